/* Arena management beyond the allocation paths of mv_alloc.h: what the engine
 * and the statistics need. */
#ifndef MV_ARENA_H
#define MV_ARENA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arena/mv_lock.h"
#include "arena/mv_types.h"

extern mv_lock_t mv_arena_lock;

struct mv_arena_counts {
  uint64_t frontier;     /* arenas ever handed out */
  uint64_t active;       /* not FREE */
  uint64_t committed;    /* may have resident pages */
  uint64_t cached;       /* FREE and committed */
  uint64_t released;     /* releases so far */
  uint64_t huge_objects;
  uint64_t thp;          /* active arenas known to sit on a huge page */
  uint64_t purged_bytes; /* free memory returned inside arenas so far: free slices
                            (MOVALLOC_PURGE), sparse pages' 4 KiB pages
                            (MOVALLOC_PURGE_SPARSE), whole pages (mv_arena_purge_page) */
  uint64_t page_purged_bytes; /* of which whole pages */
  uint64_t trimmed_bytes;     /* of which free slices past MOVALLOC_TRIM_KIB (mv_arena.c) */
};

void mv_arena_counts(struct mv_arena_counts *out);

/* Releases cached empty arenas unused for a second (the compactor calls it
 * every round; allocation paths call it too when no compactor runs). */
void mv_arena_decay(void);
size_t mv_arena_reserved_bytes(void);

/* MADV_DONTNEED of the free slices inside active arenas that are not known to
 * be zero (breaking their huge pages); returns the bytes released. Only the
 * purge rule (MOVALLOC_PURGE) calls it. */
size_t mv_arena_purge(void);
/* mallopt(M_TRIM_THRESHOLD): MOVALLOC_TRIM_KIB from now on, in bytes (rounded
 * down to KiB; an arena's size and more: never). */
void mv_arena_set_trim_threshold(size_t bytes);
/* MADV_DONTNEED of the 4 KiB pages of a one-slice small page whose bits are set
 * in os_pages (MOVALLOC_PURGE_SPARSE), while its arena is ACTIVE; returns the
 * bits done. The caller owns the page and keeps every block overlapping them
 * off its lists. */
uint16_t mv_arena_purge_os_pages(const mv_page_t *page, uint16_t os_pages);
/* MADV_DONTNEED of a whole small page none of whose blocks is in use, while its
 * arena is ACTIVE (else, or if the kernel refuses, the page stays as it was).
 * The caller keeps everyone off the page's data meanwhile (mv_heap.c,
 * page_reclaim). */
void mv_arena_purge_page(const mv_page_t *page);
uint32_t mv_arena_frontier(void);

/* fork() child, mv_arena_lock reinitialised: the arenas another thread was
 * releasing (tagged, not yet madvised) have no thread to finish that here, and
 * go back to the free arenas as they are. A release the forking thread itself
 * was in (fork from a signal handler) is left to it. */
void mv_arena_fork_child(void);

/* The engine's transitions (see the state diagram in mv_types.h).
 * mv_arena_isolate: ACTIVE -> ISOLATED and off the placement lists; false if the
 * arena was not ACTIVE. mv_arena_unisolate: back to ACTIVE after a move
 * (moved = true, from MIGRATING) or a putback (from ISOLATED); an arena that
 * emptied meanwhile is freed then. */
bool mv_arena_isolate(mv_arena_t *a);
/* Arenas isolated or migrating now. While 0, every arena holding pages is
 * ACTIVE: the heaps' slow paths then skip loading each page's arena state (two
 * cache misses a page on the way to a malloc). */
extern _Atomic(uint32_t) mv_arenas_isolated;
void mv_arena_set_migrating(mv_arena_t *a, bool migrating);
void mv_arena_unisolate(mv_arena_t *a, bool moved);
void mv_arena_state_violation(const mv_arena_t *a, int to) __attribute__((noreturn, cold));

#endif /* MV_ARENA_H */
