/* Huge-page facts about ranges, the staging page every copying backend moves
 * onto, and the descriptors the backends keep open. Reads /proc files with
 * pread directly: these are queries, not actions worth faking through
 * mv_prim. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"

/* ---- descriptors kept open ---- */

/* Opening a file per query from the compactor thread, many times a second,
 * takes the lowest free number for a moment, again and again: a program that
 * closes 0 and opens /dev/null gets 3 instead, its dup2() onto that number
 * fails with EBUSY, and its close() of a number it believes its own closes
 * ours while we still read (so we read, or close, its next file). So each
 * file is opened once per process and kept high. */
#define KEPT_NONE (-1)
#define KEPT_OPENING (-2)
#define KEPT_FD_FLOOR 512

/* fd: the descriptor once published, KEPT_NONE, or KEPT_OPENING while one
 * thread opens it (the others wait). dev, ino and pid are stored before fd is
 * published and change only while it is not. */
static struct {
  _Atomic int fd;
  _Atomic uint64_t dev, ino;
  _Atomic int pid;
} kept[MV_KEPT_COUNT] = {[0 ... MV_KEPT_COUNT - 1] = {.fd = KEPT_NONE}};

/* Whether fd still holds the file opened as kept[which]. */
static bool kept_is_ours(enum mv_kept which, int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 &&
         (uint64_t)st.st_ino == atomic_load_explicit(&kept[which].ino, memory_order_relaxed) &&
         (uint64_t)st.st_dev == atomic_load_explicit(&kept[which].dev, memory_order_relaxed);
}

/* A soft limit above this is left alone: a number above it would grow the
 * descriptor table a lot (8 bytes a slot and more). */
#define KEPT_FD_RAISE_MAX 16384
#define KEPT_FD_ROOM 16 /* numbers the raise opens up: the kept files and spares */

/* A program takes its descriptors to be [0, soft limit): sysconf(_SC_OPEN_MAX)
 * bounds the scans that check which are open (Python's subprocess tests list
 * them in a child and compare with the ones they passed down). A number at or
 * above the soft limit is invisible to those scans and can never be handed to
 * the program, and the kernel keeps such a descriptor valid; F_DUPFD only
 * creates it while the limit is higher, so the soft limit is raised for the
 * one fcntl and put back. If the program set a limit of its own in between,
 * that one is put back instead. -1 where the hard limit leaves no room. */
static int dup_above_limit(int fd, const struct rlimit *rl) {
  rlim_t at = rl->rlim_cur > KEPT_FD_FLOOR ? rl->rlim_cur : KEPT_FD_FLOOR;
  if (rl->rlim_cur > KEPT_FD_RAISE_MAX || at + KEPT_FD_ROOM > rl->rlim_max) return -1;
  struct rlimit raised = {at + KEPT_FD_ROOM, rl->rlim_max}, before, during;
  if (prlimit(0, RLIMIT_NOFILE, &raised, &before) != 0) return -1;
  int high = fcntl(fd, F_DUPFD_CLOEXEC, (int)at);
  if (prlimit(0, RLIMIT_NOFILE, &before, &during) == 0 &&
      (during.rlim_cur != raised.rlim_cur || during.rlim_max != raised.rlim_max))
    prlimit(0, RLIMIT_NOFILE, &during, NULL);
  return high;
}

int mv_fd_high(int fd) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return fd;
  int high = dup_above_limit(fd, &rl);
  if (high < 0) {
    /* soft == hard (containers often): the upper half of the program's range */
    int floor = KEPT_FD_FLOOR;
    if (rl.rlim_cur / 2 < (rlim_t)floor) floor = (int)(rl.rlim_cur / 2);
    if (fd >= floor) return fd;
    high = fcntl(fd, F_DUPFD_CLOEXEC, floor);
    if (high < 0) return fd;
  }
  close(fd);
  return high;
}

int mv_kept_fd(enum mv_kept which, int (*open_fd)(void)) {
  for (;;) {
    int fd = atomic_load_explicit(&kept[which].fd, memory_order_acquire);
    if (fd == KEPT_OPENING) {
      sched_yield();
      continue;
    }
    bool ours = fd >= 0 && kept_is_ours(which, fd);
    bool here = atomic_load_explicit(&kept[which].pid, memory_order_relaxed) == getpid();
    if (ours && here) return fd;
    if (!atomic_compare_exchange_strong_explicit(&kept[which].fd, &fd, KEPT_OPENING,
                                                 memory_order_acquire, memory_order_acquire))
      continue;
    /* Inherited over fork(): ours to close (a /proc/self file would describe
     * the parent). Not ours any more: forgotten, never closed, for that number
     * may hold the program's file now. */
    if (ours) close(fd);
    int fresh = open_fd();
    struct stat st;
    if (fresh >= 0) {
      fresh = mv_fd_high(fresh);
      if (fstat(fresh, &st) != 0) {
        int err = errno;
        close(fresh);
        fresh = -err;
      }
    }
    if (fresh >= 0) {
      atomic_store_explicit(&kept[which].dev, (uint64_t)st.st_dev, memory_order_relaxed);
      atomic_store_explicit(&kept[which].ino, (uint64_t)st.st_ino, memory_order_relaxed);
      atomic_store_explicit(&kept[which].pid, getpid(), memory_order_relaxed);
    }
    atomic_store_explicit(&kept[which].fd, fresh >= 0 ? fresh : KEPT_NONE, memory_order_release);
    return fresh;
  }
}

void mv_kept_close(enum mv_kept which) {
  int fd = atomic_load(&kept[which].fd);
  bool ours = fd >= 0 && kept_is_ours(which, fd);
  atomic_store(&kept[which].fd, KEPT_NONE);
  if (ours) close(fd);
}

static int open_proc(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  return fd >= 0 ? fd : -errno;
}
static int open_pagemap(void) { return open_proc("/proc/self/pagemap"); }
static int open_kpageflags(void) { return open_proc("/proc/kpageflags"); }
static int open_smaps(void) { return open_proc("/proc/self/smaps"); }
static int open_maps(void) { return open_proc("/proc/self/maps"); }
static int open_mem(void) { return open_proc("/proc/self/mem"); }
static int open_meminfo(void) { return open_proc("/proc/meminfo"); }
static int open_stat(void) { return open_proc("/proc/self/stat"); }
static int open_tasks(void) { return open_proc("/proc/self/task"); }

int mv_proc_fd(enum mv_kept which) {
  static int (*const openers[MV_KEPT_COUNT])(void) = {
      [MV_KEPT_PAGEMAP] = open_pagemap,
      [MV_KEPT_KPAGEFLAGS] = open_kpageflags,
      [MV_KEPT_SMAPS] = open_smaps,
      [MV_KEPT_MAPS] = open_maps,
      [MV_KEPT_MEM] = open_mem,
      [MV_KEPT_MEMINFO] = open_meminfo,
      [MV_KEPT_TASKS] = open_tasks,
      [MV_KEPT_STAT] = open_stat,
  };
  return openers[which] ? mv_kept_fd(which, openers[which]) : -EINVAL;
}

/* ---- huge-page facts ---- */

#define PM_PFN_MASK ((UINT64_C(1) << 55) - 1)
#define PM_SWAP (UINT64_C(1) << 62)
#define PM_PRESENT (UINT64_C(1) << 63)
#define KPF_COMPOUND_HEAD 15
#define KPF_THP 22

/* Reads exactly len bytes at off, or returns -errno (-EIO on a short read). */
static int pread_all(int fd, void *buf, size_t len, off_t off) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = pread(fd, (char *)buf + got, len - got, off + (off_t)got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) return -EIO;
    got += (size_t)n;
  }
  return 0;
}

/* pread_all of a kept /proc file, checked again after the read: the program
 * may put its own file on that number in between, and pagemap read from
 * /dev/zero would say "no page here", which the copy would believe. */
static int proc_pread(enum mv_kept which, void *buf, size_t len, off_t off) {
  int fd = mv_proc_fd(which);
  if (fd < 0) return fd;
  int rc = pread_all(fd, buf, len, off);
  return kept_is_ours(which, fd) ? rc : -EAGAIN;
}

long mv_proc_read(enum mv_kept which, char *buf, size_t cap) {
  if (cap == 0) return -EINVAL;
  int fd = mv_proc_fd(which);
  if (fd < 0) return fd;
  size_t got = 0;
  while (got + 1 < cap) {
    ssize_t n = pread(fd, buf + got, cap - 1 - got, (off_t)got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) break;
    got += (size_t)n;
  }
  buf[got] = '\0';
  return kept_is_ours(which, fd) ? (long)got : -EAGAIN;
}

static int read_pagemap_n(uintptr_t addr, uint64_t *entries, size_t n) {
  return proc_pread(MV_KEPT_PAGEMAP, entries, n * sizeof(uint64_t),
                    (off_t)(addr / MV_PAGE_SIZE * sizeof(uint64_t)));
}

static int read_pagemap(uintptr_t addr, uint64_t entries[MV_ARENA_PAGES]) {
  return read_pagemap_n(addr, entries, MV_ARENA_PAGES);
}

/* Sets the bits of pages [first, first + n) whose pagemap entry shows a page
 * (present, or swapped out: PM_PRESENT | PM_SWAP) in *there and, when swapped
 * is not NULL, of those not present in *swapped; clears the others. */
static int page_map_part(uintptr_t addr, size_t first, size_t n, struct mv_page_map *there,
                         struct mv_page_map *swapped) {
  uint64_t pm[MV_ARENA_PAGES];
  int rc = read_pagemap_n(addr + first * MV_PAGE_SIZE, pm, n);
  if (rc) return rc;
  for (size_t i = first; i < first + n; i++) {
    uint64_t bit = UINT64_C(1) << (i % 64), shown = pm[i - first] & (PM_PRESENT | PM_SWAP);
    if (shown) there->bits[i / 64] |= bit;
    else there->bits[i / 64] &= ~bit;
    if (!swapped) continue;
    if (shown == PM_SWAP) swapped->bits[i / 64] |= bit;
    else swapped->bits[i / 64] &= ~bit;
  }
  return 0;
}

ssize_t mv_thp_read_mem(void *dst, uintptr_t src, size_t len) {
  int fd = mv_proc_fd(MV_KEPT_MEM);
  if (fd < 0) return fd;
  ssize_t n;
  do n = pread(fd, dst, len, (off_t)src);
  while (n < 0 && errno == EINTR);
  /* EIO: the first page could not be read (mem_rw's answer to -EFAULT). */
  if (n < 0) n = errno == EIO || errno == EFAULT ? 0 : -errno;
  return kept_is_ours(MV_KEPT_MEM, fd) ? n : -EAGAIN;
}

int mv_thp_page_map(uintptr_t addr, struct mv_page_map *map) {
  return page_map_part(addr, 0, MV_ARENA_PAGES, map, NULL);
}

int mv_thp_page_map_part(uintptr_t addr, size_t first, size_t n, struct mv_page_map *map,
                         struct mv_page_map *swapped) {
  return page_map_part(addr, first, n, map, swapped);
}

void mv_thp_copy_pages(void *dst, const void *src, const struct mv_page_map *map) {
  if (!map) {
    memcpy(dst, src, MV_ARENA_SIZE);
    return;
  }
  for (size_t i = 0, end; (end = mv_page_run(map, &i, MV_ARENA_PAGES)) > i; i = end)
    memcpy((char *)dst + i * MV_PAGE_SIZE, (const char *)src + i * MV_PAGE_SIZE,
           (end - i) * MV_PAGE_SIZE);
}

/* Parses an unsigned decimal or hex number at *s, advancing *s. */
static uint64_t parse_num(const char **s, unsigned base) {
  uint64_t v = 0;
  for (;; (*s)++) {
    char c = **s;
    unsigned d;
    if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
    else if (base == 16 && c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
    else break;
    v = v * base + d;
  }
  return v;
}

/* Scans /proc/self/smaps for the VMA holding addr: its bounds and AnonHugePages
 * (kB). Streams through a stack buffer, one line at a time. 0 or -errno. */
static int smaps_vma(uintptr_t addr, uintptr_t *vs, uintptr_t *ve, uint64_t *ahp_kb) {
  int fd = mv_proc_fd(MV_KEPT_SMAPS);
  if (fd < 0) return fd;
  char buf[4096];
  size_t have = 0;
  off_t off = 0; /* pread: the kept descriptor's position is nobody's */
  bool inside = false, found = false;
  int rc = -ENOENT;
  for (;;) {
    ssize_t n = pread(fd, buf + have, sizeof buf - have, off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    off += n;
    have += (size_t)n;
    size_t pos = 0;
    for (;;) {
      char *nl = memchr(buf + pos, '\n', have - pos);
      if (!nl) break;
      *nl = 0;
      const char *line = buf + pos;
      pos = (size_t)(nl - buf) + 1;
      const char *p = line;
      uint64_t lo = parse_num(&p, 16);
      if (*p == '-' && p > line) { /* a VMA header: "start-end perms ..." */
        p++;
        uint64_t hi = parse_num(&p, 16);
        if (inside) goto done; /* its AnonHugePages line was missing */
        inside = addr >= lo && addr < hi;
        if (inside) *vs = lo, *ve = hi;
      } else if (inside && strncmp(line, "AnonHugePages:", 14) == 0) {
        p = line + 14;
        while (*p == ' ') p++;
        *ahp_kb = parse_num(&p, 10);
        found = true;
        goto done;
      }
    }
    for (size_t i = pos; i < have; i++) buf[i - pos] = buf[i]; /* no __memmove_chk (mv_arena.c) */
    have -= pos;
    if (have == sizeof buf) break; /* a line longer than the buffer: give up */
  }
done:
  if (found) rc = kept_is_ours(MV_KEPT_SMAPS, fd) ? 0 : -EAGAIN; /* as proc_pread */
  return rc;
}

int mv_thp_is_huge_smaps(uintptr_t addr) {
  uintptr_t vs = 0, ve = 0;
  uint64_t kb = 0;
  int rc = smaps_vma(addr, &vs, &ve, &kb);
  if (rc) return rc;
  if (kb == 0) return 0;
  /* AnonHugePages is per VMA: it names this range only if the VMA is the range. */
  if (vs == addr && ve == addr + MV_ARENA_SIZE) return kb >= MV_ARENA_SIZE / 1024;
  return -EOPNOTSUPP;
}

/* PAGEMAP_SCAN (Linux 6.7; not in glibc 2.36's headers): asks pagemap for the
 * runs of [start, end) whose pages are in a category. */
#define MV_PAGEMAP_SCAN _IOWR('f', 16, struct mv_pm_scan_arg)
#define MV_PAGE_IS_HUGE (1ull << 6) /* mapped by a PMD: a THP (or hugetlb) */
struct mv_pm_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct mv_page_region {
  uint64_t start, end, categories;
};

/* 1 if one PMD maps the whole range, 0 if not, -errno when the kernel cannot
 * say (before 6.7). Needs no privilege, unlike the PFNs in pagemap entries: a
 * process without CAP_SYS_ADMIN otherwise has only smaps, which cannot tell
 * one arena inside a larger VMA (the heap), and MADV_COLLAPSE would never be
 * confirmed. */
static int scan_is_huge(uintptr_t addr) {
  int fd = mv_proc_fd(MV_KEPT_PAGEMAP);
  if (fd < 0) return fd;
  struct mv_page_region r[2];
  struct mv_pm_scan_arg a = {
      .size = sizeof a,
      .start = addr,
      .end = addr + MV_ARENA_SIZE,
      .vec = (uintptr_t)r,
      .vec_len = 2,
      .category_mask = MV_PAGE_IS_HUGE,
      .return_mask = MV_PAGE_IS_HUGE,
  };
  long n = ioctl(fd, MV_PAGEMAP_SCAN, &a);
  if (n < 0) return -errno;
  if (!kept_is_ours(MV_KEPT_PAGEMAP, fd)) return -EAGAIN; /* as proc_pread */
  return n == 1 && r[0].start == addr && r[0].end == addr + MV_ARENA_SIZE;
}

int mv_thp_is_huge(uintptr_t addr) {
  if (addr & (MV_ARENA_SIZE - 1)) return -EINVAL;
  uint64_t pm[MV_ARENA_PAGES];
  if (read_pagemap(addr, pm) == 0) {
    for (size_t i = 0; i < MV_ARENA_PAGES; i++)
      if (!(pm[i] & PM_PRESENT)) return 0;
    uint64_t pfn = pm[0] & PM_PFN_MASK;
    if (pfn != 0) { /* PFNs are shown only with CAP_SYS_ADMIN */
      if (pfn % MV_ARENA_PAGES) return 0;
      for (size_t i = 1; i < MV_ARENA_PAGES; i++)
        if ((pm[i] & PM_PFN_MASK) != pfn + i) return 0;
      uint64_t flags = 0;
      if (proc_pread(MV_KEPT_KPAGEFLAGS, &flags, sizeof flags, (off_t)(pfn * sizeof flags)) == 0)
        return (flags >> KPF_THP & 1) && (flags >> KPF_COMPOUND_HEAD & 1);
    }
  }
  int rc = scan_is_huge(addr);
  return rc >= 0 ? rc : mv_thp_is_huge_smaps(addr);
}

long mv_thp_resident_pages(uintptr_t addr, size_t len) {
  uintptr_t start = addr & ~(uintptr_t)(MV_PAGE_SIZE - 1);
  uintptr_t end = (addr + len + MV_PAGE_SIZE - 1) & ~(uintptr_t)(MV_PAGE_SIZE - 1);
  unsigned char vec[512];
  long resident = 0;
  for (uintptr_t a = start; a < end;) {
    size_t pages = (end - a) / MV_PAGE_SIZE;
    if (pages > sizeof vec) pages = sizeof vec;
    if (mincore((void *)a, pages * MV_PAGE_SIZE, vec) != 0) return -errno;
    for (size_t i = 0; i < pages; i++) resident += vec[i] & 1;
    a += pages * MV_PAGE_SIZE;
  }
  return resident;
}

int mv_thp_lock_like(uintptr_t arena, void *dst, size_t len, bool onfault) {
  /* VM_LOCKED shows nowhere cheap, but msync(MS_INVALIDATE) refuses a locked
   * range with EBUSY, and on anonymous memory it does nothing else. */
  if (msync((void *)arena, MV_PAGE_SIZE, MS_INVALIDATE) == 0 || errno != EBUSY) return 0;
  return mlock2(dst, len, onfault ? MLOCK_ONFAULT : 0) == 0 ? 0 : -errno;
}

void *mv_thp_map_aligned(size_t len) {
  size_t span = len + MV_ARENA_SIZE;
  char *p = mv_os_mmap(NULL, span, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *a = (char *)(((uintptr_t)p + MV_ARENA_SIZE - 1) & ~(uintptr_t)(MV_ARENA_SIZE - 1));
  if (a > p) mv_os_munmap(p, (size_t)(a - p));
  if (a + len < p + span) mv_os_munmap(a + len, (size_t)(p + span - (a + len)));
  return a;
}

void *mv_spare_take(struct mv_spare *slot, unsigned *tag) {
  uintptr_t p = atomic_exchange_explicit(&slot->addr, 0, memory_order_acquire);
  if (tag) *tag = atomic_load_explicit(&slot->tag, memory_order_relaxed);
  return (void *)p;
}

void mv_spare_keep(struct mv_spare *slot, void *p, unsigned tag) {
  /* msync(MS_INVALIDATE) refuses a locked range with EBUSY (mv_thp_lock_like) */
  bool locked = msync(p, MV_PAGE_SIZE, MS_INVALIDATE) != 0 && errno == EBUSY;
  uintptr_t none = 0;
  atomic_store_explicit(&slot->tag, tag, memory_order_relaxed);
  if (locked || !atomic_compare_exchange_strong_explicit(&slot->addr, &none, (uintptr_t)p,
                                                         memory_order_release,
                                                         memory_order_relaxed))
    mv_os_munmap(p, MV_ARENA_SIZE);
}

void mv_spare_drop(struct mv_spare *slot) {
  void *p = mv_spare_take(slot, NULL);
  if (p) mv_os_munmap(p, MV_ARENA_SIZE);
}

static struct mv_spare spare_staging;
struct mv_spare mv_spare_scratch;

void mv_thp_forget_spares(void) {
  mv_spare_drop(&spare_staging);
  mv_spare_drop(&mv_spare_scratch);
}

int mv_thp_stage(struct mv_move *m) {
  if (m->fail_at == MV_STEP_STAGE) return -EAGAIN;
  uint64_t t0 = mv_os_now_ns();
  char *p = mv_spare_take(&spare_staging, NULL);
  int rc = 0;
  if (!p) {
    p = mv_thp_map_aligned(MV_ARENA_SIZE);
    if (!p) return -EAGAIN;
    rc = mv_os_madvise(p, MV_ARENA_SIZE, MADV_HUGEPAGE);
  }
  /* Direct compaction may run here (defrag=madvise): this is the slow part, and
   * it happens before anything is held. One touch faults the whole THP, under
   * the VMA's own lock: MADV_POPULATE_WRITE would zero 2 MiB holding the
   * process's mmap lock, and every other thread's mmap() would wait for it. */
  if (rc == 0) *(volatile char *)p = 0;
  if (rc != 0 || mv_thp_is_huge((uintptr_t)p) != 1) {
    /* Not kept: whatever stood in the way (no free huge page now, or a page
     * table left in a kept VMA) is not met again by the next stage. */
    mv_os_munmap(p, MV_ARENA_SIZE);
    return -EAGAIN;
  }
  m->staging = p;
  m->staging_map = p;
  m->staging_map_len = MV_ARENA_SIZE;
  m->stage_ns = mv_os_now_ns() - t0;
  return 0;
}

void mv_thp_unstage(struct mv_move *m) {
  /* The staged page if not consumed, and the page table (CONFIG_PT_RECLAIM),
   * go first: the next stage's THP fault needs an empty PMD. */
  void *p = m->staging_map;
  if (p && mv_os_madvise(p, MV_ARENA_SIZE, MADV_DONTNEED) == 0)
    mv_spare_keep(&spare_staging, p, 0);
  else if (p)
    mv_os_munmap(p, m->staging_map_len);
  m->staging = NULL;
  m->staging_map = NULL;
  m->staging_map_len = 0;
}
