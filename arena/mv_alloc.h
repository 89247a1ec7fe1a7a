/* The allocator's internal interface: the inline fast paths of malloc and free,
 * and the out-of-line slow paths behind them (mv_heap.c, mv_arena.c). The shim
 * (shim/mv_shim.c) turns these into the exported malloc family. */
#ifndef MV_ALLOC_H
#define MV_ALLOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arena/mv_sizeclass.h"
#include "arena/mv_types.h"

/* ---- globals set once by mv_arena_init() ---- */
extern uintptr_t mv_heap_base;          /* arena 0 */
extern _Atomic(size_t) mv_heap_limit;    /* bytes of arenas with descriptors: frontier */
extern mv_arena_t *mv_arenas;           /* descriptors, indexed like the arenas */
extern uintptr_t mv_keys[2];            /* free-list encoding secret */
extern uintptr_t mv_free_fast_mask;     /* 15; ~0 under MOVALLOC_CHECK (all frees slow) */
/* MV_DIRECT_MAX; 0 under MOVALLOC_PROFILE_LONGLIVED (all mallocs slow, where they are
 * routed). Hidden, so the fast path compares against it directly, like a
 * constant. */
extern size_t mv_malloc_fast_max __attribute__((visibility("hidden")));
/* MOVALLOC_PROFILE or MOVALLOC_PROFILE_LONGLIVED: mv_malloc_slow hands over to
 * the profiler's paths (mv_heap.c, malloc_hooked). */
extern bool mv_malloc_hooked __attribute__((visibility("hidden")));
/* This thread's mallocs go to long-lived arenas while set (with
 * mv_malloc_fast_max 0 and mv_malloc_hooked): the profiler's own, such as
 * loading libunwind, which would otherwise take room among the program's first
 * blocks and move where its later ones land. */
extern __thread bool mv_malloc_apart __attribute__((tls_model("initial-exec")));

extern mv_page_t mv_page_none;          /* every unused slice maps here */
extern mv_page_t mv_page_empty;         /* an empty bin's page: free == NULL */
extern mv_heap_t mv_heap_empty;         /* a thread's heap before its first malloc */
extern __thread mv_heap_t *mv_tls_heap __attribute__((tls_model("initial-exec")));

/* ---- free-list link encoding ----
 * A link is the next block's address XOR a secret, rotated, XOR a second
 * secret: a heap overflow that plants a plain address plants garbage, and NULL
 * does not encode to 0. Rotating by a constant compiles to one instruction.
 * MV_FREELIST_PLAIN (a build flag, never set by the build files) stores plain
 * addresses instead: it exists only to build the library that measures what
 * the encoding costs (docs/RESULTS.md, "Hardening cost"). */
#ifndef MV_FREELIST_PLAIN
static inline uintptr_t mv_ptr_encode(const void *p) {
  uintptr_t x = (uintptr_t)p ^ mv_keys[0];
  return ((x << 17) | (x >> 47)) ^ mv_keys[1];
}
static inline mv_block_t *mv_ptr_decode(uintptr_t e) {
  uintptr_t x = e ^ mv_keys[1];
  return (mv_block_t *)(((x >> 17) | (x << 47)) ^ mv_keys[0]);
}
#else
static inline uintptr_t mv_ptr_encode(const void *p) { return (uintptr_t)p; }
static inline mv_block_t *mv_ptr_decode(uintptr_t e) { return (mv_block_t *)e; }
#endif

/* ---- other threads' frees (mv_page.xthread_free) ----
 * A page's xthread_free is one word, so that a free pushes with one
 * compare-and-swap: the first block's offset from the heap base, and above it
 * how many blocks the list holds (0: empty). The owner takes the list whole,
 * and with the count it needs no walk to put it on an empty free list: each
 * link would be a miss, the blocks being in the cache of the core that freed
 * them (bench/wl_xthread; mv_heap.c, page_collect). */
#define MV_XFREE_COUNT_SHIFT 48
static_assert(MV_SLICE_SIZE / MV_ALIGN < (1u << (64 - MV_XFREE_COUNT_SHIFT)),
              "the count holds every block of a page");

static inline uintptr_t mv_xfree_word(const mv_block_t *head, uint32_t n) {
  return ((uintptr_t)head - mv_heap_base) | ((uintptr_t)n << MV_XFREE_COUNT_SHIFT);
}
static inline uint32_t mv_xfree_count(uintptr_t word) {
  return (uint32_t)(word >> MV_XFREE_COUNT_SHIFT);
}

/* Instead of a list, the word may hold a mark, with the count of blocks the
 * page carved: every one of them came back from other threads while the
 * owner stayed away, and a freeing thread gives the page's memory back to the
 * kernel (mv_heap.c, page_reclaim). A mark is no block's offset: those are
 * multiples of MV_ALIGN. */
enum mv_xfree_mark {
  MV_XFREE_RECLAIMING = 1, /* being given back: the owner leaves the page alone */
  MV_XFREE_RECLAIMED = 2,  /* given back: the owner forgets its lists and carves anew */
};
static inline bool mv_xfree_is_mark(uintptr_t word) { return (word & (MV_ALIGN - 1)) != 0; }
static inline uintptr_t mv_xfree_mark_word(enum mv_xfree_mark mark, uint32_t n) {
  return (uintptr_t)mark | ((uintptr_t)n << MV_XFREE_COUNT_SHIFT);
}

static inline mv_block_t *mv_xfree_head(uintptr_t word) {
  uintptr_t off = word & (((uintptr_t)1 << MV_XFREE_COUNT_SHIFT) - 1);
  return word && !mv_xfree_is_mark(word) ? (mv_block_t *)(mv_heap_base + off) : NULL;
}

/* ---- lookup ---- */

#define MV_HEAP_SAMPLED ((uintptr_t)1) /* tag on mv_page.heap (mv_types.h) */

/* The heap that owns a small page (NULL for large and huge ones). */
static inline struct mv_heap *mv_page_owner(const mv_page_t *page) {
  uintptr_t h = (uintptr_t)atomic_load_explicit(&((mv_page_t *)page)->heap, memory_order_relaxed);
  return (struct mv_heap *)(h & ~MV_HEAP_SAMPLED);
}

/* Blocks of a small page in use or waiting in its xthread_free (mv_types.h).
 * Exact for the owner; another thread's read may catch the two counts apart,
 * and gets 0 rather than a wrapped count. */
static inline uint32_t mv_page_in_use(const mv_page_t *page) {
  uint32_t taken = page->taken, local = page->local_count;
  return taken > local ? taken - local : 0;
}

/* The page holding p, or NULL when p is not in a used arena of the heap. */
static inline mv_page_t *mv_page_of(const void *p) {
  uintptr_t off = (uintptr_t)p - mv_heap_base;
  if (MV_UNLIKELY(off >= atomic_load_explicit(&mv_heap_limit, memory_order_acquire)))
    return NULL;
  return mv_arenas[off >> MV_ARENA_SHIFT].slice_page[(off >> MV_SLICE_SHIFT) & (MV_SLICES - 1)];
}

static inline mv_arena_t *mv_arena_of(uintptr_t addr) {
  return &mv_arenas[(addr - mv_heap_base) >> MV_ARENA_SHIFT];
}

/* ---- slow paths ---- */
void *mv_malloc_slow(size_t size) MV_NOINLINE;
void mv_free_slow(void *p) MV_NOINLINE;
/* The owner's: none of the page's blocks is in use now, or a full page got a free. */
void mv_page_emptied(mv_page_t *page) MV_NOINLINE;

/* ---- fast paths ---- */

/* Hands out b, the head of page's free list. Its link is cleared, so that a
 * block freed without having been written does not look freed (each such free
 * would walk the page's lists to tell), and the program never reads an encoded
 * link. */
static inline mv_block_t *mv_pop(mv_page_t *page, mv_block_t *b) {
  mv_block_t *next = mv_ptr_decode(b->next_enc);
  /* The next malloc of this size reads next's link: a cache miss, unless
   * fetched now, while the program works with b. */
  __builtin_prefetch(next, 1);
  page->free = next;
  b->next_enc = 0;
  page->taken++;
  return b;
}

static inline void *mv_malloc(size_t size) {
  if (MV_LIKELY(size <= mv_malloc_fast_max)) {
    mv_heap_t *heap = mv_tls_heap;
    mv_page_t *page = heap->direct[mv_direct_slot(size)];
    mv_block_t *b = page->free;
    if (MV_LIKELY(b != NULL)) return mv_pop(page, b);
  }
  return mv_malloc_slow(size);
}

/* A link that decodes to NULL or into the block's own arena is what a freed
 * block looks like: then check properly (one load and compare otherwise). */
static inline bool mv_looks_freed(const mv_block_t *b) {
  uintptr_t next = (uintptr_t)mv_ptr_decode(b->next_enc);
  return next == 0 || ((next ^ (uintptr_t)b) >> MV_ARENA_SHIFT) == 0;
}

/* Might b be free already, so that its free must be checked the slow way? A
 * block set aside for a 4 KiB page given back (mv_heap.c, page_purge_sparse)
 * reads as zeros: in a page with such blocks, a zero link is suspect too. */
static inline bool mv_free_suspect(const mv_page_t *page, const mv_block_t *b) {
  return mv_looks_freed(b) || (MV_UNLIKELY(page->purged != 0) && b->next_enc == 0);
}

/* The owner's free of b: onto its page's own list. True when the page must be
 * looked at, because it emptied or had been set aside as full (then
 * mv_page_emptied, or for a heap not the thread's, page_emptied_in). */
static inline bool mv_push_local(mv_page_t *page, mv_block_t *b) {
  b->next_enc = mv_ptr_encode(page->local_free);
  page->local_free = b;
  return MV_UNLIKELY(++page->local_count == page->taken ||
                     atomic_load_explicit(&page->in_full, memory_order_relaxed));
}

/* A page holding blocks the profiler sampled has its heap pointer tagged
 * (MV_HEAP_SAMPLED), so the owner test fails and its frees go the slow way. */
static inline void mv_free(void *p) {
  uintptr_t off = (uintptr_t)p - mv_heap_base;
  if (MV_LIKELY(off < atomic_load_explicit(&mv_heap_limit, memory_order_relaxed) &&
                ((uintptr_t)p & mv_free_fast_mask) == 0)) {
    mv_page_t *page =
        mv_arenas[off >> MV_ARENA_SHIFT].slice_page[(off >> MV_SLICE_SHIFT) & (MV_SLICES - 1)];
    mv_block_t *b = (mv_block_t *)p;
    if (MV_LIKELY(atomic_load_explicit(&page->heap, memory_order_relaxed) == mv_tls_heap &&
                  !mv_free_suspect(page, b))) {
      if (mv_push_local(page, b)) mv_page_emptied(page);
      return;
    }
  }
  mv_free_slow(p);
}

/* ---- the rest of the malloc family (mv_heap.c) ---- */
void *mv_calloc(size_t n, size_t size);
void *mv_realloc(void *p, size_t size);
void *mv_aligned(size_t align, size_t size); /* align: a power of two */
size_t mv_usable_size(const void *p);       /* 0 for NULL or a pointer not ours */
size_t mv_good_size(size_t size);           /* what malloc(size) would give */
bool mv_owns(const void *p);
bool mv_page_holds_samples(const mv_page_t *page); /* a page of the profiler's samples' heap */

/* ---- heaps (mv_heap.c) ---- */
mv_heap_t *mv_heap_get(void);      /* the calling thread's heap, acquiring one if needed */
void mv_heap_thread_exit(void);    /* abandons the calling thread's heap */
void mv_heap_fork_child(void);     /* heaps of threads that vanished in fork() are dead */
void mv_heap_collect_all(void);    /* returns empty pages of every abandoned heap */
/* Sparse pages (MOVALLOC_PURGE_SPARSE) give their wholly free 4 KiB pages back:
 * mv_heap_purge_sparse now, the calling thread's and abandoned heaps'
 * (malloc_trim; returns the bytes); mv_heap_request_sweep at each thread's next
 * slow call (the compactor's purge rule). */
size_t mv_heap_purge_sparse(void);
void mv_heap_request_sweep(void);
/* Live block bytes of the small and large pages that start in arena a: a racy
 * but safe walk of its descriptor (huge objects not counted). */
uint64_t mv_arena_pages_in_use(const mv_arena_t *a);

/* ---- arenas (mv_arena.c) ---- */
int mv_arena_init(void);           /* reserves the heap; 0 or -errno */
/* A run of n contiguous free slices in an arena of that lifetime class (enum
 * mv_lifeclass), fullest arena first. Returns its page descriptor (kind NONE,
 * slices mapped to it) or NULL with errno = ENOMEM. */
mv_page_t *mv_arena_alloc_class(unsigned n, bool *zeroed, unsigned lifeclass);
static inline mv_page_t *mv_arena_alloc_slices(unsigned n, bool *zeroed) {
  return mv_arena_alloc_class(n, zeroed, MV_LIFE_SHORT);
}
void mv_arena_free_slices(mv_page_t *page);
/* A span of whole arenas for size bytes, aligned to align (>= MV_ARENA_SIZE or 0). */
mv_page_t *mv_arena_alloc_huge(size_t size, size_t align, bool *zeroed);
void mv_arena_free_huge(mv_page_t *page);
/* Grows or shrinks a huge span in place; true on success. */
bool mv_arena_resize_huge(mv_page_t *page, size_t size);
/* Releases every cached empty arena to the kernel; returns how many. */
size_t mv_arena_trim(void);

#endif /* MV_ALLOC_H */
