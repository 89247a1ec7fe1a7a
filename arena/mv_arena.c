/* Arenas: the heap reservation, the descriptors, and the hand-out of slices
 * (for pages) and whole arenas (for huge objects).
 *
 * Placement follows Temeraire's lesson: a run of slices comes from the fullest
 * arena that has room, so live data packs into few arenas and the others empty
 * out completely; an empty arena is kept for reuse (up to the arena cache) or
 * returned to the kernel whole, never piecemeal, so a huge page under it is not
 * broken. Only an arena no huge page is meant for gives back free slices at
 * once, past a threshold (trim_locked). Free arenas are reused lowest address
 * first, before the frontier grows.
 *
 * Everything here runs under mv_arena_lock and touches only descriptors, never
 * arena data: an isolated arena never blocks this lock's holder.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "shim/mv_options.h"

uintptr_t mv_heap_base;
_Atomic(size_t) mv_heap_limit;
mv_arena_t *mv_arenas;

mv_lock_t mv_arena_lock = MV_LOCK_INIT;
_Atomic(uint32_t) mv_arenas_isolated; /* mv_arena_lock for writes */

#define MV_COMMIT_STEP 16u /* arenas committed (mprotect) at a time */
#define MV_BUCKET_SCAN 8   /* arenas tried per bucket before looking further */
#define MV_DECAY_NS (1000ull * 1000000u) /* an unused cached arena goes back after this */
#define MV_TRIM_SETTLE_NS (100ull * 1000000u) /* no trim this soon after a hand-out */

/* All below: guarded by mv_arena_lock. */
static uint32_t max_arenas;       /* the reservation, in arenas */
static uint32_t frontier;         /* arenas [0, frontier) have descriptors */
static uint32_t committed_upto;   /* arenas [0, committed_upto) are PROT_READ|WRITE */
static uint64_t *free_bits;       /* bit i: arena i is FREE */
static uint32_t free_hint;        /* no FREE arena below this index */
/* [c][k]: ACTIVE arenas of lifetime class c with k free slices */
static mv_arena_t *buckets[MV_LIFECLASSES][MV_SLICES];
#define MV_CACHE_MAX 256u
static uint32_t cache[MV_CACHE_MAX]; /* FREE arenas still committed, oldest first */
static uint64_t cached_at[MV_CACHE_MAX]; /* when each went into the cache */
static uint32_t cache_len;
static uint64_t last_decay_ns;
static uint64_t released_total;
static uint64_t purged_total;     /* bytes, by the three mv_arena_purge* */
static uint64_t page_purged_total; /* bytes, by mv_arena_purge_page */
static uint64_t trimmed_total;    /* bytes, by trim_locked */
static uint64_t huge_live;

static const uint32_t all_slices = 0xffffffffu;

/* ---- reservation ---- */

static void *reserve_aligned(size_t len, size_t align) {
  void *p = mv_os_mmap(NULL, len + align, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return NULL;
  uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
  if (start > (uintptr_t)p) mv_os_munmap(p, start - (uintptr_t)p);
  uintptr_t end = (uintptr_t)p + len + align;
  if (end > start + len) mv_os_munmap((void *)(start + len), end - (start + len));
  return (void *)start;
}

int mv_arena_init(void) {
  /* Ask for the configured reservation; halve it while the kernel says no
   * (ulimit -v, a small address space), down to 1 GiB. */
  size_t want = mv_options.reserve_gib << 30;
  for (; want >= ((size_t)1 << 30); want >>= 1) {
    size_t n = want >> MV_ARENA_SHIFT;
    size_t meta_len = n * sizeof(mv_arena_t);
    size_t bits_len = ((n + 63) / 64) * sizeof(uint64_t);
    void *data = reserve_aligned(want, MV_ARENA_SIZE);
    if (!data) continue;
    void *meta = mv_os_mmap(NULL, meta_len, PROT_NONE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void *bits = mv_os_mmap(NULL, bits_len, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (meta == MAP_FAILED || bits == MAP_FAILED) {
      mv_os_munmap(data, want);
      if (meta != MAP_FAILED) mv_os_munmap(meta, meta_len);
      if (bits != MAP_FAILED) mv_os_munmap(bits, bits_len);
      continue;
    }
    mv_heap_base = (uintptr_t)data;
    mv_arenas = meta;
    free_bits = bits;
    max_arenas = (uint32_t)n;
    return 0;
  }
  return -ENOMEM;
}

size_t mv_arena_reserved_bytes(void) { return (size_t)max_arenas << MV_ARENA_SHIFT; }

/* Whether arena index gets huge pages at fault time (MADV_HUGEPAGE in
 * commit_upto). */
static bool thp_at_fault(uint32_t index) {
  return mv_options.thp == MV_THP_FAULT ||
         (mv_options.thp == MV_THP_AUTO && index >= MV_THP_AUTO_FROM);
}

/* Makes arenas [committed_upto, upto) and their descriptors usable. */
static bool commit_upto(uint32_t upto) {
  if (upto <= committed_upto) return true;
  uint32_t to = (upto + MV_COMMIT_STEP - 1) / MV_COMMIT_STEP * MV_COMMIT_STEP;
  if (to > max_arenas) to = max_arenas;
  uintptr_t from_addr = mv_heap_base + ((uintptr_t)committed_upto << MV_ARENA_SHIFT);
  size_t len = (size_t)(to - committed_upto) << MV_ARENA_SHIFT;
  if (mv_os_mprotect((void *)from_addr, len, PROT_READ | PROT_WRITE) != 0) return false;
  if (mv_options.thp == MV_THP_FAULT) mv_os_madvise((void *)from_addr, len, MADV_HUGEPAGE);
  if (mv_options.thp == MV_THP_AUTO && to > MV_THP_AUTO_FROM) {
    uint32_t from = committed_upto > MV_THP_AUTO_FROM ? committed_upto : MV_THP_AUTO_FROM;
    mv_os_madvise((void *)(mv_heap_base + ((uintptr_t)from << MV_ARENA_SHIFT)),
                  (size_t)(to - from) << MV_ARENA_SHIFT, MADV_HUGEPAGE);
  }
  if (mv_options.thp == MV_THP_NEVER) mv_os_madvise((void *)from_addr, len, MADV_NOHUGEPAGE);
  /* Descriptors: page-granular, rounded out to whole pages. */
  uintptr_t m0 = (uintptr_t)&mv_arenas[committed_upto] & ~(uintptr_t)4095;
  uintptr_t m1 = ((uintptr_t)&mv_arenas[to] + 4095) & ~(uintptr_t)4095;
  if (mv_os_mprotect((void *)m0, m1 - m0, PROT_READ | PROT_WRITE) != 0) {
    mv_os_mprotect((void *)from_addr, len, PROT_NONE);
    return false;
  }
  committed_upto = to;
  return true;
}

static inline void bit_set(uint32_t i) { free_bits[i / 64] |= 1ull << (i % 64); }
static inline void bit_clear(uint32_t i) { free_bits[i / 64] &= ~(1ull << (i % 64)); }
static inline bool bit_test(uint32_t i) { return free_bits[i / 64] >> (i % 64) & 1; }

/* Adds n fresh arenas at the frontier, FREE and zero. */
static bool extend_frontier(uint32_t n) {
  if (n > max_arenas - frontier || !commit_upto(frontier + n)) return false;
  for (uint32_t i = frontier; i < frontier + n; i++) {
    mv_arena_t *a = &mv_arenas[i];
    a->index = i;
    a->free_mask = all_slices;
    a->zero_mask = all_slices;
    a->free_count = MV_SLICES;
    for (unsigned s = 0; s < MV_SLICES; s++) a->slice_page[s] = &mv_page_none;
    atomic_store_explicit(&a->state, MV_ARENA_FREE, memory_order_relaxed);
    bit_set(i);
  }
  frontier += n;
  atomic_store_explicit(&mv_heap_limit, (size_t)frontier << MV_ARENA_SHIFT,
                        memory_order_release);
  return true;
}

/* ---- buckets: ACTIVE arenas by free slice count ---- */

static void bucket_remove(mv_arena_t *a) {
  unsigned k = a->free_count;
  if (k == 0 || k == MV_SLICES) return;
  if (a->bucket_prev) a->bucket_prev->bucket_next = a->bucket_next;
  else if (buckets[a->lifeclass][k] == a) buckets[a->lifeclass][k] = a->bucket_next;
  if (a->bucket_next) a->bucket_next->bucket_prev = a->bucket_prev;
  a->bucket_next = a->bucket_prev = NULL;
}

static void bucket_insert(mv_arena_t *a) {
  unsigned k = a->free_count;
  if (k == 0 || k == MV_SLICES) return;
  a->bucket_prev = NULL;
  mv_arena_t **head = &buckets[a->lifeclass][k];
  a->bucket_next = *head;
  if (*head) (*head)->bucket_prev = a;
  *head = a;
}

/* ---- free arenas: the cache, then release ---- */

/* A loop, not memmove: fortified, a memmove into a fixed-size array is glibc's
 * __memmove_chk, whose resolver runs at load and maps 64 KiB of libc code that
 * programs on glibc's malloc never run (docs/RESULTS.md, fourteenth session). */
static void cache_remove(uint32_t index) {
  for (uint32_t i = 0; i < cache_len; i++)
    if (cache[i] == index) {
      cache_len--;
      for (; i < cache_len; i++) {
        cache[i] = cache[i + 1];
        cached_at[i] = cached_at[i + 1];
      }
      return;
    }
}

/* Takes one FREE arena: the most recently cached (its pages are resident),
 * else the lowest free index, else a fresh one at the frontier. */
static mv_arena_t *take_free_arena(void) {
  uint32_t index;
  if (cache_len > 0) {
    index = cache[--cache_len];
  } else {
    uint32_t w = free_hint / 64, nw = (frontier + 63) / 64;
    while (w < nw && free_bits[w] == 0) w++;
    if (w < nw) {
      index = w * 64 + (uint32_t)__builtin_ctzll(free_bits[w]);
      free_hint = index;
    } else {
      if (!extend_frontier(1)) return NULL;
      index = frontier - 1;
    }
  }
  bit_clear(index);
  mv_arena_t *a = &mv_arenas[index];
  a->committed = true;
  a->huge = false;
  atomic_store_explicit(&a->state, MV_ARENA_ACTIVE, memory_order_release);
  return a;
}

/* An arena just became wholly free. Returns it when the caller must release it
 * to the kernel after dropping the lock (mv_arena_release_unlocked). */
static mv_arena_t *arena_emptied(mv_arena_t *a) {
  uint8_t state = atomic_load(&a->state);
  if (state != MV_ARENA_ACTIVE) {
    a->release_pending = true; /* the engine finishes it when the move is over */
    return NULL;
  }
  atomic_store_explicit(&a->state, MV_ARENA_FREE, memory_order_release);
  a->huge = false;
  if (a->committed && cache_len < MV_CACHE_MAX) {
    cached_at[cache_len] = mv_os_now_ns();
    cache[cache_len++] = a->index;
    bit_set(a->index);
    if (a->index < free_hint) free_hint = a->index;
    return NULL;
  }
  if (!a->committed) {
    bit_set(a->index);
    if (a->index < free_hint) free_hint = a->index;
    return NULL;
  }
  return a; /* not in free_bits until released: nobody can take it meanwhile */
}

/* Returns a FREE arena's memory to the kernel, then offers it for reuse. */
static void release_unlocked(mv_arena_t *a) {
  uintptr_t addr = mv_heap_base + ((uintptr_t)a->index << MV_ARENA_SHIFT);
  bool ok = mv_os_madvise((void *)addr, MV_ARENA_SIZE, MADV_DONTNEED) == 0;
  mv_lock(&mv_arena_lock);
  if (ok) {
    a->committed = false;
    a->thp = false;
    a->zero_mask = all_slices;
    released_total++;
  }
  bit_set(a->index);
  if (a->index < free_hint) free_hint = a->index;
  mv_unlock(&mv_arena_lock);
}

/* Returns cached arenas to the kernel, oldest first: at most `max`, keeping
 * `keep`, and with `decayed_only` only those nobody reused for MV_DECAY_NS.
 * Returns how many went back. */
static size_t cache_release(uint32_t keep, size_t max, bool decayed_only) {
  size_t released = 0;
  for (; released < max; released++) {
    mv_lock(&mv_arena_lock);
    uint64_t now = decayed_only ? mv_os_now_ns() : 0;
    if (decayed_only) last_decay_ns = now;
    if (cache_len <= keep || (decayed_only && now - cached_at[0] < MV_DECAY_NS)) {
      mv_unlock(&mv_arena_lock);
      break;
    }
    uint32_t index = cache[0];
    cache_remove(index);
    bit_clear(index); /* ours until released */
    mv_unlock(&mv_arena_lock);
    release_unlocked(&mv_arenas[index]);
  }
  return released;
}

/* Returns to the kernel the cached arenas nobody reused for MV_DECAY_NS, down
 * to MOVALLOC_ARENA_CACHE of them: a program that frees a lot and allocates it
 * again soon reuses resident memory without page faults, and one that shrank
 * for good gives it back a moment later. */
void mv_arena_decay(void) { cache_release(mv_options.arena_cache, SIZE_MAX, true); }

/* A huge object just took `fresh` arenas the kernel has yet to fault in while
 * the cache holds resident ones it could not use (they do not lie in one run
 * long enough): as many cached arenas go back, so that a program allocating
 * and freeing huge objects of varied sizes pays the faults glibc's munmap and
 * mmap would, not the fresh pages on top of the idle ones. */
static void uncache_for_fresh(uint32_t fresh) {
  cache_release(mv_options.arena_cache, fresh, false);
}

/* The allocation paths' share of decay, when no compactor thread does it:
 * a look at the clock at most every MV_DECAY_NS / 4. Lock held. */
static bool decay_due(void) {
  if (cache_len <= mv_options.arena_cache) return false;
  return mv_os_now_ns() - last_decay_ns > MV_DECAY_NS / 4;
}

/* ---- slices ---- */

/* Bits where a run of n free slices starts. */
static inline uint32_t run_starts(uint32_t mask, unsigned n) {
  uint32_t m = mask;
  for (unsigned i = 1; i < n && m; i++) m &= mask >> i;
  return m;
}

static inline uint32_t run_mask(unsigned first, unsigned n) {
  return (n >= 32 ? all_slices : ((1u << n) - 1)) << first;
}

/* Takes the lowest run of set bits off *mask; returns it, its first bit in
 * *first and its length in *n. */
static uint32_t take_run(uint32_t *mask, unsigned *first, unsigned *n) {
  *first = (unsigned)__builtin_ctz(*mask);
  uint32_t rest = ~(*mask >> *first); /* its lowest set bit ends the run */
  *n = rest ? (unsigned)__builtin_ctz(rest) : 32 - *first;
  uint32_t run = run_mask(*first, *n);
  *mask &= ~run;
  return run;
}

static void page_reset(mv_page_t *page) {
  /* notify and xnext stay: the page may still be on a heap's xthread stack. */
  page->free = NULL;
  page->local_free = NULL;
  page->local_count = 0;
  atomic_store_explicit(&page->xthread_free, 0, memory_order_relaxed);
  atomic_store_explicit(&page->heap, NULL, memory_order_relaxed);
  page->next = page->prev = NULL;
  page->taken = page->capacity = page->reserved = page->block_size = 0;
  atomic_store_explicit(&page->in_full, 0, memory_order_relaxed);
  page->kind = MV_PAGE_NONE;
  page->bin = 0;
  page->huge_size = 0;
}

static mv_page_t *carve(mv_arena_t *a, unsigned first, unsigned n, bool *zeroed) {
  uint32_t run = run_mask(first, n);
  bucket_remove(a);
  a->free_mask &= ~run;
  a->free_count = (uint8_t)__builtin_popcount(a->free_mask);
  bucket_insert(a);
  *zeroed = (a->zero_mask & run) == run;
  a->zero_mask &= ~run;
  a->placed_ns = mv_os_now_ns();
  mv_page_t *page = &a->pages[first];
  page_reset(page);
  page->lifeclass = a->lifeclass;
  page->start = mv_heap_base + ((uintptr_t)a->index << MV_ARENA_SHIFT) +
                ((uintptr_t)first << MV_SLICE_SHIFT);
  page->slice_count = (uint16_t)n;
  for (unsigned s = first; s < first + n; s++) a->slice_page[s] = page;
  return page;
}

mv_page_t *mv_arena_alloc_class(unsigned n, bool *zeroed, unsigned lifeclass) {
  mv_lock(&mv_arena_lock);
  for (unsigned k = n; k < MV_SLICES; k++) {
    unsigned tried = 0;
    for (mv_arena_t *a = buckets[lifeclass][k]; a && tried < MV_BUCKET_SCAN;
         a = a->bucket_next, tried++) {
      uint32_t starts = run_starts(a->free_mask, n);
      if (starts) {
        mv_page_t *page = carve(a, (unsigned)__builtin_ctz(starts), n, zeroed);
        mv_unlock(&mv_arena_lock);
        return page;
      }
    }
  }
  mv_arena_t *a = take_free_arena();
  if (a) a->lifeclass = (uint8_t)lifeclass;
  mv_page_t *page = a ? carve(a, 0, n, zeroed) : NULL;
  bool decay = decay_due();
  mv_unlock(&mv_arena_lock);
  if (decay) mv_arena_decay();
  if (!page) errno = ENOMEM;
  return page;
}

static void trim_locked(mv_arena_t *a);

void mv_arena_free_slices(mv_page_t *page) {
  uintptr_t addr = page->start;
  mv_lock(&mv_arena_lock);
  mv_arena_t *a = mv_arena_of(addr);
  unsigned first = (unsigned)((addr >> MV_SLICE_SHIFT) & (MV_SLICES - 1));
  unsigned n = page->slice_count;
  for (unsigned s = first; s < first + n; s++) a->slice_page[s] = &mv_page_none;
  page->kind = MV_PAGE_NONE;
  atomic_store_explicit(&page->heap, NULL, memory_order_relaxed);
  bucket_remove(a);
  a->free_mask |= run_mask(first, n);
  a->free_count = (uint8_t)__builtin_popcount(a->free_mask);
  mv_arena_t *release = NULL;
  if (a->free_count == MV_SLICES) {
    release = arena_emptied(a);
  } else if (atomic_load(&a->state) == MV_ARENA_ACTIVE) {
    bucket_insert(a);
    trim_locked(a);
  }
  mv_unlock(&mv_arena_lock);
  if (release) release_unlocked(release);
}

/* ---- huge spans ---- */

/* First index of n FREE arenas in a row starting at a multiple of step: of
 * the runs there are, the one with the most cached (still resident) arenas,
 * the lowest of those; the fewer arenas the kernel has to fault in, the fewer
 * cached ones go back for them (uncache_for_fresh). A run may end at the
 * frontier: the caller extends it. */
static uint32_t find_run(uint32_t n, uint32_t step, uint32_t *tail_needed) {
  uint32_t run = 0, warm = 0, best = UINT32_MAX, best_warm = 0;
  for (uint32_t i = free_hint / step * step; i < frontier; i++) {
    if (!bit_test(i)) {
      if (i % 64 == 0 && free_bits[i / 64] == 0) i += 63; /* a word of arenas in use */
      run = warm = 0;
      continue;
    }
    if (run == 0 && i % step != 0) continue;
    run++;
    warm += mv_arenas[i].committed;
    if (run > n) warm -= mv_arenas[i - n].committed;
    uint32_t start = i + 1 - n;
    if (run >= n && start % step == 0 && (best == UINT32_MAX || warm > best_warm)) {
      best = start;
      best_warm = warm;
      if (warm == n) break;
    }
  }
  if (best != UINT32_MAX) {
    *tail_needed = 0;
    return best;
  }
  /* A free run reaching the frontier can be finished by extending it. */
  uint32_t start = frontier - run;
  if (run > 0 && start % step == 0) {
    *tail_needed = n - run;
    return start;
  }
  start = (frontier + step - 1) / step * step;
  *tail_needed = start + n - frontier;
  return start;
}

/* Makes FREE arenas [from, to) part of a huge span (lock held). Returns how
 * many of them the kernel has yet to fault in; *zero: whether all of them
 * hold only zeros. */
static uint32_t span_take(uint32_t from, uint32_t to, bool *zero) {
  uint32_t fresh = 0;
  *zero = true;
  for (uint32_t i = from; i < to; i++) {
    mv_arena_t *a = &mv_arenas[i];
    bit_clear(i);
    cache_remove(i);
    fresh += !a->committed;
    *zero &= a->zero_mask == all_slices;
    a->zero_mask = a->free_mask = 0;
    a->free_count = 0;
    a->committed = true;
    a->huge = true;
    atomic_store_explicit(&a->state, MV_ARENA_ACTIVE, memory_order_release);
  }
  return fresh;
}

/* A huge object's last arena, `used` bytes of it its own. Where huge pages
 * come at fault time, its first touch would fault in 2 MiB and add the unused
 * rest to RSS (bench/wl_realloc: 3 MiB over its peak). So while the object
 * uses less than half of it (a huge page would then add more than it holds),
 * the last arena takes small pages (MADV_NOHUGEPAGE), and huge pages again
 * once the object fills it, shrinks off it or is freed; the compactor
 * collapses it when it is dense. The price: a fault per 4 KiB there
 * (bench/wl_large, wl_realloc: 9% more CPU). Lock held, and only while ACTIVE:
 * the engine never sees the mapping change under an arena it moves. A failed
 * madvise leaves things as they were. */
static bool tail_wants_small(uint32_t last, size_t used) {
  return thp_at_fault(last) && used < MV_ARENA_SIZE / 2;
}

static void tail_pages_locked(uint32_t last, size_t used) {
  mv_arena_t *a = &mv_arenas[last];
  bool small = tail_wants_small(last, used);
  if (small == a->small_tail || atomic_load(&a->state) != MV_ARENA_ACTIVE) return;
  if (mv_os_madvise((void *)(mv_heap_base + ((uintptr_t)last << MV_ARENA_SHIFT)), MV_ARENA_SIZE,
                    small ? MADV_NOHUGEPAGE : MADV_HUGEPAGE) == 0)
    a->small_tail = small;
}

static void map_huge(mv_page_t *page, uint32_t first, uint32_t n) {
  for (uint32_t i = first; i < first + n; i++) {
    mv_arena_t *a = &mv_arenas[i];
    for (unsigned s = 0; s < MV_SLICES; s++) a->slice_page[s] = page;
  }
}

mv_page_t *mv_arena_alloc_huge(size_t size, size_t align, bool *zeroed) {
  size_t n = (size + MV_ARENA_SIZE - 1) >> MV_ARENA_SHIFT;
  size_t step = align > MV_ARENA_SIZE ? align >> MV_ARENA_SHIFT : 1;
  if (n == 0 || n > max_arenas || step > max_arenas) {
    errno = ENOMEM;
    return NULL;
  }
  /* The reservation is 2 MiB aligned, not more: align the absolute address. */
  uint32_t base_skew = (uint32_t)((mv_heap_base >> MV_ARENA_SHIFT) % step);
  mv_lock(&mv_arena_lock);
  uint32_t tail = 0;
  uint32_t first;
  if (base_skew == 0) {
    first = find_run((uint32_t)n, (uint32_t)step, &tail);
  } else {
    /* Rare (alignment above 2 MiB with an unlucky base): fresh arenas only. */
    first = (frontier + base_skew + (uint32_t)step - 1) / (uint32_t)step * (uint32_t)step -
            base_skew;
    if (first < frontier) first += (uint32_t)step;
    tail = first + (uint32_t)n - frontier;
  }
  if (tail && !extend_frontier(tail)) {
    mv_unlock(&mv_arena_lock);
    errno = ENOMEM;
    return NULL;
  }
  bool zero;
  uint32_t fresh = span_take(first, first + (uint32_t)n, &zero);
  if (first == free_hint) free_hint = first + (uint32_t)n;
  mv_page_t *page = &mv_arenas[first].pages[0];
  page_reset(page);
  page->kind = MV_PAGE_HUGE;
  page->start = mv_heap_base + ((uintptr_t)first << MV_ARENA_SHIFT);
  page->huge_size = n << MV_ARENA_SHIFT;
  map_huge(page, first, (uint32_t)n);
  tail_pages_locked(first + (uint32_t)n - 1, size - ((n - 1) << MV_ARENA_SHIFT));
  huge_live++;
  bool decay = decay_due();
  mv_unlock(&mv_arena_lock);
  if (decay) mv_arena_decay();
  uncache_for_fresh(fresh);
  *zeroed = zero;
  return page;
}

static uint32_t huge_first(const mv_page_t *page) {
  return (uint32_t)((page->start - mv_heap_base) >> MV_ARENA_SHIFT);
}

/* Frees arenas [from, to) of a huge span. Lock held. The arenas to release
 * (FREE and out of free_bits: nobody else can take them) are tagged with a
 * fresh ticket, returned for release_span_unlocked(). The others are not
 * touched by the release: cached ones, and isolated ones, whose release the
 * engine finishes when their move is over (a madvise over the whole span would
 * zap an arena being copied). */
static uint32_t free_span_locked(uint32_t from, uint32_t to) {
  static uint32_t last_ticket;
  if (++last_ticket == 0) last_ticket = 1; /* 0: not being released */
  for (uint32_t i = from; i < to; i++) {
    mv_arena_t *a = &mv_arenas[i];
    for (unsigned s = 0; s < MV_SLICES; s++) a->slice_page[s] = &mv_page_none;
    a->free_mask = all_slices;
    a->free_count = MV_SLICES;
    mv_arena_t *r = arena_emptied(a);
    if (r) r->release_ticket = last_ticket;
  }
  return last_ticket;
}

/* The ticket this thread is releasing, 0 if none (for mv_arena_fork_child). */
static __thread uint32_t releasing_here;

/* Releases the arenas of [from, to) tagged with ticket, one madvise per run
 * of them, without the lock held across a madvise. */
static void release_span_unlocked(uint32_t from, uint32_t to, uint32_t ticket) {
  releasing_here = ticket;
  mv_lock(&mv_arena_lock);
  for (uint32_t i = from; i < to;) {
    if (mv_arenas[i].release_ticket != ticket) {
      i++;
      continue;
    }
    uint32_t end = i + 1;
    while (end < to && mv_arenas[end].release_ticket == ticket) end++;
    mv_unlock(&mv_arena_lock);
    uintptr_t addr = mv_heap_base + ((uintptr_t)i << MV_ARENA_SHIFT);
    bool ok = mv_os_madvise((void *)addr, (size_t)(end - i) << MV_ARENA_SHIFT,
                            MADV_DONTNEED) == 0;
    mv_lock(&mv_arena_lock);
    for (uint32_t k = i; k < end; k++) {
      mv_arena_t *a = &mv_arenas[k];
      a->release_ticket = 0;
      if (ok) {
        a->committed = false;
        a->thp = false;
        a->zero_mask = all_slices;
        released_total++;
      }
      bit_set(k);
    }
    if (i < free_hint) free_hint = i;
    i = end;
  }
  mv_unlock(&mv_arena_lock);
  releasing_here = 0;
}

void mv_arena_fork_child(void) {
  for (uint32_t i = 0; i < frontier; i++) {
    mv_arena_t *a = &mv_arenas[i];
    if (!a->release_ticket || a->release_ticket == releasing_here) continue;
    a->release_ticket = 0; /* committed, contents unknown: as a cached arena */
    bit_set(i);
    if (i < free_hint) free_hint = i;
  }
}

void mv_arena_free_huge(mv_page_t *page) {
  uint32_t first = huge_first(page), n = (uint32_t)(page->huge_size >> MV_ARENA_SHIFT);
  mv_lock(&mv_arena_lock);
  tail_pages_locked(first + n - 1, MV_ARENA_SIZE);
  page->kind = MV_PAGE_NONE;
  huge_live--;
  uint32_t ticket = free_span_locked(first, first + n);
  mv_unlock(&mv_arena_lock);
  release_span_unlocked(first, first + n, ticket);
}

bool mv_arena_resize_huge(mv_page_t *page, size_t size) {
  uint32_t first = huge_first(page), n = (uint32_t)(page->huge_size >> MV_ARENA_SHIFT);
  size_t want = (size + MV_ARENA_SIZE - 1) >> MV_ARENA_SHIFT;
  if (want == 0 || want > max_arenas) return false;
  size_t tail_used = size - ((want - 1) << MV_ARENA_SHIFT);
  if (want == n) { /* the lock only when the last arena's pages change */
    if (tail_wants_small(first + n - 1, tail_used) != mv_arenas[first + n - 1].small_tail) {
      mv_lock(&mv_arena_lock);
      tail_pages_locked(first + n - 1, tail_used);
      mv_unlock(&mv_arena_lock);
    }
    return true;
  }
  uint32_t ticket = 0, fresh = 0;
  mv_lock(&mv_arena_lock);
  tail_pages_locked(first + n - 1, MV_ARENA_SIZE); /* no longer the last, or freed */
  if (want < n) {
    ticket = free_span_locked(first + (uint32_t)want, first + n);
  } else {
    uint32_t end = first + (uint32_t)want;
    if (end > max_arenas) goto fail;
    for (uint32_t i = first + n; i < end && i < frontier; i++)
      if (!bit_test(i)) goto fail;
    if (end > frontier && !extend_frontier(end - frontier)) goto fail;
    bool zero; /* the grown part's contents are the caller's to fill */
    fresh = span_take(first + n, end, &zero);
    map_huge(page, first + n, end - first - n);
  }
  page->huge_size = want << MV_ARENA_SHIFT;
  tail_pages_locked(first + (uint32_t)want - 1, tail_used);
  mv_unlock(&mv_arena_lock);
  if (ticket) release_span_unlocked(first + (uint32_t)want, first + n, ticket);
  uncache_for_fresh(fresh);
  return true;
fail:
  mv_unlock(&mv_arena_lock);
  return false;
}

size_t mv_arena_trim(void) { return cache_release(0, SIZE_MAX, false); }

/* MADV_DONTNEED of [addr, addr + len) in arena a, lock held; false if the
 * kernel refused. The arena then no longer sits whole on a huge page. */
static bool give_back_locked(mv_arena_t *a, uintptr_t addr, size_t len) {
  if (mv_os_madvise((void *)addr, len, MADV_DONTNEED) != 0) return false;
  a->thp = false;
  purged_total += len;
  return true;
}

/* The free slices of ACTIVE arena a that may hold data go back to the kernel
 * and are known zero after; returns their bytes. Lock held. */
static size_t give_back_free_locked(mv_arena_t *a) {
  uintptr_t base = mv_heap_base + ((uintptr_t)a->index << MV_ARENA_SHIFT);
  uint32_t dirty = a->free_mask & ~a->zero_mask;
  size_t bytes = 0;
  while (dirty) {
    unsigned first, n;
    uint32_t run = take_run(&dirty, &first, &n);
    size_t len = (size_t)n << MV_SLICE_SHIFT;
    if (!give_back_locked(a, base + ((uintptr_t)first << MV_SLICE_SHIFT), len)) continue;
    a->zero_mask |= run;
    bytes += len;
  }
  return bytes;
}

/* Whether arena a may sit on a huge page: it was moved onto one, or gets them
 * at fault time. */
static bool meant_for_thp(const mv_arena_t *a) { return a->thp || thp_at_fault(a->index); }

/* glibc's trim threshold, for the arenas no huge page is meant for: such an
 * arena keeps at most MOVALLOC_TRIM_KIB of free slices resident, and the free
 * that passes it gives them all back. A small program that frees most of its
 * heap then shrinks at once, as on glibc, whose trim and munmap of large
 * chunks also happen at free (bench/wl_churn frees its 768 KiB table, then
 * printf faults in libc code: without this that is a new peak). Never where a
 * huge page is meant: breaking one costs more than the memory. Nor in an arena
 * that handed out slices in the last MV_TRIM_SETTLE_NS: it is recycling them,
 * and each trim would cost the faults to fill them again (trimming at once
 * cost bench/wl_realloc, which grows blocks into the runs it frees, 21-29% more
 * CPU). ACTIVE arena, lock held. */
static void trim_locked(mv_arena_t *a) {
  uint32_t dirty = a->free_mask & ~a->zero_mask;
  if (mv_options.purge == MV_PURGE_NEVER || meant_for_thp(a) ||
      ((size_t)__builtin_popcount(dirty) << MV_SLICE_SHIFT) <= (size_t)mv_options.trim_kib << 10 ||
      mv_os_now_ns() - a->placed_ns < MV_TRIM_SETTLE_NS)
    return;
  trimmed_total += give_back_free_locked(a);
}

void mv_arena_set_trim_threshold(size_t bytes) {
  size_t kib = bytes >> 10, most = MV_ARENA_SIZE >> 10;
  mv_lock(&mv_arena_lock);
  mv_options.trim_kib = (unsigned)(kib < most ? kib : most);
  mv_unlock(&mv_arena_lock);
}

/* Partial release (MOVALLOC_PURGE): the free slices of active arenas that may
 * hold data go back to the kernel. This breaks the huge page under such an
 * arena, so it runs only when the purge rule says so; the compactor moves the
 * arena back onto a huge page once it is dense again. One arena at a time under
 * the lock: a slice handed out between the check and the madvise would lose
 * its new contents, and an isolated arena is never touched. */
size_t mv_arena_purge(void) {
  size_t bytes = 0;
  for (uint32_t i = 0; i < mv_arena_frontier(); i++) {
    mv_lock(&mv_arena_lock);
    mv_arena_t *a = &mv_arenas[i];
    if (atomic_load(&a->state) == MV_ARENA_ACTIVE && !a->huge && a->committed)
      bytes += give_back_free_locked(a);
    mv_unlock(&mv_arena_lock);
  }
  return bytes;
}

/* Under the lock, like mv_arena_purge, so that no isolation starts meanwhile:
 * the engine never sees memory vanish under an arena it is moving. */
uint16_t mv_arena_purge_os_pages(const mv_page_t *page, uint16_t os_pages) {
  uint32_t done = 0, left = os_pages;
  mv_arena_t *a = mv_arena_of(page->start);
  mv_lock(&mv_arena_lock);
  if (atomic_load(&a->state) == MV_ARENA_ACTIVE) {
    while (left) {
      unsigned first, n;
      uint32_t run = take_run(&left, &first, &n);
      if (give_back_locked(a, page->start + ((uintptr_t)first << MV_OS_PAGE_SHIFT),
                           (size_t)n << MV_OS_PAGE_SHIFT))
        done |= run;
    }
  }
  mv_unlock(&mv_arena_lock);
  return (uint16_t)done;
}

/* The same, for a whole page. */
void mv_arena_purge_page(const mv_page_t *page) {
  size_t len = (size_t)page->slice_count << MV_SLICE_SHIFT;
  mv_arena_t *a = mv_arena_of(page->start);
  mv_lock(&mv_arena_lock);
  if (atomic_load(&a->state) == MV_ARENA_ACTIVE && give_back_locked(a, page->start, len))
    page_purged_total += len;
  mv_unlock(&mv_arena_lock);
}

/* ---- isolation support for the engine ---- */

bool mv_arena_isolate(mv_arena_t *a) {
  mv_lock(&mv_arena_lock);
  uint8_t expected = MV_ARENA_ACTIVE;
  bool ok = atomic_compare_exchange_strong(&a->state, &expected, MV_ARENA_ISOLATED);
  if (ok) {
    bucket_remove(a);
    atomic_fetch_add(&mv_arenas_isolated, 1);
  }
  mv_unlock(&mv_arena_lock);
  return ok;
}

void mv_arena_set_migrating(mv_arena_t *a, bool migrating) {
  uint8_t from = migrating ? MV_ARENA_ISOLATED : MV_ARENA_MIGRATING;
  uint8_t to = migrating ? MV_ARENA_MIGRATING : MV_ARENA_ISOLATED;
  bool ok = atomic_compare_exchange_strong(&a->state, &from, to);
  if (!ok) mv_arena_state_violation(a, to);
}

void mv_arena_unisolate(mv_arena_t *a, bool moved) {
  mv_lock(&mv_arena_lock);
  uint8_t from = moved ? MV_ARENA_MIGRATING : MV_ARENA_ISOLATED;
  if (!atomic_compare_exchange_strong(&a->state, &from, MV_ARENA_ACTIVE))
    mv_arena_state_violation(a, MV_ARENA_ACTIVE);
  atomic_fetch_sub(&mv_arenas_isolated, 1);
  if (moved) a->thp = true;
  mv_arena_t *release = NULL;
  if (a->release_pending) {
    a->release_pending = false;
    release = arena_emptied(a);
  } else {
    bucket_insert(a);
  }
  mv_unlock(&mv_arena_lock);
  if (release) release_unlocked(release);
}

/* ---- statistics and walks ---- */

void mv_arena_counts(struct mv_arena_counts *out) {
  memset(out, 0, sizeof *out);
  mv_lock(&mv_arena_lock);
  out->frontier = frontier;
  out->cached = cache_len;
  out->released = released_total;
  out->purged_bytes = purged_total;
  out->page_purged_bytes = page_purged_total;
  out->trimmed_bytes = trimmed_total;
  out->huge_objects = huge_live;
  for (uint32_t i = 0; i < frontier; i++) {
    mv_arena_t *a = &mv_arenas[i];
    if (atomic_load(&a->state) != MV_ARENA_FREE) {
      out->active++;
      if (a->thp) out->thp++;
    }
    if (a->committed) out->committed++;
  }
  mv_unlock(&mv_arena_lock);
}

uint32_t mv_arena_frontier(void) {
  return (uint32_t)(atomic_load_explicit(&mv_heap_limit, memory_order_acquire) >>
                    MV_ARENA_SHIFT);
}

void mv_arena_state_violation(const mv_arena_t *a, int to) {
  mv_fatal("arena %u: state %d cannot become %d (engine bug)", a->index,
           (int)atomic_load(&a->state), to);
}
