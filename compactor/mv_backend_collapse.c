/* The collapse backend (MADV_COLLAPSE, Linux >= 6.1): the kernel does it all.
 * It allocates the huge page, takes the mmap lock for write (so writers wait
 * on it, system calls included), refuses pinned pages (their extra reference:
 * EAGAIN) and copies. Nothing to stage and nothing to hold: hold() only
 * records the state. The cost is that lock, held during the copy, which stalls
 * every page fault and mmap of the process for that time.
 *
 * Errors: EAGAIN (a page busy or pinned) and ENOMEM (no huge page now, the
 * case in which the other backends' stage() says -EAGAIN) are temporary;
 * EINVAL (not allowed here: VM_NOHUGEPAGE, PR_SET_THP_DISABLE) and the rest,
 * EBUSY for a memory cgroup over its limit among them, are permanent.
 * Timings: swap_ns is the whole MADV_COLLAPSE.
 */
#include <errno.h>
#include <sys/mman.h>

#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"

static int collapse_stage(struct mv_move *m) {
  return m->fail_at == MV_STEP_STAGE ? -EAGAIN : 0;
}

static int collapse_hold(struct mv_move *m) {
  if (m->fail_at == MV_STEP_HOLD) return -EIO;
  m->held = true;
  m->held_at_ns = mv_os_now_ns();
  return 0;
}

static int collapse_move(struct mv_move *m) {
  if (!m->held) return -EINVAL;
  if (m->fail_at == MV_STEP_COPY) return -EAGAIN;
  if (m->fail_at == MV_STEP_SWAP) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  int rc = mv_os_madvise((void *)m->start, MV_ARENA_SIZE, MADV_COLLAPSE);
  int err = errno;
  m->swap_ns = mv_os_now_ns() - t0;
  if (rc) return err == EAGAIN || err == ENOMEM ? -EAGAIN : -err;
  return mv_thp_is_huge(m->start) == 1 ? 0 : -EAGAIN;
}

static void collapse_release(struct mv_move *m) { m->held = false; }

static void collapse_unstage(struct mv_move *m) {}

const struct mv_backend mv_backend_collapse_impl = {
    .kind = MV_BACKEND_COLLAPSE,
    .name = "collapse",
    .pin_safe = true,
    .holds_syscalls = true,
    .stage = collapse_stage,
    .hold = collapse_hold,
    .move = collapse_move,
    .release = collapse_release,
    .unstage = collapse_unstage,
};
