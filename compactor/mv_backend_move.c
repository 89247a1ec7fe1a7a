/* The move backend (UFFDIO_MOVE, Linux >= 6.8): pin-safe, and the VMA is never
 * split for longer than the move.
 *
 *   stage    fault a THP (staging); take a 2 MiB scratch range registered on
 *            the userfaultfd (UFFDIO_MOVE only moves into registered ranges),
 *            kept empty from the last move
 *   hold     register the arena MISSING|WP and write-protect it: writers wait,
 *            readers (the owner's migrate() among them) do not
 *   move     1. pre-copy by moving out: the arena's pages go to scratch
 *               OUT_PAGES at a time, still write-protected (a batch with a
 *               WP_UNPOPULATED marker is unprotected first: see
 *               move_present_out), and each batch is copied from there into
 *               staging. Between batches the engine serves the userfaultfd: a
 *               thread that touched a page that is out gets it back from
 *               scratch; one that wrote a page still protected gets it
 *               unprotected; a hole gets the zero page.
 *               Either way the page is dirty. While many pages are dirty they
 *               go out and are copied again.
 *            2. every page still in the arena goes out: from here every access
 *               waits
 *            3. copy the dirty pages, scratch -> staging, and zero the ones the
 *               program zapped since their copy
 *            4. MADV_DONTNEED the (now empty) arena so its PTE table is freed
 *               (CONFIG_PT_RECLAIM), then UFFDIO_MOVE the staged THP in as one
 *               PMD
 *   release  unregister (wakes the range, merges the VMA back), free the old
 *            pages in scratch; scratch and the empty staging VMA are kept for
 *            the next move (mv_spare_keep)
 *
 * Why no write is lost: a page is copied only while it is in scratch, where
 * nothing but the engine reaches it, and a page that left scratch since its
 * copy, or was written in the arena, is dirty and copied again after step 2.
 *
 * Pins: the kernel refuses to move a pinned or copy-on-write shared page
 * (EBUSY); everything goes back and the answer is -EAGAIN. Since a page is
 * copied only after it moved out, no device was writing it when it was
 * copied; a pin for writing taken later faults (the protection, or the hole)
 * like any write, so its page is dirty, and is met again at step 2.
 *
 * Why the copier never waits on itself: it reads only scratch, which is
 * registered WP and never protected, so a hole there reads as zeros. Nothing
 * the program does reaches scratch.
 *
 * Readers wait too during move(): for their page to be served while it is
 * out, and from step 2 until release. With UFFD_USER_MODE_ONLY a system call
 * touching a page that is out would fail (EFAULT) instead of waiting, and an
 * arena already on a THP goes out whole (one PMD): neither pre-copies, so
 * step 3 copies everything with every access held.
 *
 * An mlock()ed arena keeps its VMA, so it stays locked; scratch and staging
 * are locked like it, because UFFDIO_MOVE refuses to move between a locked and
 * an unlocked VMA (EINVAL).
 *
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

/* Moves scratch [from, MV_ARENA_SIZE) back into the arena.
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
static void move_back(struct mv_move *m, size_t from) {
  uintptr_t a = m->start, s = (uintptr_t)m->scratch;
  size_t done = from, to = MV_ARENA_SIZE;
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

/* After a failure in move(): scratch [from, end) back, and the arena
 * write-protected again, so that the contents are as before and writers are
 * held until release. Returns rc. */
static int put_back(struct mv_move *m, size_t from, int rc) {
  move_back(m, from);
  mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  return rc;
}

/* EBUSY (a pinned or shared page) and EAGAIN are worth another pass; 0 is 0. */
static int temporary_or(int err) { return err == EBUSY || err == EAGAIN ? -EAGAIN : -err; }

#define OUT_PAGES 64 /* moved out and copied between two looks at the fd: about 35 us */

/* mv_precopy_serve's serve_page: a page that is out comes back from scratch
 * into the hole it left (dirty from then on); any other is served as the
 * write-protect pre-copy serves it. Pages are in the arena or in scratch,
 * never in both. 0 or -errno. */
static int serve_page(struct mv_move *m, size_t i, bool wp) {
  uintptr_t off = i * MV_PAGE_SIZE;
  struct mv_page_map there;
  int rc = mv_thp_page_map_part((uintptr_t)m->scratch, i, 1, &there, NULL);
  if (rc) return rc;
  if (!mv_page_test(&there, i)) return mv_precopy_serve_page(m, i, wp);
  mv_page_set(&m->dirty, i);
  int err;
  mv_uffd_move(m->start + off, (uintptr_t)m->scratch + off, MV_PAGE_SIZE,
               UFFDIO_MOVE_MODE_DONTWAKE, &err);
  return err ? temporary_or(err) : mv_uffd_wake(m->start + off, MV_PAGE_SIZE);
}

/* Moves the pages of [first, end) that are in want and hold data out to
 * scratch, and marks them in moved. Only the pages the page map shows, and
 * without UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: Linux 6.18 keeps the -EAGAIN of a
 * step that met a changing page, so when the program zaps (MADV_DONTNEED) a
 * page while it moves, a move that allows holes retries that hole forever
 * inside the kernel. Without the mode the hole ends the move (ENOENT), and
 * the move goes on after it.
 *
 * A present page moves write-protected or not (it arrives writable). A
 * write-protect marker (WP_UNPOPULATED's, on a hole) does not move: the kernel
 * refuses it. So only a range whose page map shows an entry that is not
 * present (a marker, or a page swapped out) is unprotected first, without
 * waking: every UFFDIO_WRITEPROTECT takes the mmap lock that other threads'
 * mmap() waits for, and sends a TLB flush to every CPU running this process.
 * 0, or the errno that stopped it. */
static int move_present_out(struct mv_move *m, const struct mv_page_map *want, size_t first,
                            size_t end, struct mv_page_map *moved) {
  uintptr_t a = m->start, s = (uintptr_t)m->scratch;
  struct mv_page_map there, swapped = {{0}};
  int rc = mv_thp_page_map_part(a, first, end - first, &there, &swapped);
  if (rc) return -rc;
  bool markers = false;
  for (size_t w = first / 64; w * 64 < end; w++)
    markers |= (swapped.bits[w] & want->bits[w]) != 0;
  if (markers) {
    rc = mv_uffd_writeprotect(a + first * MV_PAGE_SIZE, (end - first) * MV_PAGE_SIZE, false, false);
    if (rc == 0) rc = mv_thp_page_map_part(a, first, end - first, &there, NULL);
    if (rc) return -rc;
  }
  for (size_t w = first / 64; w * 64 < end; w++) there.bits[w] &= want->bits[w];
  for (size_t i = first, run; (run = mv_page_run(&there, &i, end)) > i;) {
    while (i < run) {
      int err;
      size_t pages = mv_uffd_move(s + i * MV_PAGE_SIZE, a + i * MV_PAGE_SIZE,
                                  (run - i) * MV_PAGE_SIZE, UFFDIO_MOVE_MODE_DONTWAKE, &err) /
                     MV_PAGE_SIZE;
      for (; pages; pages--) mv_page_set(moved, i++);
      if (err == ENOENT) i++; /* zapped since the page map: a hole, nothing to move */
      else if (err) return err;
    }
  }
  return 0;
}

/* Moves the pages of want out to scratch. With copying, OUT_PAGES at a time,
 * serving faults before each batch and copying it from scratch after: a page
 * copied now is not dirty any more. On failure everything goes back to the
 * arena (-EAGAIN for a pinned or shared page); 0 or -errno. */
static int move_out(struct mv_move *m, const struct mv_page_map *want, bool copying) {
  size_t step = copying ? OUT_PAGES : MV_ARENA_PAGES;
  for (size_t first = 0; first < MV_ARENA_PAGES; first += step) {
    struct mv_page_map moved = {{0}};
    int rc = copying ? mv_precopy_serve(m, serve_page) : 0;
    for (size_t k = first; copying && k < first + step; k++)
      if (mv_page_test(want, k)) mv_page_clear(&m->dirty, k);
    if (rc == 0) rc = temporary_or(move_present_out(m, want, first, first + step, &moved));
    if (rc) {
      move_back(m, 0);
      return rc;
    }
    for (size_t i = first, run; copying && (run = mv_page_run(&moved, &i, first + step)) > i;) {
      memcpy((char *)m->staging + i * MV_PAGE_SIZE, (const char *)m->scratch + i * MV_PAGE_SIZE,
             (run - i) * MV_PAGE_SIZE);
      for (; i < run; i++) mv_page_set(&m->copied, i);
    }
  }
  return 0;
}

/* Step 1: every page out and copied once, then the dirty ones again while
 * there are many. */
static int precopy_moving_out(struct mv_move *m) {
  struct mv_page_map all;
  memset(&all, 0xff, sizeof all);
  int rc = move_out(m, &all, true);
  for (int pass = 0; rc == 0 && mv_precopy_again(m, pass); pass++) {
    struct mv_page_map again = m->dirty;
    rc = move_out(m, &again, true);
  }
  return rc;
}

static int move_hold(struct mv_move *m) {
  if (m->fail_at == MV_STEP_HOLD) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  int rc = mv_thp_lock_like(m->start, m->scratch, MV_ARENA_SIZE, true);
  if (rc == 0) rc = mv_thp_lock_like(m->start, m->staging, MV_ARENA_SIZE, false);
  if (rc == 0) rc = mv_uffd_register(m->start, MV_ARENA_SIZE, true, true);
  if (rc) return rc;
  rc = mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  if (rc) {
    mv_uffd_unregister(m->start, MV_ARENA_SIZE);
    return rc;
  }
  m->held = true;
  m->held_at_ns = mv_os_now_ns();
  m->hold_ns = m->held_at_ns - t0;
  return 0;
}

static int move_move(struct mv_move *m) {
  if (!m->held || !m->staging || !m->scratch) return -EINVAL;
  uintptr_t a = m->start, s = (uintptr_t)m->scratch, t = (uintptr_t)m->staging;
  uint64_t t0 = mv_os_now_ns();
  int rc = 0;
  /* An arena on a THP goes out whole, as one PMD, at step 2: serving a fault
   * from a THP in scratch would split it there, and a split that fails (a
   * transient reference: EBUSY) would leave the page neither here nor there. */
  if (!mv_backend_probe()->uffd_user_only && mv_thp_is_huge(a) != 1) {
    rc = precopy_moving_out(m);
    m->held_at_ns = mv_os_now_ns(); /* served until now: from here writers wait for good */
  }
  if (rc) return put_back(m, MV_ARENA_SIZE, rc); /* move_out put every page back */

  struct mv_page_map all;
  memset(&all, 0xff, sizeof all);
  /* The injected failure moves half out, then gets what a pinned page gives. */
  if (m->fail_at == MV_STEP_MOVE_OUT) {
    memset(all.bits + MV_ARENA_PAGES / 128, 0, sizeof all / 2);
    rc = move_out(m, &all, false);
    return put_back(m, 0, rc ? rc : -EAGAIN);
  }
  rc = move_out(m, &all, false);
  if (rc) return put_back(m, MV_ARENA_SIZE, rc);
  struct mv_page_map map;
  bool mapped = mv_thp_page_map(s, &map) == 0;
  mv_precopy_finish(m, s, mapped ? &map : NULL, false); /* scratch: WP only, never fails */
  m->copy_ns = mv_os_now_ns() - t0;
  if (m->fail_at == MV_STEP_COPY) return put_back(m, 0, -EAGAIN);

  uint64_t t1 = mv_os_now_ns();
  /* Nothing is left to zap: this only frees the empty PTE table, so that the
   * PMD goes in whole instead of the THP being split into the table. The
   * _LOCKED variant (5.18) also works on an mlock()ed arena. */
  if (mv_os_madvise((void *)a, MV_ARENA_SIZE, MADV_DONTNEED_LOCKED) != 0)
    mv_os_madvise((void *)a, MV_ARENA_SIZE, MADV_DONTNEED);
  size_t in = 0;
  int err;
  if (m->fail_at == MV_STEP_SWAP) err = EIO;
  else in = mv_uffd_move(a, t, MV_ARENA_SIZE, UFFDIO_MOVE_MODE_DONTWAKE, &err);
  /* What did go in is the copy of what was there: put back only the rest. */
  if (err) return put_back(m, in, temporary_or(err));
  m->staging = NULL; /* consumed; release unmaps the empty VMA left at staging_map */
  m->swap_ns = mv_os_now_ns() - t1;

  /* The contents are right either way; a THP split on the way in (no PT
   * reclaim on this kernel, or a race) is worth another try. */
  if (mv_thp_is_huge(a) != 1) return put_back(m, MV_ARENA_SIZE, -EAGAIN);
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
