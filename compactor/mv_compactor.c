/* The background compactor: the "VM" side of the contract. It wakes up every
 * period, returns cached empty arenas nobody reused to the kernel, purges free
 * slices inside arenas when MOVALLOC_PURGE says so, and moves the arenas that
 * gain from a huge page (dense, settled, not yet huge, not backing off)
 * through the engine, within a bandwidth budget and a CPU budget measured with
 * its own thread's CPU clock (mv_policy.h).
 *
 * Started lazily, once the heap is big enough to be worth it (small programs
 * never get a thread), with every signal blocked so the program's signals go to
 * the program's threads. fork(): the child has no compactor thread; its next
 * poke starts one. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_engine.h"
#include "compactor/mv_policy.h"
#include "shim/mv_channel.h"
#include "shim/mv_options.h"

#define MV_COMPACTOR_MIN_ARENAS 8 /* 16 MiB of heap before a thread is worth it */

enum { IDLE, STARTING, RUNNING, FAILED };
static _Atomic(int) state = IDLE;

/* True when every other thread of the process has exited (main included, by
 * pthread_exit): then the compactor must not be what keeps the process alive.
 * A thread other than main that exits leaves /proc/self/task; main stays there
 * as a zombie until the process ends, and its state is in /proc/self/stat.
 * Both are kept open (no descriptor of ours appears at a low number for an
 * instant every check, where a program listing its descriptors would see it);
 * getdents64 and small reads: no malloc. Not sure means not alone. */
static bool alone(void) {
  int dir = mv_proc_fd(MV_KEPT_TASKS);
  if (dir < 0 || lseek(dir, 0, SEEK_SET) != 0) return false;
  int me = mv_os_gettid(), main_tid = getpid();
  char buf[4096];
  long n;
  while ((n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
    for (long off = 0; off < n;) {
      struct dirent64 *d = (struct dirent64 *)(buf + off);
      off += d->d_reclen;
      int tid = 0;
      for (const char *c = d->d_name; *c >= '0' && *c <= '9'; c++) tid = tid * 10 + (*c - '0');
      if (tid != 0 && tid != me && tid != main_tid) return false;
    }
  }
  if (n < 0) return false;
  char stat[512];
  if (mv_proc_read(MV_KEPT_STAT, stat, sizeof stat) <= 0) return false;
  const char *end = strrchr(stat, ')');
  return end && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X');
}

static void sleep_ms(unsigned ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

/* The compactor's own counters (movalloc_stats); written by its thread only. */
static struct {
  _Atomic uint64_t rounds, throttled, thread_ns, scan_ns, started_ns;
} stats;

#define MV_FIRST_COST_NS 2000000u /* CPU per move assumed before one is measured */

static bool pressure_now(void) {
  char buf[4096];
  uint64_t avail, total;
  return mv_proc_read(MV_KEPT_MEMINFO, buf, sizeof buf) > 0 &&
         mv_policy_parse_meminfo(buf, &avail, &total) &&
         mv_policy_under_pressure(avail, total, mv_options.purge_free_pct);
}

static void *compactor_main(void *unused) {
  unsigned period = mv_options.compact_stress ? 10 : mv_options.compact_period_ms;
  unsigned flags = mv_options.compact_stress ? MOVALLOC_COMPACT_ALL : MV_COMPACT_SETTLED;
  /* The bandwidth budget in arenas per period, at least one. */
  uint64_t per_period = (uint64_t)mv_options.compact_mbps * period / 1000 / 2;
  int max_moves = mv_options.compact_stress ? INT32_MAX : (int)(per_period ? per_period : 1);
  struct mv_cpu_budget budget;
  mv_budget_init(&budget, mv_options.compact_cpu_pct, MV_BUDGET_WINDOW_NS);
  /* What one move costs this thread (staging fault, copy, the scan around it),
   * measured: a moving average over the rounds that moved something. */
  uint64_t cost_per_move = MV_FIRST_COST_NS;
  /* false with the "off" backend or MOVALLOC_THP=never: then it only decays */
  bool can_move = mv_options.thp != MV_THP_NEVER;
  uint64_t last_alone_check = 0, last = mv_os_now_ns();
  atomic_store(&stats.started_ns, last);
  for (;;) {
    sleep_ms(period);
    /* POSIX: the process exits (status 0) when its last thread ends; the last
     * program thread may be waiting on this one to go. */
    uint64_t now = mv_os_now_ns();
    if (now - last_alone_check > 200000000u) {
      last_alone_check = now;
      if (alone()) pthread_exit(NULL);
    }
    mv_budget_earn(&budget, now - last);
    last = now;
    uint64_t cpu0 = mv_os_thread_cpu_ns();
    mv_arena_decay();
    if (mv_policy_should_purge(mv_options.purge, pressure_now)) {
      mv_arena_purge();
      mv_heap_request_sweep(); /* sparse pages: only their owners may touch their lists */
    }
    int moved = 0;
    if (can_move) {
      int allowed = mv_options.compact_stress ? max_moves
                                              : mv_budget_moves(&budget, cost_per_move, max_moves);
      if (allowed == 0) {
        atomic_fetch_add(&stats.throttled, 1);
      } else {
        int rc = mv_engine_compact(flags, allowed);
        can_move = rc != -ENOSYS;
        moved = rc > 0 ? rc : 0;
      }
    }
    uint64_t spent = mv_os_thread_cpu_ns() - cpu0;
    mv_budget_spend(&budget, spent);
    if (moved) cost_per_move = (cost_per_move * 3 + spent / (uint64_t)moved) / 4;
    else atomic_fetch_add(&stats.scan_ns, spent);
    atomic_fetch_add(&stats.thread_ns, spent);
    atomic_fetch_add(&stats.rounds, 1);
    mv_channel_refresh(); /* what `movalloc stat` reads (shim/mv_channel.h) */
  }
}

void mv_compactor_stats(struct movalloc_stats *out) {
  uint64_t started = atomic_load(&stats.started_ns);
  out->compactor_rounds = atomic_load(&stats.rounds);
  out->compactor_throttled = atomic_load(&stats.throttled);
  out->compactor_thread_ns = atomic_load(&stats.thread_ns);
  out->compactor_scan_ns = atomic_load(&stats.scan_ns);
  out->compactor_wall_ns = started ? mv_os_now_ns() - started : 0;
}

void mv_compactor_poke(void) {
  if (MV_LIKELY(atomic_load_explicit(&state, memory_order_relaxed) != IDLE)) return;
  if (!mv_options.compact) return;
  if (mv_arena_frontier() < MV_COMPACTOR_MIN_ARENAS && !mv_options.compact_stress) return;
  int expected = IDLE;
  if (!atomic_compare_exchange_strong(&state, &expected, STARTING)) return;
  /* The descriptors the thread will use, opened here, inside an allocation of
   * the thread that starts it: a descriptor is born at the lowest free number
   * and only then moved high (mv_fd_high), and at that instant a program
   * listing its own on another thread sees one it never opened. Python's
   * test_subprocess did, in a child under MOVALLOC_COMPACT_STRESS whose
   * compactor's first round ran into the listing. Only the backend's probe
   * and its userfaultfd wait for the first move when nothing chose the
   * backend yet (mv_engine_start). */
  mv_proc_fd(MV_KEPT_TASKS); /* alone() */
  mv_proc_fd(MV_KEPT_STAT);
  mv_proc_fd(MV_KEPT_MEMINFO); /* pressure_now() */
  mv_engine_open_ahead();
  mv_channel_publish();
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t tid;
  int rc = pthread_create(&tid, &attr, compactor_main, NULL);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    atomic_store(&state, FAILED);
    if (mv_options.verbose) mv_log("no background compactor: pthread_create failed (%d)", rc);
    return;
  }
  pthread_setname_np(tid, "movalloc-cmpct"); /* 15 characters at most */
  atomic_store(&state, RUNNING);
  if (mv_options.verbose) mv_log("background compactor started");
}

void mv_compactor_fork_child(void) {
  if (atomic_load(&state) == RUNNING) atomic_store(&state, IDLE);
}

bool mv_compactor_running(void) { return atomic_load(&state) == RUNNING; }
