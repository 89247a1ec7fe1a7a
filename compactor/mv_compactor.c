/* The background compactor: the "VM" side of the contract. It wakes up every
 * period, returns cached empty arenas nobody reused to the kernel, and moves the
 * arenas that gain from a huge page (dense, settled, not yet huge, not backing
 * off) within a bandwidth budget, through the engine.
 *
 * Started lazily, once the heap is big enough to be worth it (small programs
 * never get a thread), with every signal blocked so the program's signals go to
 * the program's threads. fork(): the child has no compactor thread; its next
 * poke starts one. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include "compactor/mv_engine.h"
#include "shim/mv_channel.h"
#include "shim/mv_options.h"

#define MV_COMPACTOR_MIN_ARENAS 8 /* 16 MiB of heap before a thread is worth it */

enum { IDLE, STARTING, RUNNING, FAILED };
static _Atomic(int) state = IDLE;

/* True when every other thread of the process has exited (main included, by
 * pthread_exit): then the compactor must not be what keeps the process alive.
 * Reads /proc/self/task with getdents64 and small reads: no malloc. */
static bool alone(void) {
  int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0) return false;
  int me = mv_os_gettid();
  bool others = false;
  char buf[4096];
  long n;
  while (!others && (n = syscall(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
    for (long off = 0; off < n && !others;) {
      struct dirent64 *d = (struct dirent64 *)(buf + off);
      off += d->d_reclen;
      int tid = 0;
      for (const char *c = d->d_name; *c >= '0' && *c <= '9'; c++) tid = tid * 10 + (*c - '0');
      if (tid == 0 || tid == me) continue;
      char path[64], stat[512];
      mv_snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
      if (mv_os_read_file(path, stat, sizeof stat) <= 0) continue; /* gone meanwhile */
      const char *end = strrchr(stat, ')');
      others = end && end[1] == ' ' && end[2] != 'Z' && end[2] != 'X';
    }
  }
  close(dir);
  return !others;
}

static void sleep_ms(unsigned ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

static void *compactor_main(void *unused) {
  unsigned period = mv_options.compact_stress ? 10 : mv_options.compact_period_ms;
  unsigned flags = mv_options.compact_stress ? MOVALLOC_COMPACT_ALL : MV_COMPACT_SETTLED;
  /* The bandwidth budget in arenas per period, at least one. */
  uint64_t per_period = (uint64_t)mv_options.compact_mbps * period / 1000 / 2;
  int max_moves = mv_options.compact_stress ? INT32_MAX : (int)(per_period ? per_period : 1);
  bool can_move = true; /* false with the "off" backend: then it only decays */
  uint64_t last_alone_check = 0;
  for (;;) {
    sleep_ms(period);
    /* POSIX: the process exits (status 0) when its last thread ends; the last
     * program thread may be waiting on this one to go. */
    uint64_t now = mv_os_now_ns();
    if (now - last_alone_check > 200000000u) {
      last_alone_check = now;
      if (alone()) pthread_exit(NULL);
    }
    mv_arena_decay();
    if (can_move) can_move = mv_engine_compact(flags, max_moves) != -ENOSYS;
    mv_channel_refresh(); /* what `movalloc stat` reads (shim/mv_channel.h) */
  }
}

void mv_compactor_poke(void) {
  if (MV_LIKELY(atomic_load_explicit(&state, memory_order_relaxed) != IDLE)) return;
  if (!mv_options.compact) return;
  if (mv_arena_frontier() < MV_COMPACTOR_MIN_ARENAS && !mv_options.compact_stress) return;
  int expected = IDLE;
  if (!atomic_compare_exchange_strong(&state, &expected, STARTING)) return;
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
  pthread_setname_np(tid, "movalloc-compact");
  atomic_store(&state, RUNNING);
  if (mv_options.verbose) mv_log("background compactor started");
}

void mv_compactor_fork_child(void) {
  if (atomic_load(&state) == RUNNING) atomic_store(&state, IDLE);
}

bool mv_compactor_running(void) { return atomic_load(&state) == RUNNING; }
