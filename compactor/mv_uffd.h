/* The process-wide userfaultfd used by the move and remap backends.
 *
 * One descriptor per process, opened on first use (O_CLOEXEC | O_NONBLOCK) the
 * way the probe found to work, with the features the probe found (and did not
 * mask), and kept at a number >= 512 (MV_KEPT_UFFD in mv_backend_int.h): away
 * from the lowest free numbers the program counts on, checked before each use
 * (the program may close it or dup2() over it) and opened again if it is not
 * ours any more. Outside a pre-copy (mv_precopy.c) nobody reads it: every
 * fault it catches is a thread held until the backend wakes the range, and
 * no event feature (fork, remap,
 * remove, unmap) is ever requested, because an unread event would block the
 * thread that caused it.
 *
 * A range is registered only around one migration, or one UFFDIO_MOVE of
 * realloc (mv_engine_move_span): registration splits the VMA and stops
 * khugepaged and MADV_COLLAPSE on it, so arenas not being moved must not stay
 * registered. Unregistering merges the VMA back with its neighbours.
 */
#ifndef MV_UFFD_H
#define MV_UFFD_H

#include <linux/userfaultfd.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What older <linux/userfaultfd.h> lack (values from the kernel's uapi header). */
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
  __u64 mode;
  __s64 move; /* written by the kernel: bytes moved, or -errno */
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif

/* Opens a fresh userfaultfd: the system call, else /dev/userfaultfd and
 * USERFAULTFD_IOC_NEW. user_only adds UFFD_USER_MODE_ONLY. Returns the fd (at
 * a high number, as mv_fd_high) or -errno of the system call (the first reason
 * it failed). No UFFDIO_API yet. */
int mv_uffd_open(bool user_only);

/* UFFDIO_API on a fresh fd asking for `want`; *got receives what the kernel
 * offers (with want == 0: every feature it has). 0 or -errno. */
int mv_uffd_api(int fd, uint64_t want, uint64_t *got);

/* The process-wide fd, opened on first call and again when the program
 * closed or replaced it; -errno when userfaultfd is not usable here (the
 * probe said no, or opening failed now). One fstat() per call. */
int mv_uffd_get(void);

/* Changes each time a new descriptor is opened (after fork, or when the program
 * closed or replaced ours): a range registered before is not registered with
 * the current one. */
unsigned mv_uffd_generation(void);

/* Features enabled on the process-wide fd (0 before it is open). */
uint64_t mv_uffd_features(void);

/* Closes the process-wide fd (if that number still holds it): after fork() in
 * the child, and when a test forgets the probe. Never while a range is held,
 * nor while another thread uses the fd. */
void mv_uffd_drop(void);

/* Thin wrappers over the ioctls, on the process-wide fd. 0 or -errno. */
int mv_uffd_register(uintptr_t start, size_t len, bool missing, bool wp);
int mv_uffd_unregister(uintptr_t start, size_t len);
/* Unregisters a held range for good at release: a range left registered would
 * hang the next fault on it. Retries a transient failure, takes -EINVAL
 * (nothing mapped there any more, so nothing registered) as done, and ends
 * the process with a message naming who when it cannot. */
void mv_uffd_unregister_held(uintptr_t start, size_t len, const char *who);
/* wake: whether unprotecting wakes the range; protecting never wakes, and the
 * kernel refuses it with wake false (EINVAL). */
int mv_uffd_writeprotect(uintptr_t start, size_t len, bool protect, bool wake);
int mv_uffd_wake(uintptr_t start, size_t len);

/* UFFDIO_ZEROPAGE over [start, start + len): maps the zero page into holes
 * and wakes the threads waiting there. 0, -EEXIST (a page is there already)
 * or -errno. */
int mv_uffd_zeropage(uintptr_t start, size_t len);

/* Reads up to max pending page-fault messages without waiting (the fd is
 * O_NONBLOCK): the address of each fault into addrs[], and whether it was a
 * write-protect fault into wp[] (else a fault on a hole). Returns how many
 * (0 when none is pending) or -errno. Only the pre-copy reads the fd: at any
 * other time a faulting thread is simply held until its range is woken. */
int mv_uffd_read_faults(uintptr_t *addrs, bool *wp, int max);

/* UFFDIO_MOVE of [src, src + len) to dst. Returns the bytes moved (== len on
 * success); on failure *err gets the errno and the return value says how far
 * it got (0 if nothing moved). After a failure the page tables, not the
 * kernel's count, say how far (Linux 6.18 moves pages it does not count). */
size_t mv_uffd_move(uintptr_t dst, uintptr_t src, size_t len, uint64_t mode, int *err);

#ifdef __cplusplus
}
#endif

#endif /* MV_UFFD_H */
