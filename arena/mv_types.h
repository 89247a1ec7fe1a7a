/* Every allocator structure, with its invariants.
 *
 * Memory layout
 *   data region:  [mv_heap_base, mv_heap_base + reserve)  2 MiB aligned, arena i at
 *                 mv_heap_base + i * MV_ARENA_SIZE. Holds only program data and the
 *                 encoded free-list links inside free blocks.
 *   meta region:  mv_arenas[i] describes arena i. Nothing the allocator needs to
 *                 read or write under a lock lives in the data region, so an arena
 *                 can be write-protected and moved while the allocator runs.
 *
 * An arena is 32 slices of 64 KiB. A page is a run of slices serving one size
 * class (small pages) or one object (large); huge objects take a span of whole
 * arenas. Every slice of every used arena maps to its page through
 * mv_arena.slice_page, so free() finds a block's page in two loads.
 */
#ifndef MV_TYPES_H
#define MV_TYPES_H

#include "arena/mv_atomic.h"
#include <assert.h> /* static_assert, in C as in C++ */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arena/mv_lock.h"
#include "compactor/mv_backend.h" /* MV_ARENA_SHIFT, MV_ARENA_SIZE */

#define MV_SLICE_SHIFT 16
#define MV_SLICE_SIZE ((size_t)1 << MV_SLICE_SHIFT)
#define MV_SLICES (MV_ARENA_SIZE / MV_SLICE_SIZE) /* 32: one bit each in a uint32_t */
#define MV_OS_PAGE_SHIFT 12
#define MV_OS_PAGE_SIZE ((size_t)1 << MV_OS_PAGE_SHIFT)
#define MV_SLICE_OS_PAGES (MV_SLICE_SIZE / MV_OS_PAGE_SIZE) /* 16: one bit each in a uint16_t */

#define MV_ALIGN 16                       /* every block is 16-byte aligned */
#define MV_SMALL_MAX ((size_t)64 << 10)   /* largest size-class block */
#define MV_LARGE_MAX ((size_t)1 << 20)    /* largest object inside one arena */
#define MV_BINS 81                        /* bins 1..80 are size classes; 0 unused */
#define MV_DIRECT_MAX 1024                /* largest size malloc's fast path serves */
#define MV_DIRECT_SLOTS (MV_DIRECT_MAX / 16 + 1) /* mv_heap_t.direct (mv_sizeclass.h) */
#define MV_PAGE_MAX_SLICES 8              /* a small page spans at most 512 KiB */

#define MV_LIKELY(x) __builtin_expect(!!(x), 1)
#define MV_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define MV_EXPORT __attribute__((visibility("default")))
#define MV_NOINLINE __attribute__((noinline))
#define MV_COLD __attribute__((cold, noinline))
/* Every function that can sit between a program's allocation call and the
 * profiler's stack capture lives in this section: the profiler cuts its frames
 * off a sampled stack (profiler/mv_profile.c), linked statically or preloaded. */
#define MV_ALLOC_ENTRY __attribute__((section("mv_alloc_text")))

/* A free block: its first word is the encoded address of the next free block
 * (mv_ptr_encode), so a heap overflow cannot plant a plain pointer. */
typedef struct mv_block {
  uintptr_t next_enc;
} mv_block_t;

enum mv_page_kind {
  MV_PAGE_NONE,  /* slice not in use (the slice_page entries point at mv_page_none) */
  MV_PAGE_SMALL, /* blocks of one size class, owned by one heap */
  MV_PAGE_LARGE, /* one object of slice_count slices */
  MV_PAGE_HUGE,  /* one object of whole arenas (huge_size bytes) */
};

struct mv_heap;

/* Lifetime classes (MOVALLOC_PROFILE_LONGLIVED): allocations from sites an
 * earlier profile found long-lived get pages in arenas of their own, so the
 * holes short-lived churn leaves do not pin arenas holding long-lived data. */
enum mv_lifeclass {
  MV_LIFE_SHORT, /* everything by default */
  MV_LIFE_LONG,  /* routed: predicted long-lived */
  MV_LIFECLASSES,
};

/* One page. Lives in the meta region, in the arena that holds its first slice.
 *
 * SMALL invariants (owner = the heap that owns the page):
 *   taken = blocks popped off free and not back on it: in use, or waiting in
 *   local_free or xthread_free; local_count = the length of local_free. So the
 *   blocks in use or waiting in xthread_free are taken - local_count
 *   (mv_page_in_use), and free and sample_rest hold capacity - taken - aside:
 *   counted, never walked. The owner's free adds to local_count, not to taken, so that it
 *   costs what a decrement of an in-use count would;
 *   capacity = blocks carved so far <= reserved; blocks in free, local_free and
 *   xthread_free are distinct and each lies in [start, start + reserved * block_size);
 *   free and local_free are touched only by the owner; xthread_free by anyone
 *   (lock-free push, owner takes it whole; its word holds the list's length too,
 *   which the owner subtracts from taken). It holds a mark instead (mv_alloc.h)
 *   only when its count is capacity == reserved: every block came back that way,
 *   and the page's memory is being or was given back; the owner then leaves the
 *   page alone, or starts it over with nothing carved.
 *   none in use and the page is not its bin's only page => the owner retires it.
 *   in_full: the page sits in the owner's full list, not its bin queue.
 *   purged bit g set (one-slice pages only) => 4 KiB page g was given back to the
 *   kernel (MOVALLOC_PURGE_SPARSE) while every block overlapping it was free; those
 *   blocks are on no list, the `aside` of them, and come back to `free` when the
 *   page runs out of blocks (mv_heap.c, page_unpurge).
 *   notify: the page is on some heap's xthread_pages stack (at most one).
 */
typedef struct mv_page {
  mv_block_t *free;          /* malloc pops here (owner only) */
  uint32_t taken;
  uint32_t block_size;
  mv_block_t *local_free;    /* the owner's frees; become `free` when it runs out */
  uint32_t local_count;
  uint16_t purged;           /* SMALL: 4 KiB pages given back, a bit each (the owner
                                writes it; frees read it: mv_free_suspect) */
  _Atomic(uint8_t) in_full;
  _Atomic(struct mv_heap *) heap;  /* owner; NULL for LARGE/HUGE. Bit 0 set (MV_HEAP_SAMPLED):
                                      the page holds blocks the profiler sampled, so no
                                      heap matches it and every free of its blocks takes
                                      the slow path; read it through mv_page_owner */
  struct mv_page *next, *prev;     /* the owner's bin queue or full list */
  struct mv_page *xnext;           /* link on a heap's xthread_pages stack */
  /* The fast paths touch the cache line above only. Other threads' frees write
   * the one below, so that they do not take the owner's line away from it. */
  _Atomic(uintptr_t) xthread_free; /* other threads' frees (encoded links, as on free),
                                      with their count: mv_alloc.h, mv_xfree_word */
  uintptr_t start;           /* first data byte */
  uint32_t capacity;
  uint32_t reserved;
  _Atomic(uint8_t) notify;
  uint8_t kind;              /* enum mv_page_kind */
  uint8_t bin;
  uint16_t slice_count;      /* slices this page covers (SMALL, LARGE) */
  _Atomic(uint16_t) sampled; /* live blocks in the profiler's table (mv_profile.h);
                                SMALL: != 0 <=> heap has MV_HEAP_SAMPLED (profile lock) */
  size_t huge_size;          /* HUGE/LARGE: usable bytes */
  uint8_t lifeclass;         /* SMALL, LARGE: enum mv_lifeclass, that of its arena;
                                SMALL: which of the owner's queue sets holds it */
  uint16_t aside;            /* SMALL: free blocks overlapping purged pages (owner only) */
  uint32_t purge_seen;       /* SMALL: blocks in use when last looked at for purging */
  _Atomic(uintptr_t) sampled_block; /* profile lock: 0 when sampled is 0; the sampled
                                block while it is the page's only one since sampled was
                                0; MV_SAMPLED_MANY otherwise (mv_profile.h) */
  mv_block_t *sample_rest;   /* MOVALLOC_PROFILE, owner only: free blocks held back
                                from `free` because the first of them is to be sampled
                                (mv_heap.c, prof_install); only a bin's direct page */
} __attribute__((aligned(64))) mv_page_t; /* no two pages share a cache line */
static_assert(sizeof(mv_page_t) == 128, "a page descriptor is two cache lines");

/* Arena states. Transitions are atomic (mv_arena_set_state asserts each one):
 *   FREE -> ACTIVE               handed out (arena lock)
 *   ACTIVE -> FREE               wholly empty again (arena lock)
 *   ACTIVE -> ISOLATED           isolate() (arena lock)
 *   ISOLATED -> MIGRATING        the engine starts moving it
 *   MIGRATING -> ISOLATED        the move failed; putback() follows
 *   MIGRATING -> ACTIVE          moved
 *   ISOLATED -> ACTIVE           putback()
 * HUGE arenas (part of a huge object's span) are ACTIVE while the object lives.
 */
enum mv_arena_state {
  MV_ARENA_FREE,
  MV_ARENA_ACTIVE,
  MV_ARENA_ISOLATED,
  MV_ARENA_MIGRATING,
};

/* One arena's descriptor (meta region).
 * Invariants, under mv_arena_lock unless marked atomic:
 *   free_mask bit i set <=> slice i belongs to no page;
 *   free_mask == all ones <=> the arena is FREE or about to be (release deferred
 *   while ISOLATED/MIGRATING: release_pending);
 *   on a bucket list (of its lifeclass) <=> ACTIVE, not huge, and
 *   0 < free slices < MV_SLICES;
 *   committed: its pages may be resident (not released since last use);
 *   zero_mask bit i set => slice i holds only zeros (fresh, or released and not
 *   handed out since). */
typedef struct mv_arena {
  _Atomic(uint8_t) state;      /* enum mv_arena_state */
  bool huge;                  /* part of a huge object's span */
  bool committed;
  bool release_pending;
  bool thp;                   /* known to sit on a transparent huge page */
  bool small_tail;            /* MADV_NOHUGEPAGE: the last arena of a huge object, too
                                 little of it used for a huge page (mv_arena.c) */
  uint8_t lifeclass;          /* enum mv_lifeclass of every page in it (set when taken
                                 FREE -> ACTIVE); its bucket list is that class's */
  uint8_t free_count;         /* popcount(free_mask) */
  uint32_t free_mask;
  uint32_t zero_mask;         /* slices known to hold only zeros */
  uint32_t index;
  uint32_t release_ticket;    /* != 0: FREE, out of free_bits, being released by the
                                 span free that drew this ticket (mv_arena.c) */
  uint64_t backoff_until_ns;  /* the engine skips it until then (permanent failure) */
  uint32_t engine_gen;        /* the engine's: last compaction that was done with it */
  uint64_t placed_ns;         /* when slices were last handed out (still filling?) */
  struct mv_arena *bucket_next, *bucket_prev;
  mv_page_t *slice_page[MV_SLICES];
  mv_page_t pages[MV_SLICES]; /* page whose first slice is slice i */
} mv_arena_t;

/* A bin queue: pages with (possibly) free blocks, the first one serving. */
typedef struct mv_page_queue {
  mv_page_t *first, *last;
} mv_page_queue_t;

/* A thread heap. Heaps are never freed: a thread that exits abandons its heap,
 * and the next new thread adopts it (so a cross-thread free may always write to
 * a page's heap, even a dead thread's).
 * Invariants: direct[s] == queues[MV_LIFE_SHORT][b].first for the bin b that
 * serves the sizes of slot s (mv_direct_slot), or &mv_page_empty when that is
 * NULL or under MOVALLOC_CHECK (so that every malloc takes the slow path, which
 * arms the block's canary); queues[c] holds pages of lifetime
 * class c (MV_LIFE_LONG: routed allocations, always through the slow path);
 * only the owning thread (owned == 1) touches anything but xthread_pages. */
typedef struct mv_heap {
  mv_page_t *direct[MV_DIRECT_SLOTS]; /* the fast path's page per 16 bytes of size */
  mv_page_queue_t queues[MV_LIFECLASSES][MV_BINS];
  mv_page_queue_t full;               /* pages with no free block when last looked */
  _Atomic(mv_page_t *) xthread_pages; /* full pages that got a cross-thread free */
  _Atomic(uint64_t) notified_since_ns; /* when the first page there was pushed (mv_heap.c,
                                          owner_away) */
  _Atomic(uint8_t) owned;
  bool dead;                          /* its thread vanished in fork(): never adopted */
  struct mv_heap *next_heap;          /* all heaps (mv_heaps list) */
  struct mv_heap *next_abandoned;
  uint64_t slow_calls;                /* paces housekeeping */
  uint32_t grown;                     /* slices of new pages since the last sparse sweep */
  uint32_t sweep_after;               /* ... and how many start the next one */
  uint32_t sweeps_seen;               /* sweep requests (mv_heap.c) as of the last one */
} mv_heap_t;

#endif /* MV_TYPES_H */
