// Huge-page facts (pagemap + kpageflags, the smaps fallback, residency) and the
// staging helper every copying backend shares.
#include <unistd.h>

#include "tests/backend/backend_util.h"

namespace mvtest {
namespace {

class Thp : public testing::Test {
 protected:
  void SetUp() override {
    if (!mv_backend_probe()->thp) GTEST_SKIP() << "no THP here: " << mv_backend_probe()->why;
    mv_thp_forget_spares();  // each test maps its own staging VMA
  }
  void TearDown() override { mv_prim_reset(); }
};

TEST_F(Thp, StagedPageIsHuge) {
  mv_move m;
  memset(&m, 0, sizeof m);
  ASSERT_EQ(mv_thp_stage(&m), 0);
  uintptr_t s = reinterpret_cast<uintptr_t>(m.staging);
  EXPECT_EQ(s % kArena, 0u);
  EXPECT_EQ(m.staging_map, m.staging);
  EXPECT_EQ(m.staging_map_len, kArena);
  EXPECT_GT(m.stage_ns, 0u);
  EXPECT_EQ(mv_thp_is_huge(s), 1);
  EXPECT_EQ(mv_thp_is_huge_smaps(s), 1) << "the staged page is its own VMA: smaps can tell";
  EXPECT_EQ(mv_thp_resident_pages(s, kArena), (long)kPages);
  EXPECT_EQ(CountVmas(s, s + kArena), 1) << "the alignment slack is unmapped at once";
  mv_thp_unstage(&m);
  EXPECT_EQ(m.staging, nullptr);
  EXPECT_EQ(m.staging_map, nullptr);
  mv_thp_forget_spares();
  EXPECT_EQ(CountVmas(s, s + kArena), 0);
}


TEST_F(Thp, SmallPagesAreNotHuge) {
  KhugepagedWatch khugepaged;
  Region r(1);
  // Nothing here moves the arena: keep khugepaged off it from now on.
  ASSERT_EQ(madvise(r.arena(0), kArena, MADV_NOHUGEPAGE), 0);
  ASSERT_TRUE(khugepaged.Small(r.start(0)));
  if (mv_thp_is_huge(r.start(0)) != 0) GTEST_SKIP() << "khugepaged collapsed the arena first";
  EXPECT_EQ(mv_thp_resident_pages(r.start(0), kArena), (long)(kPages * 3 / 4));
  EXPECT_EQ(mv_thp_resident_pages(r.start(0) + 3 * kPage, kPage), 0) << "a hole";
  EXPECT_EQ(mv_thp_resident_pages(r.start(0) + 10, 100), 1) << "unaligned start";
  r.Fill(0);
  for (size_t p = 3; p < kPages; p += 4) r.arena(0)[p * kPage] = 1;  // no holes left
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 0) << "all present, but 4 KiB pages";
  EXPECT_EQ(mv_thp_is_huge_smaps(r.start(0)), 0);
  EXPECT_EQ(mv_thp_is_huge(r.start(0) + kPage), -EINVAL);
}

// The tests' excuse for a huge page where small ones were expected is
// khugepaged's work alone: a collapse asked for (as every backend's is) is
// not excused.
TEST_F(Thp, KhugepagedWatchExcusesOnlyKhugepaged) {
  KhugepagedWatch khugepaged;
  Region r(1);
  int rc = madvise(r.arena(0), kArena, MADV_COLLAPSE);
  if (rc != 0) GTEST_SKIP() << "MADV_COLLAPSE: " << strerror(errno);
  ASSERT_EQ(mv_thp_is_huge(r.start(0)), 1);
  if (khugepaged.Collapsed()) GTEST_SKIP() << "khugepaged collapsed something meanwhile";
  EXPECT_FALSE(khugepaged.Small(r.start(0)));
}

// Inside a larger VMA, smaps' per-VMA AnonHugePages cannot name one range.
TEST_F(Thp, SmapsFallbackKnowsItsLimits) {
  if (!mv_backend_probe()->collapse) GTEST_SKIP() << "no MADV_COLLAPSE to make a THP in place";
  Region r(2);
  ASSERT_EQ(madvise(r.base(), 2 * kArena, MADV_COLLAPSE), 0) << strerror(errno);
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  EXPECT_EQ(mv_thp_is_huge_smaps(r.start(0)), -EOPNOTSUPP);
}

bool populate_used;
int RecordingMadvise(void *addr, size_t len, int advice) {
  populate_used |= advice == MADV_POPULATE_WRITE;
  return madvise(addr, len, advice);
}
int NoHugepage(void *addr, size_t len, int advice) {
  if (advice == MADV_HUGEPAGE) {
    errno = EINVAL;  // THP not built in
    return -1;
  }
  return madvise(addr, len, advice);
}
void *last_map;
size_t last_len;
void *RecordingMmap(void *a, size_t l, int p, int f, int fd, off_t o) {
  last_map = mmap(a, l, p, f, fd, o);
  last_len = l;
  return last_map;
}

// Staging faults its THP with a touch, under the VMA's own lock: not with
// MADV_POPULATE_WRITE, which zeroes 2 MiB holding the mmap lock that every
// other thread's mmap() needs.
TEST_F(Thp, StageFaultsWithATouch) {
  struct mv_prim fake = mv_prim_real;
  fake.madvise = RecordingMadvise;
  mv_prim_set(&fake);
  populate_used = false;
  mv_move m;
  memset(&m, 0, sizeof m);
  ASSERT_EQ(mv_thp_stage(&m), 0);
  EXPECT_EQ(mv_thp_is_huge(reinterpret_cast<uintptr_t>(m.staging)), 1);
  EXPECT_FALSE(populate_used);
  mv_thp_unstage(&m);
}

// No THP: -EAGAIN, and nothing of the 4 MiB mapped for it is left.
TEST_F(Thp, StageFailureLeavesNothingMapped) {
  struct mv_prim fake = mv_prim_real;
  fake.madvise = NoHugepage;
  fake.mmap = RecordingMmap;
  mv_prim_set(&fake);
  mv_move m;
  memset(&m, 0, sizeof m);
  EXPECT_EQ(mv_thp_stage(&m), -EAGAIN);
  EXPECT_EQ(m.staging, nullptr);
  EXPECT_EQ(m.staging_map, nullptr);
  uintptr_t lo = reinterpret_cast<uintptr_t>(last_map);
  EXPECT_EQ(CountVmas(lo, lo + last_len), 0);
  m.fail_at = MV_STEP_STAGE;
  mv_prim_reset();
  EXPECT_EQ(mv_thp_stage(&m), -EAGAIN) << "injected";
  EXPECT_EQ(m.staging, nullptr);
}

int madvise_calls;
int CountingMadvise(void *addr, size_t len, int advice) {
  madvise_calls++;
  return madvise(addr, len, advice);
}

// The staging VMA is kept between migrations, empty, so that the next stage
// maps and madvises nothing (both take the mmap lock); a VMA that cannot give a
// huge page is not kept.
TEST_F(Thp, StagingVmaIsKeptEmptyForTheNextStage) {
  mv_move m;
  memset(&m, 0, sizeof m);
  ASSERT_EQ(mv_thp_stage(&m), 0);
  uintptr_t s = reinterpret_cast<uintptr_t>(m.staging);
  mv_thp_unstage(&m);
  EXPECT_EQ(CountVmas(s, s + kArena), 1) << "kept";
  EXPECT_EQ(mv_thp_resident_pages(s, kArena), 0) << "its huge page went back";
  struct mv_prim fake = mv_prim_real;
  fake.mmap = RecordingMmap;
  fake.madvise = CountingMadvise;
  mv_prim_set(&fake);
  last_map = nullptr;
  madvise_calls = 0;
  ASSERT_EQ(mv_thp_stage(&m), 0);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.staging), s) << "the kept VMA";
  EXPECT_EQ(last_map, nullptr) << "nothing mapped";
  EXPECT_EQ(madvise_calls, 0) << "nothing madvised";
  EXPECT_EQ(mv_thp_is_huge(s), 1);
  mv_prim_reset();
  // A VMA made unable to give a huge page is unmapped at the failed stage.
  mv_thp_unstage(&m);
  ASSERT_EQ(madvise(reinterpret_cast<void *>(s), kArena, MADV_NOHUGEPAGE), 0);
  EXPECT_EQ(mv_thp_stage(&m), -EAGAIN);
  EXPECT_EQ(CountVmas(s, s + kArena), 0);
}

}  // namespace
}  // namespace mvtest
