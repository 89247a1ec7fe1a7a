/* The move backend (UFFDIO_MOVE, Linux >= 6.8): pin-safe, and the VMA is never
 * split for longer than the move.
 *
 *   stage    fault a THP (staging); take a 2 MiB scratch range registered on
 *            the userfaultfd (UFFDIO_MOVE only moves into registered ranges),
 *            kept empty from the last move
 *   hold     register the arena MISSING|WP, write-protect it; check for pins
 *            (every page moved out to scratch and back: EBUSY means pinned,
 *            -EAGAIN); pre-copy it into staging while serving its writers
 *            (mv_precopy.c), then hold them
 *   move     1. drop the protection without waking (WP_UNPOPULATED left markers
 *               in empty PTEs, and UFFDIO_MOVE refuses markers with EFAULT) from
 *               the pages step 3 copies anyway: not pre-copied, or dirty. From
 *               here such a page still in the arena takes its writes with it
 *               when it is moved out, and a write to a moved-out page waits
 *               (MISSING). Pre-copied clean pages hold data, so no marker.
 *            2. move the arena's pages out to scratch: the kernel refuses a
 *               pinned or copy-on-write shared page with EBUSY, which is the pin
 *               check; then everything moved goes back and the answer is -EAGAIN.
 *               A marker met here (the program zapped a protected page) is a
 *               hole: unprotected, and passed
 *            3. copy what the pre-copy missed or writers dirtied, scratch ->
 *               staging: nothing can reach those pages any more, and no device
 *               was writing them (the pin check at hold)
 *            4. MADV_DONTNEED the (now empty) arena so its PTE table is freed
 *               (CONFIG_PT_RECLAIM), then UFFDIO_MOVE the staged THP in as one PMD
 *   release  unregister (clears the protection, wakes the range, merges the VMA
 *            back), free the old pages in scratch; scratch and the empty
 *            staging VMA are kept for the next move (mv_spare_keep)
 *
 * An mlock()ed arena keeps its VMA, so it stays locked; scratch and staging
 * are locked like it, because UFFDIO_MOVE refuses to move between a locked and
 * an unlocked VMA (EINVAL).
 *
 * Readers wait too, from the moment their page is moved out until it is back
 * (the pin check) or until release: the data is not in the arena then. That
 * window is the pin check, and steps 2 to 4.
 * Timings: copy_ns covers steps 1 to 3, swap_ns step 4.
 */
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>

#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"

static int move_stage(struct mv_move *m) {
  int rc = mv_thp_stage(m);
  if (rc) return rc;
  rc = mv_uffd_get();
  unsigned gen;
  char *s = rc < 0 ? NULL : mv_spare_take(&mv_spare_scratch, &gen);
  if (s && gen != mv_uffd_generation()) { /* registered with a descriptor gone since */
    mv_os_munmap(s, MV_ARENA_SIZE);
    s = NULL;
  }
  if (rc >= 0 && !s) {
    /* WP mode only: UFFDIO_MOVE needs the destination registered, and with no
     * MISSING mode a read of a hole in scratch never blocks. 2 MiB aligned, so
     * that an arena already on a THP moves out as one PMD. */
    s = mv_thp_map_aligned(MV_ARENA_SIZE);
    rc = s ? mv_uffd_register((uintptr_t)s, MV_ARENA_SIZE, false, true) : -EAGAIN;
  }
  if (rc < 0) {
    if (s) mv_os_munmap(s, MV_ARENA_SIZE);
    mv_thp_unstage(m);
    return rc;
  }
  m->scratch = s;
  return 0;
}

/* Moves scratch [from, to) back into the arena.
 *
 * Nothing else can map a page into the arena meanwhile: it is registered
 * MISSING, so every fault there (read or write, THP or zero page, from a
 * thread or a system call) waits, and GUP without FAULT_FLAG_ALLOW_RETRY gets
 * EFAULT instead. What used to make this fail with EEXIST was Linux 6.18's
 * UFFDIO_MOVE moving pages it did not count (see mv_uffd_move): a move-in that
 * "failed with nothing moved" had put staging pages in the arena, and a
 * move-out had left uncounted pages in scratch, which went with it. mv_uffd_move
 * now takes the count from the page tables, so an arena page that is still
 * in the way here is one that cannot be explained, and guessing which copy
 * is right would lose data silently. */
static void move_back(struct mv_move *m, size_t from, size_t to) {
  uintptr_t a = m->start, s = (uintptr_t)m->scratch;
  size_t done = from;
  for (int tries = 0; done < to; tries++) {
    int err;
    done += mv_uffd_move(a + done, s + done, to - done,
                         UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | UFFDIO_MOVE_MODE_DONTWAKE, &err);
    if (done < to && tries == 100)
      mv_fatal("move backend: cannot put %zu bytes back at %p (errno %d)", to - done,
               (void *)(a + done), err);
    if (done < to) sched_yield();
  }
}

/* Moves scratch [from, to) back and write-protects the arena again, so the
 * contents are as before and writers are held. Returns rc. */
static int put_back(struct mv_move *m, size_t from, size_t to, int rc) {
  move_back(m, from, to);
  mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  return rc;
}

/* EBUSY (a pinned or shared page) and EAGAIN are worth another pass. */
static int temporary_or(int err) { return err == EBUSY || err == EAGAIN ? -EAGAIN : -err; }

/* The pin check before a pre-copy: every page moved out to scratch and back.
 * UFFDIO_MOVE refuses a pinned page (EBUSY), and once the protection is armed
 * a new write pin has to fault first (GUP for write breaks the protection),
 * which the pre-copy sees. So after this no device writes the arena behind
 * the pre-copy's back: a pin taken before the protection and dropped before
 * its page's check had its DMA done before the pre-copy began.
 *
 * PIN_CHECK_PAGES at a time, serving faults in between, so that a reader or
 * writer of a page that is out waits for one batch only; a THP goes whole (one
 * PMD, a few microseconds). 0, or -EAGAIN (pinned or shared) / -errno with
 * the contents as before. */
#define PIN_CHECK_PAGES 64

static int check_pins(struct mv_move *m) {
  uintptr_t a = m->start, s = (uintptr_t)m->scratch;
  bool markers = mv_uffd_features() & UFFD_FEATURE_WP_UNPOPULATED;
  size_t step = mv_thp_is_huge(a) == 1 ? MV_ARENA_SIZE : PIN_CHECK_PAGES * MV_PAGE_SIZE;
  for (size_t off = 0; off < MV_ARENA_SIZE; off += step) {
    int rc = mv_precopy_serve(m);
    if (rc) return rc;
    /* UFFDIO_MOVE refuses WP_UNPOPULATED's markers (EFAULT): unprotected,
     * without waking, for as long as the batch is out. */
    if (markers && (rc = mv_uffd_writeprotect(a + off, step, false, false)) != 0) return rc;
    int err;
    size_t out = mv_uffd_move(s + off, a + off, step,
                              UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | UFFDIO_MOVE_MODE_DONTWAKE, &err);
    move_back(m, off, off + out);
    int wp = mv_uffd_writeprotect(a + off, step, true, true);
    if (err || wp) return err ? temporary_or(err) : wp;
  }
  return 0;
}

static int move_hold(struct mv_move *m) {
  if (m->fail_at == MV_STEP_HOLD) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  int rc = mv_thp_lock_like(m->start, m->scratch, MV_ARENA_SIZE, true);
  if (rc == 0) rc = mv_thp_lock_like(m->start, m->staging, MV_ARENA_SIZE, false);
  if (rc == 0) rc = mv_uffd_register(m->start, MV_ARENA_SIZE, true, true);
  if (rc) return rc;
  rc = mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  /* With UFFD_USER_MODE_ONLY a system call writing a protected page fails
   * (EFAULT) instead of waiting: keep that window short, no pre-copy. */
  if (rc == 0 && mv_backend_probe()->uffd_user_only) m->held_at_ns = mv_os_now_ns();
  else {
    if (rc == 0) rc = check_pins(m);
    if (rc == 0) rc = mv_precopy(m, true);
  }
  if (rc) {
    mv_uffd_unregister(m->start, MV_ARENA_SIZE);
    return rc;
  }
  m->held = true;
  m->hold_ns = mv_os_now_ns() - t0;
  return 0;
}

static int move_move(struct mv_move *m) {
  if (!m->held || !m->staging || !m->scratch) return -EINVAL;
  uintptr_t a = m->start, s = (uintptr_t)m->scratch, t = (uintptr_t)m->staging;
  uint64_t t0 = mv_os_now_ns();
  int err;
  if (mv_uffd_features() & UFFD_FEATURE_WP_UNPOPULATED) {
    int rc = mv_precopy_unprotect_recopied(m);
    if (rc) return put_back(m, 0, 0, rc);
  }

  /* The injected failure moves half out, then gets what a pinned page gives. */
  size_t len = m->fail_at == MV_STEP_MOVE_OUT ? MV_ARENA_SIZE / 2 : MV_ARENA_SIZE;
  size_t out = 0;
  for (size_t markers = 0;; markers++) {
    out += mv_uffd_move(s + out, a + out, len - out,
                        UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | UFFDIO_MOVE_MODE_DONTWAKE, &err);
    /* EFAULT: a marker, left where the program zapped (MADV_DONTNEED) a
     * protected page since step 1. It is a hole: unprotected like the others,
     * and the move goes on from it (a marker does not come back unprotected). */
    if (err != EFAULT || markers == MV_ARENA_PAGES ||
        mv_uffd_writeprotect(a + out, MV_PAGE_SIZE, false, false) != 0)
      break;
  }
  if (!err && m->fail_at == MV_STEP_MOVE_OUT) err = EBUSY;
  if (err) return put_back(m, 0, out, temporary_or(err));

  struct mv_page_map map;
  bool mapped = mv_thp_page_map(s, &map) == 0;
  mv_precopy_finish(m, s, mapped ? &map : NULL, false); /* scratch: WP only, never fails */
  m->copy_ns = mv_os_now_ns() - t0;
  if (m->fail_at == MV_STEP_COPY) return put_back(m, 0, MV_ARENA_SIZE, -EAGAIN);

  uint64_t t1 = mv_os_now_ns();
  /* Nothing is left to zap: this only frees the empty PTE table, so that the
   * PMD goes in whole instead of the THP being split into the table. The
   * _LOCKED variant (5.18) also works on an mlock()ed arena. */
  if (mv_os_madvise((void *)a, MV_ARENA_SIZE, MADV_DONTNEED_LOCKED) != 0)
    mv_os_madvise((void *)a, MV_ARENA_SIZE, MADV_DONTNEED);
  size_t in = 0;
  if (m->fail_at == MV_STEP_SWAP) err = EIO;
  else in = mv_uffd_move(a, t, MV_ARENA_SIZE, UFFDIO_MOVE_MODE_DONTWAKE, &err);
  /* What did go in is the copy of what was there: put back only the rest. */
  if (err) return put_back(m, in, MV_ARENA_SIZE, temporary_or(err));
  m->staging = NULL; /* consumed; release unmaps the empty VMA left at staging_map */
  m->swap_ns = mv_os_now_ns() - t1;

  /* The contents are right either way; a THP split on the way in (no PT
   * reclaim on this kernel, or a race) is worth another try. */
  if (mv_thp_is_huge(a) != 1) return put_back(m, 0, 0, -EAGAIN);
  return 0;
}

/* The old pages are freed with MADV_DONTNEED (which takes only the VMA's lock
 * since Linux 6.16) and the empty VMA is kept for the next move: no munmap
 * holding the mmap lock that every other thread's mmap() needs. */
static void free_scratch(struct mv_move *m) {
  if (!m->scratch) return;
  if (mv_os_madvise(m->scratch, MV_ARENA_SIZE, MADV_DONTNEED_LOCKED) == 0 ||
      mv_os_madvise(m->scratch, MV_ARENA_SIZE, MADV_DONTNEED) == 0)
    mv_spare_keep(&mv_spare_scratch, m->scratch, mv_uffd_generation());
  else
    mv_os_munmap(m->scratch, MV_ARENA_SIZE);
  m->scratch = NULL;
}

static void move_release(struct mv_move *m) {
  if (m->held) {
    mv_uffd_unregister_held(m->start, MV_ARENA_SIZE, "move backend");
    mv_uffd_wake(m->start, MV_ARENA_SIZE);
    m->held = false;
  }
  free_scratch(m);
  if (!m->staging) mv_thp_unstage(m);
}

static void move_unstage(struct mv_move *m) {
  free_scratch(m);
  mv_thp_unstage(m);
}

const struct mv_backend mv_backend_move_impl = {
    .kind = MV_BACKEND_MOVE,
    .name = "move",
    .pin_safe = true,
    .holds_syscalls = true,
    .stage = move_stage,
    .hold = move_hold,
    .move = move_move,
    .release = move_release,
    .unstage = move_unstage,
};

const struct mv_backend mv_backend_move_user_only = {
    .kind = MV_BACKEND_MOVE,
    .name = "move",
    .pin_safe = true,
    .holds_syscalls = false,
    .stage = move_stage,
    .hold = move_hold,
    .move = move_move,
    .release = move_release,
    .unstage = move_unstage,
};
