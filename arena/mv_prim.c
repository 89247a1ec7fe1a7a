/* The real OS primitives behind mv_prim.h. */
#include "arena/mv_prim.h"

#include "arena/mv_print.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void *real_mremap(void *old_addr, size_t old_len, size_t new_len, int flags,
                         void *new_addr) {
  return mremap(old_addr, old_len, new_len, flags, new_addr);
}

static int real_ioctl(int fd, unsigned long request, void *arg) {
  return ioctl(fd, request, arg);
}

static int real_userfaultfd(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

#define REAL_PRIMITIVES                                                              \
  {                                                                                  \
    .mmap = mmap, .munmap = munmap, .mprotect = mprotect, .madvise = madvise,        \
    .mremap = real_mremap, .ioctl = real_ioctl, .userfaultfd = real_userfaultfd,     \
  }

const struct mv_prim mv_prim_real = REAL_PRIMITIVES;
struct mv_prim mv_prim = REAL_PRIMITIVES; /* tests swap entries */

void mv_prim_set(const struct mv_prim *fake) { mv_prim = *fake; }
void mv_prim_reset(void) { mv_prim = mv_prim_real; }

static uint64_t clock_ns(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t mv_os_now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t mv_os_thread_cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }
int mv_os_gettid(void) { return (int)syscall(SYS_gettid); }

void mv_os_random(void *buf, size_t len) {
  unsigned char *p = buf;
  size_t got = 0;
  while (got < len) {
    ssize_t n = getrandom(p + got, len - got, GRND_NONBLOCK);
    if (n <= 0) break;
    got += (size_t)n;
  }
  if (got == len) return;
  /* No entropy yet (early boot, seccomp): mix what differs between runs. */
  uint64_t x = clock_ns(CLOCK_MONOTONIC) ^ ((uint64_t)(uintptr_t)buf << 17) ^
               ((uint64_t)getpid() << 40);
  for (; got < len; got++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    p[got] = (unsigned char)x;
  }
}

void mv_os_write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    buf += n;
    len -= (size_t)n;
  }
}

long mv_os_read_file(const char *path, char *buf, size_t cap) {
  if (cap == 0) return -EINVAL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  size_t got = 0;
  while (got + 1 < cap) {
    ssize_t n = read(fd, buf + got, cap - 1 - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      return -e;
    }
    if (n == 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = 0;
  return (long)got;
}

int mv_os_open_private(const char *path, char *why, size_t cap) {
  /* O_NOFOLLOW: a planted symlink cannot aim our writes at another file;
   * O_NONBLOCK: a FIFO cannot hang start-up (refused below anyway). */
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
  if (fd < 0) {
    int e = errno;
    if (e == ELOOP) mv_snprintf(why, cap, "is a symbolic link: refused (give the file itself)");
    else mv_snprintf(why, cap, "cannot open it (errno %d)", e);
    return -1;
  }
  struct stat st;
  const char *bad = NULL;
  if (fstat(fd, &st) != 0) bad = "cannot stat it";
  else if (!S_ISREG(st.st_mode)) bad = "not a regular file";
  else if (st.st_uid != geteuid()) bad = "owned by another user";
  else if (st.st_mode & 077) bad = "open to group or others";
  if (bad) {
    unsigned m = (unsigned)st.st_mode;
    mv_snprintf(why, cap, "%s (owner uid %u, mode %u%u%u): refused; movalloc writes only to a "
                "regular file of its own user with mode 600 (or one it creates)",
                bad, (unsigned)st.st_uid, (m >> 6) & 7, (m >> 3) & 7, m & 7);
    close(fd);
    return -1;
  }
  return fd;
}
