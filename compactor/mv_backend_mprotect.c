/* The mprotect backend (any kernel, no userfaultfd). Not pin-safe, and system
 * calls writing a held range get EFAULT (shim/mv_syscall_retry.c retries the
 * common ones).
 *
 *   stage    install the SIGSEGV handler (once); fault a THP (staging)
 *   hold     note how many VMAs the remap will add; enter the range in the
 *            handler's table, then mprotect(PROT_READ): a write faults and the
 *            handler parks the thread on a futex
 *   move     copy the pages that hold data into staging; make staging read-only
 *            (a thread that had not faulted yet must not write the new page
 *            before release either); mremap it over the arena
 *   release  mprotect(PROT_READ | PROT_WRITE) the arena (the new VMA, or the old
 *            one, which merges back with its neighbours), then end the hold:
 *            the parked threads wake and write
 *
 * An arena is taken to be PROT_READ | PROT_WRITE outside a hold.
 * Between hold and release, m->scratch carries the VMA count (as in remap).
 */
#include <errno.h>
#include <sched.h>
#include <sys/mman.h>

#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "shim/mv_sigsegv.h"

static int mprotect_stage(struct mv_move *m) {
  int rc = mv_sigsegv_install();
  return rc ? rc : mv_thp_stage(m);
}

static int mprotect_hold(struct mv_move *m) {
  if (m->fail_at == MV_STEP_HOLD) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  unsigned delta = mv_remap_vma_delta(m->start);
  int rc = mv_sigsegv_hold(m->start, MV_ARENA_SIZE);
  if (rc) return rc;
  if (mv_os_mprotect((void *)m->start, MV_ARENA_SIZE, PROT_READ) != 0) {
    rc = -errno;
    mv_sigsegv_release(m->start);
    return rc;
  }
  m->scratch = (void *)(uintptr_t)delta;
  m->held = true;
  m->held_at_ns = mv_os_now_ns();
  m->hold_ns = mv_os_now_ns() - t0;
  return 0;
}

static int mprotect_move(struct mv_move *m) {
  if (!m->held || !m->staging) return -EINVAL;
  uint64_t t0 = mv_os_now_ns();
  struct mv_page_map map;
  /* Without the page map every page is read: holes map the zero page, harmless. */
  bool mapped = mv_thp_page_map(m->start, &map) == 0;
  mv_thp_copy_pages(m->staging, (void *)m->start, mapped ? &map : NULL);
  m->copy_ns = mv_os_now_ns() - t0;
  if (m->fail_at == MV_STEP_COPY) return -EAGAIN;
  if (m->fail_at == MV_STEP_SWAP) return -EIO;

  uint64_t t1 = mv_os_now_ns();
  /* The new VMA is the staging one: lock it if the arena was locked. */
  int rc = mv_thp_lock_like(m->start, m->staging, MV_ARENA_SIZE, false);
  if (rc) return rc;
  if (mv_os_mprotect(m->staging, MV_ARENA_SIZE, PROT_READ) != 0) return -errno;
  if (mv_os_mremap(m->staging, MV_ARENA_SIZE, MV_ARENA_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED,
                   (void *)m->start) == MAP_FAILED) {
    rc = -errno;
    /* Staging goes back writable (unstage keeps it for the next stage), or away. */
    if (mv_os_mprotect(m->staging, MV_ARENA_SIZE, PROT_READ | PROT_WRITE) != 0) {
      mv_os_munmap(m->staging_map, m->staging_map_len);
      m->staging = m->staging_map = NULL;
      m->staging_map_len = 0;
    }
    return rc;
  }
  m->staging = m->staging_map = NULL; /* consumed: it is the arena now */
  m->staging_map_len = 0;
  mv_remap_vmas_add((unsigned)(uintptr_t)m->scratch);
  m->swap_ns = mv_os_now_ns() - t1;
  return 0;
}

static void mprotect_release(struct mv_move *m) {
  if (!m->held) return;
  /* Writers released onto a read-only page would fault for good: insist. */
  int tries = 0;
  while (mv_os_mprotect((void *)m->start, MV_ARENA_SIZE, PROT_READ | PROT_WRITE) != 0) {
    if (++tries == 100) mv_fatal("mprotect backend: cannot unprotect %p", (void *)m->start);
    sched_yield();
  }
  mv_sigsegv_release(m->start);
  m->scratch = NULL;
  m->held = false;
}

static void mprotect_unstage(struct mv_move *m) { mv_thp_unstage(m); }

const struct mv_backend mv_backend_mprotect_impl = {
    .kind = MV_BACKEND_MPROTECT,
    .name = "mprotect",
    .pin_safe = false,
    .holds_syscalls = false,
    .stage = mprotect_stage,
    .hold = mprotect_hold,
    .move = mprotect_move,
    .release = mprotect_release,
    .unstage = mprotect_unstage,
};
