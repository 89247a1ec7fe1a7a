/* The allocation-site profiler (MOVALLOC_PROFILE): samples one allocation per
 * mean-rate bytes allocated (exponentially distributed intervals, so periodic
 * patterns are not aliased), captures its stack with libunwind, and keeps per
 * site (stack hash) estimated live bytes, allocations and lifetimes in mmap'd
 * fixed-size tables.
 *
 * The allocator's fast paths are the same instructions on or off. On, the
 * slow path counts a page's free list against the countdown when it installs
 * it for the fast path, and cuts it short before a block to be sampled, so the
 * fast path comes back to the slow path exactly there (mv_heap.c,
 * prof_install); allocations the fast path does not serve are counted one by
 * one (mv_prof_count). A page holding sampled blocks has its owner pointer
 * tagged (MV_HEAP_SAMPLED), so frees of its blocks miss the fast path and reach
 * mv_free_slow, which sees the tag and looks the block up (mv_prof_free;
 * mv_page_t.sampled counts them); every other free stays on the fast path.
 *
 * Stacks come from libunwind, dlopen'ed by mv_prof_start: unw_init_local and
 * unw_step for a thread's first samples, unw_backtrace (whose per-thread frame
 * cache is dear to build) after them.
 * Nothing here allocates: the sampler runs with a per-thread guard set, so an
 * allocation libunwind makes from inside it is served but never sampled. Lock:
 * mv_prof_lock, a leaf (nothing else is taken under it); the stack is captured
 * before it is taken. */
#ifndef MV_PROFILE_H
#define MV_PROFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arena/mv_lock.h"
#include "arena/mv_types.h"

/* Mean bytes between samples; 0: off. Hidden: the slow paths test it directly,
 * not through the GOT. */
extern uint64_t mv_prof_rate __attribute__((visibility("hidden")));
extern __thread int64_t mv_prof_left __attribute__((tls_model("initial-exec")));
/* This thread is inside libunwind for a sample (shim/mv_unwind_fds.c). */
extern __thread bool mv_prof_unwinding __attribute__((tls_model("initial-exec")));
extern mv_lock_t mv_prof_lock;

/* After the options are read: maps the tables and hooks the slow paths
 * (mv_malloc_hooked). Returns false (profiling stays off, said on stderr) when
 * the tables cannot be mapped. */
bool mv_prof_init(uint64_t rate);

/* From movalloc's constructor, once the process can dlopen: loads libunwind.
 * Samples are taken from then on. */
void mv_prof_start(void);

/* fork handlers: prepare waits for the unwinds in flight (before any lock is
 * taken: an unwind may allocate), and none start until done (parent, child). */
void mv_prof_fork_prepare(void);
void mv_prof_fork_done(void);

/* Loads libunwind (once; later calls return at once). */
void mv_prof_load_unwind(void);

/* This thread's stack into frames (return addresses, innermost first); 0 when
 * libunwind is not loaded. */
int mv_prof_backtrace(void **frames, int max);

/* Linker-made bounds of the MV_ALLOC_ENTRY section. */
extern const char __start_mv_alloc_text[] __attribute__((visibility("hidden")));
extern const char __stop_mv_alloc_text[] __attribute__((visibility("hidden")));

/* Is this return address inside a function between a program's allocation
 * call and the profiler? */
static inline bool mv_in_allocator(uintptr_t ip) {
  return ip > (uintptr_t)__start_mv_alloc_text && ip <= (uintptr_t)__stop_mv_alloc_text;
}

/* The thread's byte countdown ran out: starts the next one (exponential, mean
 * mv_prof_rate). True if the allocation where it ran out is to be sampled;
 * false for a thread's first countdown, which starts at 0 rather than drawn. */
bool mv_prof_cross(void) MV_NOINLINE;

/* Records p (size bytes asked for, just allocated), picked by mv_prof_cross;
 * unit: the bytes the countdown counted for it (its size, or its block's for
 * the sizes the fast path serves); near: an address in the arena where the
 * allocation's unsampled neighbours go (p itself, unless p was placed apart),
 * which the report describes. Returns p. */
void *mv_prof_sample(void *p, size_t size, size_t unit, uintptr_t near) MV_NOINLINE;

/* Counts an allocation the fast path does not serve. */
static inline void *mv_prof_count(void *p, size_t size) {
  if (MV_UNLIKELY((mv_prof_left -= (int64_t)size) < 0) && p && mv_prof_cross())
    return mv_prof_sample(p, size, size, (uintptr_t)p);
  return p;
}

/* The sampled-object table's slot for an address (its home for linear probing). */
#define MV_PROF_OBJECTS 65536u /* slots (power of two) */
static inline uint32_t mv_prof_slot(uintptr_t addr) {
  uint64_t h = (uint64_t)addr * 0x9E3779B97F4A7C15ULL;
  return (uint32_t)(h >> 40) & (MV_PROF_OBJECTS - 1);
}

/* mv_prof_filter[s]: live samples whose address has slot s, changed under the
 * lock, read without it: a free whose slot counts 0 is not sampled, and skips
 * the lock. A sample is counted before its block is handed out, so any later
 * free of it sees a count above 0. MV_PROF_OBJECTS counters, mmap'd. */
extern _Atomic(uint16_t) *mv_prof_filter __attribute__((visibility("hidden")));

/* p, sampled (its slot counts it), in page, is being freed: forgets it. */
void mv_prof_freed(void *p, mv_page_t *page) MV_NOINLINE;

/* mv_page.sampled_block when the page holds more than its first sample. */
#define MV_SAMPLED_MANY ((uintptr_t)1)

/* p, in page (which holds sampled blocks), is being freed: forgets it if
 * sampled. The test is inline: most blocks of such a page are not sampled.
 * A page with one sample names it in its descriptor, which the free has just
 * read; the filter, a cache miss more often than not, is asked only for pages
 * with more. */
static inline void mv_prof_free(void *p, mv_page_t *page) {
  uintptr_t one = atomic_load_explicit(&page->sampled_block, memory_order_acquire);
  if (one == MV_SAMPLED_MANY
          ? atomic_load_explicit(&mv_prof_filter[mv_prof_slot((uintptr_t)p)], memory_order_acquire)
          : one == (uintptr_t)p)
    mv_prof_freed(p, page);
}

/* At exit with MOVALLOC_PROFILE set: the report on stderr, and the folded
 * stacks into MOVALLOC_PROFILE_OUT if given. */
void mv_prof_exit(void);

/* What the sampler needs of libm, written out (libm mapped into every process
 * would add about 300 KiB of resident text). mv_ln: ln(x) for a normal x > 0,
 * within a few ulps. mv_one_minus_exp_neg: 1 - e^-y for y >= 0, with full
 * relative precision for small y. */
double mv_ln(double x);
double mv_one_minus_exp_neg(double y);

#endif /* MV_PROFILE_H */
