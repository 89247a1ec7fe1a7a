/* System calls that write into a caller's buffer (the read family, epoll_wait)
 * fail with EFAULT when the buffer lies in a range the mprotect backend holds
 * read-only. These wrappers wait for the release and call again, only then:
 * when the call succeeded, or failed otherwise, they cost one relaxed load.
 *
 * Calling again is safe for what they cover: a pipe, a stream socket or a file
 * consumes nothing when the copy to the user fails. A datagram socket does drop
 * the datagram (the kernel frees it on EFAULT), so the retry returns the next
 * one: holding a recv buffer is lossy for UDP, whatever the wrapper does.
 *
 * The real calls are reached without dlsym, which can allocate: glibc exports
 * read and pread64 as __read and __pread64 too; readv is preadv2 at offset -1
 * (the kernel's own definition) and recvfrom is recvmsg with one iovec, both
 * glibc entry points that stay cancellation points. readdir is the exception
 * (glibc has no other name for it): found with dlsym at its first call, long
 * after start-up.
 */
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shim/mv_sigsegv.h"

#define MV_INTERPOSE __attribute__((visibility("default")))

extern ssize_t __read(int fd, void *buf, size_t n);
extern ssize_t __pread64(int fd, void *buf, size_t n, off64_t off);
extern void __chk_fail(void) __attribute__((noreturn));

static inline bool failed_on_hold(ssize_t r, const void *buf, size_t n, uint64_t epoch) {
  return __builtin_expect(r < 0 && errno == EFAULT, 0) &&
         mv_sigsegv_wait((uintptr_t)buf, n, epoch);
}

MV_INTERPOSE ssize_t read(int fd, void *buf, size_t n) {
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    ssize_t r = __read(fd, buf, n);
    if (!failed_on_hold(r, buf, n, epoch)) return r;
  }
}

MV_INTERPOSE ssize_t pread64(int fd, void *buf, size_t n, off64_t off) {
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    ssize_t r = __pread64(fd, buf, n, off);
    if (!failed_on_hold(r, buf, n, epoch)) return r;
  }
}

MV_INTERPOSE ssize_t pread(int fd, void *buf, size_t n, off_t off) {
  return pread64(fd, buf, n, off);
}

MV_INTERPOSE ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    ssize_t r = preadv2(fd, iov, iovcnt, -1, 0);
    if (__builtin_expect(r >= 0 || errno != EFAULT, 1)) return r;
    bool retry = false;
    for (int i = 0; i < iovcnt; i++)
      retry |= mv_sigsegv_wait((uintptr_t)iov[i].iov_base, iov[i].iov_len, epoch);
    if (!retry) return r;
  }
}

static ssize_t recvfrom_once(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                             socklen_t *addr_len) {
  struct iovec iov = {.iov_base = buf, .iov_len = n};
  struct msghdr msg = {
      .msg_name = addr,
      .msg_namelen = addr && addr_len ? *addr_len : 0,
      .msg_iov = &iov,
      .msg_iovlen = 1,
  };
  ssize_t r = recvmsg(fd, &msg, flags);
  if (r >= 0 && addr && addr_len) *addr_len = msg.msg_namelen;
  return r;
}

/* __SOCKADDR_ARG: glibc's transparent union for a struct sockaddr pointer. */
MV_INTERPOSE ssize_t recvfrom(int fd, void *buf, size_t n, int flags, __SOCKADDR_ARG addr,
                              socklen_t *addr_len) {
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    ssize_t r = recvfrom_once(fd, buf, n, flags, addr.__sockaddr__, addr_len);
    if (!failed_on_hold(r, buf, n, epoch)) return r;
  }
}

MV_INTERPOSE ssize_t recv(int fd, void *buf, size_t n, int flags) {
  return recvfrom(fd, buf, n, flags, NULL, NULL);
}

/* epoll: an event that cannot be copied out goes back on the ready list
 * (fs/eventpoll.c), so calling again loses none. The wait restarts with its
 * whole timeout, once per hold it met. epoll_pwait2 (glibc 2.35) is the real
 * call: not interposed, and a cancellation point like the ones it stands for. */
static int epoll_once(int epfd, struct epoll_event *events, int max, int timeout_ms,
                      const sigset_t *sigmask) {
  struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000};
  int r = epoll_pwait2(epfd, events, max, timeout_ms < 0 ? NULL : &ts, sigmask);
  if (r < 0 && errno == ENOSYS) /* Linux < 5.11 */
    r = (int)syscall(SYS_epoll_pwait, epfd, events, max, timeout_ms, sigmask, _NSIG / 8);
  return r;
}

MV_INTERPOSE int epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout_ms,
                             const sigset_t *sigmask) {
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    int r = epoll_once(epfd, events, max, timeout_ms, sigmask);
    size_t bytes = max > 0 ? (size_t)max * sizeof *events : 0;
    if (!failed_on_hold(r, events, bytes, epoch)) return r;
  }
}

MV_INTERPOSE int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout_ms) {
  return epoll_pwait(epfd, events, max, timeout_ms, NULL);
}

/* readdir: glibc refills the DIR's buffer, which opendir took from malloc
 * together with the DIR, by getdents64, an internal call no interposer reaches.
 * The kernel moves the directory's position only past entries it copied, and
 * it fails with EFAULT only when it copied none: readdir returns NULL with
 * errno EFAULT and calling it again loses nothing. The buffer lies in the
 * DIR's block, at most 1 MiB (glibc's MAX_DIR_BUFFER_SIZE) past it. */
#define DIR_BLOCK_MAX (((size_t)1 << 20) + 4096) /* the buffer and the DIR itself */

static _Atomic(void *) real_readdir64;

MV_INTERPOSE struct dirent64 *readdir64(DIR *dirp) {
  struct dirent64 *(*next)(DIR *) = atomic_load_explicit(&real_readdir64, memory_order_acquire);
  if (!next) {
    next = (struct dirent64 * (*)(DIR *)) dlsym(RTLD_NEXT, "readdir64");
    if (!next) {
      errno = ENOSYS;
      return NULL;
    }
    atomic_store_explicit(&real_readdir64, (void *)next, memory_order_release);
  }
  int saved = errno;
  for (;;) {
    uint64_t epoch = mv_sigsegv_epoch();
    struct dirent64 *d = next(dirp);
    if (__builtin_expect(d || errno != EFAULT, 1) ||
        !mv_sigsegv_wait((uintptr_t)dirp, DIR_BLOCK_MAX, epoch))
      return d;
    errno = saved; /* end of directory leaves errno alone */
  }
}

/* struct dirent is struct dirent64 on 64-bit Linux: glibc makes them one function. */
MV_INTERPOSE struct dirent *readdir(DIR *dirp) { return (struct dirent *)readdir64(dirp); }

/* _FORTIFY_SOURCE builds call these instead. */
MV_INTERPOSE ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen) {
  if (n > buflen) __chk_fail();
  return read(fd, buf, n);
}

MV_INTERPOSE ssize_t __pread64_chk(int fd, void *buf, size_t n, off64_t off, size_t buflen) {
  if (n > buflen) __chk_fail();
  return pread64(fd, buf, n, off);
}

MV_INTERPOSE ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen) {
  if (n > buflen) __chk_fail();
  return pread64(fd, buf, n, off);
}

MV_INTERPOSE ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags) {
  if (n > buflen) __chk_fail();
  return recvfrom(fd, buf, n, flags, NULL, NULL);
}

MV_INTERPOSE ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                                    __SOCKADDR_ARG addr, socklen_t *addr_len) {
  if (n > buflen) __chk_fail();
  return recvfrom(fd, buf, n, flags, addr, addr_len);
}
