// Arena carving and placement: runs of slices come from the fullest arena with
// room, huge spans are contiguous and reused before the heap grows, and an arena
// that empties while isolated is freed only when it is put back.
#include <gtest/gtest.h>
#include <malloc.h>
#include <string.h>
#include <time.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <thread>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
}

namespace {

mv_arena_t *ArenaOf(const mv_page_t *page) { return mv_arena_of(page->start); }

bool FitsRun(uint32_t free_mask, unsigned n) {
  uint32_t m = free_mask;
  for (unsigned i = 1; i < n; i++) m &= free_mask >> i;
  return m != 0;
}

// The fewest free slices of any active arena that has n free slices in a row
// (the whole heap: the test process allocates too).
unsigned FullestFit(unsigned n) {
  unsigned best = MV_SLICES + 1;
  for (uint32_t i = 0; i < mv_arena_frontier(); i++) {
    mv_arena_t *a = &mv_arenas[i];
    if (atomic_load(&a->state) != MV_ARENA_ACTIVE || a->huge) continue;
    if (FitsRun(a->free_mask, n) && a->free_count < best) best = a->free_count;
  }
  return best;
}

uint64_t LibcNs(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// The clocks come from the vDSO's own entry point, not libc's wrapper (code
// that a program on glibc's malloc never runs: calling it would map 64 KiB of
// libc into every process), and tell libc's time.
TEST(Prim, ClocksComeFromTheVdsoAndTellLibcsTime) {
  if (!getauxval(AT_SYSINFO_EHDR)) GTEST_SKIP() << "no vDSO here: libc's clock serves";
  ASSERT_TRUE(mv_os_clock_from_vdso());
  for (int i = 0; i < 1000; i++) {
    uint64_t before = LibcNs(CLOCK_MONOTONIC), t = mv_os_now_ns();
    EXPECT_LE(before, t);
    EXPECT_LE(t, LibcNs(CLOCK_MONOTONIC));
    before = LibcNs(CLOCK_THREAD_CPUTIME_ID), t = mv_os_thread_cpu_ns();
    EXPECT_LE(before, t);
    EXPECT_LE(t, LibcNs(CLOCK_THREAD_CPUTIME_ID));
  }
}

TEST(Arena, SlicesComeFromTheFullestArenaWithRoom) {
  bool zeroed;
  // Arena A: 30 of 32 slices used. Arena B: 1 used.
  mv_page_t *a_pages[4];
  a_pages[0] = mv_arena_alloc_slices(16, &zeroed);
  ASSERT_NE(a_pages[0], nullptr);
  mv_arena_t *a = ArenaOf(a_pages[0]);
  a_pages[1] = mv_arena_alloc_slices(14, &zeroed);
  ASSERT_EQ(ArenaOf(a_pages[1]), a) << "16 free slices left in A: the run fits";
  mv_page_t *b_page = mv_arena_alloc_slices(16, &zeroed);  // does not fit in A
  mv_arena_t *b = ArenaOf(b_page);
  ASSERT_NE(b, a);
  // 2 slices fit in A and in B; A is the fuller one.
  a_pages[2] = mv_arena_alloc_slices(2, &zeroed);
  EXPECT_EQ(ArenaOf(a_pages[2]), a);
  // A is full now: the next run goes to the fullest arena that fits it (B, or
  // a fuller one the test process itself uses).
  unsigned fullest = FullestFit(2);
  ASSERT_LE(fullest, (unsigned)b->free_count);
  mv_page_t *next = mv_arena_alloc_slices(2, &zeroed);
  EXPECT_EQ(ArenaOf(next)->free_count + 2u, fullest);
  // Every slice of a run maps to its page.
  for (unsigned s = 0; s < a_pages[0]->slice_count; s++)
    EXPECT_EQ(mv_page_of((void *)(a_pages[0]->start + s * MV_SLICE_SIZE + 100)), a_pages[0]);
  for (mv_page_t *p : {a_pages[0], a_pages[1], a_pages[2], b_page, next}) mv_arena_free_slices(p);
  EXPECT_EQ(mv_page_of((void *)(a->pages[0].start + 100))->kind, MV_PAGE_NONE);
}

TEST(Arena, FreshSlicesAreZero) {
  malloc_trim(0);  // released arenas are zero again
  bool zeroed = false;
  mv_page_t *p = mv_arena_alloc_huge((size_t)3 << 20, 0, &zeroed);
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(zeroed);
  memset((void *)p->start, 1, 4096);
  mv_arena_free_huge(p);
  mv_page_t *q = mv_arena_alloc_huge((size_t)3 << 20, 0, &zeroed);  // the same, from the cache
  EXPECT_EQ(q->start, p->start) << "freed arenas are reused before the heap grows";
  EXPECT_FALSE(zeroed) << "it was written: calloc must clear it";
  mv_arena_free_huge(q);
}

TEST(Arena, HugeSpansAreContiguousAndMapped) {
  bool zeroed;
  mv_page_t *p = mv_arena_alloc_huge((size_t)7 << 20, 0, &zeroed);  // 4 arenas
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->start % MV_ARENA_SIZE, 0u);
  EXPECT_EQ(p->huge_size, (size_t)8 << 20);
  for (size_t off = 0; off < p->huge_size; off += MV_SLICE_SIZE)
    ASSERT_EQ(mv_page_of((void *)(p->start + off)), p) << off;
  EXPECT_TRUE(mv_arena_resize_huge(p, (size_t)3 << 20));  // shrink in place
  EXPECT_EQ(p->huge_size, (size_t)4 << 20);
  EXPECT_EQ(mv_page_of((void *)(p->start + ((size_t)5 << 20)))->kind, MV_PAGE_NONE);
  mv_arena_free_huge(p);
  mv_page_t *aligned = mv_arena_alloc_huge((size_t)3 << 20, (size_t)8 << 20, &zeroed);
  ASSERT_NE(aligned, nullptr);
  EXPECT_EQ(aligned->start % ((size_t)8 << 20), 0u);
  mv_arena_free_huge(aligned);
}

TEST(Arena, EmptiedWhileIsolatedIsFreedAtPutback) {
  bool zeroed;
  mv_page_t *p = mv_arena_alloc_slices(32, &zeroed);  // a whole arena
  ASSERT_NE(p, nullptr);
  mv_arena_t *a = ArenaOf(p);
  ASSERT_TRUE(mv_arena_isolate(a));
  EXPECT_FALSE(mv_arena_isolate(a)) << "already isolated";
  mv_arena_free_slices(p);  // the owner frees everything meanwhile
  EXPECT_EQ(atomic_load(&a->state), MV_ARENA_ISOLATED) << "not freed under the engine";
  EXPECT_TRUE(a->release_pending);
  mv_arena_unisolate(a, false);
  EXPECT_EQ(atomic_load(&a->state), MV_ARENA_FREE);
  EXPECT_FALSE(a->release_pending);
}

// A huge object freed while one arena of its span is isolated: the others go
// back to the kernel, the isolated one keeps its contents for the engine
// (which may be copying it) and is freed at putback.
TEST(Arena, SpanFreedAroundAnIsolatedArenaLeavesItsContents) {
  bool zeroed;
  // Fill the arena cache first, so that the span's arenas are released (madvised)
  // rather than cached.
  mv_page_t *filler = mv_arena_alloc_huge((size_t)300 << MV_ARENA_SHIFT, 0, &zeroed);
  ASSERT_NE(filler, nullptr);
  mv_page_t *span = mv_arena_alloc_huge((size_t)5 << MV_ARENA_SHIFT, 0, &zeroed);
  ASSERT_NE(span, nullptr);
  mv_arena_free_huge(filler);
  memset((void *)span->start, 0x5a, span->huge_size);
  mv_arena_t *middle = mv_arena_of(span->start + 2 * MV_ARENA_SIZE);
  ASSERT_TRUE(mv_arena_isolate(middle));
  mv_arena_free_huge(span);
  EXPECT_EQ(atomic_load(&middle->state), MV_ARENA_ISOLATED);
  EXPECT_TRUE(middle->release_pending);
  const unsigned char *m = (const unsigned char *)(span->start + 2 * MV_ARENA_SIZE);
  size_t bad = 0;
  for (size_t i = 0; i < MV_ARENA_SIZE; i++) bad += m[i] != 0x5a;
  EXPECT_EQ(bad, 0u) << "the isolated arena was released under the engine";
  const unsigned char *first = (const unsigned char *)span->start;
  EXPECT_EQ(first[0], 0) << "the rest of the span went back to the kernel";
  mv_arena_unisolate(middle, false);
  EXPECT_EQ(atomic_load(&middle->state), MV_ARENA_FREE);
  malloc_trim(0);
}

// The release of a freed huge span, held inside its madvise.
std::atomic<uintptr_t> held_release{0};
std::atomic<bool> release_entered{false}, release_go{false};

int HoldingMadvise(void *addr, size_t len, int advice) {
  if ((uintptr_t)addr == held_release.load() && advice == MADV_DONTNEED) {
    release_entered = true;
    while (!release_go) usleep(1000);
  }
  return mv_prim_real.madvise(addr, len, advice);
}

// fork() while another thread releases a huge span (its arenas tagged, its
// madvise not made yet): that thread does not exist in the child, whose copy
// of the span must still be free arenas, reused before the heap grows.
TEST(Arena, ForkDuringASpanReleaseLeavesTheChildItsArenas) {
  const size_t n = 40;
  bool zeroed;
  mv_page_t *filler = mv_arena_alloc_huge((size_t)300 << MV_ARENA_SHIFT, 0, &zeroed);
  ASSERT_NE(filler, nullptr);
  mv_page_t *span = mv_arena_alloc_huge(n << MV_ARENA_SHIFT, 0, &zeroed);
  ASSERT_NE(span, nullptr);
  const uintptr_t span_start = span->start;
  mv_arena_free_huge(filler); // fills the arena cache: the span's arenas are released
  struct mv_prim fake = mv_prim_real;
  fake.madvise = HoldingMadvise;
  held_release = span_start;
  mv_prim_set(&fake);
  std::thread releaser([span] { mv_arena_free_huge(span); });
  while (!release_entered) usleep(1000);
  pid_t child = fork();
  if (child == 0) {
    mv_prim_reset();
    uint32_t frontier = mv_arena_frontier();
    for (int i = 0; i < 64; i++) {
      mv_page_t *p = mv_arena_alloc_huge(n << MV_ARENA_SHIFT, 0, &zeroed);
      if (!p) _exit(2);
      if (p->start < span_start + (n << MV_ARENA_SHIFT) && p->start + p->huge_size > span_start)
        _exit(0);
      if (mv_arena_frontier() > frontier) _exit(1);
    }
    _exit(3);
  }
  release_go = true;
  releaser.join();
  mv_prim_reset();
  held_release = 0;
  ASSERT_GE(child, 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "1: the heap grew while the span's arenas were lost, 2: no memory, 3: never reused";
  EXPECT_FALSE(mv_arena_of(span_start)->committed) << "the parent's release went through";
  malloc_trim(0);
}

TEST(ArenaDeathTest, ImpossibleTransitionsAbort) {
  bool zeroed;
  mv_page_t *p = mv_arena_alloc_slices(1, &zeroed);
  mv_arena_t *a = ArenaOf(p);
  EXPECT_DEATH(mv_arena_set_migrating(a, true), "cannot become");  // ACTIVE -> MIGRATING
  mv_arena_free_slices(p);
}

}  // namespace
