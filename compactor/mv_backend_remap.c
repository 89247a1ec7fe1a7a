/* The remap backend (userfaultfd write-protect, Linux >= 5.7). Not pin-safe: a
 * device writing an arena page during the copy writes the old page, which
 * mremap then throws away.
 *
 *   stage    fault a THP (staging)
 *   hold     note how many VMAs the remap will add; register the arena WP (and
 *            MISSING when the kernel lacks WP_UNPOPULATED: an empty PTE cannot
 *            be write-protected then, and a first write there must wait too;
 *            so does a read of a never-touched page, in that mode only);
 *            write-protect it; pre-copy it into staging while serving its
 *            writers (mv_precopy.c), then hold them
 *   move     copy what the pre-copy missed or writers dirtied (pagemap says
 *            which pages hold data) into staging; mremap the staging VMA over
 *            the arena (MREMAP_FIXED): the old VMA, its pages and its
 *            registration are gone in one step
 *   release  the threads held on the old VMA still sleep on the userfaultfd:
 *            UFFDIO_WAKE the range (they fault again on the new VMA); if the
 *            remap did not happen, unregister (clears the protection, wakes)
 *
 * VMAs: the new VMA cannot merge with its neighbours (another anon_vma, another
 * page offset), so a remap adds the pieces left and right of the arena in the
 * VMA that held it. mv_backend_remap_vmas() counts them (also for the mprotect
 * backend, which remaps the same way) so the engine can stay below
 * vm.max_map_count. Between hold and release, m->scratch carries that count.
 */
#include <errno.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"

/* PROCMAP_QUERY (Linux >= 6.11, include/uapi/linux/fs.h): one VMA by address,
 * without parsing /proc/self/maps. */
struct mv_procmap_query {
  uint64_t size;
  uint64_t query_flags;
  uint64_t query_addr;
  uint64_t vma_start;
  uint64_t vma_end;
  uint64_t vma_flags;
  uint64_t vma_page_size;
  uint64_t vma_offset;
  uint64_t inode;
  uint32_t dev_major;
  uint32_t dev_minor;
  uint32_t vma_name_size;
  uint32_t build_id_size;
  uint64_t vma_name_addr;
  uint64_t build_id_addr;
};
#define MV_PROCMAP_QUERY _IOWR('f', 17, struct mv_procmap_query)

static _Atomic size_t remap_vmas;

size_t mv_backend_remap_vmas(void) { return atomic_load_explicit(&remap_vmas, memory_order_relaxed); }

void mv_remap_vmas_add(unsigned n) { atomic_fetch_add_explicit(&remap_vmas, n, memory_order_relaxed); }

static int query_vma(int fd, uintptr_t addr, uintptr_t *start, uintptr_t *end) {
  struct mv_procmap_query q = {.size = sizeof q, .query_addr = addr};
  if (mv_os_ioctl(fd, MV_PROCMAP_QUERY, &q) != 0) return -errno;
  *start = q.vma_start;
  *end = q.vma_end;
  return 0;
}

unsigned mv_remap_vma_delta(uintptr_t start) {
  uintptr_t end = start + MV_ARENA_SIZE, ls, le, rs, re;
  int fd = mv_proc_fd(MV_KEPT_MAPS);
  if (fd < 0) return 2;
  int rc = query_vma(fd, start, &ls, &le);
  if (rc == 0) rc = query_vma(fd, end - 1, &rs, &re);
  if (rc) return 2;
  return (ls < start) + (re > end);
}

static int remap_stage(struct mv_move *m) {
  int rc = mv_thp_stage(m);
  if (rc) return rc;
  rc = mv_uffd_get();
  if (rc < 0) {
    mv_thp_unstage(m);
    return rc;
  }
  return 0;
}

static bool wp_unpopulated(void) { return mv_uffd_features() & UFFD_FEATURE_WP_UNPOPULATED; }

static int remap_hold(struct mv_move *m) {
  if (m->fail_at == MV_STEP_HOLD) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  unsigned delta = mv_remap_vma_delta(m->start); /* before registering splits it */
  int rc = mv_uffd_register(m->start, MV_ARENA_SIZE, !wp_unpopulated(), true);
  if (rc) return rc;
  rc = mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  if (rc) {
    mv_uffd_unregister(m->start, MV_ARENA_SIZE);
    return rc;
  }
  /* With UFFD_USER_MODE_ONLY a system call writing a protected page fails
   * (EFAULT) instead of waiting: keep that window short, no pre-copy. */
  if (mv_backend_probe()->uffd_user_only) m->held_at_ns = mv_os_now_ns();
  else if ((rc = mv_precopy(m, !wp_unpopulated())) != 0) {
    mv_uffd_unregister(m->start, MV_ARENA_SIZE);
    return rc;
  }
  m->scratch = (void *)(uintptr_t)delta;
  m->held = true;
  m->hold_ns = mv_os_now_ns() - t0;
  return 0;
}

static int remap_move(struct mv_move *m) {
  if (!m->held || !m->staging) return -EINVAL;
  uint64_t t0 = mv_os_now_ns();
  struct mv_page_map map;
  int rc = mv_thp_page_map(m->start, &map);
  /* Without the page map, holes must be read too: fine with WP_UNPOPULATED (a
   * read maps the zero page), a wait on ourselves with MISSING. */
  if (rc && !wp_unpopulated()) return rc;
  rc = mv_precopy_finish(m, m->start, rc ? NULL : &map, !wp_unpopulated());
  if (rc) return -EAGAIN; /* a read of the range failed; the arena is as it was */
  m->copy_ns = mv_os_now_ns() - t0;
  if (m->fail_at == MV_STEP_COPY) return -EAGAIN;
  if (m->fail_at == MV_STEP_SWAP) return -EIO;

  uint64_t t1 = mv_os_now_ns();
  /* The new VMA is the staging one: lock it if the arena was locked. */
  rc = mv_thp_lock_like(m->start, m->staging, MV_ARENA_SIZE, false);
  if (rc) return rc;
  if (mv_os_mremap(m->staging, MV_ARENA_SIZE, MV_ARENA_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED,
                   (void *)m->start) == MAP_FAILED)
    return -errno;
  m->staging = m->staging_map = NULL; /* consumed: it is the arena now */
  m->staging_map_len = 0;
  mv_remap_vmas_add((unsigned)(uintptr_t)m->scratch);
  m->swap_ns = mv_os_now_ns() - t1;
  return 0;
}

static void remap_release(struct mv_move *m) {
  if (!m->held) return;
  if (m->staging_map) {
    /* Not remapped: the old VMA is still registered. */
    mv_uffd_unregister_held(m->start, MV_ARENA_SIZE, "remap backend");
  }
  mv_uffd_wake(m->start, MV_ARENA_SIZE);
  m->scratch = NULL;
  m->held = false;
}

static void remap_unstage(struct mv_move *m) { mv_thp_unstage(m); }

const struct mv_backend mv_backend_remap_impl = {
    .kind = MV_BACKEND_REMAP,
    .name = "remap",
    .pin_safe = false,
    .holds_syscalls = true,
    .stage = remap_stage,
    .hold = remap_hold,
    .move = remap_move,
    .release = remap_release,
    .unstage = remap_unstage,
};

const struct mv_backend mv_backend_remap_user_only = {
    .kind = MV_BACKEND_REMAP,
    .name = "remap",
    .pin_safe = false,
    .holds_syscalls = false,
    .stage = remap_stage,
    .hold = remap_hold,
    .move = remap_move,
    .release = remap_release,
    .unstage = remap_unstage,
};
