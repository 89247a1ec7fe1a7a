/* Migration backends: the mechanisms that put a fresh transparent huge page
 * under a live 2 MiB range without changing its virtual address and without
 * losing a write. The engine (mv_engine.c) decides what to move and drives the
 * owner's isolate/migrate/putback ops; a backend only knows ranges.
 *
 * The engine calls, for one range [start, start + MV_ARENA_SIZE):
 *
 *   stage()            before anything is isolated; may be slow (faults a THP)
 *   hold()             from its return on, every write to the range waits
 *                      (remap first pre-copies while writers run: mv_precopy.c)
 *   move()             contents onto the staged page, same virtual address
 *                      (move first pre-copies, serving writers again)
 *   release()          held writers run again (after move, success or not)
 *   unstage()          frees a staged page that move() did not consume
 *
 * Contract of every backend:
 * - stage() returns 0 with a page verified to be a real THP (mv_thp_is_huge),
 *   or -EAGAIN when the kernel cannot give one now; nothing is held then.
 * - hold() returns 0 with m->held_at_ns set to when writers began to wait, or
 *   -errno with nothing held. Writes from other threads,
 *   and where the backend says so in mv_backend.holds_syscalls, writes by system
 *   calls (read() into the range), wait until release() (the move backend
 *   serves them during its pre-copy in move(), and sets held_at_ns again when
 *   it stops). Reads of pages that hold data do not wait between hold() and
 *   move(): the owner's migrate() may read the range. Inside move() they wait
 *   too in the move backend, whose pages leave the range.
 * - move() returns 0, -EAGAIN (temporary: a pinned or shared page, a race) or
 *   another -errno (permanent). On any failure the range's contents are exactly
 *   as before the call and the writers are still held. No byte written before
 *   hold() is lost; no write is attempted between hold() and release().
 * - release() never fails and wakes every writer held on the range, also when
 *   move() replaced the VMA under it.
 * - None of them allocates with malloc, and none takes an allocator lock.
 * - mv_move.fail_at injects a failure at one step (tests).
 */
#ifndef MV_BACKEND_H
#define MV_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MV_ARENA_SHIFT 21
#define MV_ARENA_SIZE ((size_t)1 << MV_ARENA_SHIFT)

enum mv_backend_kind {
  MV_BACKEND_OFF,
  MV_BACKEND_MPROTECT,
  MV_BACKEND_COLLAPSE,
  MV_BACKEND_REMAP,
  MV_BACKEND_MOVE,
  MV_BACKEND_COUNT,
  MV_BACKEND_AUTO = -1, /* only as a request: pick the best one this kernel runs */
};

/* Steps at which a test can inject a failure (mv_move.fail_at). */
enum mv_move_step {
  MV_STEP_NONE,
  MV_STEP_STAGE,    /* stage() returns -EAGAIN */
  MV_STEP_HOLD,     /* hold() returns -EIO */
  MV_STEP_MOVE_OUT, /* move backend: moving old pages out fails midway: -EBUSY */
  MV_STEP_COPY,     /* after the copy, before the swap: -EAGAIN */
  MV_STEP_SWAP,     /* the swap (mremap / UFFDIO_MOVE in / MADV_COLLAPSE) fails: -EIO */
};

#define MV_ARENA_PAGES (MV_ARENA_SIZE / 4096)

/* One bit per 4 KiB page of a 2 MiB range. */
struct mv_page_map {
  uint64_t bits[MV_ARENA_PAGES / 64];
};

/* One range being moved. The engine zeroes it and sets start and fail_at; the
 * backend owns the rest. */
struct mv_move {
  uintptr_t start;          /* MV_ARENA_SIZE aligned */
  enum mv_move_step fail_at;
  void *staging;            /* the staged THP, or NULL */
  void *staging_map;        /* what to munmap for it (may be larger, for alignment) */
  size_t staging_map_len;
  void *scratch;            /* backend-private (move: where old pages went) */
  bool held;
  /* Pre-copy (mv_precopy.c): staging holds the pages in copied as they were
   * when copied; of those, only the ones in dirty can have been written since
   * (dirty: every page whose writer was served since hold() began). Both
   * empty when there was no pre-copy. */
  struct mv_page_map copied, dirty;
  /* timings, filled by the backend (ns) */
  uint64_t stage_ns, hold_ns, copy_ns, swap_ns;
  uint64_t held_at_ns;      /* when writers started to wait (CLOCK_MONOTONIC) */
  unsigned precopy_faults;  /* writes served (not held) during the pre-copy */
};

struct mv_backend {
  enum mv_backend_kind kind;
  const char *name;
  bool pin_safe;       /* refuses to move pages a device may be writing */
  bool holds_syscalls; /* a system call writing the range waits instead of EFAULT */
  int (*stage)(struct mv_move *m);
  int (*hold)(struct mv_move *m);
  int (*move)(struct mv_move *m);
  void (*release)(struct mv_move *m);
  void (*unstage)(struct mv_move *m);
};

/* What the running kernel offers, found by trying (never by version numbers). */
struct mv_probe {
  bool uffd;              /* a userfaultfd can be opened (syscall or /dev/userfaultfd) */
  bool uffd_user_only;    /* only with UFFD_USER_MODE_ONLY: syscall writes get EFAULT */
  bool uffd_wp;           /* UFFD_FEATURE_PAGEFAULT_FLAG_WP on anonymous memory */
  bool uffd_wp_unpopulated;
  bool uffd_move;         /* UFFD_FEATURE_MOVE / UFFDIO_MOVE */
  bool collapse;          /* MADV_COLLAPSE accepted */
  bool thp;               /* a THP fault in a MADV_HUGEPAGE range gives a huge page */
  int uffd_errno;         /* why uffd is false (EPERM: sysctl/seccomp, ENOSYS, ...) */
  char why[112];          /* one line: what was found and what was chosen */
};

/* Probes the kernel once per process (cached; mv_backend_forget_probe() for tests).
 * Thread-safe; never allocates. */
const struct mv_probe *mv_backend_probe(void);
void mv_backend_forget_probe(void);

/* Test hook: pretend the kernel lacks features (an "old kernel"). Call before
 * mv_backend_probe(); the next probe ANDs its findings with *mask. */
void mv_backend_mask_probe(const struct mv_probe *mask);

/* The backend for a request: the requested one if the kernel runs it, else the
 * best that it does (move > remap > collapse > mprotect > off for AUTO: the
 * fastest pin-safe one first). why (may be NULL) gets one line explaining the
 * choice. Never returns NULL. */
const struct mv_backend *mv_backend_select(enum mv_backend_kind requested, char *why,
                                           size_t why_len);

/* A backend by kind, whether or not this kernel runs it (tests). */
const struct mv_backend *mv_backend_get(enum mv_backend_kind kind);

/* Name <-> kind ("move", "remap", "collapse", "mprotect", "off", "auto").
 * mv_backend_parse returns -1 for an unknown name. */
const char *mv_backend_name(enum mv_backend_kind kind);
int mv_backend_parse(const char *name, enum mv_backend_kind *out);

/* After fork(), in the child: the parent's userfaultfd does not describe the
 * child's memory. Drops it; the next use opens a fresh one. */
void mv_backend_fork_child(void);

/* VMAs added so far by the backends that mremap a new page over an arena
 * (remap, mprotect): the new VMA never merges with its neighbours, so each
 * remap of an arena inside a larger VMA leaves up to two more. The engine keeps
 * this well below vm.max_map_count. */
size_t mv_backend_remap_vmas(void);

/* 1 if [addr, addr + MV_ARENA_SIZE) is mapped by one transparent huge page,
 * 0 if not, -errno if it cannot be told. Uses /proc/self/pagemap and
 * /proc/kpageflags where PFNs are shown (CAP_SYS_ADMIN), else pagemap's
 * PAGEMAP_SCAN (Linux 6.7), else /proc/self/smaps. addr must be
 * MV_ARENA_SIZE aligned and every page of the range present. */
int mv_thp_is_huge(uintptr_t addr);

/* How many 4 KiB pages of [addr, addr + len) are resident, or -errno. */
long mv_thp_resident_pages(uintptr_t addr, size_t len);

#endif /* MV_BACKEND_H */
