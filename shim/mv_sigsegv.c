/* The SIGSEGV side of the mprotect backend (see mv_sigsegv.h). */
#include "shim/mv_sigsegv.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define MV_INTERPOSE __attribute__((visibility("default")))

/* glibc's sigaction under its other exported name: the one ours forwards to. */
extern int __sigaction(int sig, const struct sigaction *act, struct sigaction *oact);
/* glibc's signal() under its other exported name (not declared with _GNU_SOURCE). */
extern __sighandler_t bsd_signal(int sig, __sighandler_t handler);

/* ---- held ranges ---- */

/* A slot is free while start == 0; a hold claims it by CAS. seq is odd exactly
 * while [start, start + len) is held, and a reader that sees it odd (acquire)
 * sees that start and len. Waiters sleep on seq. */
struct held {
  _Atomic uintptr_t start;
  _Atomic size_t len;
  _Atomic uint32_t seq;
};

static struct held held[MV_SIGSEGV_SLOTS];
static _Atomic unsigned held_count; /* slots with an odd seq: 0 makes every check one load */
static _Atomic uint64_t release_epoch;

static void futex_wait(_Atomic uint32_t *word, uint32_t val) {
  syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) {
  syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* ---- alternate signal stacks ----
 * The kernel writes a signal frame on a thread's alternate stack. When that
 * stack lies in the heap (Python's faulthandler allocates it with malloc) and
 * its arena is held read-only, the frame cannot be written and the kernel kills
 * the process. sigaltstack() is interposed so that every such stack is known,
 * and a hold overlapping one is refused. A slot is free while tid == 0; a
 * thread changes only its own slot. */
#define MV_ALTSTACK_SLOTS 64

struct altstack {
  _Atomic pid_t tid;
  _Atomic uintptr_t start;
  _Atomic size_t len;
};

static struct altstack altstacks[MV_ALTSTACK_SLOTS];
static _Atomic bool altstacks_overflowed; /* a stack did not fit: refuse every hold */

static void note_altstack(const stack_t *ss) {
  pid_t tid = (pid_t)syscall(SYS_gettid);
  bool disable = ss->ss_flags & SS_DISABLE;
  struct altstack *mine = NULL, *free_slot = NULL;
  for (unsigned i = 0; i < MV_ALTSTACK_SLOTS && !mine; i++) {
    pid_t t = atomic_load(&altstacks[i].tid);
    if (t == tid) mine = &altstacks[i];
    else if (t == 0 && !free_slot) free_slot = &altstacks[i];
  }
  if (disable) {
    if (mine) atomic_store(&mine->tid, 0);
    return;
  }
  if (!mine) {
    pid_t zero = 0;
    if (!free_slot || !atomic_compare_exchange_strong(&free_slot->tid, &zero, tid)) {
      atomic_store(&altstacks_overflowed, true);
      return;
    }
    mine = free_slot;
  }
  atomic_store(&mine->len, 0); /* no stale range is seen while it changes */
  atomic_store(&mine->start, (uintptr_t)ss->ss_sp);
  atomic_store(&mine->len, ss->ss_size);
}

static bool altstack_in(uintptr_t start, size_t len) {
  if (atomic_load(&altstacks_overflowed)) return true;
  for (unsigned i = 0; i < MV_ALTSTACK_SLOTS; i++) {
    if (!atomic_load(&altstacks[i].tid)) continue;
    uintptr_t s = atomic_load(&altstacks[i].start);
    size_t l = atomic_load(&altstacks[i].len);
    if (l && s < start + len && start < s + l) return true;
  }
  return false;
}

MV_INTERPOSE int sigaltstack(const stack_t *ss, stack_t *old) {
  int rc = (int)syscall(SYS_sigaltstack, ss, old);
  if (rc == 0 && ss) note_altstack(ss);
  return rc;
}

int mv_sigsegv_hold(uintptr_t start, size_t len) {
  for (unsigned i = 0; i < MV_SIGSEGV_SLOTS; i++) {
    uintptr_t free_slot = 0;
    if (!atomic_compare_exchange_strong(&held[i].start, &free_slot, start)) continue;
    /* Claimed first, checked second: a stack registered after the check is
     * one its thread set up while the range was being held (a race the
     * program would need to run into within microseconds). */
    if (altstack_in(start, len)) {
      atomic_store(&held[i].start, 0);
      return -EAGAIN;
    }
    atomic_store(&held[i].len, len);
    atomic_fetch_add(&held_count, 1);
    atomic_fetch_add_explicit(&held[i].seq, 1, memory_order_release); /* odd: held */
    return 0;
  }
  return -EBUSY;
}

void mv_sigsegv_release(uintptr_t start) {
  for (unsigned i = 0; i < MV_SIGSEGV_SLOTS; i++) {
    if (atomic_load(&held[i].start) != start || !(atomic_load(&held[i].seq) & 1)) continue;
    /* The epoch moves before seq: whoever sees the range released also sees
     * the epoch changed, and retries a system call that failed on it. */
    atomic_fetch_add(&release_epoch, 1);
    atomic_fetch_sub(&held_count, 1);
    atomic_fetch_add(&held[i].seq, 1); /* even: released */
    futex_wake_all(&held[i].seq);
    atomic_store(&held[i].start, 0);
    return;
  }
}

uint64_t mv_sigsegv_epoch(void) {
  return atomic_load_explicit(&release_epoch, memory_order_relaxed);
}

unsigned mv_sigsegv_held(void) { return atomic_load(&held_count); }

/* If [addr, addr + len) overlaps a held range, sleeps until that hold ends and
 * returns true. */
static bool wait_if_held(uintptr_t addr, size_t len) {
  if (atomic_load_explicit(&held_count, memory_order_acquire) == 0) return false;
  for (unsigned i = 0; i < MV_SIGSEGV_SLOTS; i++) {
    uint32_t s = atomic_load_explicit(&held[i].seq, memory_order_acquire);
    if (!(s & 1)) continue;
    uintptr_t start = atomic_load(&held[i].start);
    size_t rlen = atomic_load(&held[i].len);
    if (addr >= start + rlen || start >= addr + len) continue;
    /* A slot reused under us only makes seq differ: the wait returns at once
     * and the fault is taken again. */
    while (atomic_load(&held[i].seq) == s) futex_wait(&held[i].seq, s);
    return true;
  }
  return false;
}

bool mv_sigsegv_wait(uintptr_t addr, size_t len, uint64_t epoch) {
  int saved = errno;
  bool retry = wait_if_held(addr, len) || mv_sigsegv_epoch() != epoch;
  errno = saved;
  return retry;
}

/* ---- the program's SIGSEGV disposition ---- */

/* What the program asked for SIGSEGV, while ours is installed. Written only
 * under writer_lock into the slot not in use, then published by bumping
 * prog_gen; the handler copies slot prog_gen & 1. A copy could tear only if the
 * program changed its handler twice while one SIGSEGV was being delivered. */
static struct sigaction prog_act[2];
static _Atomic unsigned prog_gen;
static _Atomic bool installed;
static _Atomic int writer_lock; /* taken with every signal blocked: never re-entered */

static void read_prog(struct sigaction *out) {
  *out = prog_act[atomic_load_explicit(&prog_gen, memory_order_acquire) & 1];
}

static void write_prog(const struct sigaction *act) {
  unsigned g = atomic_load_explicit(&prog_gen, memory_order_relaxed);
  prog_act[(g + 1) & 1] = *act;
  atomic_store_explicit(&prog_gen, g + 1, memory_order_release);
}

/* ---- signal masks ----
 * A thread that has SIGSEGV blocked and writes a held range is killed: the
 * kernel cannot leave a fault pending, so it delivers it with the default
 * action. Threads do block every signal and then write the heap (servers'
 * worker threads; libunwind around its cache updates), so once the handler is
 * installed, sigprocmask and pthread_sigmask leave SIGSEGV out of what they
 * block. What a program can tell: a SIGSEGV sent with kill() to such a thread
 * is handled at once instead of staying pending.
 *
 * pthread_sigmask is glibc's, written out (glibc exports no other name for
 * it): its own SIGCANCEL and SIGSETXID are never blocked. */
#define MV_SIGCANCEL __SIGRTMIN
#define MV_SIGSETXID (__SIGRTMIN + 1)

__thread bool mv_signals_held __attribute__((tls_model("initial-exec")));

/* 0 or an error number, errno untouched. segv_too: block SIGSEGV if asked. */
static int set_mask(int how, const sigset_t *set, sigset_t *old, bool segv_too) {
  sigset_t copy;
  if (set) {
    copy = *set;
    sigdelset(&copy, MV_SIGCANCEL);
    sigdelset(&copy, MV_SIGSETXID);
    if (!segv_too && how != SIG_UNBLOCK && atomic_load_explicit(&installed, memory_order_acquire))
      sigdelset(&copy, SIGSEGV);
    set = &copy;
  }
  int saved_errno = errno;
  int err = syscall(SYS_rt_sigprocmask, how, set, old, _NSIG / 8) == 0 ? 0 : errno;
  errno = saved_errno;
  return err;
}

static void lock_writers(sigset_t *saved) {
  sigset_t all;
  sigfillset(&all);
  set_mask(SIG_SETMASK, &all, saved, true);
  int expected = 0;
  while (!atomic_compare_exchange_weak(&writer_lock, &expected, 1)) {
    expected = 0;
    sched_yield();
  }
}

static void unlock_writers(const sigset_t *saved) {
  atomic_store(&writer_lock, 0);
  set_mask(SIG_SETMASK, saved, NULL, true);
}

static __thread uintptr_t retried_addr; /* the last fault retried by this thread ... */
static __thread uint64_t retried_epoch; /* ... and the release epoch at that time */

static void chain(int sig, siginfo_t *si, void *uc) {
  struct sigaction prog;
  read_prog(&prog);
  bool from_fault = si->si_code > 0; /* raised by the kernel for a fault, not sent */
  if (prog.sa_handler == SIG_IGN && !from_fault) return;
  if (prog.sa_handler == SIG_DFL || prog.sa_handler == SIG_IGN) {
    /* Die the way the program would have (a fault cannot be ignored): with the
     * default action, the fault happens again on return; a sent signal is sent
     * again, and stays pending until this handler returns. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    __sigaction(sig, &dfl, NULL);
    if (!from_fault) syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), sig);
    return;
  }
  /* The mask the kernel would have set for the program's handler. */
  sigset_t mask = ((ucontext_t *)uc)->uc_sigmask;
  sigorset(&mask, &mask, &prog.sa_mask);
  if (!(prog.sa_flags & SA_NODEFER)) sigaddset(&mask, sig);
  pthread_sigmask(SIG_SETMASK, &mask, NULL);
  if (prog.sa_flags & SA_RESETHAND) {
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    write_prog(&dfl);
  }
  if (prog.sa_flags & SA_SIGINFO) prog.sa_sigaction(sig, si, uc);
  else prog.sa_handler(sig);
}

static void segv_handler(int sig, siginfo_t *si, void *uc) {
  int saved_errno = errno;
  if (si->si_code == SEGV_ACCERR) {
    uintptr_t addr = (uintptr_t)si->si_addr;
    if (wait_if_held(addr, 1)) goto out;
    /* The hold this fault hit may have ended between the fault and now: take
     * the fault once more. The same address with no release in between is the
     * program's own fault. */
    uint64_t e = mv_sigsegv_epoch();
    if (e != 0 && (retried_addr != addr || retried_epoch != e)) {
      retried_addr = addr;
      retried_epoch = e;
      goto out;
    }
  }
  chain(sig, si, uc);
out:
  errno = saved_errno;
}

/* Puts our handler in the kernel, with the program's SA_RESTART. */
static int install_kernel(int prog_flags) {
  struct sigaction ours = {.sa_sigaction = segv_handler};
  sigemptyset(&ours.sa_mask);
  /* SA_ONSTACK: a program that catches stack overflow on an alternate stack
   * still gets there through us. */
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK | (prog_flags & SA_RESTART);
  return __sigaction(SIGSEGV, &ours, NULL) == 0 ? 0 : -errno;
}

int mv_sigsegv_install(void) {
  if (atomic_load_explicit(&installed, memory_order_acquire)) return 0;
  sigset_t saved;
  lock_writers(&saved);
  int rc = 0;
  if (!atomic_load(&installed)) {
    struct sigaction cur;
    if (__sigaction(SIGSEGV, NULL, &cur) != 0) {
      rc = -errno;
    } else {
      write_prog(&cur);
      rc = install_kernel(cur.sa_flags);
      if (rc == 0) atomic_store_explicit(&installed, true, memory_order_release);
    }
  }
  unlock_writers(&saved);
  return rc;
}

/* The mask calls (see "signal masks" above). */
MV_INTERPOSE int pthread_sigmask(int how, const sigset_t *set, sigset_t *old) {
  return set_mask(how, set, old, false);
}

MV_INTERPOSE int sigprocmask(int how, const sigset_t *set, sigset_t *old) {
  if (__builtin_expect(mv_signals_held, 0)) {
    if (old) sigfillset(old);
    return 0;
  }
  int err = set_mask(how, set, old, false);
  if (err) {
    errno = err;
    return -1;
  }
  return 0;
}

MV_INTERPOSE int sigaction(int sig, const struct sigaction *act, struct sigaction *oact) {
  if (sig != SIGSEGV) return __sigaction(sig, act, oact);
  /* Under the lock even when not installed: an install must not interleave
   * with a program's change that goes straight to the kernel. */
  sigset_t saved;
  lock_writers(&saved);
  int rc = 0;
  if (!atomic_load(&installed)) {
    rc = __sigaction(sig, act, oact);
  } else {
    struct sigaction old;
    read_prog(&old);
    if (act) {
      write_prog(act);
      rc = install_kernel(act->sa_flags);
    }
    if (oact && rc == 0) *oact = old;
  }
  int e = errno;
  unlock_writers(&saved);
  errno = e;
  return rc == 0 ? 0 : -1;
}

MV_INTERPOSE __sighandler_t signal(int sig, __sighandler_t handler) {
  if (sig != SIGSEGV) return bsd_signal(sig, handler);
  /* glibc's signal(): BSD semantics. */
  struct sigaction act = {.sa_handler = handler, .sa_flags = SA_RESTART}, old;
  sigemptyset(&act.sa_mask);
  sigaddset(&act.sa_mask, sig);
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}
