/* The process-wide userfaultfd (see mv_uffd.h). */
#include "compactor/mv_uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"

/* What UFFDIO_API enabled on the kept descriptor (MV_KEPT_UFFD), stored
 * before it is published. */
static _Atomic uint64_t uffd_features;
/* How many descriptors were opened: what a range was registered with. */
static _Atomic unsigned uffd_generation;

int mv_uffd_open(bool user_only) {
  int flags = O_CLOEXEC | O_NONBLOCK | (user_only ? UFFD_USER_MODE_ONLY : 0);
  int fd = mv_os_userfaultfd(flags);
  if (fd >= 0) return mv_fd_high(fd);
  int err = errno;
  /* Linux >= 6.1: access to /dev/userfaultfd is a file permission, not the
   * vm.unprivileged_userfaultfd sysctl, and seccomp filters on the system call
   * do not see it. */
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = mv_os_ioctl(dev, USERFAULTFD_IOC_NEW, (void *)(uintptr_t)flags);
    close(dev);
    if (fd >= 0) return mv_fd_high(fd);
  }
  return -err;
}

int mv_uffd_api(int fd, uint64_t want, uint64_t *got) {
  struct uffdio_api api = {.api = UFFD_API, .features = want};
  if (mv_os_ioctl(fd, UFFDIO_API, &api) != 0) return -errno;
  *got = api.features;
  return 0;
}

/* Opens the process-wide descriptor with the features the probe found. */
static int open_process_fd(void) {
  const struct mv_probe *p = mv_backend_probe();
  if (!p->uffd) return -(p->uffd_errno ? p->uffd_errno : ENOSYS);
  uint64_t want = 0;
  if (p->uffd_wp) want |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
  if (p->uffd_wp && p->uffd_wp_unpopulated) want |= UFFD_FEATURE_WP_UNPOPULATED;
  if (p->uffd_move) want |= UFFD_FEATURE_MOVE;
  int fd = mv_uffd_open(p->uffd_user_only);
  if (fd < 0) return fd;
  uint64_t got;
  int rc = mv_uffd_api(fd, want, &got);
  if (rc) {
    close(fd);
    return rc;
  }
  atomic_store_explicit(&uffd_features, want, memory_order_relaxed);
  atomic_fetch_add(&uffd_generation, 1);
  return fd;
}

int mv_uffd_get(void) { return mv_kept_fd(MV_KEPT_UFFD, open_process_fd); }

unsigned mv_uffd_generation(void) { return atomic_load(&uffd_generation); }

uint64_t mv_uffd_features(void) {
  return atomic_load_explicit(&uffd_features, memory_order_relaxed);
}

void mv_uffd_drop(void) {
  mv_kept_close(MV_KEPT_UFFD);
  atomic_store(&uffd_features, 0);
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

void mv_uffd_unregister_held(uintptr_t start, size_t len, const char *who) {
  int rc, tries = 0;
  while ((rc = mv_uffd_unregister(start, len)) != 0 && rc != -EINVAL && ++tries < 100)
    sched_yield();
  if (rc && rc != -EINVAL) mv_fatal("%s: cannot unregister %p (%d)", who, (void *)start, rc);
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

int mv_uffd_zeropage(uintptr_t start, size_t len) {
  struct uffdio_zeropage z = {.range = {.start = start, .len = len}, .mode = 0};
  return uffd_ioctl(UFFDIO_ZEROPAGE, &z);
}

int mv_uffd_read_faults(uintptr_t *addrs, bool *wp, int max) {
  int fd = mv_uffd_get();
  if (fd < 0) return fd;
  struct uffd_msg msgs[16];
  if (max > 16) max = 16;
  ssize_t n = read(fd, msgs, (size_t)max * sizeof msgs[0]);
  if (n < 0) return errno == EAGAIN ? 0 : -errno;
  int got = 0;
  for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
    if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue; /* no other event is asked for */
    addrs[got] = (uintptr_t)msgs[i].arg.pagefault.address;
    wp[got] = msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP;
    got++;
  }
  return got;
}

/* Linux 6.18 (mm/userfaultfd.c move_pages(), since the batched TLB flush of
 * UFFDIO_MOVE) can move pages without counting them. move_pages_ptes() sets
 * the loop's err only when it fails; once one step met -EAGAIN (a large folio
 * locked or not splittable yet, a migration entry, a PTE that changed under
 * it: compaction and writers make these common), every later step that
 * succeeds is taken as that -EAGAIN again: its pages are moved but neither
 * counted nor stepped over, and the retry at the same address finds dst taken
 * and stops with -EEXIST. The caller is then told "0 bytes, EEXIST" (or fewer
 * bytes than moved) while up to a PMD's worth of pages sits at dst.
 *
 * So after a failure the page tables say how far it got, not the count: from
 * the first page not counted, the pages with nothing left at src have moved
 * (dst holds them) or were holes (when holes are allowed). Returns the bytes of
 * that run. pagemap shows present pages, zero pages, swap and migration
 * entries alike, so nothing in flight is taken for a hole. */
static size_t moved_uncounted(uintptr_t dst, uintptr_t src, size_t len, uint64_t mode) {
  struct mv_page_map s, d;
  if (mv_thp_page_map(src, &s) != 0 || mv_thp_page_map(dst, &d) != 0) return 0;
  bool holes = mode & UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
  size_t pages = len / MV_PAGE_SIZE < MV_ARENA_PAGES ? len / MV_PAGE_SIZE : MV_ARENA_PAGES, n;
  for (n = 0; n < pages; n++) {
    bool at_src = mv_page_test(&s, n), at_dst = mv_page_test(&d, n);
    if (at_src || !(at_dst || holes)) break;
  }
  return n * MV_PAGE_SIZE;
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
    size_t uncounted = moved_uncounted(dst + done, src + done, len - done, mode);
    if (uncounted) {
      done += uncounted;
      continue;
    }
    /* Nothing moved and EAGAIN: a folio lock or a migration entry in the way. */
    if (e == EAGAIN && ++transient < 16) continue;
    *err = e;
    break;
  }
  return done;
}
