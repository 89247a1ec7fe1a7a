/* The migration engine: drives the isolate/migrate/putback ops of movalloc's own
 * arenas and of registered regions with the backend chosen at start-up, the way
 * the kernel's migrate_pages() drives movable pages: a fixed number of passes,
 * -EAGAIN retried in the next pass, any other error sent back, every outcome
 * counted. */
#ifndef MV_ENGINE_H
#define MV_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "arena/mv_lock.h"
#include "compactor/mv_backend.h"
#include "include/movalloc.h"

/* Called once, after start-up. Chooses the backend (MOVALLOC_MIGRATE, probing
 * the kernel) there only to say which (MOVALLOC_VERBOSE) or under
 * MOVALLOC_COMPACT_STRESS, whose compactor starts with the first allocation:
 * the probe's descriptors then come and go before the program runs. Otherwise
 * the first move chooses, on the compactor's thread: probing takes 1-7 ms,
 * which no allocation should wait for. */
void mv_engine_start(void);

/* Held for a whole compaction and by registration. fork()'s prepare handler
 * takes it first (mv_lock.h), so no migration is in flight across fork(). */
extern mv_lock_t mv_engine_lock;

/* Held while the backend is chosen, which the compactor does under
 * mv_engine_lock and movalloc_stats_get without it: one thread opens the
 * MOVALLOC_TRACE file and writes the reason. fork() takes it second, so that
 * a child never starts with a choice half made. */
extern mv_lock_t mv_engine_choice_lock;

/* In the child after fork(): drops the parent's userfaultfd. */
void mv_engine_fork_child(void);

/* (Re)opens the MOVALLOC_TRACE file named in mv_options.trace (tests set it). */
void mv_engine_trace_open(void);

/* Tests: use this backend and inject a failure at one step of every move. */
void mv_engine_use_backend(const struct mv_backend *b, enum mv_move_step fail_at);

/* Also a flag for mv_engine_compact (the compactor's): only arenas that got no
 * new pages in the last second. */
#define MV_COMPACT_SETTLED 0x100u

/* movalloc_compact() with a cap on how many arenas move (the compactor's
 * budget). Returns how many moved, or -errno as movalloc_compact(). */
int mv_engine_compact(unsigned flags, int max_moves);

/* Whether the backend was chosen (the kernel probed) yet. */
bool mv_engine_backend_chosen(void);

/* Opens the descriptors the engine keeps, on the calling thread
 * (mv_compactor_poke): the /proc files it reads, and the userfaultfd once the
 * backend is chosen; it does not choose it (see mv_engine_start). */
void mv_engine_open_ahead(void);

/* The background compactor (mv_compactor.c). mv_compactor_poke() is cheap and
 * called by the allocator when its heap grows: it starts the thread once the
 * heap is big enough to be worth it, if MOVALLOC_COMPACT allows. */
void mv_compactor_poke(void);
void mv_compactor_fork_child(void);
bool mv_compactor_running(void);
/* The compactor's counters into *out (movalloc_stats_get). */
void mv_compactor_stats(struct movalloc_stats *out);

/* realloc of a huge object that cannot grow in place: makes dst hold the len
 * bytes at src, both 2 MiB aligned. An arena of src on a huge page moves
 * (UFFDIO_MOVE: the PMD changes hands, nothing is copied) when the move backend
 * is in use, the engine is idle and the kernel allows it (not pinned, not
 * shared with a fork() child, not mlock()ed); the rest is copied. Afterwards
 * src's contents are undefined. The caller owns both ranges: no other thread
 * touches them meanwhile. Returns the bytes moved. */
size_t mv_engine_move_span(void *dst, const void *src, size_t len);

/* Copies the engine's counters, backend name and reason into *out. */
void mv_engine_stats(struct movalloc_stats *out);

#endif /* MV_ENGINE_H */
