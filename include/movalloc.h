/* movalloc: a malloc whose heap lives in 2 MiB movable arenas.
 *
 * Public API. The malloc family itself is exported under its standard names
 * (malloc, free, ...); this header adds what only movalloc has: statistics, the
 * isolate/migrate/putback contract for movable memory, and synchronous compaction.
 */
#ifndef MOVALLOC_H
#define MOVALLOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOVALLOC_ARENA_SIZE ((size_t)2 << 20) /* one arena: 2 MiB, 2 MiB aligned */

/* ---------------------------------------------------------------------------
 * Statistics
 * ------------------------------------------------------------------------- */

#define MOVALLOC_STALL_BUCKETS 16 /* bucket i counts stalls < 2^i * 16 us; last is the rest */

struct movalloc_stats {
  /* heap */
  uint64_t reserved_bytes;   /* virtual address space reserved for arenas */
  uint64_t committed_bytes;  /* arenas handed out and not returned to the kernel */
  uint64_t in_use_bytes;     /* bytes in live blocks (block sizes, not request sizes) */
  uint64_t arena_count;      /* arenas holding live data */
  uint64_t arenas_cached;    /* empty arenas kept for reuse, not yet returned */
  uint64_t arenas_released;  /* arenas returned to the kernel (MADV_DONTNEED) so far */
  uint64_t huge_objects;     /* live objects in their own multi-arena span */
  uint64_t heaps;            /* thread heaps created (live and abandoned) */

  /* misuse found and survived (MOVALLOC_CHECK=1 aborts instead) */
  uint64_t invalid_frees;    /* pointers movalloc does not own, or interior pointers */
  uint64_t double_frees;

  /* huge pages */
  uint64_t huge_page_bytes;  /* arena bytes known to be backed by transparent huge pages */

  /* migration (the engine) */
  uint64_t migrated;           /* arenas moved onto a fresh huge page */
  uint64_t migrate_retries;    /* -EAGAIN outcomes (temporary) */
  uint64_t isolate_refused;    /* isolate() said no: pinned, shared, vetoed, busy */
  uint64_t migrate_failed;     /* permanent errors: arena backs off */
  uint64_t staging_failed;     /* no huge page to move onto: nothing was isolated */
  uint64_t bytes_moved;
  uint64_t stall_hist[MOVALLOC_STALL_BUCKETS]; /* isolation window lengths */
  uint64_t compact_passes;
  uint64_t compactor_cpu_ns;   /* CPU time spent by compaction */
  uint64_t vma_capped;         /* moves skipped: remap/mprotect would near vm.max_map_count */

  char backend[16];          /* "move", "remap", "collapse", "mprotect" or "off" */
  char backend_reason[112];  /* why that backend was chosen */

  /* the background compactor (zero until it starts) and partial release */
  uint64_t coverage_ppm;       /* huge_page_bytes per million bytes of arenas in use */
  uint64_t compactor_rounds;
  uint64_t compactor_throttled;  /* rounds that moved nothing: CPU budget spent */
  uint64_t compactor_thread_ns;  /* the thread's CPU time: moves, scans, decay, purges */
  uint64_t compactor_scan_ns;    /* of which rounds that moved nothing: the cost of looking */
  uint64_t compactor_wall_ns;    /* since it started: migrated / this = migrations per second */
  uint64_t purged_bytes;         /* free memory returned inside arenas: free slices
                                   (MOVALLOC_PURGE), sparse pages (MOVALLOC_PURGE_SPARSE),
                                   away threads' pages (below) */

  uint64_t realloc_moved_bytes;  /* huge objects' realloc growth done by moving pages,
                                    not copying them (the move backend's UFFDIO_MOVE) */

  uint64_t away_purged_bytes;    /* of purged_bytes: pages that other threads emptied while
                                    the thread owning them was away (blocked) */

  uint64_t trimmed_bytes;        /* of purged_bytes: free slices that arenas no huge page is
                                    meant for gave back at free (MOVALLOC_TRIM_KIB) */

  uint64_t reserved_for_growth[21]; /* zero; later counters take these slots */
};

/* Fills *out. Returns 0, or -EINVAL for a NULL pointer. Never allocates. */
int movalloc_stats_get(struct movalloc_stats *out);

/* Writes a human-readable summary to fd (what MOVALLOC_STATS=1 prints at exit).
 * Never allocates. */
void movalloc_stats_print(int fd);

/* ---------------------------------------------------------------------------
 * Movable memory: the isolate / migrate / putback contract
 *
 * This is Linux's non-LRU movable page contract (commit bda807d4) in user
 * space. A movable region is one or more 2 MiB arenas: 2 MiB aligned, private
 * anonymous memory, owned by movalloc's allocator or by the program through
 * movalloc_region_register(). Its owner supplies the ops below; the migration
 * engine (movalloc_compact() and the background compactor) drives them:
 *
 *   isolate ---false--> skipped this pass (counted as isolate_refused)
 *      |true
 *   [engine holds writers of the arena]
 *   migrate --0-------> writers released; the arena lives on a huge page
 *      |-EAGAIN         writers released, putback(), retried in a later pass
 *      |other -errno    writers released, putback(), arena backs off
 *
 * Unlike the kernel, an arena that gets -EAGAIN is not kept isolated between
 * passes: holding the program's writers that long would stall it.
 * ------------------------------------------------------------------------- */

struct movalloc_migration; /* one move in flight; valid only inside migrate() */

struct movalloc_movable_ops {
  /* Called by the engine before it holds the arena's writers. The owner stops
   * handing out new memory from [start, start + len) and returns true, or
   * returns false when the arena cannot move now (pinned, shared, busy): the
   * engine then skips it and touches nothing.
   * The callee must not block on the arena's data; it may take its own locks.
   * The caller holds no movalloc lock. Never called twice without a migrate
   * outcome or putback in between. */
  bool (*isolate)(void *ctx, void *start, size_t len);

  /* Called with the arena isolated and its writers held: any thread that
   * writes [start, start + len) now waits until the engine releases it, so
   * the callee must not write the arena and must not wait for a thread that
   * might. It may read what the arena holds, but not a page never written (a
   * read there may wait for the engine, which is the caller). To move the
   * contents the callee calls movalloc_migration_move(m) (it may do its own
   * work before and after, and may veto by not calling it); while that runs,
   * readers of the arena may wait too.
   * Returns:
   *   0        moved; the callee has resumed handing out from the arena
   *   -EAGAIN  temporary: the engine calls putback() and retries later
   *   other    permanent (-errno): putback(), and the arena backs off */
  int (*migrate)(void *ctx, struct movalloc_migration *m);

  /* Called only after isolate() returned true and migrate() failed, with the
   * arena's writers already released and its contents exactly as before. The
   * owner resumes handing out from the arena. Must not fail. */
  void (*putback)(void *ctx, void *start, size_t len);
};

/* The arena a migration is moving. */
void *movalloc_migration_start(const struct movalloc_migration *m);
size_t movalloc_migration_len(const struct movalloc_migration *m);

/* Moves the arena's contents onto the huge page the engine staged, at the same
 * virtual address, with the running backend. Returns 0, -EAGAIN (temporary:
 * pinned page, lost race) or another -errno; on failure the contents are
 * exactly as before. At most once per migrate() call. */
int movalloc_migration_move(struct movalloc_migration *m);

/* Makes [start, start + len) movable: start and len must be multiples of
 * MOVALLOC_ARENA_SIZE, the range private anonymous memory of this process, and
 * not overlap a registered region or movalloc's own heap. ops must stay valid
 * until the region is unregistered.
 * Returns 0, -EINVAL (alignment, overlap, NULL ops), -ENOSPC (too many regions). */
int movalloc_region_register(void *start, size_t len,
                             const struct movalloc_movable_ops *ops, void *ctx);

/* Retires a region: waits for a migration of it in flight to finish, then
 * forgets it. Returns 0 or -ENOENT. */
int movalloc_region_unregister(void *start);

/* Flags for movalloc_compact(). */
#define MOVALLOC_COMPACT_ALL 1u /* also arenas already on huge pages or sparse */

/* Migrates every eligible arena (heap arenas and registered regions) now, on
 * the calling thread. Returns how many arenas moved, or -errno: -ENOSYS when
 * the backend is "off", -EBUSY when called from inside an ops callback. */
int movalloc_compact(unsigned flags);

/* ---------------------------------------------------------------------------
 * Allocation-site profiler (MOVALLOC_PROFILE=on or a mean sampling interval in
 * bytes). One allocation per that many bytes allocated, on average, is sampled
 * with its stack; each sample stands for size / (1 - exp(-size / rate)) bytes,
 * so the per-site figures below are unbiased estimates. All of these return
 * -ENOSYS when profiling is off.
 * ------------------------------------------------------------------------- */

#define MOVALLOC_PROFILE_DEPTH 32    /* frames kept per site */
#define MOVALLOC_LIFETIME_BUCKETS 7  /* freed samples that lived < 1 ms, < 10 ms, ...
                                        < 100 s (bucket i: < 10^i ms), and the rest */

struct movalloc_profile_site {
  uint64_t live_bytes;       /* estimated bytes allocated here and not freed */
  uint64_t live_objects;     /* estimated objects, same */
  uint64_t alloc_bytes;      /* estimated bytes ever allocated here */
  uint64_t allocs;           /* estimated allocations */
  uint64_t samples;          /* sampled allocations */
  uint64_t live_samples;     /* of which not freed yet */
  /* Where a sample's allocation went: the arena of its size's serving page (a
   * sampled block itself lives apart, with the other samples). */
  uint64_t sparse_bytes;     /* of live_bytes: in arenas less than half in use */
  uint64_t small_page_bytes; /* of live_bytes: in arenas not on a huge page */
  uint64_t long_lived_samples; /* samples still live, or that lived 10 s or more */
  uint64_t lifetime[MOVALLOC_LIFETIME_BUCKETS]; /* freed samples by lifetime */
  unsigned depth;            /* frames[0 .. depth) */
  void *frames[MOVALLOC_PROFILE_DEPTH]; /* return addresses, the caller of malloc first */
};

/* The sites, largest estimated live bytes first, into out[0 .. max). Returns
 * how many sites there are (may exceed max), or -ENOSYS. Never allocates. */
int movalloc_profile_sites(struct movalloc_profile_site *out, size_t max);

/* Writes the top sites by live bytes with symbolized frames to fd (what
 * MOVALLOC_PROFILE prints at exit). Returns 0 or -errno. */
int movalloc_profile_report(int fd, unsigned top);

/* Writes live bytes per site as folded stacks ("outer;...;inner bytes" lines,
 * what flamegraph.pl and speedscope read) to path, created mode 0600 (what
 * MOVALLOC_PROFILE_OUT gets at exit). Returns 0 or -errno. */
int movalloc_profile_dump(const char *path);

#ifdef __cplusplus
}
#endif

#endif /* MOVALLOC_H */
