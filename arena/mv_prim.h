/* OS primitives: every system call movalloc makes goes through this table, so
 * that tests can fake the OS (inject ENOMEM into the third mmap, refuse
 * userfaultfd, ...) without touching the code that calls it.
 *
 * Contract of every entry: it behaves like the Linux system call of the same
 * name, returns -1 (MAP_FAILED for mmap/mremap) and sets errno on failure,
 * never allocates, and is async-signal-safe. Tests replace entries with
 * mv_prim_set() and restore them with mv_prim_reset().
 */
#ifndef MV_PRIM_H
#define MV_PRIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct mv_prim {
  void *(*mmap)(void *addr, size_t len, int prot, int flags, int fd, off_t off);
  int (*munmap)(void *addr, size_t len);
  int (*mprotect)(void *addr, size_t len, int prot);
  int (*madvise)(void *addr, size_t len, int advice);
  void *(*mremap)(void *old_addr, size_t old_len, size_t new_len, int flags,
                  void *new_addr);
  int (*ioctl)(int fd, unsigned long request, void *arg);
  int (*userfaultfd)(int flags);
};

/* The table in force. Read it through the mv_os_* inlines below. */
extern struct mv_prim mv_prim;

/* Replaces the whole table (tests only). */
void mv_prim_set(const struct mv_prim *fake);
/* Puts the real system calls back. */
void mv_prim_reset(void);
/* The real system calls, for fakes that forward. */
extern const struct mv_prim mv_prim_real;

static inline void *mv_os_mmap(void *addr, size_t len, int prot, int flags, int fd,
                               off_t off) {
  return mv_prim.mmap(addr, len, prot, flags, fd, off);
}
static inline int mv_os_munmap(void *addr, size_t len) { return mv_prim.munmap(addr, len); }
static inline int mv_os_mprotect(void *addr, size_t len, int prot) {
  return mv_prim.mprotect(addr, len, prot);
}
static inline int mv_os_madvise(void *addr, size_t len, int advice) {
  return mv_prim.madvise(addr, len, advice);
}
static inline void *mv_os_mremap(void *old_addr, size_t old_len, size_t new_len, int flags,
                                 void *new_addr) {
  return mv_prim.mremap(old_addr, old_len, new_len, flags, new_addr);
}
static inline int mv_os_ioctl(int fd, unsigned long request, void *arg) {
  return mv_prim.ioctl(fd, request, arg);
}
static inline int mv_os_userfaultfd(int flags) { return mv_prim.userfaultfd(flags); }

/* Small helpers that never fail in a way worth faking. */
uint64_t mv_os_now_ns(void);        /* CLOCK_MONOTONIC */
uint64_t mv_os_thread_cpu_ns(void); /* CLOCK_THREAD_CPUTIME_ID */
bool mv_os_clock_from_vdso(void);   /* the two above call the vDSO, not libc */
int mv_os_gettid(void);
void mv_os_random(void *buf, size_t len); /* getrandom, with a fallback that never fails */
/* Writes all of buf to fd, retrying on EINTR and short writes. */
void mv_os_write_all(int fd, const char *buf, size_t len);
/* Reads a small file (e.g. under /proc or /sys) into buf, NUL-terminated.
 * Returns the length or -errno. Never allocates. */
long mv_os_read_file(const char *path, char *buf, size_t cap);
/* Opens path for appending (created mode 0600), only if it is a regular file,
 * not a symbolic link, owned by the effective user and closed to group and
 * others: what movalloc writes must not land in, or be readable from, anyone
 * else's file. Returns the fd, or -1 with the reason in why. */
int mv_os_open_private(const char *path, char *why, size_t cap);

#endif /* MV_PRIM_H */
