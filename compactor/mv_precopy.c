/* Pre-copy by write protection (the remap backend): copy an arena into its
 * staging page while the program keeps writing it, so that writers wait only
 * for what they changed meanwhile. The move backend pre-copies the same way
 * with pages moved out instead of protected (mv_backend_move.c).
 *
 * Copying 2 MiB takes about 450 us; a writer held for all of it stalls that
 * long. Instead (the way live migration of virtual machines works):
 *
 *   1. The range is registered on the userfaultfd and write-protected (by the
 *      caller). Every page of it is copied into staging, a few pages at a time.
 *      Between batches the engine reads the userfaultfd: a thread that wrote a
 *      protected page (or touched a hole) is waiting there; its page is marked
 *      dirty, unprotected (or given the zero page) and the thread woken. It
 *      waited for one batch at most, and that page now writes freely.
 *   2. While many pages are dirty, they are protected again, their bits
 *      cleared and copied again: what is written after that shows up as new
 *      faults.
 *   3. The whole range is protected again and nothing is served any more: from
 *      here writers wait. move() copies the dirty pages only, then swaps.
 *
 * Why no write is lost: a page is unprotected only after its dirty bit is set,
 * so every page that can have been written since the protection was armed is
 * dirty when writers are held, and the dirty pages are copied after that.
 * A thread still waiting at step 3 has not written its page yet.
 *
 * System calls writing the range (read() into it) fault the same way and are
 * served the same way. DMA does not fault, which is why remap does not promise
 * pin safety.
 *
 * Why the copier never waits on itself: the engine is the only thread that
 * serves the userfaultfd, so a fault of its own there would never end. It
 * only reads the range, and a read faults only on a hole in a range
 * registered MISSING (without UFFD_FEATURE_WP_UNPOPULATED, a hole cannot be
 * write-protected, so it is held as missing). There it reads through
 * /proc/self/mem, whose page lookups get an error instead of waiting (they
 * cannot drop the mmap lock to wait, so the userfaultfd refuses them); it
 * costs about twice a memcpy. A hole appears even where the page map showed
 * data a moment earlier: the program may zap (MADV_DONTNEED) memory it holds.
 */
#include <errno.h>
#include <string.h>

#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"

#define BATCH_PAGES 16      /* about 10 us of copying between two looks at the fd */
#define SERVE_MAX 64        /* faults served between two batches */

int mv_precopy_serve_page(struct mv_move *m, size_t i, bool wp) {
  uintptr_t page = m->start + i * MV_PAGE_SIZE;
  mv_page_set(&m->dirty, i);
  /* A hole (registered MISSING) gets the zero page; a write then fills it
   * without faulting again, which is fine: it is dirty. */
  int rc = wp ? 0 : mv_uffd_zeropage(page, MV_PAGE_SIZE);
  if (wp || rc == -EEXIST) rc = mv_uffd_writeprotect(page, MV_PAGE_SIZE, false, true);
  return rc;
}

int mv_precopy_serve(struct mv_move *m, int (*serve_page)(struct mv_move *m, size_t i, bool wp)) {
  uintptr_t addrs[16];
  bool wp[16];
  int n, served = 0;
  /* At most SERVE_MAX per call: a thread that faults again as soon as it is
   * served (writing page after page, or zapping what it wrote) would keep the
   * engine serving forever. The rest waits for the next batch, or release. */
  while (served < SERVE_MAX && (n = mv_uffd_read_faults(addrs, wp, 16)) > 0) {
    served += n;
    for (int k = 0; k < n; k++) {
      uintptr_t page = addrs[k] & ~(uintptr_t)(MV_PAGE_SIZE - 1);
      if (page - m->start >= MV_ARENA_SIZE) {
        mv_uffd_wake(page, MV_PAGE_SIZE);
        continue;
      }
      m->precopy_faults++;
      int rc = serve_page(m, (page - m->start) / MV_PAGE_SIZE, wp[k]);
      if (rc) return rc;
    }
  }
  return n < 0 ? n : 0;
}

/* Copies pages [i, end) into staging and marks them copied. In a range
 * registered MISSING (missing) a read of a hole would wait for this very
 * thread to serve it, so there the pages are read through /proc/self/mem,
 * which gets an error instead: a hole (never touched, a write-protect marker,
 * or zapped by the program meanwhile) is left for mv_precopy_finish(), which
 * reads where the pages went. False when pages cannot be read that way (no
 * /proc): the rest is left to mv_precopy_finish() too. */
static bool copy_run(struct mv_move *m, size_t i, size_t end, bool missing) {
  char *dst = m->staging;
  while (i < end) {
    size_t len = (end - i) * MV_PAGE_SIZE;
    ssize_t got = (ssize_t)len;
    if (!missing) memcpy(dst + i * MV_PAGE_SIZE, (const char *)m->start + i * MV_PAGE_SIZE, len);
    else if ((got = mv_thp_read_mem(dst + i * MV_PAGE_SIZE, m->start + i * MV_PAGE_SIZE, len)) < 0)
      return false;
    size_t pages = (size_t)got / MV_PAGE_SIZE;
    for (size_t k = 0; k < pages; k++) mv_page_set(&m->copied, i + k);
    i += pages + ((size_t)got < len); /* steps over the page that ended the read */
  }
  return true;
}

/* Copies the pages of want in batches, serving faults between batches. Pages
 * that turn dirty meanwhile are left for later. */
static int copy_serving(struct mv_move *m, const struct mv_page_map *want, bool missing) {
  bool copying = true;
  for (size_t first = 0; first < MV_ARENA_PAGES; first += BATCH_PAGES) {
    int rc = mv_precopy_serve(m, mv_precopy_serve_page);
    if (rc) return rc;
    for (size_t i = first; copying && i < first + BATCH_PAGES;) {
      if (!mv_page_test(want, i) || mv_page_test(&m->dirty, i)) {
        i++;
        continue;
      }
      size_t end = i + 1;
      while (end < first + BATCH_PAGES && mv_page_test(want, end) && !mv_page_test(&m->dirty, end))
        end++;
      copying = copy_run(m, i, end, missing);
      i = end;
    }
  }
  return mv_precopy_serve(m, mv_precopy_serve_page);
}

/* Protects (or unprotects, without waking) the runs of pages in map. */
static int protect_pages(struct mv_move *m, const struct mv_page_map *map, bool protect) {
  for (size_t i = 0, end; (end = mv_page_run(map, &i, MV_ARENA_PAGES)) > i; i = end) {
    int rc = mv_uffd_writeprotect(m->start + i * MV_PAGE_SIZE, (end - i) * MV_PAGE_SIZE, protect,
                                  protect);
    if (rc) return rc;
  }
  return 0;
}

int mv_precopy(struct mv_move *m, bool missing) {
  struct mv_page_map map;
  int rc = 0;
  if (missing) memset(&map, 0xff, sizeof map); /* holes end reads (copy_run) */
  else rc = mv_thp_page_map(m->start, &map);
  if (rc == 0) rc = copy_serving(m, &map, missing);
  for (int pass = 0; rc == 0 && mv_precopy_again(m, pass); pass++) {
    struct mv_page_map again = m->dirty;
    memset(&m->dirty, 0, sizeof m->dirty);
    rc = protect_pages(m, &again, true);
    if (rc == 0) rc = copy_serving(m, &again, missing);
  }
  /* Step 3, also after a failure: writers are held either way, and whatever
   * the pre-copy did not finish, mv_precopy_finish() copies. */
  int wp = mv_uffd_writeprotect(m->start, MV_ARENA_SIZE, true, true);
  if (wp) return wp;
  m->held_at_ns = mv_os_now_ns();
  return 0;
}

int mv_precopy_finish(struct mv_move *m, uintptr_t src, const struct mv_page_map *present,
                      bool missing) {
  char *dst = m->staging;
  for (size_t i = 0; i < MV_ARENA_PAGES; i++) {
    bool has = present ? mv_page_test(present, i) : true, copied = mv_page_test(&m->copied, i);
    char *to = dst + i * MV_PAGE_SIZE;
    if (has && (!copied || mv_page_test(&m->dirty, i))) {
      ssize_t got = MV_PAGE_SIZE;
      if (!missing) memcpy(to, (const char *)src + i * MV_PAGE_SIZE, MV_PAGE_SIZE);
      else if ((got = mv_thp_read_mem(to, src + i * MV_PAGE_SIZE, MV_PAGE_SIZE)) < 0)
        return (int)got;
      if (got < (ssize_t)MV_PAGE_SIZE) memset(to, 0, MV_PAGE_SIZE); /* zapped since the page map */
    } else if (!has && copied) { /* zapped since: a hole reads as zeros */
      memset(to, 0, MV_PAGE_SIZE);
    }
  }
  return 0;
}
