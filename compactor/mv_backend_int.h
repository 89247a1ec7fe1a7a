/* What the backends share among themselves (not part of the engine's interface). */
#ifndef MV_BACKEND_INT_H
#define MV_BACKEND_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "arena/mv_atomic.h"
#include "compactor/mv_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifndef MADV_COLLAPSE /* Linux 6.1; glibc 2.36 does not have it */
#define MADV_COLLAPSE 25
#endif

#ifndef MADV_DONTNEED_LOCKED /* Linux 5.18 */
#define MADV_DONTNEED_LOCKED 24
#endif

#define MV_PAGE_SIZE ((size_t)4096)

/* The backends, one per kind. The *_user_only variants are the same code for a
 * userfaultfd opened with UFFD_USER_MODE_ONLY: system calls writing the range
 * get EFAULT instead of waiting, so holds_syscalls is false. */
extern const struct mv_backend mv_backend_off_impl;
extern const struct mv_backend mv_backend_mprotect_impl;
extern const struct mv_backend mv_backend_collapse_impl;
extern const struct mv_backend mv_backend_remap_impl;
extern const struct mv_backend mv_backend_remap_user_only;
extern const struct mv_backend mv_backend_move_impl;
extern const struct mv_backend mv_backend_move_user_only;

/* Descriptors the backends keep open, each opened once per process at a
 * number >= 512 and >= the RLIMIT_NOFILE soft limit when the hard limit leaves
 * room (the soft one is raised for the dup and put back), else >= 512 (half the
 * soft limit when that is lower): away from the lowest free numbers a program
 * counts on (it closes 0 and expects open() to give 0 back) and, where there is
 * room, out of the range a program scans to list its descriptors (a child that
 * checks it holds exactly the descriptors it was given). Every use checks that the number still holds the file opened there
 * (st_dev, st_ino) in this process (getpid(): a /proc/self file describes the
 * process that opened it). If the program closed it or put its own file on
 * that number, another is opened and the number is left alone; one inherited
 * over fork() is closed and opened again. */
enum mv_kept {
  MV_KEPT_UFFD,       /* mv_uffd.c */
  MV_KEPT_PAGEMAP,    /* /proc/self/pagemap */
  MV_KEPT_KPAGEFLAGS, /* /proc/kpageflags */
  MV_KEPT_SMAPS,      /* /proc/self/smaps: read it with pread */
  MV_KEPT_MAPS,       /* /proc/self/maps, for PROCMAP_QUERY */
  MV_KEPT_MEM,        /* /proc/self/mem, for reads that must not fault (pread) */
  MV_KEPT_MEMINFO,    /* /proc/meminfo, every compactor round (purge rule) */
  MV_KEPT_TASKS,      /* /proc/self/task (getdents64 from 0) */
  MV_KEPT_STAT,       /* /proc/self/stat: the main thread's state */
  MV_KEPT_COUNT,
};

/* Moves fd to the lowest free number >= max(512, soft limit) where the hard
 * limit allows, else >= 512 (or half the soft limit), closing the low one;
 * returns the new number, or fd where there is no room up there. */
int mv_fd_high(int fd);

/* The kept descriptor, opened with open_fd (a new descriptor, or -errno) when
 * there is none or it is not ours any more; -errno if that fails. Thread-safe:
 * one caller opens, the others wait. */
int mv_kept_fd(enum mv_kept which, int (*open_fd)(void));

/* Closes it if the number still holds it; the next use opens another. Not
 * while another thread uses it. */
void mv_kept_close(enum mv_kept which);

/* mv_kept_fd for the /proc files above. */
int mv_proc_fd(enum mv_kept which);

/* The whole of a kept /proc file, read again from its start, into buf (at most
 * cap - 1 bytes, NUL-terminated): its length, or -errno (-EAGAIN when the
 * number stopped holding the file during the read). */
long mv_proc_read(enum mv_kept which, char *buf, size_t cap);

/* Maps len bytes (a multiple of MV_ARENA_SIZE) at an MV_ARENA_SIZE aligned
 * address: maps len + MV_ARENA_SIZE and unmaps the ends at once, so that only
 * the aligned range is left to unmap later. NULL on failure (errno set). */
void *mv_thp_map_aligned(size_t len);

/* A 2 MiB aligned VMA kept empty between migrations, so that the next one
 * maps, unmaps and madvises nothing: those take the mmap lock that every other
 * thread's mmap() waits for. tag says what was done to it (the move backend's
 * scratch: which userfaultfd it is registered with). One per slot; the slot is
 * zero-initialised. */
struct mv_spare {
  _Atomic(uintptr_t) addr; /* 0: none kept */
  _Atomic(unsigned) tag;
};

/* Takes the kept VMA (its tag in *tag unless tag is NULL), or returns NULL. */
void *mv_spare_take(struct mv_spare *slot, unsigned *tag);

/* Keeps [p, p + MV_ARENA_SIZE), which must hold no pages, for the next take;
 * unmaps it when the slot is taken or when p is mlocked (a locked VMA would
 * lock what moves through it next). */
void mv_spare_keep(struct mv_spare *slot, void *p, unsigned tag);

/* Unmaps what the slot keeps. */
void mv_spare_drop(struct mv_spare *slot);

/* The staging step shared by backends: takes the kept staging VMA or maps an
 * aligned 2 MiB range with MADV_HUGEPAGE, faults its huge page with a touch,
 * checks it is a real THP and fills m->staging, staging_map, staging_map_len
 * and stage_ns. Returns 0, or -EAGAIN with nothing left mapped but the kept
 * VMA (also when m->fail_at == MV_STEP_STAGE). */
int mv_thp_stage(struct mv_move *m);

/* Frees the staged page if it was not consumed, keeps its VMA for the next
 * stage (or unmaps it), and clears the staging fields. */
void mv_thp_unstage(struct mv_move *m);

/* The move backend's scratch, kept registered with the userfaultfd of its
 * tag's generation (mv_uffd_generation). */
extern struct mv_spare mv_spare_scratch;

/* Unmaps the kept staging and scratch VMAs (tests that count mappings or fake
 * the calls that make them). */
void mv_thp_forget_spares(void);

/* Reads /proc/self/pagemap for [addr, addr + MV_ARENA_SIZE) into *map.
 * 0 or -errno. */
int mv_thp_page_map(uintptr_t addr, struct mv_page_map *map);

/* The same for pages [first, first + n) of it only; the other bits of *map are
 * left as they are. swapped, when not NULL, gets the pages of them that are
 * not present: swapped out, or a userfaultfd write-protect marker. */
int mv_thp_page_map_part(uintptr_t addr, size_t first, size_t n, struct mv_page_map *map,
                         struct mv_page_map *swapped);

static inline bool mv_page_test(const struct mv_page_map *map, size_t i) {
  return map->bits[i / 64] >> (i % 64) & 1;
}

static inline void mv_page_set(struct mv_page_map *map, size_t i) {
  map->bits[i / 64] |= UINT64_C(1) << (i % 64);
}

static inline void mv_page_clear(struct mv_page_map *map, size_t i) {
  map->bits[i / 64] &= ~(UINT64_C(1) << (i % 64));
}

/* The next run of pages set in map within [*i, end): moves *i to its first
 * page and returns the page after its last (*i == end: none left). */
static inline size_t mv_page_run(const struct mv_page_map *map, size_t *i, size_t end) {
  while (*i < end && !mv_page_test(map, *i)) ++*i;
  size_t run = *i;
  while (run < end && mv_page_test(map, run)) run++;
  return run;
}

static inline size_t mv_page_count(const struct mv_page_map *map) {
  size_t n = 0;
  for (size_t w = 0; w < MV_ARENA_PAGES / 64; w++) n += (size_t)__builtin_popcountll(map->bits[w]);
  return n;
}

/* Both pre-copies (remap's and move's) copy the dirty pages again after a
 * pass while more than MV_PRECOPY_FINAL_PAGES are dirty, at most
 * MV_PRECOPY_RECOPY_PASSES times (a hot page stays hot): what is left is few
 * enough to copy with every writer held. */
#define MV_PRECOPY_FINAL_PAGES 32
#define MV_PRECOPY_RECOPY_PASSES 2
static inline bool mv_precopy_again(const struct mv_move *m, int passes_done) {
  return passes_done < MV_PRECOPY_RECOPY_PASSES &&
         mv_page_count(&m->dirty) > MV_PRECOPY_FINAL_PAGES;
}

/* Reads [src, src + len) of this process's memory into dst through
 * /proc/self/mem, which never waits on a userfaultfd: a page that would (a
 * hole in a range registered MISSING) ends the read. Returns the bytes read
 * (fewer than len: the page at src + that count could not be read), or -errno
 * (-EAGAIN: the descriptor was not ours any more; dst holds garbage). */
ssize_t mv_thp_read_mem(void *dst, uintptr_t src, size_t len);

/* Copies the 4 KiB pages marked in *map (all of them when map is NULL) from src
 * to dst, both MV_ARENA_SIZE long. */
void mv_thp_copy_pages(void *dst, const void *src, const struct mv_page_map *map);

/* Pre-copy (mv_precopy.c), for a range registered on the userfaultfd (also
 * MISSING when missing is set: then it never reads a page that is not
 * present) and write-protected: copies its pages that hold data into
 * m->staging while serving its writers, fills m->copied and m->dirty, then
 * write-protects the whole range again and sets m->held_at_ns: from its return
 * on, writers wait. 0, or -errno of the last step (nothing is released: the
 * caller unregisters). */
int mv_precopy(struct mv_move *m, bool missing);

/* Reads every fault pending on the userfaultfd and hands each one in the range
 * to serve_page (page index, whether a write-protect fault), which marks the
 * page dirty and wakes the thread; one outside the range (none should exist:
 * one migration at a time) is only woken. 0 or the first -errno. */
int mv_precopy_serve(struct mv_move *m, int (*serve_page)(struct mv_move *m, size_t i, bool wp));

/* The pre-copy's serve_page: marks page i dirty, unprotects it (or maps the
 * zero page into a hole) and wakes its thread. 0 or -errno. */
int mv_precopy_serve_page(struct mv_move *m, size_t i, bool wp);

/* With writers held: brings staging up to date from src (the range, or where
 * its pages went), whose pages with data are in present (NULL: all of them):
 * copies the ones not pre-copied or dirty, zeroes the ones zapped since. With
 * missing (src is a range registered MISSING) it reads as mv_precopy() does.
 * 0, or -errno when such a read failed (staging is then incomplete). */
int mv_precopy_finish(struct mv_move *m, uintptr_t src, const struct mv_page_map *present,
                      bool missing);

/* mlock()ed arenas must stay locked, and UFFDIO_MOVE only moves between VMAs
 * that are both locked or both not: if the arena's VMA is VM_LOCKED, locks
 * [dst, dst + len) too (onfault: without faulting it in). 0, or -errno when it
 * had to be locked and could not (RLIMIT_MEMLOCK). */
int mv_thp_lock_like(uintptr_t arena, void *dst, size_t len, bool onfault);

/* mv_thp_is_huge's fallback, exposed for tests: /proc/self/smaps only. */
int mv_thp_is_huge_smaps(uintptr_t addr);

/* VMAs that remapping [start, start + MV_ARENA_SIZE) onto a fresh mapping will
 * add: the pieces left of and right of it in the VMA that holds it now (0, 1 or
 * 2). Asked with PROCMAP_QUERY before the range is touched; 2 when the kernel
 * cannot tell. */
unsigned mv_remap_vma_delta(uintptr_t start);

/* Adds to the count that mv_backend_remap_vmas() reports. */
void mv_remap_vmas_add(unsigned n);

#ifdef __cplusplus
}
#endif

#endif /* MV_BACKEND_INT_H */
