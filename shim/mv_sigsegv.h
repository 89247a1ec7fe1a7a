/* Holding writers without userfaultfd: the mprotect backend makes a range
 * read-only and this SIGSEGV handler parks every thread that writes it on a
 * futex until the range is released. Every other SIGSEGV goes to the program's
 * own disposition: sigaction() and signal() are interposed for SIGSEGV, so the
 * program sees and sets its own handler whether it installed it before or
 * after movalloc did, and SIG_DFL / SIG_IGN keep their meaning.
 *
 * Only SIGSEGV is taken: a write to a read-only mapping raises nothing else, so
 * SIGBUS never reaches movalloc and needs no chaining.
 *
 * sigaltstack() is interposed too, to know the alternate signal stacks that a
 * hold must not make read-only; and sigprocmask() and pthread_sigmask(), so
 * that no thread blocks SIGSEGV once the handler is installed (a held writer
 * with SIGSEGV blocked would be killed).
 *
 * All of it is async-signal-safe and allocation-free.
 */
#ifndef MV_SIGSEGV_H
#define MV_SIGSEGV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MV_SIGSEGV_SLOTS 64 /* ranges held at once */

/* Installs the handler (once per process; later calls return 0 at once). The
 * handler the program had becomes the one faults are chained to.
 * 0 or -errno. */
int mv_sigsegv_install(void);

/* Marks [start, start + len) held: from now on a write fault there waits. Call
 * before making the range read-only. 0, -EBUSY when MV_SIGSEGV_SLOTS ranges are
 * held already, or -EAGAIN when a thread's alternate signal stack (interposed
 * sigaltstack()) lies in the range: the kernel could not write a signal frame
 * there while it is read-only. */
int mv_sigsegv_hold(uintptr_t start, size_t len);

/* Ends the hold of the range that starts at start and wakes its writers. Call
 * after making the range writable again. */
void mv_sigsegv_release(uintptr_t start);

/* Changes on every release. Read it before a system call that may fail with
 * EFAULT because of a hold, and pass it to mv_sigsegv_wait(). One relaxed load. */
uint64_t mv_sigsegv_epoch(void);

/* After a system call failed with EFAULT on [addr, addr + len): waits while
 * the range overlaps a held one. True when the call should be retried (it
 * waited, or a hold ended since `epoch` was read, so the EFAULT may have been
 * ours). Preserves errno. */
bool mv_sigsegv_wait(uintptr_t addr, size_t len, uint64_t epoch);

/* Set by a thread that has blocked every signal itself around code that calls
 * sigprocmask() (the profiler's stepped unwinds: libunwind blocks signals around
 * every frame): those calls change nothing meanwhile. */
extern __thread bool mv_signals_held __attribute__((tls_model("initial-exec")));

/* Ranges held right now (tests). */
unsigned mv_sigsegv_held(void);

#ifdef __cplusplus
}
#endif

#endif /* MV_SIGSEGV_H */
