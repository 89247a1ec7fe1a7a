/* The process-wide userfaultfd (see mv_uffd.h). */
#include "compactor/mv_uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <unistd.h>

#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"

/* fd >= 0 once opened; features is what UFFDIO_API enabled on it and is stored
 * before fd is published. */
static _Atomic int uffd_fd = -1;
static _Atomic uint64_t uffd_features;

int mv_uffd_open(bool user_only) {
  int flags = O_CLOEXEC | O_NONBLOCK | (user_only ? UFFD_USER_MODE_ONLY : 0);
  int fd = mv_os_userfaultfd(flags);
  if (fd >= 0) return fd;
  int err = errno;
  /* Linux >= 6.1: access to /dev/userfaultfd is a file permission, not the
   * vm.unprivileged_userfaultfd sysctl, and seccomp filters on the system call
   * do not see it. */
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = mv_os_ioctl(dev, USERFAULTFD_IOC_NEW, (void *)(uintptr_t)flags);
    close(dev);
    if (fd >= 0) return fd;
  }
  return -err;
}

int mv_uffd_api(int fd, uint64_t want, uint64_t *got) {
  struct uffdio_api api = {.api = UFFD_API, .features = want};
  if (mv_os_ioctl(fd, UFFDIO_API, &api) != 0) return -errno;
  *got = api.features;
  return 0;
}

int mv_uffd_get(void) {
  int fd = atomic_load_explicit(&uffd_fd, memory_order_acquire);
  if (fd >= 0) return fd;
  const struct mv_probe *p = mv_backend_probe();
  if (!p->uffd) return -(p->uffd_errno ? p->uffd_errno : ENOSYS);
  uint64_t want = 0;
  if (p->uffd_wp) want |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
  if (p->uffd_wp && p->uffd_wp_unpopulated) want |= UFFD_FEATURE_WP_UNPOPULATED;
  if (p->uffd_move) want |= UFFD_FEATURE_MOVE;
  fd = mv_uffd_open(p->uffd_user_only);
  if (fd < 0) return fd;
  uint64_t got;
  int rc = mv_uffd_api(fd, want, &got);
  if (rc) {
    close(fd);
    return rc;
  }
  atomic_store_explicit(&uffd_features, want, memory_order_relaxed);
  int expected = -1;
  if (!atomic_compare_exchange_strong_explicit(&uffd_fd, &expected, fd, memory_order_acq_rel,
                                               memory_order_acquire)) {
    close(fd); /* another thread opened it first, with the same features */
    return expected;
  }
  return fd;
}

uint64_t mv_uffd_features(void) {
  return atomic_load_explicit(&uffd_features, memory_order_relaxed);
}

void mv_uffd_drop(void) {
  int fd = atomic_exchange(&uffd_fd, -1);
  atomic_store(&uffd_features, 0);
  if (fd >= 0) close(fd);
}

static int uffd_ioctl(unsigned long request, void *arg) {
  int fd = mv_uffd_get();
  if (fd < 0) return fd;
  return mv_os_ioctl(fd, request, arg) == 0 ? 0 : -errno;
}

int mv_uffd_register(uintptr_t start, size_t len, bool missing, bool wp) {
  struct uffdio_register r = {
      .range = {.start = start, .len = len},
      .mode = (missing ? UFFDIO_REGISTER_MODE_MISSING : 0) | (wp ? UFFDIO_REGISTER_MODE_WP : 0),
  };
  return uffd_ioctl(UFFDIO_REGISTER, &r);
}

int mv_uffd_unregister(uintptr_t start, size_t len) {
  struct uffdio_range r = {.start = start, .len = len};
  return uffd_ioctl(UFFDIO_UNREGISTER, &r);
}

int mv_uffd_writeprotect(uintptr_t start, size_t len, bool protect, bool wake) {
  struct uffdio_writeprotect w = {
      .range = {.start = start, .len = len},
      .mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
              (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
  };
  return uffd_ioctl(UFFDIO_WRITEPROTECT, &w);
}

int mv_uffd_wake(uintptr_t start, size_t len) {
  struct uffdio_range r = {.start = start, .len = len};
  return uffd_ioctl(UFFDIO_WAKE, &r);
}

size_t mv_uffd_move(uintptr_t dst, uintptr_t src, size_t len, uint64_t mode, int *err) {
  *err = 0;
  int fd = mv_uffd_get();
  if (fd < 0) {
    *err = -fd;
    return 0;
  }
  size_t done = 0;
  for (int transient = 0; done < len;) {
    struct uffdio_move mv = {
        .dst = dst + done, .src = src + done, .len = len - done, .mode = mode, .move = 0};
    if (mv_os_ioctl(fd, UFFDIO_MOVE, &mv) == 0) return len;
    int e = errno;
    /* A partial move reports EAGAIN and the bytes moved; the next call from
     * there says what stopped it. */
    if (mv.move > 0) {
      done += (size_t)mv.move;
      continue;
    }
    /* Nothing moved and EAGAIN: a folio lock or a migration entry in the way. */
    if (e == EAGAIN && ++transient < 16) continue;
    *err = e;
    break;
  }
  return done;
}
