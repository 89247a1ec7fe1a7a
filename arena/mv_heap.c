/* Thread heaps and small pages: the slow paths behind mv_malloc/mv_free, and the
 * rest of the malloc family.
 *
 * A heap owns pages; only its thread touches their free lists. Another thread's
 * free goes onto the page's xthread_free stack, and if the page sat in the
 * owner's full list, the page goes onto the owner's xthread_pages stack so the
 * owner looks at it again. Heaps are never freed (see mv_types.h), which keeps
 * every one of these races benign: the worst a stale notification does is make
 * an owner look at a page for nothing.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_engine.h"
#include "shim/mv_channel.h"
#include "profiler/mv_lifetime.h"
#include "profiler/mv_profile.h"
#include "shim/mv_init.h"
#include "shim/mv_options.h"

mv_page_t mv_page_none = {.kind = MV_PAGE_NONE};
mv_page_t mv_page_empty = {.kind = MV_PAGE_NONE};
mv_heap_t mv_heap_empty = {.direct = {[0 ... MV_DIRECT_SLOTS - 1] = &mv_page_empty}};
__thread mv_heap_t *mv_tls_heap __attribute__((tls_model("initial-exec"))) = &mv_heap_empty;
uintptr_t mv_keys[2];
uintptr_t mv_free_fast_mask = MV_ALIGN - 1;
size_t mv_malloc_fast_max = MV_DIRECT_MAX;
bool mv_malloc_hooked;
__thread bool mv_malloc_apart __attribute__((tls_model("initial-exec")));

mv_lock_t mv_heaps_lock = MV_LOCK_INIT;
static mv_heap_t *all_heaps;      /* mv_heaps_lock */
static mv_heap_t *abandoned;      /* mv_heaps_lock */
static char *heap_chunk;          /* mv_heaps_lock: bump space for new heaps */
static size_t heap_chunk_left;
static _Atomic uint64_t heap_count;
static _Atomic uint64_t invalid_frees, double_frees;

/* MOVALLOC_PROFILE: the heap of every sampled block, shared by all threads
 * under mv_samples_lock (samples are rare: one per 2 MiB by default). A page
 * holding a sample sends every free of its blocks the slow way (mv_profile.h);
 * were samples in the pages the fast path serves, that would be the thread's
 * hot frees, for as long as the sample lives (tcmalloc keeps samples apart
 * too). Its pages hold samples only, in the long-lived arenas (its long
 * queues), with what the profiler allocates for itself, so that profiling does
 * not move the program's other blocks. No thread owns it: whoever holds the
 * lock acts as its owner, a sample's free too (sample_free). */
mv_lock_t mv_samples_lock = MV_LOCK_INIT;
static mv_heap_t samples_heap = { /* mv_samples_lock; owned, so never adopted */
    .direct = {[0 ... MV_DIRECT_SLOTS - 1] = &mv_page_empty},
    .owned = 1,
};

bool mv_page_holds_samples(const mv_page_t *page) { return mv_page_owner(page) == &samples_heap; }

#define MV_HOUSEKEEPING_EVERY 1024 /* slow calls between looks at the full list */
#define MV_RESCAN_PAGES 64         /* full pages looked at by one such look */
#define MV_EXTEND_BYTES 4096       /* bytes of blocks carved at a time: one OS page */

/* ---- misuse ---- */

/* op: the call that was misused ("free", "realloc"). */
static MV_COLD void report_misuse(const char *op, const void *p, const char *what,
                                  bool is_double) {
  uint64_t n = atomic_fetch_add(is_double ? &double_frees : &invalid_frees, 1);
  if (mv_options.check) mv_fatal("%s(%p): %s", op, p, what);
  if (n < 8) mv_log("ignored %s(%p): %s (MOVALLOC_CHECK=1 aborts here)", op, p, what);
}

/* ---- canaries (MOVALLOC_CHECK=1) ----
 * Under CHECK every block is MV_CANARY_EXTRA bytes larger than asked for. Its
 * last word, the trailer, holds the requested size n XOR a key made from the
 * block's address (a stray write, or a trailer copied from another block, does
 * not decode to a plausible size); bytes [n, n + MV_CANARY_SPAN) up to the
 * trailer hold MV_CANARY_BYTE. free, realloc and malloc_usable_size verify both
 * and abort naming the block. The fast paths never see any of it: under CHECK
 * every free is slow (mv_free_fast_mask) and no heap's direct[] holds a page, so
 * every malloc is slow too. */
#define MV_CANARY_TRAILER sizeof(uintptr_t)
#define MV_CANARY_EXTRA (MV_CANARY_TRAILER + 1) /* at least one canary byte */
#define MV_CANARY_SPAN 4096 /* canary bytes past n: bounds the cost for big blocks */
#define MV_CANARY_BYTE 0xcb

static inline uintptr_t canary_key(const void *p) {
  return mv_keys[0] ^ ((uintptr_t)p * 0x9e3779b97f4a7c15u);
}

static inline size_t canary_end(size_t n, size_t usable) {
  size_t trailer = usable - MV_CANARY_TRAILER;
  return trailer - n > MV_CANARY_SPAN ? n + MV_CANARY_SPAN : trailer;
}

/* p: a block start with usable bytes; n + MV_CANARY_EXTRA <= usable. */
static void canary_arm(void *p, size_t usable, size_t n) {
  unsigned char *b = p;
  memset(b + n, MV_CANARY_BYTE, canary_end(n, usable) - n);
  uintptr_t t = n ^ canary_key(p);
  memcpy(b + usable - MV_CANARY_TRAILER, &t, sizeof t);
}

/* The size requested for block p (usable bytes); aborts when anything past it
 * was overwritten. op: the call that found it. */
static size_t canary_verify(const char *op, const void *p, size_t usable) {
  const unsigned char *b = p;
  uintptr_t t;
  memcpy(&t, b + usable - MV_CANARY_TRAILER, sizeof t);
  size_t n = t ^ canary_key(p);
  if (usable < MV_CANARY_EXTRA || n > usable - MV_CANARY_EXTRA)
    mv_fatal("%s(%p): write past the end of the block (its size record in the last %zu "
             "of its %zu usable bytes was overwritten)", op, p, MV_CANARY_TRAILER, usable);
  for (size_t i = n, end = canary_end(n, usable); i < end; i++)
    if (b[i] != MV_CANARY_BYTE)
      mv_fatal("%s(%p): write past the end of a %zu-byte block (byte %zu changed)", op, p, n,
               i);
  return n;
}

void mv_heap_misuse_counts(uint64_t *invalid, uint64_t *dbl) {
  *invalid = atomic_load(&invalid_frees);
  *dbl = atomic_load(&double_frees);
}

/* ---- page queues ---- */

static void queue_remove(mv_page_queue_t *q, mv_page_t *page) {
  if (page->prev) page->prev->next = page->next;
  else q->first = page->next;
  if (page->next) page->next->prev = page->prev;
  else q->last = page->prev;
  page->next = page->prev = NULL;
}

static void queue_push_front(mv_page_queue_t *q, mv_page_t *page) {
  page->prev = NULL;
  page->next = q->first;
  if (q->first) q->first->prev = page;
  else q->last = page;
  q->first = page;
}

static void queue_push_back(mv_page_queue_t *q, mv_page_t *page) {
  page->next = NULL;
  page->prev = q->last;
  if (q->last) q->last->next = page;
  else q->first = page;
  q->last = page;
}

/* Points the direct slots of bin's sizes at its serving page. Under CHECK
 * direct[] stays empty, so every malloc takes the slow path. */
static inline void update_direct(mv_heap_t *h, unsigned bin) {
  size_t size = mv_bin_size(bin);
  if (size > MV_DIRECT_MAX) return;
  mv_page_t *first = h->queues[MV_LIFE_SHORT][bin].first;
  mv_page_t *page = first && !mv_options.check ? first : &mv_page_empty;
  for (size_t s = mv_bin_first_slot(bin); s <= mv_direct_slot(size); s++) h->direct[s] = page;
}

/* The owner's queue for a page's bin and lifetime class. */
static inline mv_page_queue_t *bin_queue(mv_heap_t *h, unsigned bin, unsigned lifeclass) {
  return &h->queues[lifeclass][bin];
}

static inline mv_page_queue_t *page_queue(mv_heap_t *h, const mv_page_t *page) {
  return bin_queue(h, page->bin, page->lifeclass);
}

/* After page left or joined the head of its queue. */
static inline void update_direct_for(mv_heap_t *h, const mv_page_t *page) {
  if (page->lifeclass == MV_LIFE_SHORT) update_direct(h, page->bin);
}

/* ---- pages ---- */

static_assert(((uint64_t)MV_RESERVE_GIB_MAX << 30) <= ((uint64_t)1 << MV_XFREE_COUNT_SHIFT),
              "every heap offset fits below xthread_free's count");

static MV_COLD void xfree_corrupt(const mv_page_t *page) {
  mv_fatal("heap corruption: page %p got more frees from other threads than it handed out "
           "blocks (a double free from another thread?)", (void *)page->start);
}

/* A page whose memory another thread gave back (page_reclaim) starts over:
 * nothing carved, nothing taken. While it is still being given back, the
 * owner leaves it alone. */
static MV_NOINLINE void page_take_reclaimed(mv_page_t *page, uintptr_t word) {
  if (word != mv_xfree_mark_word(MV_XFREE_RECLAIMED, page->reserved)) return;
  if (!atomic_compare_exchange_strong(&page->xthread_free, &word, 0))
    return; /* a double free got onto it: the next collect reports it */
  if (page->taken != page->capacity || page->local_free || page->sample_rest) xfree_corrupt(page);
  page->free = NULL;
  page->taken = page->capacity = 0;
  page->purge_seen = UINT32_MAX;
}

/* Moves other threads' frees, and the owner's if that leaves free empty, onto
 * page->free. The list is taken with a compare-and-swap, not an exchange, so
 * that a mark (page_reclaim) stays. */
static void page_collect(mv_page_t *page) {
  uintptr_t word = atomic_load_explicit(&page->xthread_free, memory_order_relaxed);
  while (word && !mv_xfree_is_mark(word) &&
         !atomic_compare_exchange_weak_explicit(&page->xthread_free, &word, 0,
                                                memory_order_acquire, memory_order_relaxed)) {
  }
  if (MV_UNLIKELY(mv_xfree_is_mark(word))) {
    page_take_reclaimed(page, word);
    return;
  }
  if (word) {
    mv_block_t *head = mv_xfree_head(word);
    uint32_t n = mv_xfree_count(word);
    if (n > mv_page_in_use(page)) xfree_corrupt(page);
    if (page->free) { /* rare on the way to a malloc: only there the list is walked */
      mv_block_t *tail = head;
      for (uint32_t i = 1; i < n; i++)
        if (!(tail = mv_ptr_decode(tail->next_enc))) xfree_corrupt(page);
      if (tail->next_enc != mv_ptr_encode(NULL)) xfree_corrupt(page);
      tail->next_enc = mv_ptr_encode(page->free);
    }
    page->free = head;
    page->taken -= n;
  }
  if (!page->free && page->local_free) {
    page->free = page->local_free;
    page->local_free = NULL;
    page->taken -= page->local_count;
    page->local_count = 0;
  }
}

/* Carves the next blocks of a page onto its free list. */
static void page_extend(mv_page_t *page) {
  uint32_t bs = page->block_size;
  uint32_t n = page->reserved - page->capacity;
  uint32_t batch = MV_EXTEND_BYTES / bs;
  if (batch < 4) batch = 4;
  if (n > batch) n = batch;
  char *first = (char *)(page->start + (uintptr_t)page->capacity * bs);
  for (uint32_t i = 0; i + 1 < n; i++)
    ((mv_block_t *)(first + (size_t)i * bs))->next_enc = mv_ptr_encode(first + (size_t)(i + 1) * bs);
  ((mv_block_t *)(first + (size_t)(n - 1) * bs))->next_enc = mv_ptr_encode(page->free);
  page->free = (mv_block_t *)first;
  page->capacity += n;
}

/* The blocks on free and sample_rest. */
static inline uint32_t blocks_not_handed_out(const mv_page_t *page) {
  return page->capacity - page->taken - page->aside;
}

/* Racy, as the state is: an isolation that starts just after finds the page
 * handing out blocks, which the engine copes with; this only spares it writes. */
static bool arena_serving(const mv_page_t *page) {
  return atomic_load_explicit(&mv_arenas_isolated, memory_order_relaxed) == 0 ||
         atomic_load_explicit(&mv_arena_of(page->start)->state, memory_order_relaxed) ==
             MV_ARENA_ACTIVE;
}

/* ---- sparse pages (MOVALLOC_PURGE_SPARSE) ----
 * A page that its class's frees left mostly empty keeps its memory: its holes
 * fit only blocks of its own size, which a program that moved on to other
 * sizes no longer asks for (bench/wl_fragment). When the purge rule says so
 * (sweep_due), such a page gives its wholly free 4 KiB pages back to the
 * kernel. The blocks
 * overlapping them leave the free lists (their links would read as zeros) and
 * come back when the page runs out (page_regrow). One-slice pages only: bins
 * up to 8 KiB, a uint16_t of 4 KiB pages each. */

#define MV_SWEEP_MIN 16 /* slices of new pages between sweeps, at least */
static _Atomic uint32_t sweep_requests; /* mv_heap_request_sweep calls so far */
/* u blocks in use at random places leave 16 * (15/16)^u of a slice's 4 KiB
 * pages free, whatever the block size: one page for u = 44, none to speak of
 * beyond. A page with more is not worth walking its free lists for. */
#define MV_SPARSE_MAX_IN_USE 48

static inline bool marked(const uint64_t *marks, uint32_t i) {
  return marks[i / 64] >> (i % 64) & 1;
}

/* Does block i overlap a 4 KiB page whose bit is set in os_pages? */
static inline bool block_overlaps(const mv_page_t *page, uint32_t i, uint16_t os_pages) {
  size_t from = (size_t)i * page->block_size;
  unsigned g0 = (unsigned)(from >> MV_OS_PAGE_SHIFT);
  unsigned g1 = (unsigned)((from + page->block_size - 1) >> MV_OS_PAGE_SHIFT);
  return (os_pages & (((2u << (g1 - g0)) - 1) << g0)) != 0;
}

/* The carved blocks overlapping 4 KiB page g: [*first, *last]; false if none. */
static bool os_page_blocks(const mv_page_t *page, unsigned g, uint32_t *first, uint32_t *last) {
  size_t from = (size_t)g << MV_OS_PAGE_SHIFT;
  *first = (uint32_t)(from / page->block_size);
  *last = (uint32_t)((from + MV_OS_PAGE_SIZE - 1) / page->block_size);
  if (*last >= page->capacity) *last = page->capacity - 1;
  return *first < page->capacity;
}

#define MV_SWEEP_BATCH 8 /* pages whose free lists are walked side by side */
#define MV_MARK_WORDS (MV_SLICE_SIZE / MV_ALIGN / 64) /* a bit per block of a slice */

/* Marks the free blocks (free and local_free) of n pages, walking their 2n
 * lists side by side: a walk is a chain of cache misses, and this way the
 * misses of different lists overlap. bad[i]: page i's list leaves its carved
 * blocks or is longer than they are (corrupt: then the page is left alone). */
static void mark_free_blocks(mv_page_t *const *pages, unsigned n,
                             uint64_t (*marks)[MV_MARK_WORDS], bool *bad) {
  const mv_block_t *at[2 * MV_SWEEP_BATCH];
  uint32_t seen[MV_SWEEP_BATCH] = {0};
  unsigned live = 2 * n;
  for (unsigned i = 0; i < n; i++) {
    memset(marks[i], 0, sizeof marks[i]);
    bad[i] = false;
    at[2 * i] = pages[i]->free;
    at[2 * i + 1] = pages[i]->local_free;
  }
  while (live) {
    live = 0;
    for (unsigned w = 0; w < 2 * n; w++) {
      const mv_block_t *b = at[w];
      if (!b) continue;
      const mv_page_t *page = pages[w / 2];
      uintptr_t off = (uintptr_t)b - page->start;
      if (off >= (uintptr_t)page->capacity * page->block_size || ++seen[w / 2] > page->capacity) {
        bad[w / 2] = true;
        at[w] = NULL;
        continue;
      }
      uint32_t i = (uint32_t)(off / page->block_size);
      marks[w / 2][i / 64] |= (uint64_t)1 << (i % 64);
      at[w] = mv_ptr_decode(b->next_enc);
      live += at[w] != NULL;
    }
  }
}

/* Puts 4 KiB page g's blocks back on the free list, the ones that overlap no
 * other page still given back (each goes back with the last of its pages). */
static void page_unpurge(mv_page_t *page, unsigned g) {
  page->purged &= (uint16_t)~(1u << g);
  uint32_t first, last;
  if (!os_page_blocks(page, g, &first, &last)) return;
  for (uint32_t i = last + 1; i-- > first;) {
    if (block_overlaps(page, i, page->purged)) continue;
    mv_block_t *b = (mv_block_t *)(page->start + (uintptr_t)i * page->block_size);
    b->next_enc = mv_ptr_encode(page->free);
    page->free = b;
    page->aside--;
  }
}

/* Gives back the 4 KiB pages of a one-slice page of the caller's that hold free
 * blocks only (marks: its free blocks); returns how many. The free list is
 * rebuilt without the blocks overlapping them before the madvise, so no link
 * is lost; a page the kernel refused comes back at once. */
static unsigned page_purge_sparse(mv_page_t *page, const uint64_t *marks) {
  uint16_t want = 0;
  for (unsigned g = 0; g < MV_SLICE_OS_PAGES; g++) {
    uint32_t first, last;
    if (!os_page_blocks(page, g, &first, &last)) break;
    if (page->purged >> g & 1) continue;
    bool all_free = true;
    for (uint32_t i = first; i <= last && all_free; i++)
      all_free = marked(marks, i) || block_overlaps(page, i, page->purged);
    if (all_free) want |= (uint16_t)(1u << g);
  }
  if (!want) return 0;
  uint16_t purged = page->purged | want;
  mv_block_t *head = NULL;
  uint32_t aside = 0;
  for (uint32_t i = page->capacity; i-- > 0;) {
    if (block_overlaps(page, i, purged)) {
      aside++;
    } else if (marked(marks, i)) {
      mv_block_t *b = (mv_block_t *)(page->start + (uintptr_t)i * page->block_size);
      b->next_enc = mv_ptr_encode(head);
      head = b;
    }
  }
  page->free = head;
  page->local_free = NULL;
  page->taken -= page->local_count;
  page->local_count = 0;
  page->purged = purged;
  page->aside = (uint16_t)aside;
  uint16_t done = mv_arena_purge_os_pages(page, want), refused = want & (uint16_t)~done;
  while (refused) {
    unsigned g = (unsigned)__builtin_ctz(refused);
    refused &= (uint16_t)(refused - 1);
    page_unpurge(page, g);
  }
  return (unsigned)__builtin_popcount(done);
}

/* Returns the 4 KiB pages given back. */
static size_t purge_batch(mv_page_t *const *pages, unsigned n) {
  uint64_t marks[MV_SWEEP_BATCH][MV_MARK_WORDS];
  bool bad[MV_SWEEP_BATCH];
  size_t done = 0;
  mark_free_blocks(pages, n, marks, bad);
  for (unsigned i = 0; i < n; i++)
    if (!bad[i]) done += page_purge_sparse(pages[i], marks[i]);
  return done;
}

/* Purges heap h's sparse one-slice pages (the caller owns h); returns the 4 KiB
 * pages given back. every_page: also those looked at before with no fewer
 * blocks in use since (otherwise skipped: they had nothing to give). */
static size_t heap_sweep_sparse(mv_heap_t *h, bool every_page) {
  size_t done = 0;
  h->sweeps_seen = atomic_load_explicit(&sweep_requests, memory_order_relaxed);
  uint64_t limit = (uint64_t)mv_options.purge_sparse * MV_SLICE_SIZE / 100;
  mv_page_t *batch[MV_SWEEP_BATCH];
  unsigned n = 0;
  uint32_t pages = 0;
  unsigned classes = mv_lifetime_on ? MV_LIFECLASSES : 1;
  for (unsigned c = 0; c < classes; c++) {
    for (unsigned bin = 1; bin < MV_BINS && mv_bin_slices(bin) == 1; bin++) {
      for (mv_page_t *page = bin_queue(h, bin, c)->first; page; page = page->next) {
        pages++;
        uint32_t in_use = mv_page_in_use(page);
        if ((every_page || in_use < page->purge_seen) && in_use <= MV_SPARSE_MAX_IN_USE &&
            (uint64_t)in_use * page->block_size <= limit &&
            atomic_load_explicit(&page->heap, memory_order_relaxed) == h &&
            !page->sample_rest && arena_serving(page))
          batch[n++] = page;
        page->purge_seen = in_use;
        if (n == MV_SWEEP_BATCH) {
          done += purge_batch(batch, n);
          n = 0;
        }
      }
    }
  }
  if (n) done += purge_batch(batch, n);
  h->grown = 0;
  h->sweep_after = pages / 16 > MV_SWEEP_MIN ? pages / 16 : MV_SWEEP_MIN;
  return done;
}

/* Due when the purge rule fired since the heap's last sweep (by default: memory
 * pressure), or, under MOVALLOC_PURGE=always, when the heap has taken new pages
 * for a sixteenth of those it holds: a heap that holds still is never swept,
 * and a growing one's sweeps cost a bounded share of its growth. */
static inline bool sweep_due(const mv_heap_t *h) {
  return mv_options.purge_sparse &&
         (h->sweeps_seen != atomic_load_explicit(&sweep_requests, memory_order_relaxed) ||
          (mv_options.purge == MV_PURGE_ALWAYS && h->grown >= h->sweep_after));
}

void mv_heap_request_sweep(void) { atomic_fetch_add(&sweep_requests, 1); }

size_t mv_heap_purge_sparse(void) {
  if (!mv_options.purge_sparse || mv_options.purge == MV_PURGE_NEVER) return 0;
  size_t done = 0;
  mv_lock(&mv_heaps_lock); /* the owner of abandoned heaps */
  for (mv_heap_t *h = abandoned; h; h = h->next_abandoned) done += heap_sweep_sparse(h, true);
  mv_unlock(&mv_heaps_lock);
  mv_heap_t *mine = mv_tls_heap;
  if (mine != &mv_heap_empty) done += heap_sweep_sparse(mine, true);
  return done << MV_OS_PAGE_SHIFT;
}

/* Blocks for a page whose lists ran dry: those set aside first (they take no
 * more of the slice than it had), else newly carved ones. page_extend never
 * carves into a page given back, whose aside blocks would be listed twice. */
static void page_regrow(mv_page_t *page) {
  while (!page->free && page->purged) page_unpurge(page, (unsigned)__builtin_ctz(page->purged));
  if (!page->free && page->capacity < page->reserved) page_extend(page);
}

static inline __attribute__((always_inline)) void page_release(mv_heap_t *h, mv_page_t *page) {
  if (atomic_load_explicit(&page->in_full, memory_order_relaxed)) {
    queue_remove(&h->full, page);
    atomic_store(&page->in_full, 0);
  } else {
    queue_remove(page_queue(h, page), page);
    update_direct_for(h, page);
  }
  mv_arena_free_slices(page);
}

/* MOVALLOC_PROFILE counted the page's list when installed (prof_install): the
 * blocks never handed out were not allocated, and go back to this thread's
 * countdown. A copy of page_retire of its own, so that the unprofiled one
 * keeps its registers. */
static MV_NOINLINE void page_retire_profiled(mv_heap_t *h, mv_page_t *page) {
  if (page->lifeclass == MV_LIFE_SHORT && page->block_size <= MV_DIRECT_MAX)
    mv_prof_left += (int64_t)page->block_size * blocks_not_handed_out(page);
  page_release(h, page);
}

/* Only pages of the calling thread's own heap give back to its countdown: the
 * countdown is per thread, so what a heap of an exited thread (or the exiting
 * thread's, which is no longer mv_tls_heap) never handed out is no one's to
 * give back, and counting it walks two free lists for nothing. */
static void page_retire(mv_heap_t *h, mv_page_t *page) {
  if (MV_UNLIKELY(mv_prof_rate) && h == mv_tls_heap) page_retire_profiled(h, page);
  else page_release(h, page);
}

/* Full list <-> bin queue. The stores and loads of in_full and xthread_free are
 * sequentially consistent: either the owner sees a concurrent free's block, or
 * the freeing thread sees in_full and notifies. */
static void page_to_full(mv_heap_t *h, mv_page_t *page) {
  queue_remove(page_queue(h, page), page);
  queue_push_back(&h->full, page);
  atomic_store(&page->in_full, 1);
  if (atomic_load(&page->xthread_free) != 0) {
    queue_remove(&h->full, page);
    atomic_store(&page->in_full, 0);
    queue_push_back(page_queue(h, page), page);
  }
}

/* A free that still reads in_full as set notifies for nothing, which
 * heap_drain_notified ignores: no ordering is needed here, unlike page_to_full. */
static void page_unfull(mv_heap_t *h, mv_page_t *page) {
  queue_remove(&h->full, page);
  atomic_store_explicit(&page->in_full, 0, memory_order_relaxed);
  queue_push_back(page_queue(h, page), page);
  update_direct_for(h, page);
}

/* Tells a page's owner that a full page got a free. At most one stack holds a
 * page at a time (notify), so xnext is never shared. */
static void page_notify(mv_page_t *page) {
  if (atomic_exchange(&page->notify, 1) != 0) return;
  mv_heap_t *h = mv_page_owner(page);
  if (!h) {
    atomic_store(&page->notify, 0);
    return;
  }
  mv_page_t *head = atomic_load_explicit(&h->xthread_pages, memory_order_relaxed);
  do page->xnext = head;
  while (!atomic_compare_exchange_weak_explicit(&h->xthread_pages, &head, page,
                                                memory_order_release, memory_order_relaxed));
  if (!head) atomic_store_explicit(&h->notified_since_ns, mv_os_now_ns(), memory_order_relaxed);
}

static void heap_drain_notified(mv_heap_t *h) {
  if (!atomic_load_explicit(&h->xthread_pages, memory_order_relaxed)) return;
  mv_page_t *page = atomic_exchange_explicit(&h->xthread_pages, NULL, memory_order_acquire);
  while (page) {
    mv_page_t *next = page->xnext;
    atomic_store(&page->notify, 0);
    mv_heap_t *owner = mv_page_owner(page);
    bool full = atomic_load(&page->in_full);
    if (owner == h && full) page_unfull(h, page);
    else if (owner && owner != h && full) page_notify(page); /* reused meanwhile: forward */
    page = next;
  }
}

static bool page_got_frees(const mv_page_t *page) {
  return page->local_free || atomic_load_explicit(&page->xthread_free, memory_order_relaxed);
}

/* The safety net under the notifications: full pages that got frees anyway. */
static void heap_rescan_full(mv_heap_t *h) {
  for (mv_page_t *page = h->full.first, *next; page; page = next) {
    next = page->next;
    if (page_got_frees(page)) page_unfull(h, page);
  }
}

/* The same net, as housekeeping: a few full pages from the front at a time,
 * the ones left going to the back. A heap of gigabytes holds tens of
 * thousands of full pages; walking them all every MV_HOUSEKEEPING_EVERY slow
 * calls took a sixth of the time of random churn over 1 GiB (bench/wl_phased). */
static void heap_rescan_some_full(mv_heap_t *h) {
  for (unsigned i = 0; i < MV_RESCAN_PAGES && h->full.first; i++) {
    mv_page_t *page = h->full.first;
    if (page_got_frees(page)) {
      page_unfull(h, page);
    } else {
      queue_remove(&h->full, page);
      queue_push_back(&h->full, page);
    }
  }
}

static mv_page_t *page_fresh(mv_heap_t *h, unsigned bin, unsigned lifeclass) {
  mv_compactor_poke();
  bool zeroed;
  mv_page_t *page = mv_arena_alloc_class(mv_bin_slices(bin), &zeroed, lifeclass);
  if (!page) return NULL;
  h->grown += page->slice_count;
  page->kind = MV_PAGE_SMALL;
  page->sample_rest = NULL;
  page->purged = page->aside = 0;
  page->purge_seen = UINT32_MAX;
  page->bin = (uint8_t)bin;
  page->block_size = (uint32_t)mv_bin_size(bin);
  page->reserved = (uint32_t)(((size_t)page->slice_count << MV_SLICE_SHIFT) / page->block_size);
  atomic_store_explicit(&page->heap, h, memory_order_release);
  queue_push_front(bin_queue(h, bin, lifeclass), page);
  mv_channel_poke(); /* the heap grew: the inspection channel may publish */
  return page;
}

static void heap_collect(mv_heap_t *h, bool keep_one);

/* Returns the empty pages of one abandoned heap (rotating through them), if
 * nobody else is at it: what threads that exited still hold, other threads'
 * frees have often emptied. */
static void collect_one_abandoned(void) {
  if (!abandoned || !mv_lock_try(&mv_heaps_lock)) return;
  mv_heap_t *h = abandoned;
  if (h) {
    heap_collect(h, false);
    if (h->next_abandoned) { /* to the back, so the next call looks at another */
      abandoned = h->next_abandoned;
      mv_heap_t *last = abandoned;
      while (last->next_abandoned) last = last->next_abandoned;
      last->next_abandoned = h;
      h->next_abandoned = NULL;
    }
  }
  mv_unlock(&mv_heaps_lock);
}

/* A page of bin and lifetime class with a free block, made the first page of
 * its queue; NULL: no memory. */
static inline __attribute__((always_inline)) mv_page_t *heap_page_for(mv_heap_t *h,
                                                                      unsigned bin,
                                                                      unsigned lifeclass) {
  if (++h->slow_calls % MV_HOUSEKEEPING_EVERY == 0) heap_rescan_some_full(h);
  if (MV_UNLIKELY(sweep_due(h))) heap_sweep_sparse(h, false);
  heap_drain_notified(h);
  mv_page_queue_t *q = bin_queue(h, bin, lifeclass);
  /* A page with freed blocks before a page with blocks set aside or still to
   * carve: those touch new memory while freed blocks wait, and each size class
   * would keep the memory of its own peak. */
  mv_page_t *page = q->first, *regrow = NULL;
  while (page) {
    mv_page_t *next = page->next;
    if (arena_serving(page)) { /* an isolated arena hands out nothing new */
      page_collect(page);
      if (page->free) break;
      if (page->capacity == page->reserved && !page->purged) page_to_full(h, page);
      else if (!regrow) regrow = page;
    }
    page = next;
  }
  if (!page && regrow) {
    page = regrow;
    page_regrow(page);
  }
  if (!page) {
    collect_one_abandoned(); /* their empty pages may serve instead of fresh ones */
    page = page_fresh(h, bin, lifeclass);
    if (!page) return NULL;
    page_extend(page);
  }
  if (q->first != page) {
    queue_remove(q, page);
    queue_push_front(q, page);
  }
  if (lifeclass == MV_LIFE_SHORT) update_direct(h, bin);
  return page;
}

static void page_emptied_in(mv_heap_t *h, mv_page_t *page) {
  if (atomic_load_explicit(&page->in_full, memory_order_relaxed)) page_unfull(h, page);
  if (mv_page_in_use(page) != 0) return;
  /* Keep a bin's only page: a thread that frees its last block of a size
   * usually allocates that size again. */
  mv_page_queue_t *q = page_queue(h, page);
  if (q->first == page && q->last == page) return;
  page_retire(h, page);
}

void mv_page_emptied(mv_page_t *page) { page_emptied_in(mv_tls_heap, page); }

/* A block of the samples' heap is freed: the heap takes it back at once, as
 * its owner would, so that it stops counting as in use (left to the other
 * threads' way, it would wait for the heap's next sample). Not while this
 * thread holds the heap's lock (a free from inside sample_apart). */
static bool sample_free(mv_page_t *page, mv_block_t *b) {
  if (!mv_page_holds_samples(page) || mv_lock_held_by_me(&mv_samples_lock)) return false;
  mv_lock(&mv_samples_lock);
  if (mv_push_local(page, b)) page_emptied_in(&samples_heap, page);
  mv_unlock(&mv_samples_lock);
  return true;
}

/* ---- heaps ---- */

static mv_heap_t *heap_new_locked(void) {
  if (heap_chunk_left < sizeof(mv_heap_t)) {
    size_t len = (size_t)64 << 10;
    void *chunk = mv_os_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
    if (chunk == MAP_FAILED) return NULL;
    heap_chunk = chunk;
    heap_chunk_left = len;
  }
  mv_heap_t *h = (mv_heap_t *)heap_chunk;
  heap_chunk += (sizeof(mv_heap_t) + 63) & ~(size_t)63;
  heap_chunk_left -= (sizeof(mv_heap_t) + 63) & ~(size_t)63;
  for (unsigned s = 0; s < MV_DIRECT_SLOTS; s++) h->direct[s] = &mv_page_empty;
  h->next_heap = all_heaps;
  all_heaps = h;
  atomic_fetch_add(&heap_count, 1);
  return h;
}

static mv_heap_t *heap_acquire(void) {
  mv_lock(&mv_heaps_lock);
  mv_heap_t *h = abandoned;
  if (h) abandoned = h->next_abandoned;
  else h = heap_new_locked();
  if (h) atomic_store(&h->owned, 1);
  mv_unlock(&mv_heaps_lock);
  return h;
}

mv_heap_t *mv_heap_get(void) {
  mv_heap_t *h = mv_tls_heap;
  if (MV_LIKELY(h != &mv_heap_empty)) return h;
  if (!mv_ensure_init()) return NULL;
  h = mv_tls_heap; /* initialisation may have run a recursive malloc */
  if (h != &mv_heap_empty) return h;
  h = heap_acquire();
  if (!h) return NULL;
  mv_tls_heap = h;
  mv_thread_attach();
  return h;
}

/* Collects every page of a heap the caller owns and returns the empty ones. */
static void heap_collect(mv_heap_t *h, bool keep_one) {
  heap_drain_notified(h);
  heap_rescan_full(h);
  /* Long queues stay empty unless routing, but in the heap of samples. */
  unsigned classes = mv_lifetime_on || h == &samples_heap ? MV_LIFECLASSES : 1;
  for (unsigned c = 0; c < classes; c++) {
    for (unsigned bin = 1; bin < MV_BINS; bin++) {
      mv_page_queue_t *q = bin_queue(h, bin, c);
      for (mv_page_t *page = q->first, *next; page; page = next) {
        next = page->next;
        page_collect(page);
        bool kept = keep_one && q->first == page && !next;
        if (mv_page_in_use(page) == 0 && !kept) page_retire(h, page);
      }
    }
  }
}

void mv_heap_thread_exit(void) {
  mv_heap_t *h = mv_tls_heap;
  if (h == &mv_heap_empty) return;
  mv_tls_heap = &mv_heap_empty; /* later destructors that malloc get a fresh heap */
  heap_collect(h, false);
  mv_lock(&mv_heaps_lock);
  atomic_store(&h->owned, 0);
  h->next_abandoned = abandoned;
  abandoned = h;
  mv_unlock(&mv_heaps_lock);
}

void mv_heap_collect_all(void) {
  mv_lock(&mv_samples_lock);
  heap_collect(&samples_heap, false);
  mv_unlock(&mv_samples_lock);
  mv_lock(&mv_heaps_lock);
  for (mv_heap_t *h = abandoned; h; h = h->next_abandoned) heap_collect(h, false);
  mv_unlock(&mv_heaps_lock);
  mv_heap_t *mine = mv_tls_heap;
  if (mine != &mv_heap_empty) heap_collect(mine, true);
}

void mv_heap_fork_child(void) {
  /* The other threads are gone, maybe in the middle of a free-list update: their
   * heaps cannot be trusted, so they are never adopted (their memory is lost to
   * the child, which usually execs soon). */
  mv_heap_t *mine = mv_tls_heap;
  abandoned = NULL;
  for (mv_heap_t *h = all_heaps; h; h = h->next_heap) {
    if (h == mine) continue;
    if (atomic_load(&h->owned)) h->dead = true;
    else if (!h->dead) {
      h->next_abandoned = abandoned;
      abandoned = h;
    }
  }
}

uint64_t mv_heap_count(void) { return atomic_load(&heap_count); }

/* ---- frees that left the fast path ---- */

/* Is b on the free list starting at head? Bounded, and it stops at a link that
 * leaves the page, so it is safe on a list that another thread is changing
 * (then it may miss). */
static bool block_on_list(const mv_page_t *page, const mv_block_t *head, const mv_block_t *b) {
  uint32_t limit = page->capacity + 1, n = 0;
  uintptr_t carved = (uintptr_t)page->capacity * page->block_size;
  for (const mv_block_t *x = head; x && n < limit; n++) {
    if (x == b) return true;
    if ((uintptr_t)x - page->start >= carved) return false;
    x = mv_ptr_decode(x->next_enc);
  }
  return false;
}

/* Is b free: on the owner's lists (sample_rest: the profiler's held-back part
 * of free) or on other threads' frees? Exact for the owner; for another thread
 * it races with the owner and may miss. */
static bool block_is_free(const mv_page_t *page, const mv_block_t *b) {
  return block_on_list(page, __atomic_load_n(&page->free, __ATOMIC_RELAXED), b) ||
         block_on_list(page, __atomic_load_n(&page->local_free, __ATOMIC_RELAXED), b) ||
         block_on_list(page, __atomic_load_n(&page->sample_rest, __ATOMIC_RELAXED), b) ||
         block_on_list(page, mv_xfree_head(atomic_load(&page->xthread_free)), b);
}

/* Is b a freed block of page? Those set aside for a 4 KiB page given back
 * (page_purge_sparse), and those of a page given back whole (page_reclaim),
 * read as zeros, so mv_looks_freed misses them; the page's bits, or its mark,
 * tell (mv_free_suspect sends the former's frees here). */
static bool block_freed(const mv_page_t *page, const mv_block_t *b) {
  if (mv_xfree_is_mark(atomic_load_explicit(&page->xthread_free, memory_order_relaxed)))
    return true; /* every block is free: the page was given back (page_reclaim) */
  uint16_t purged = __atomic_load_n(&page->purged, __ATOMIC_RELAXED);
  if (purged && block_overlaps(page, (uint32_t)(((uintptr_t)b - page->start) / page->block_size),
                               purged))
    return true;
  return mv_looks_freed(b) && block_is_free(page, b);
}

/* Another thread's free into a page whose heap was abandoned (its thread
 * exited): the freeing thread takes the page over, so the block serves its own
 * next mallocs at once instead of waiting in the page until some new thread
 * adopts that heap. Servers hand objects from thread to thread (bench/wl_larson:
 * 5% less CPU). Once per page, under the heaps' lock, which stands for the
 * abandoned heaps' owner, when nobody else holds it. */
static MV_NOINLINE bool page_claim(mv_page_t *page) {
  mv_heap_t *a = mv_page_owner(page), *h = mv_tls_heap;
  if (!a || atomic_load_explicit(&a->owned, memory_order_relaxed) || h == &mv_heap_empty)
    return false;
  if (!mv_lock_try(&mv_heaps_lock)) return false;
  bool claim = !atomic_load(&a->owned) && mv_page_owner(page) == a;
  if (claim && atomic_load(&page->notify)) heap_drain_notified(a); /* its stack lets go of it */
  /* sample_rest: blocks held back for a sample of the countdown of a's thread. */
  claim = claim && !atomic_load(&page->notify) && !page->sample_rest && arena_serving(page);
  if (claim) {
    if (atomic_load(&page->in_full)) {
      queue_remove(&a->full, page);
      atomic_store(&page->in_full, 0);
    } else {
      queue_remove(page_queue(a, page), page);
      update_direct_for(a, page);
    }
    atomic_store_explicit(&page->heap, h, memory_order_release);
  }
  mv_unlock(&mv_heaps_lock);
  if (claim) {
    queue_push_back(page_queue(h, page), page);
    update_direct_for(h, page);
  }
  return claim;
}

/* The time spares a running owner, which takes its notifications at its next
 * slow call, and one that waits for a core briefly; one that waited longer
 * carves the page anew, at a few page faults. No count of pages besides: a
 * thread that handed its objects on and waits to exit (bench/wl_larson's
 * generations, on two cores) is told of a few pages only (it had 0-4 full
 * ones), and the count of 32 that was here kept their memory
 * (docs/RESULTS.md, sixteenth session). */
static bool owner_away(mv_heap_t *h) {
  return atomic_load_explicit(&h->xthread_pages, memory_order_relaxed) != NULL &&
         mv_os_now_ns() - atomic_load_explicit(&h->notified_since_ns, memory_order_relaxed) >=
             MV_AWAY_NS;
}

/* Every block of a wholly carved page came back from other threads (word, the
 * list ending with this thread's push, counts them all), and the owner is away
 * (owner_away). A thread that made the data others consume and then blocks
 * (bench/wl_larson's main thread) would keep that memory for as long as it
 * blocks: only the owner may move a page, but no block of this one is in use,
 * so this thread gives the memory back. The mark keeps the owner off the page
 * meanwhile (the owner takes lists with a compare-and-swap that fails on it),
 * and no other thread frees into it (that would be a double free, which
 * block_freed catches). The owner starts the page over when it looks again
 * (page_take_reclaimed). Not under MOVALLOC_PURGE=never. */
static MV_NOINLINE bool page_reclaim(mv_page_t *page, uintptr_t word) {
  mv_heap_t *h = mv_page_owner(page);
  if (!h || mv_options.purge == MV_PURGE_NEVER || !owner_away(h)) return false;
  uintptr_t reclaiming = mv_xfree_mark_word(MV_XFREE_RECLAIMING, page->reserved);
  if (!atomic_compare_exchange_strong(&page->xthread_free, &word, reclaiming)) return false;
  mv_arena_purge_page(page);
  atomic_compare_exchange_strong(&page->xthread_free, &reclaiming,
                                 mv_xfree_mark_word(MV_XFREE_RECLAIMED, page->reserved));
  page_notify(page);
  return true;
}

/* profiling: MOVALLOC_PROFILE is on, a constant in each copy (free_block).
 * Off, no page is tagged and the first block compiles away. */
static inline __attribute__((always_inline)) void free_small(mv_page_t *page, mv_block_t *b,
                                                             bool profiling) {
  if (profiling) {
    /* The tag is set while the page holds sampled blocks, from before any of
     * them is handed out (mv_prof_sample): an untagged page's block is not
     * sampled, and this test is all its frees pay. */
    uintptr_t tagged = (uintptr_t)atomic_load_explicit(&page->heap, memory_order_relaxed);
    if (MV_UNLIKELY(tagged & MV_HEAP_SAMPLED)) {
      mv_prof_free(b, page);
      if (tagged == ((uintptr_t)mv_tls_heap | MV_HEAP_SAMPLED) &&
          ((uintptr_t)b & mv_free_fast_mask) == 0 && !mv_free_suspect(page, b)) {
        /* The owner's free: what the fast path would do were the page
         * untagged, no more (what it leaves unchecked is unchecked with
         * profiling off too). Otherwise the tag fails the owner test below,
         * and the free takes the other threads' way: correct too. */
        if (mv_push_local(page, b)) mv_page_emptied(page);
        return;
      }
    }
  }
  uintptr_t off = (uintptr_t)b - page->start;
  if (off % page->block_size != 0 || off >= (uintptr_t)page->capacity * page->block_size) {
    report_misuse("free", b, "not the start of a block (interior pointer)", false);
    return;
  }
  /* The owner's free; a page of an exited thread's heap becomes this thread's. */
  if (atomic_load_explicit(&page->heap, memory_order_relaxed) == mv_tls_heap || page_claim(page)) {
    if (block_freed(page, b)) {
      report_misuse("free", b, "double free", true);
      return;
    }
    if (MV_UNLIKELY(mv_options.check)) canary_verify("free", b, page->block_size);
    if (mv_push_local(page, b)) mv_page_emptied(page);
    return;
  }
  if (block_freed(page, b)) {
    report_misuse("free", b, "double free", true);
    return;
  }
  if (MV_UNLIKELY(mv_options.check)) canary_verify("free", b, page->block_size);
  if (profiling && sample_free(page, b)) return;
  uintptr_t word = atomic_load_explicit(&page->xthread_free, memory_order_relaxed), mine;
  uint32_t n;
  do {
    n = mv_xfree_count(word) + 1;
    b->next_enc = mv_ptr_encode(mv_xfree_head(word));
    mine = mv_xfree_word(b, n);
  } while (!atomic_compare_exchange_weak(&page->xthread_free, &word, mine));
  if (MV_UNLIKELY(n == page->reserved) && page_reclaim(page, mine)) return;
  if (atomic_load(&page->in_full)) page_notify(page);
}

/* p in page (a live page of p's heap). profiling: as free_small's. */
static inline __attribute__((always_inline)) void free_block(void *p, mv_page_t *page,
                                                             bool profiling) {
  switch (page->kind) {
    case MV_PAGE_SMALL:
      free_small(page, (mv_block_t *)p, profiling);
      return;
    case MV_PAGE_LARGE:
    case MV_PAGE_HUGE:
      if ((uintptr_t)p != page->start) {
        report_misuse("free", p, "not the start of a block (interior pointer)", false);
        return;
      }
      if (profiling && atomic_load_explicit(&page->sampled, memory_order_relaxed))
        mv_prof_free(p, page);
      if (MV_UNLIKELY(mv_options.check)) canary_verify("free", p, page->huge_size);
      if (page->kind == MV_PAGE_LARGE) mv_arena_free_slices(page);
      else mv_arena_free_huge(page);
      return;
    default:
      report_misuse("free", p, "double free, or never allocated (no live block there)", true);
      return;
  }
}

void mv_free_slow(void *p) {
  if (!p) return;
  mv_page_t *page = mv_page_of(p);
  if (!page) {
    report_misuse("free", p, "not allocated by movalloc", false);
    return;
  }
  /* MOVALLOC_PROFILE: frees of blocks in pages holding sampled blocks come here
   * (mv_page.heap is tagged), as do large and huge ones: a sampled block is
   * forgotten before it can be reused. */
  if (MV_UNLIKELY(mv_prof_rate)) free_block(p, page, true);
  else free_block(p, page, false);
}


/* ---- allocation beyond the fast path ---- */

/* Counts p for the profiler, when it is on. */
static inline void *counted(void *p, size_t size) {
  return MV_UNLIKELY(mv_prof_rate) ? mv_prof_count(p, size) : p;
}

static MV_ALLOC_ENTRY void *alloc_big(size_t size, size_t align, bool *zeroed,
                                      unsigned lifeclass) {
  mv_compactor_poke();
  bool z;
  if (size > PTRDIFF_MAX) {
    errno = ENOMEM;
    return NULL;
  }
  mv_page_t *page;
  if (size <= MV_LARGE_MAX && align <= MV_SLICE_SIZE) {
    unsigned n = (unsigned)((size + MV_SLICE_SIZE - 1) >> MV_SLICE_SHIFT);
    page = mv_arena_alloc_class(n, &z, lifeclass);
    if (!page) return NULL;
    page->huge_size = (size_t)n << MV_SLICE_SHIFT;
    page->kind = MV_PAGE_LARGE;
  } else {
    page = mv_arena_alloc_huge(size, align > MV_ARENA_SIZE ? align : 0, &z);
    if (!page) return NULL;
  }
  if (zeroed) *zeroed = z;
  mv_channel_poke(); /* the heap grew: the inspection channel may publish */
  return counted((void *)page->start, size);
}

/* A block of the size class of size (<= MV_SMALL_MAX) from h. */
static void *small_alloc(mv_heap_t *h, size_t size) {
  unsigned bin = mv_bin_of(size);
  mv_page_t *page = bin_queue(h, bin, MV_LIFE_SHORT)->first;
  if (!page || !page->free) {
    page = heap_page_for(h, bin, MV_LIFE_SHORT);
    if (!page) {
      errno = ENOMEM;
      return NULL;
    }
  }
  mv_block_t *b = mv_pop(page, page->free);
  if (MV_UNLIKELY(mv_options.check) && page->free) {
    uintptr_t off = (uintptr_t)page->free - page->start;
    if (off >= (uintptr_t)page->capacity * page->block_size || off % page->block_size != 0)
      mv_fatal("malloc: heap corruption: the free block %p has a damaged link (written after "
               "it was freed, or past the end of the block before it)", (void *)b);
  }
  return b;
}

/* Under CHECK: every allocation, with its canary armed. align: 0, or a power
 * of two. zeroed (optional): whether the block came zeroed. */
static void *check_alloc(mv_heap_t *h, size_t n, size_t align, bool *zeroed) {
  if (n > PTRDIFF_MAX) {
    errno = ENOMEM;
    return NULL;
  }
  size_t real = n + MV_CANARY_EXTRA;
  size_t rounded = align > MV_ALIGN ? (real + align - 1) & ~(align - 1) : real;
  bool z = false;
  void *p;
  if (rounded <= MV_SMALL_MAX && align <= MV_SLICE_SIZE)
    p = small_alloc(h, rounded); /* as mv_aligned: bin sizes keep the alignment */
  else
    p = alloc_big(real, align > MV_ALIGN ? align : 0, &z, MV_LIFE_SHORT);
  if (!p) return NULL;
  if (zeroed) *zeroed = z;
  mv_page_t *page = mv_page_of(p);
  canary_arm(p, page->kind == MV_PAGE_SMALL ? page->block_size : page->huge_size, n);
  return p;
}

static MV_NOINLINE MV_ALLOC_ENTRY void *malloc_slow(size_t size) {
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  if (MV_UNLIKELY(mv_options.check)) return check_alloc(h, size, 0, NULL);
  if (size > MV_SMALL_MAX) return alloc_big(size, 0, NULL, MV_LIFE_SHORT);
  return small_alloc(h, size);
}

/* A block of bin from h's long queues (the owner, or mv_samples_lock held);
 * NULL with errno = ENOMEM. */
static mv_block_t *long_block(mv_heap_t *h, unsigned bin) {
  mv_page_t *page = bin_queue(h, bin, MV_LIFE_LONG)->first;
  if (!page || !page->free) page = heap_page_for(h, bin, MV_LIFE_LONG);
  if (!page) {
    errno = ENOMEM;
    return NULL;
  }
  return mv_pop(page, page->free);
}

/* A routed allocation (MOVALLOC_PROFILE_LONGLIVED): pages of the heap's long
 * queues, in arenas of their own. */
static MV_NOINLINE MV_ALLOC_ENTRY void *malloc_long(size_t size) {
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  if (size > MV_SMALL_MAX) return alloc_big(size, 0, NULL, MV_LIFE_LONG);
  mv_block_t *b = long_block(h, mv_bin_of(size));
  return b ? counted(b, size) : NULL;
}

/* MOVALLOC_PROFILE, sizes the fast path serves: a page's free list is counted
 * against the thread's byte countdown when it is installed for the fast path,
 * all at once. If the countdown runs out within it, the list is cut before the
 * block where it does; that block heads sample_rest, so the fast path stops
 * short of it and malloc_refill samples it. The fast path itself counts nothing. */
static inline __attribute__((always_inline)) void prof_install(mv_page_t *page) {
  int64_t bs = page->block_size;
  mv_block_t *b = page->free;
  if (!b) return;
  /* The whole of free (sample_rest is empty here). */
  int64_t bytes = (int64_t)blocks_not_handed_out(page) * bs;
  if (mv_prof_left >= bytes) {
    mv_prof_left -= bytes;
    return;
  }
  for (mv_block_t *prev = NULL; b; prev = b, b = mv_ptr_decode(b->next_enc)) {
    if (mv_prof_left < bs && mv_prof_cross()) { /* the countdown ran out in b */
      if (prev) prev->next_enc = mv_ptr_encode(NULL);
      else page->free = NULL;
      page->sample_rest = b; /* the rest is counted when installed after b */
      return;
    }
    mv_prof_left -= bs;
  }
}

/* A sampled allocation of size, from samples_heap. unit: what the countdown
 * counted for it. The report describes the arena of the bin's serving page in
 * h, where the allocation's unsampled neighbours go. */
static MV_NOINLINE MV_ALLOC_ENTRY void *sample_apart(mv_heap_t *h, size_t size, size_t unit) {
  /* A malloc made while this thread holds the lock (the compactor's
   * pthread_create, which a fresh page may start) is served unsampled. */
  if (mv_lock_held_by_me(&mv_samples_lock)) return small_alloc(h, size);
  unsigned bin = mv_bin_of(size);
  mv_lock(&mv_samples_lock);
  mv_block_t *b = long_block(&samples_heap, bin);
  mv_unlock(&mv_samples_lock);
  if (!b) return NULL;
  mv_page_t *serving = bin_queue(h, bin, MV_LIFE_SHORT)->first;
  return mv_prof_sample(b, size, unit, serving ? serving->start : (uintptr_t)b);
}

/* MOVALLOC_PROFILE, size <= MV_DIRECT_MAX, the direct page's list is used up: install
 * the next one (prof_install), or sample: the countdown ran out at the
 * held-back block, which stays for a later allocation (counted with the rest
 * of the list), and this allocation is sampled apart. */
static MV_NOINLINE MV_ALLOC_ENTRY void *malloc_refill(size_t size) {
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  unsigned bin = mv_bin_of(size);
  mv_page_t *page = h->direct[mv_direct_slot(size)];
  if (!page->free && !page->sample_rest) {
    page = heap_page_for(h, bin, MV_LIFE_SHORT);
    if (!page) {
      errno = ENOMEM;
      return NULL;
    }
    prof_install(page);
  }
  mv_block_t *b = page->free;
  if (b) return mv_pop(page, b);
  page->free = page->sample_rest;
  page->sample_rest = NULL;
  prof_install(page);
  return sample_apart(h, size, (size_t)page->block_size);
}

/* A routed allocation (MOVALLOC_PROFILE_LONGLIVED, or mv_malloc_apart) or a
 * profiled one (MOVALLOC_PROFILE) that left the fast path. ra: the return address of
 * mv_malloc_slow, malloc's caller when malloc jumped there. Under routing,
 * every malloc comes here (mv_malloc_fast_max is 0). */
static MV_NOINLINE MV_ALLOC_ENTRY void *malloc_hooked(size_t size, uintptr_t ra) {
  if (mv_malloc_apart || (mv_lifetime_on && mv_lifetime_class(ra) == MV_LIFE_LONG))
    return malloc_long(size);
  if (size <= MV_DIRECT_MAX) {
    mv_page_t *page = mv_tls_heap->direct[mv_direct_slot(size)];
    mv_block_t *b = page->free;
    if (MV_LIKELY(b != NULL)) return mv_pop(page, b); /* the fast path's, counted when installed */
    if (mv_prof_rate) return malloc_refill(size);
  }
  if (size > MV_SMALL_MAX) return malloc_slow(size); /* alloc_big counts it */
  return counted(malloc_slow(size), size);
}

/* Profiling alone, sizes the fast path does not serve: counted one by one. Out
 * of line, so that mv_malloc_slow needs no frame. */
static MV_NOINLINE MV_ALLOC_ENTRY void *malloc_counted(size_t size) {
  /* malloc_slow's small case, without a call to it: profiling is off under
   * MOVALLOC_CHECK, and the size is at most MV_SMALL_MAX. */
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  if (MV_UNLIKELY((mv_prof_left -= (int64_t)size) < 0) && mv_prof_cross())
    return sample_apart(h, size, size);
  return small_alloc(h, size);
}

MV_ALLOC_ENTRY void *mv_malloc_slow(size_t size) {
  if (MV_UNLIKELY(mv_malloc_hooked)) {
    if (mv_lifetime_on || mv_malloc_apart)
      return malloc_hooked(size, (uintptr_t)__builtin_return_address(0));
    /* Profiling alone: up to MV_DIRECT_MAX the fast path's list ran out; above, count it. */
    if (size <= MV_DIRECT_MAX) return malloc_refill(size);
    if (size > MV_SMALL_MAX) return malloc_slow(size); /* alloc_big counts it */
    return malloc_counted(size);
  }
  return malloc_slow(size);
}

MV_ALLOC_ENTRY void *mv_calloc(size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  if (total <= MV_SMALL_MAX) {
    void *p = mv_malloc(total);
    if (p) memset(p, 0, total);
    return p;
  }
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  bool zeroed;
  void *p = mv_options.check ? check_alloc(h, total, 0, &zeroed)
                            : alloc_big(total, 0, &zeroed, MV_LIFE_SHORT);
  if (p && !zeroed) memset(p, 0, total);
  return p;
}

MV_ALLOC_ENTRY void *mv_aligned(size_t align, size_t size) {
  if (align <= MV_ALIGN) return mv_malloc(size);
  if (size > PTRDIFF_MAX - align) {
    errno = ENOMEM;
    return NULL;
  }
  mv_heap_t *h = mv_heap_get();
  if (!h) {
    errno = ENOMEM;
    return NULL;
  }
  if (MV_UNLIKELY(mv_options.check)) return check_alloc(h, size, align, NULL);
  if (align <= MV_SLICE_SIZE) {
    /* Bin sizes that are multiples of align give aligned blocks in slice-aligned
     * pages (mv_sizeclass.h). */
    size_t rounded = ((size ? size : 1) + align - 1) & ~(align - 1);
    if (rounded <= MV_SMALL_MAX) return mv_malloc(rounded);
  }
  return alloc_big(size ? size : 1, align, NULL, MV_LIFE_SHORT);
}

size_t mv_usable_size(const void *p) {
  mv_page_t *page = p ? mv_page_of(p) : NULL;
  if (!page) return 0;
  if (MV_UNLIKELY(mv_options.check)) { /* the size asked for: more is canary */
    if (page->kind == MV_PAGE_SMALL && ((uintptr_t)p - page->start) % page->block_size == 0)
      return canary_verify("malloc_usable_size", p, page->block_size);
    if (page->kind != MV_PAGE_NONE && (uintptr_t)p == page->start)
      return canary_verify("malloc_usable_size", p, page->huge_size);
    return 0;
  }
  switch (page->kind) {
    case MV_PAGE_SMALL: {
      uintptr_t off = ((uintptr_t)p - page->start) % page->block_size;
      return page->block_size - off;
    }
    case MV_PAGE_LARGE:
    case MV_PAGE_HUGE:
      return page->huge_size - ((uintptr_t)p - page->start);
    default:
      return 0;
  }
}

size_t mv_good_size(size_t size) {
  if (size <= MV_SMALL_MAX) return mv_bin_size(mv_bin_of(size));
  if (size <= MV_LARGE_MAX) return (size + MV_SLICE_SIZE - 1) & ~(MV_SLICE_SIZE - 1);
  return (size + MV_ARENA_SIZE - 1) & ~(MV_ARENA_SIZE - 1);
}

bool mv_owns(const void *p) {
  mv_page_t *page = mv_page_of(p);
  return page && page->kind != MV_PAGE_NONE;
}

/* realloc under CHECK: p is a live block start of page (a freed small block
 * has been refused). Verifies p's canary, keeps the new block's armed. */
static void *check_realloc(void *p, mv_page_t *page, size_t size) {
  bool small = page->kind == MV_PAGE_SMALL;
  size_t usable = small ? page->block_size : page->huge_size;
  size_t old = canary_verify("realloc", p, usable);
  if (size <= PTRDIFF_MAX) {
    size_t real = size + MV_CANARY_EXTRA;
    bool fits = page->kind == MV_PAGE_HUGE ? real > MV_LARGE_MAX && mv_arena_resize_huge(page, real)
                                           : real <= usable && real > usable / 2;
    if (fits) {
      canary_arm(p, small ? usable : page->huge_size, size);
      return p;
    }
  }
  void *q = mv_malloc(size);
  if (!q) return NULL; /* p is untouched */
  memcpy(q, p, size < old ? size : old);
  mv_free(p);
  return q;
}

MV_ALLOC_ENTRY void *mv_realloc(void *p, size_t size) {
  if (!p) return mv_malloc(size);
  if (size == 0) { /* glibc: realloc(p, 0) frees p and returns NULL */
    mv_free(p);
    return NULL;
  }
  mv_page_t *page = mv_page_of(p);
  if (!page || page->kind == MV_PAGE_NONE ||
      (page->kind != MV_PAGE_SMALL && (uintptr_t)p != page->start)) {
    report_misuse("realloc", p, "not a live block", false);
    errno = EINVAL;
    return NULL;
  }
  if (page->kind == MV_PAGE_SMALL) {
    if (mv_looks_freed(p) && block_is_free(page, p)) {
      report_misuse("realloc", p, "a freed block (use after free)", true);
      errno = EINVAL;
      return NULL;
    }
  }
  if (MV_UNLIKELY(mv_options.check)) {
    if (page->kind == MV_PAGE_SMALL && ((uintptr_t)p - page->start) % page->block_size != 0) {
      report_misuse("realloc", p, "not the start of a block (interior pointer)", false);
      errno = EINVAL;
      return NULL;
    }
    return check_realloc(p, page, size);
  }
  size_t usable = mv_usable_size(p);
  if (page->kind == MV_PAGE_SMALL) {
    if (size <= usable && size >= usable / 2) return p;
  } else if (page->kind == MV_PAGE_HUGE) {
    if (size > MV_LARGE_MAX && mv_arena_resize_huge(page, size)) return p;
  } else if (size <= usable && size > usable / 2) {
    return p;
  }
  void *q = mv_malloc(size);
  if (!q) return NULL; /* p is untouched */
  size_t keep = size < usable ? size : usable;
  /* Huge to huge: both spans start on an arena, and their pages can move. */
  if (page->kind == MV_PAGE_HUGE && size > MV_LARGE_MAX) mv_engine_move_span(q, p, keep);
  else memcpy(q, p, keep);
  mv_free(p);
  return q;
}

/* ---- statistics ---- */

uint64_t mv_arena_pages_in_use(const mv_arena_t *a) {
  uint64_t total = 0;
  for (unsigned s = 0; s < MV_SLICES; s++) {
    const mv_page_t *page = a->slice_page[s];
    if (page != &a->pages[s]) continue; /* each page once, at its first slice */
    if (page->kind == MV_PAGE_SMALL) total += (uint64_t)mv_page_in_use(page) * page->block_size;
    else if (page->kind == MV_PAGE_LARGE) total += page->huge_size;
  }
  return total;
}

uint64_t mv_heap_bytes_in_use(void) {
  uint64_t total = 0;
  uint32_t n = mv_arena_frontier();
  for (uint32_t i = 0; i < n; i++) {
    mv_arena_t *a = &mv_arenas[i];
    if (atomic_load_explicit(&a->state, memory_order_relaxed) == MV_ARENA_FREE) continue;
    total += mv_arena_pages_in_use(a);
    const mv_page_t *first = &a->pages[0]; /* a huge object, at its span's first slice */
    if (a->slice_page[0] == first && first->kind == MV_PAGE_HUGE) total += first->huge_size;
  }
  return total;
}
