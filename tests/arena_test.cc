// Arena carving and placement: runs of slices come from the fullest arena with
// room, huge spans are contiguous and reused before the heap grows, an arena
// that empties while isolated is freed only when it is put back, and an arena no
// huge page is meant for trims its free slices past MOVALLOC_TRIM_KIB.
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
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
#include "shim/mv_options.h"
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

// Trim (mv_arena.c, trim_locked). Pages of the long-lived class: nothing else in
// this process takes them, so the three pages Carve makes share one fresh arena.
class Trim : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_ = mv_options;
    mv_options.thp = MV_THP_COMPACT;  // no arena is meant for a huge page at fault time
    mv_options.purge = MV_PURGE_PRESSURE;
    mv_options.trim_kib = 1024;
  }
  // Pages a (16 slices), b (14) and c (2) fill one fresh arena, every byte
  // written; beyond_line: an arena past the first MV_THP_AUTO_FROM.
  void Carve(bool beyond_line = false) {
    bool zeroed;
    if (beyond_line) {
      // Whole arenas come from the cache, the most recent first, else the
      // lowest free index: take them until one lies beyond the line, and give
      // that one back to be the next.
      std::vector<mv_page_t *> below;
      mv_page_t *beyond = nullptr;
      while (!beyond) {
        mv_page_t *p = Take(MV_SLICES, &zeroed);
        ASSERT_NE(p, nullptr);
        if (ArenaOf(p)->index >= MV_THP_AUTO_FROM) beyond = p;
        else below.push_back(p);
      }
      mv_arena_free_slices(beyond);
      a_ = Take(16, &zeroed);
      for (mv_page_t *p : below) mv_arena_free_slices(p);
      ASSERT_EQ(a_->start, beyond->start);
    } else {
      a_ = Take(16, &zeroed);
    }
    b_ = Take(14, &zeroed);
    c_ = Take(2, &zeroed);
    ASSERT_TRUE(a_ && b_ && c_);
    ASSERT_EQ(a_->slice_count + b_->slice_count + c_->slice_count, MV_SLICES);
    arena_ = ArenaOf(a_);
    ASSERT_EQ(ArenaOf(b_), arena_);
    ASSERT_EQ(ArenaOf(c_), arena_);
    ASSERT_EQ(arena_->free_count, 0u);
    for (mv_page_t *p : {a_, b_, c_}) memset((void *)p->start, 0x6b, Bytes(p));
    a_start_ = a_->start;
    b_start_ = b_->start;
    Settle();
  }
  void TearDown() override {
    if (c_) mv_arena_free_slices(c_);  // the arena empties: the next test starts afresh
    mv_options = saved_;
  }
  static mv_page_t *Take(unsigned slices, bool *zeroed) {
    return mv_arena_alloc_class(slices, zeroed, MV_LIFE_LONG);
  }
  static size_t Bytes(const mv_page_t *p) { return (size_t)p->slice_count << MV_SLICE_SHIFT; }
  // 4 KiB pages of [start, start + len) that are resident.
  static size_t ResidentPages(uintptr_t start, size_t len) {
    std::vector<unsigned char> v(len / 4096);
    EXPECT_EQ(mincore((void *)start, len, v.data()), 0);
    size_t n = 0;
    for (unsigned char c : v) n += c & 1;
    return n;
  }
  static uint64_t Trimmed() {
    struct mv_arena_counts c;
    mv_arena_counts(&c);
    return c.trimmed_bytes;
  }
  // The arena handed out its last slices long enough ago for a trim.
  void Settle() { arena_->placed_ns = mv_os_now_ns() - 200 * 1000000ull; }
  // Frees b (14 slices: under the threshold), then a (16 more: past it).
  void FreeBThenA() {
    mv_arena_free_slices(b_);
    b_gone_ = ResidentPages(b_start_, 14 * MV_SLICE_SIZE) == 0;
    mv_arena_free_slices(a_);
    ASSERT_EQ(arena_->free_count, 30u);
  }
  // Frees b then a: nothing may go back.
  void FreeAndExpectKept() {
    uint64_t before = Trimmed();
    FreeBThenA();
    EXPECT_EQ(ResidentPages(a_start_, 30 * MV_SLICE_SIZE), 30 * MV_SLICE_OS_PAGES);
    EXPECT_EQ(Trimmed(), before);
  }
  // Frees b then a: all 30 free slices go back, at a's free.
  void FreeAndExpectTrimmed() {
    uint64_t before = Trimmed();
    FreeBThenA();
    EXPECT_FALSE(b_gone_) << "14 free slices are within 1 MiB: they stay for reuse";
    EXPECT_EQ(ResidentPages(a_start_, 30 * MV_SLICE_SIZE), 0u) << "30 free slices: all go back";
    EXPECT_EQ(Trimmed() - before, 30 * MV_SLICE_SIZE);
  }
  bool CIntact() const {
    const unsigned char *m = (const unsigned char *)c_->start;
    for (size_t i = 0; i < Bytes(c_); i++)
      if (m[i] != 0x6b) return false;
    return true;
  }

  struct mv_options saved_;
  mv_page_t *a_ = nullptr, *b_ = nullptr, *c_ = nullptr;
  mv_arena_t *arena_ = nullptr;
  uintptr_t a_start_ = 0, b_start_ = 0;
  bool b_gone_ = false;
};

TEST_F(Trim, AFreePastTheThresholdGivesTheArenasFreeSlicesBack) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  FreeAndExpectTrimmed();
  EXPECT_TRUE(CIntact()) << "the page still in use keeps its data";
  bool zeroed = false;
  mv_page_t *again = Take(30, &zeroed);
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(again->start, a_start_);
  EXPECT_TRUE(zeroed) << "given back: known zero, calloc need not clear it";
  mv_arena_free_slices(again);
}

// An arena that handed out slices in the last 100 ms is recycling them: no
// trim, so that the next hand-out does not fault them in again.
TEST_F(Trim, NotRightAfterAHandOut) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  arena_->placed_ns = mv_os_now_ns();
  FreeAndExpectKept();
}

TEST_F(Trim, NotWhereTheArenaSitsOnAHugePage) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  arena_->thp = true;  // moved onto one: a trim would break it
  FreeAndExpectKept();
  arena_->thp = false;
}

TEST_F(Trim, NotWhereHugePagesComeAtFaultTime) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  mv_options.thp = MV_THP_FAULT;
  FreeAndExpectKept();
}

// MOVALLOC_THP=auto asks for huge pages at fault time from the 17th arena on.
TEST_F(Trim, UnderAutoBelowTheLine) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  mv_options.thp = MV_THP_AUTO;
  ASSERT_LT(arena_->index, MV_THP_AUTO_FROM);
  FreeAndExpectTrimmed();
}

TEST_F(Trim, NotUnderAutoBeyondTheLine) {
  ASSERT_NO_FATAL_FAILURE(Carve(true));
  mv_options.thp = MV_THP_AUTO;
  ASSERT_GE(arena_->index, MV_THP_AUTO_FROM);
  FreeAndExpectKept();
}

TEST_F(Trim, NotUnderPurgeNever) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  mv_options.purge = MV_PURGE_NEVER;
  FreeAndExpectKept();
}

// mallopt(M_TRIM_THRESHOLD) sets the threshold in bytes, -1 being never.
TEST_F(Trim, MalloptSetsTheThreshold) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  ASSERT_EQ(mallopt(M_TRIM_THRESHOLD, 512 << 10), 1);
  EXPECT_EQ(mv_options.trim_kib, 512u);
  FreeBThenA();
  EXPECT_TRUE(b_gone_) << "14 free slices are past 512 KiB";
  ASSERT_EQ(mallopt(M_TRIM_THRESHOLD, -1), 1);
  EXPECT_EQ(mv_options.trim_kib, MV_ARENA_SIZE >> 10) << "never: an arena's worth";
}

TEST_F(Trim, MalloptMinusOneIsNever) {
  ASSERT_NO_FATAL_FAILURE(Carve());
  ASSERT_EQ(mallopt(M_TRIM_THRESHOLD, -1), 1);
  FreeAndExpectKept();
}

TEST(ArenaDeathTest, ImpossibleTransitionsAbort) {
  bool zeroed;
  mv_page_t *p = mv_arena_alloc_slices(1, &zeroed);
  mv_arena_t *a = ArenaOf(p);
  EXPECT_DEATH(mv_arena_set_migrating(a, true), "cannot become");  // ACTIVE -> MIGRATING
  mv_arena_free_slices(p);
}

}  // namespace
