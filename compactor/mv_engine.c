/* The migration engine (see mv_engine.h and the contract in include/movalloc.h).
 *
 * One migration, for one 2 MiB arena:
 *   stage      fault a huge page to move onto; none: -EAGAIN, nothing isolated
 *   isolate    the owner stops handing out from the arena (may refuse)
 *   hold       the backend holds the arena's writers
 *   migrate    the owner's callback; it calls movalloc_migration_move()
 *   release    held writers run again
 *   putback    only when migrate failed
 * No allocator lock is held between hold and release: the engine lock is the
 * engine's own, and the callbacks of movalloc's arenas touch only descriptors.
 */
#include "compactor/mv_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_lock.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"
#include "shim/mv_channel.h"
#include "shim/mv_init.h"
#include "shim/mv_options.h"

#define MV_PASSES 3                         /* bounded retry, like migrate_pages() */
#define MV_BACKOFF_NS (10ull * 1000000000u) /* after a permanent failure */
#define MV_MAX_REGIONS 64
#define MV_SETTLE_NS (1000ull * 1000000u)   /* no new pages for this long: settled */

struct movalloc_migration {
  struct mv_move move;
  const struct mv_backend *backend;
  bool move_called;
};

/* A registered third-party region. Slots are reused; ops == NULL is free. */
struct region {
  uintptr_t start;
  size_t len;
  const struct movalloc_movable_ops *ops;
  void *ctx;
  uint64_t backoff_until_ns;
};

mv_lock_t mv_engine_lock = MV_LOCK_INIT; /* one compaction at a time; the regions */
mv_lock_t mv_engine_choice_lock = MV_LOCK_INIT;
static const struct mv_backend *backend; /* chosen lazily: probing costs a few ms */
static char backend_reason[112];
static struct region regions[MV_MAX_REGIONS];
static enum mv_move_step inject_step;    /* tests: fail every move at this step */
static __thread bool in_callback;

static struct {
  _Atomic uint64_t migrated, retries, refused, failed, staging_failed, bytes, passes, cpu_ns;
  _Atomic uint64_t vma_capped, realloc_moved;
  _Atomic uint64_t stall_hist[MOVALLOC_STALL_BUCKETS];
} counters;

enum outcome { MOVED, RETRY, REFUSED, FAILED };

/* MOVALLOC_TRACE: one CSV line per migration, written whole with O_APPEND so
 * lines from several processes sharing the file do not interleave. Off: one
 * load and branch per migration. */
static int trace_fd = -1;

void mv_engine_trace_open(void) {
  if (trace_fd >= 0) close(trace_fd);
  trace_fd = -1;
  if (!mv_options.trace) return;
  char why[192];
  trace_fd = mv_os_open_private(mv_options.trace, why, sizeof why);
  if (trace_fd < 0) {
    mv_log("MOVALLOC_TRACE=%s: %s; no trace", mv_options.trace, why);
    return;
  }
  struct stat st;
  if (fstat(trace_fd, &st) == 0 && st.st_size == 0)
    mv_dprintf(trace_fd, "time_ns,pid,arena,backend,outcome,rc,bytes,stall_us\n");
}

/* Indexed by enum outcome. */
static const char *const outcome_names[] = {"moved", "retry", "refused", "failed"};

static void trace_migration(const struct mv_backend *b, uintptr_t start, enum outcome outcome,
                            int rc, uint64_t stall_ns) {
  mv_channel_event(b->name, start, outcome, rc, stall_ns); /* the inspection channel's ring */
  if (trace_fd < 0) return;
  mv_dprintf(trace_fd, "%llu,%d,%p,%s,%s,%d,%zu,%llu\n", (unsigned long long)mv_os_now_ns(),
             (int)getpid(), (void *)start, b->name, outcome_names[outcome], rc,
             outcome == MOVED ? MV_ARENA_SIZE : (size_t)0, (unsigned long long)(stall_ns / 1000));
}

/* ---- backend ---- */

static const struct mv_backend *engine_backend(void) {
  const struct mv_backend *b = __atomic_load_n(&backend, __ATOMIC_ACQUIRE);
  if (b) return b;
  mv_lock(&mv_engine_choice_lock);
  if (!(b = __atomic_load_n(&backend, __ATOMIC_RELAXED))) {
    mv_engine_trace_open();
    b = mv_backend_select((enum mv_backend_kind)mv_options.migrate, backend_reason,
                          sizeof backend_reason);
    __atomic_store_n(&backend, b, __ATOMIC_RELEASE); /* after its reason: mv_engine_stats */
    if (mv_options.verbose) mv_log("migration backend %s: %s", b->name, backend_reason);
  }
  mv_unlock(&mv_engine_choice_lock);
  return b;
}

void mv_engine_start(void) {
  if (mv_options.verbose || mv_options.compact_stress) engine_backend();
}

bool mv_engine_backend_chosen(void) { return __atomic_load_n(&backend, __ATOMIC_ACQUIRE) != NULL; }

void mv_engine_open_ahead(void) {
  const struct mv_backend *b = __atomic_load_n(&backend, __ATOMIC_ACQUIRE);
  if (b && b->kind == MV_BACKEND_OFF) return;
  if (b && (b->kind == MV_BACKEND_MOVE || b->kind == MV_BACKEND_REMAP)) mv_uffd_get();
  /* What tells huge pages and reads arenas without faulting (mv_thp.c); a
   * backend may use fewer. */
  static const enum mv_kept proc_files[] = {MV_KEPT_PAGEMAP, MV_KEPT_KPAGEFLAGS, MV_KEPT_SMAPS,
                                            MV_KEPT_MAPS, MV_KEPT_MEM};
  for (size_t i = 0; i < sizeof proc_files / sizeof proc_files[0]; i++) mv_proc_fd(proc_files[i]);
}

void mv_engine_use_backend(const struct mv_backend *b, enum mv_move_step fail_at) {
  mv_lock(&mv_engine_lock);
  backend = b;
  mv_snprintf(backend_reason, sizeof backend_reason, "set by a test");
  inject_step = fail_at;
  mv_unlock(&mv_engine_lock);
}

/* ---- the public migration handle ---- */

MV_EXPORT void *movalloc_migration_start(const struct movalloc_migration *m) {
  return (void *)m->move.start;
}

MV_EXPORT size_t movalloc_migration_len(const struct movalloc_migration *m) {
  return MV_ARENA_SIZE;
}

MV_EXPORT int movalloc_migration_move(struct movalloc_migration *m) {
  if (m->move_called) return -EINVAL;
  m->move_called = true;
  int rc = m->backend->move(&m->move);
  if (rc == 0) atomic_fetch_add(&counters.bytes, MV_ARENA_SIZE);
  return rc;
}

/* ---- movalloc's own arenas as movable memory ---- */

static bool heap_isolate(void *ctx, void *start, size_t len) {
  return mv_arena_isolate(mv_arena_of((uintptr_t)start));
}

static int heap_migrate(void *ctx, struct movalloc_migration *m) {
  mv_arena_t *a = mv_arena_of(m->move.start);
  mv_arena_set_migrating(a, true);
  int rc = movalloc_migration_move(m);
  if (rc != 0) {
    mv_arena_set_migrating(a, false);
    return rc;
  }
  mv_arena_unisolate(a, true); /* descriptors only: fine with writers held */
  return 0;
}

static void heap_putback(void *ctx, void *start, size_t len) {
  mv_arena_unisolate(mv_arena_of((uintptr_t)start), false);
}

static const struct movalloc_movable_ops heap_ops = {
    .isolate = heap_isolate,
    .migrate = heap_migrate,
    .putback = heap_putback,
};

/* ---- one migration ---- */

static void count_stall(uint64_t ns) {
  uint64_t us16 = ns / 16000;
  unsigned bucket = 0;
  while (bucket + 1 < MOVALLOC_STALL_BUCKETS && us16 >= (1ull << bucket)) bucket++;
  atomic_fetch_add(&counters.stall_hist[bucket], 1);
}

/* Staging failures in a row in this compact_locked call (engine lock). After
 * MV_STAGING_GIVE_UP the kernel has no huge page to give for now (fragmented
 * memory): every further try would cost a failed THP fault, often with direct
 * compaction, for nothing. The call ends; the next one tries again. */
#define MV_STAGING_GIVE_UP 4
static unsigned staging_misses;

/* From hold to release (or putback) the arena's writers wait, and under the
 * move backend its pages may be missing: a signal handler that ran on the
 * engine's thread then and touched the arena would wait for the engine, that
 * is for itself. The compactor's thread blocks signals for good; a program's
 * thread in movalloc_compact defers them (but those a fault raises) until the
 * window closes. (tests/fuzz: libFuzzer's alarm handler read its own heap in
 * an arena the move backend had emptied, and hung.) */
static void defer_signals(sigset_t *saved) {
  sigset_t all;
  sigfillset(&all);
  sigdelset(&all, SIGSEGV);
  sigdelset(&all, SIGBUS);
  sigdelset(&all, SIGILL);
  sigdelset(&all, SIGFPE);
  sigdelset(&all, SIGTRAP);
  pthread_sigmask(SIG_BLOCK, &all, saved);
}

static enum outcome migrate_one(const struct mv_backend *b,
                                const struct movalloc_movable_ops *ops, void *ctx,
                                uintptr_t start) {
  struct movalloc_migration m;
  memset(&m, 0, sizeof m);
  m.move.start = start;
  m.move.fail_at = inject_step;
  m.backend = b;
  if (b->stage(&m.move) != 0) {
    atomic_fetch_add(&counters.staging_failed, 1);
    staging_misses++;
    trace_migration(b, start, RETRY, -EAGAIN, 0);
    return RETRY;
  }
  staging_misses = 0;
  in_callback = true;
  bool isolated = ops->isolate(ctx, (void *)start, MV_ARENA_SIZE);
  in_callback = false;
  if (!isolated) {
    b->unstage(&m.move);
    atomic_fetch_add(&counters.refused, 1);
    trace_migration(b, start, REFUSED, 0, 0);
    return REFUSED;
  }
  uint64_t t0 = mv_os_now_ns(), stall = 0;
  sigset_t saved;
  defer_signals(&saved);
  int rc = b->hold(&m.move);
  if (rc == 0) {
    in_callback = true;
    rc = ops->migrate(ctx, &m);
    in_callback = false;
    b->release(&m.move);
    /* Writers wait from held_at_ns; a pre-copy before it let them run. */
    stall = mv_os_now_ns() - (m.move.held_at_ns ? m.move.held_at_ns : t0);
    count_stall(stall);
  }
  if (rc != 0) {
    in_callback = true;
    ops->putback(ctx, (void *)start, MV_ARENA_SIZE);
    in_callback = false;
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
  b->unstage(&m.move);
  enum outcome o = rc == 0 ? MOVED : rc == -EAGAIN ? RETRY : FAILED;
  atomic_fetch_add(o == MOVED ? &counters.migrated : o == RETRY ? &counters.retries : &counters.failed, 1);
  trace_migration(b, start, o, rc, stall);
  return o;
}

/* ---- which arenas ---- */

/* remap and mprotect leave each moved arena its own VMA (mv_backend.h). They
 * stop at half of vm.max_map_count, which leaves the program the other half. */
static bool vma_budget_left(const struct mv_backend *b) {
  if (b->kind != MV_BACKEND_REMAP && b->kind != MV_BACKEND_MPROTECT) return true;
  static size_t cap;
  if (!cap) {
    char buf[32];
    long max = 65530;
    if (mv_os_read_file("/proc/sys/vm/max_map_count", buf, sizeof buf) > 0) {
      long v = 0;
      for (const char *c = buf; *c >= '0' && *c <= '9'; c++) v = v * 10 + (*c - '0');
      if (v > 0) max = v;
    }
    cap = (size_t)max / 2;
  }
  if (mv_backend_remap_vmas() + 2 <= cap) return true;
  atomic_fetch_add(&counters.vma_capped, 1);
  return false;
}

static bool dense_enough(uintptr_t start, unsigned flags) {
  if (flags & MOVALLOC_COMPACT_ALL) return true;
  long resident = mv_thp_resident_pages(start, MV_ARENA_SIZE);
  /* MOVALLOC_COMPACT_DENSITY: a huge page adds at most the rest to RSS. */
  return resident * 100 >= (long)(MV_ARENA_SIZE / 4096) * (long)mv_options.compact_density;
}

static bool heap_arena_eligible(mv_arena_t *a, unsigned flags, uint64_t now) {
  if (atomic_load_explicit(&a->state, memory_order_relaxed) != MV_ARENA_ACTIVE) return false;
  if (!a->committed || now < a->backoff_until_ns) return false;
  uintptr_t start = mv_heap_base + ((uintptr_t)a->index << MV_ARENA_SHIFT);
  if (!(flags & MOVALLOC_COMPACT_ALL)) {
    if (a->thp) return false;
    /* Still filling: moving it now would fault its rest in as 4 KiB pages anyway
     * (and the program is busy). */
    if (flags & MV_COMPACT_SETTLED && now - a->placed_ns < MV_SETTLE_NS) return false;
    if (!dense_enough(start, flags)) return false;
    if (mv_thp_is_huge(start) == 1) { /* got one at fault time, or from khugepaged */
      a->thp = true;
      return false;
    }
  }
  return true;
}

/* Runs MV_PASSES passes over every eligible arena, stopping after max_moves
 * moves; returns how many moved. */
static int compact_locked(unsigned flags, int max_moves) {
  uint64_t cpu0 = mv_os_thread_cpu_ns();
  int moved = 0;
  uint32_t n = mv_arena_frontier();
  /* Arenas refused, failed or moved in this call are not tried again in it:
   * a->engine_gen == gen for movalloc's, skip_region for regions (the first 64
   * arenas of each; later ones are only tried again while still not huge). */
  static uint32_t gen;
  gen++;
  uint8_t skip_region[MV_MAX_REGIONS][64];
  memset(skip_region, 0, sizeof skip_region);
  staging_misses = 0;
  /* UFFDIO_MOVE refuses pages that are not exclusively the process's: shared
   * with a child after fork(), and even after the child is gone, until the
   * program writes them again. The last pass gives arenas the move backend keeps
   * refusing to MADV_COLLAPSE, which copies instead (and is pin-safe too). */
  const struct mv_backend *last_pass = backend;
  if (backend->kind == MV_BACKEND_MOVE) {
    const struct mv_backend *c = mv_backend_select(MV_BACKEND_COLLAPSE, NULL, 0);
    if (c->kind == MV_BACKEND_COLLAPSE) last_pass = c;
  }
  for (int pass = 0; pass < MV_PASSES; pass++) {
    const struct mv_backend *b = pass == MV_PASSES - 1 ? last_pass : backend;
    atomic_fetch_add(&counters.passes, 1);
    bool again = false;
    uint64_t now = mv_os_now_ns();
    for (uint32_t i = 0; i < n; i++) {
      mv_arena_t *a = &mv_arenas[i];
      if (moved >= max_moves) break;
      if (a->engine_gen == gen || !heap_arena_eligible(a, flags, now)) continue;
      if (!vma_budget_left(b)) break;
      enum outcome o = migrate_one(b, &heap_ops, NULL, mv_heap_base + ((uintptr_t)i << MV_ARENA_SHIFT));
      if (o == MOVED) moved++;
      if (o == FAILED) a->backoff_until_ns = now + MV_BACKOFF_NS;
      if (o == RETRY) again = true;
      else a->engine_gen = gen;
      if (staging_misses >= MV_STAGING_GIVE_UP) goto out;
    }
    for (int r = 0; r < MV_MAX_REGIONS; r++) {
      struct region *reg = &regions[r];
      if (!reg->ops || now < reg->backoff_until_ns) continue;
      size_t arenas = reg->len >> MV_ARENA_SHIFT;
      for (size_t k = 0; k < arenas && moved < max_moves; k++) {
        uintptr_t start = reg->start + (k << MV_ARENA_SHIFT);
        bool tracked_k = k < sizeof skip_region[r];
        if (tracked_k && skip_region[r][k]) continue;
        if (!(flags & MOVALLOC_COMPACT_ALL) && mv_thp_is_huge(start) == 1) continue;
        if (!vma_budget_left(b)) break;
        enum outcome o = migrate_one(b, reg->ops, reg->ctx, start);
        if (o == MOVED) moved++;
        if (o == FAILED) reg->backoff_until_ns = now + MV_BACKOFF_NS;
        if (o == RETRY) again = true;
        else if (tracked_k) skip_region[r][k] = 1;
        if (staging_misses >= MV_STAGING_GIVE_UP) goto out;
      }
    }
    if (!again || moved >= max_moves) break;
  }
out:
  atomic_fetch_add(&counters.cpu_ns, mv_os_thread_cpu_ns() - cpu0);
  return moved;
}

int mv_engine_compact(unsigned flags, int max_moves) {
  if (in_callback) return -EBUSY;
  if (!mv_ensure_init()) return -ENOMEM;
  mv_lock(&mv_engine_lock);
  const struct mv_backend *b = engine_backend();
  int rc = b->kind == MV_BACKEND_OFF ? -ENOSYS : compact_locked(flags, max_moves);
  mv_unlock(&mv_engine_lock);
  return rc;
}

MV_EXPORT int movalloc_compact(unsigned flags) { return mv_engine_compact(flags, INT32_MAX); }

/* ---- realloc of huge objects ---- */

/* Moves the arena at src to dst, engine lock held: UFFDIO_MOVE moves only into
 * holes of a range registered on the userfaultfd, and refuses pages it cannot
 * take (pinned, shared with a fork() child, mlock()ed on one side only).
 * Returns the bytes moved, a prefix of the arena. */
static size_t move_arena(uintptr_t dst, uintptr_t src) {
  if (mv_uffd_register(dst, MV_ARENA_SIZE, true, false) != 0) return 0;
  int err;
  size_t n = mv_uffd_move(dst, src, MV_ARENA_SIZE,
                          UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | UFFDIO_MOVE_MODE_DONTWAKE, &err);
  /* Before the caller copies the rest: a write to a hole of a range
   * registered MISSING would wait for a wake nobody sends. */
  mv_uffd_unregister_held(dst, MV_ARENA_SIZE, "realloc");
  return n;
}

/* Whether the arena at src is better moved to dst than copied: when it is a
 * huge page, which moves as one PMD instead of 2 MiB of copying. Small pages
 * would stay small if moved, while a copy into fresh memory gets a huge page
 * at fault time where the kernel has one (bench/wl_hugegrow runs in half the
 * time of copying everything when huge pages alone move, and in 1.5 times it
 * when small pages move too). UFFDIO_MOVE fills holes only: whatever dst holds
 * (an arena cached for reuse) is dropped first; an mlock()ed dst refuses that,
 * and takes the copy. */
static bool worth_moving(uintptr_t dst, uintptr_t src) {
  return mv_thp_is_huge(src) == 1 && mv_os_madvise((void *)dst, MV_ARENA_SIZE, MADV_DONTNEED) == 0;
}

/* The lock is taken per arena and never waited for: a compaction in progress
 * (it may be moving this very arena) or this thread inside the engine already
 * (a signal handler's realloc) means a copy. */
static size_t move_or_copy_arena(uintptr_t dst, uintptr_t src) {
  size_t n = 0;
  if (!in_callback && mv_lock_try(&mv_engine_lock)) {
    if (engine_backend()->kind == MV_BACKEND_MOVE && worth_moving(dst, src))
      n = move_arena(dst, src);
    mv_unlock(&mv_engine_lock);
  }
  memcpy((char *)dst + n, (const char *)src + n, MV_ARENA_SIZE - n);
  return n;
}

size_t mv_engine_move_span(void *dst, const void *src, size_t len) {
  size_t off = 0, moved = 0;
  for (; off + MV_ARENA_SIZE <= len; off += MV_ARENA_SIZE)
    moved += move_or_copy_arena((uintptr_t)dst + off, (uintptr_t)src + off);
  memcpy((char *)dst + off, (const char *)src + off, len - off);
  if (moved) atomic_fetch_add_explicit(&counters.realloc_moved, moved, memory_order_relaxed);
  return moved;
}

/* ---- third-party regions ---- */

static bool overlaps(uintptr_t a, size_t alen, uintptr_t b, size_t blen) {
  return a < b + blen && b < a + alen;
}

MV_EXPORT int movalloc_region_register(void *start, size_t len,
                                       const struct movalloc_movable_ops *ops, void *ctx) {
  uintptr_t s = (uintptr_t)start;
  if (!ops || !ops->isolate || !ops->migrate || !ops->putback || len == 0 ||
      (s | len) & (MV_ARENA_SIZE - 1))
    return -EINVAL;
  if (mv_arenas && overlaps(s, len, mv_heap_base, mv_arena_reserved_bytes())) return -EINVAL;
  mv_lock(&mv_engine_lock);
  int rc = -ENOSPC;
  struct region *slot = NULL;
  for (int r = 0; r < MV_MAX_REGIONS; r++) {
    if (regions[r].ops && overlaps(s, len, regions[r].start, regions[r].len)) {
      rc = -EINVAL;
      slot = NULL;
      break;
    }
    if (!regions[r].ops && !slot) slot = &regions[r];
  }
  if (slot) {
    *slot = (struct region){.start = s, .len = len, .ops = ops, .ctx = ctx};
    rc = 0;
  }
  mv_unlock(&mv_engine_lock);
  return rc;
}

MV_EXPORT int movalloc_region_unregister(void *start) {
  mv_lock(&mv_engine_lock); /* a migration of it in flight finishes first */
  int rc = -ENOENT;
  for (int r = 0; r < MV_MAX_REGIONS; r++)
    if (regions[r].ops && regions[r].start == (uintptr_t)start) {
      regions[r].ops = NULL;
      rc = 0;
      break;
    }
  mv_unlock(&mv_engine_lock);
  return rc;
}

/* ---- fork and statistics ---- */

void mv_engine_fork_child(void) {
  mv_backend_fork_child();
  mv_compactor_fork_child();
}

void mv_engine_stats(struct movalloc_stats *out) {
  const struct mv_backend *b = engine_backend();
  out->migrated = atomic_load(&counters.migrated);
  out->migrate_retries = atomic_load(&counters.retries);
  out->isolate_refused = atomic_load(&counters.refused);
  out->migrate_failed = atomic_load(&counters.failed);
  out->staging_failed = atomic_load(&counters.staging_failed);
  out->bytes_moved = atomic_load(&counters.bytes);
  out->compact_passes = atomic_load(&counters.passes);
  out->compactor_cpu_ns = atomic_load(&counters.cpu_ns);
  out->vma_capped = atomic_load(&counters.vma_capped);
  out->realloc_moved_bytes = atomic_load(&counters.realloc_moved);
  for (int i = 0; i < MOVALLOC_STALL_BUCKETS; i++)
    out->stall_hist[i] = atomic_load(&counters.stall_hist[i]);
  mv_snprintf(out->backend, sizeof out->backend, "%s", b->name);
  mv_snprintf(out->backend_reason, sizeof out->backend_reason, "%s", backend_reason);
}
