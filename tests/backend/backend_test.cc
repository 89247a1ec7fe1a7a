// Every backend this kernel runs, through the engine's call sequence: the
// contents survive byte for byte on a fresh THP, no write is lost (by threads or
// by read()), every injected failure leaves the contents intact and releases
// the writers, and the VMA layout behaves as documented.
#include <fcntl.h>
#include <unistd.h>

#include "tests/backend/backend_util.h"

extern "C" {
#include "compactor/mv_uffd.h"
}

namespace mvtest {
namespace {

struct Param {
  mv_backend_kind kind;
  bool unpopulated;  // uffd backends: with UFFD_FEATURE_WP_UNPOPULATED, or MISSING mode
};

std::string Name(const testing::TestParamInfo<Param> &info) {
  std::string n = mv_backend_name(info.param.kind);
  if (info.param.kind == MV_BACKEND_MOVE || info.param.kind == MV_BACKEND_REMAP)
    n += info.param.unpopulated ? "_wp_unpopulated" : "_missing_mode";
  return n;
}

class BackendTest : public testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    mv_probe mask = KeepAll();
    mask.uffd_wp_unpopulated = GetParam().unpopulated;
    mv_backend_mask_probe(&mask);
    mv_backend_forget_probe();
    b_ = Runnable(GetParam().kind);
    if (!b_) {
      char why[128];
      mv_backend_select(GetParam().kind, why, sizeof why);
      GTEST_SKIP() << "this kernel does not run " << mv_backend_name(GetParam().kind) << ": "
                   << why;
    }
    if (GetParam().kind == MV_BACKEND_MOVE || GetParam().kind == MV_BACKEND_REMAP) {
      ASSERT_GE(mv_uffd_get(), 0);
      ASSERT_EQ((mv_uffd_features() & UFFD_FEATURE_WP_UNPOPULATED) != 0, GetParam().unpopulated);
    }
  }
  void TearDown() override {
    mv_backend_mask_probe(nullptr);
    mv_backend_forget_probe();
  }
  std::string Label() const { return Name(testing::TestParamInfo<Param>(GetParam(), 0)); }

  const mv_backend *b_ = nullptr;
};

// Per-step times for arenas of 4 KiB pages (3 of 4 touched) moved onto a THP,
// and for a THP moved onto another.
TEST_P(BackendTest, Timings) {
  Region r(16);
  Timing small, huge;
  for (size_t a = 0; a < r.size(); a++) ASSERT_EQ(MoveRetrying(b_, r.start(a), &small), 0);
  for (size_t a = 0; a < r.size(); a++) ASSERT_EQ(MoveRetrying(b_, r.start(a), &huge), 0);
  small.Print((Label() + " 4K->THP").c_str());
  huge.Print((Label() + " THP->THP").c_str());
}

TEST_P(BackendTest, ContentsSurviveOnAHugePage) {
  KhugepagedWatch khugepaged;
  Region r(2);
  for (size_t a = 0; a < r.size(); a++) {
    if (mv_thp_is_huge(r.start(a)) == 0)
      EXPECT_EQ(mv_thp_resident_pages(r.start(a), kArena), (long)(kPages * 3 / 4));
    else
      EXPECT_TRUE(khugepaged.Small(r.start(a)));
    ASSERT_EQ(MoveRetrying(b_, r.start(a)), 0);
    EXPECT_EQ(mv_thp_is_huge(r.start(a)), 1);
    EXPECT_EQ(mv_thp_resident_pages(r.start(a), kArena), (long)kPages);
    std::string first;
    EXPECT_EQ(r.Verify(a, &first), 0u) << first;
  }
  // Again, from a huge page onto a huge page.
  ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  EXPECT_EQ(r.Verify(0), 0u);
}

// A writer hammers counters in touched pages, and for every move writes a
// never-touched page for the first time while the arena is held.
TEST_P(BackendTest, WriterLosesNothing) {
  Region r(2);
  Writer w(r);
  int moved = 0, retries = 0, not_held = 0;
  bool holds = b_->kind != MV_BACKEND_COLLAPSE;  // collapse holds inside the kernel only
  for (int i = 0; i < 60; i++) {
    size_t a = i % 2, hole = (i / 2) % (kPages / 4);
    w.Settle();
    int rc = MoveOnce(b_, r.start(a), MV_STEP_NONE, nullptr, [&] {
      uint64_t n = w.NextHole(a, hole);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      not_held += holds && w.HoleWriteDone(n);
    });
    if (rc == -EAGAIN) retries++;
    else ASSERT_EQ(rc, 0) << "move " << i;
    moved += rc == 0;
  }
  EXPECT_TRUE(WriterRuns(w));
  w.Stop();
  EXPECT_EQ(not_held, 0) << "first writes to never-touched pages went through while held";
  std::string first;
  EXPECT_EQ(w.CountLost(&first), 0u) << first;
  for (size_t a = 0; a < r.size(); a++) EXPECT_EQ(r.Verify(a, &first), 0u) << first;
  EXPECT_GT(moved, 30);
  EXPECT_GE(w.holes_written(), 25u);
  printf("[ info     ] %s: %d moved, %d -EAGAIN, %llu writer iterations\n", Label().c_str(),
         moved, retries, (unsigned long long)w.iterations());
}

// move and remap pre-copy the arena with its writers running: a write during
// the pre-copy is served (the writer goes on) instead of held, and what was
// written after its page was copied (or, for move, after its page came back
// from scratch) is copied again.
TEST_P(BackendTest, PreCopyServesWritersAndLosesNothing) {
  if (b_->kind != MV_BACKEND_MOVE && b_->kind != MV_BACKEND_REMAP)
    GTEST_SKIP() << Label() << " does not pre-copy";
  Region r(2);
  Writer w(r);
  unsigned served = 0;
  int moved = 0;
  // Until a write fell into a pre-copy (the writer needs a CPU then: on a
  // loaded machine that can take many moves).
  for (int i = 0; i < 1000 && (moved < 40 || served == 0); i++) {
    mv_move m;
    memset(&m, 0, sizeof m);
    m.start = r.start(i % 2);
    if (b_->stage(&m) != 0) continue;
    if (b_->hold(&m) == 0) {
      EXPECT_NE(m.held_at_ns, 0u);
      int rc = b_->move(&m);  // move pre-copies here, remap in hold
      served += m.precopy_faults;
      b_->release(&m);
      if (rc != -EAGAIN) EXPECT_EQ(rc, 0);
      moved += rc == 0;
      // The move backend does not pre-copy an arena already on a THP: a hole
      // zapped (it holds zeros either way) puts this one back on 4 KiB pages.
      ASSERT_EQ(madvise(r.arena(i % 2) + 3 * kPage, kPage, MADV_DONTNEED), 0);
    }
    b_->unstage(&m);
  }
  EXPECT_TRUE(WriterRuns(w));
  w.Stop();
  EXPECT_GT(served, 0u) << "no write was served during a pre-copy";
  EXPECT_GE(moved, 40);
  std::string first;
  EXPECT_EQ(w.CountLost(&first), 0u) << first;
  for (size_t a = 0; a < r.size(); a++) EXPECT_EQ(r.Verify(a, &first), 0u) << first;
  printf("[ info     ] %s: %d moved, %u writes served during pre-copies\n", Label().c_str(),
         moved, served);
}

// A program that zaps (MADV_DONTNEED) pages it holds while they move: a page
// can be present when the pre-copy decides to read it and a hole when it does.
// In a range registered MISSING a plain read of that hole would wait for the
// engine, which is the reader: the move would hang. Every move completes (the
// test's timeout is the check), and nothing else is lost.
TEST_P(BackendTest, ZapsDuringPreCopyNeverHangIt) {
  if (b_->kind != MV_BACKEND_MOVE && b_->kind != MV_BACKEND_REMAP)
    GTEST_SKIP() << Label() << " does not pre-copy";
  Region r(1);
  Writer w(r);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> zaps{0};
  // Hole pages only: they hold zeros, before and after a zap.
  std::thread zapper([&] {
    for (size_t p = 3; !stop.load(std::memory_order_relaxed); p = (p + 4) % kPages) {
      volatile char *page = r.arena(0) + p * kPage;
      page[0] = 0;  // present again
      ASSERT_EQ(madvise((void *)page, kPage, MADV_DONTNEED), 0);
      zaps++;
    }
  });
  int moved = 0;
  for (int i = 0; i < 200; i++) {
    int rc = MoveOnce(b_, r.start(0), MV_STEP_NONE, nullptr, [] {});
    if (rc != -EAGAIN) ASSERT_EQ(rc, 0) << "move " << i;
    moved += rc == 0;
  }
  stop = true;
  zapper.join();
  EXPECT_TRUE(WriterRuns(w));
  w.Stop();
  EXPECT_GT(zaps.load(), 200u);
  EXPECT_GE(moved, 100);
  std::string first;
  EXPECT_EQ(w.CountLost(&first), 0u) << first;
  EXPECT_EQ(r.Verify(0, &first), 0u) << first;
  printf("[ info     ] %s: %d moved, %llu zaps\n", Label().c_str(), moved,
         (unsigned long long)zaps.load());
}

// read() from a pipe into the arena while it moves: every chunk lands. For
// the mprotect backend the read goes through the EFAULT-retrying wrapper.
TEST_P(BackendTest, PipeReadDuringMoves) {
  Region r(1);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  std::atomic<bool> stop{false};
  std::atomic<size_t> bad{0}, chunks{0};
  std::thread feeder([&] {
    std::vector<uint64_t> chunk(kPage / 8);
    for (uint64_t seq = 0; !stop.load(); seq++) {
      for (size_t i = 0; i < chunk.size(); i++) chunk[i] = seq * 1000003 + i;
      ASSERT_EQ(write(fds[1], chunk.data(), kPage), (ssize_t)kPage);
    }
    close(fds[1]);
  });
  std::thread reader([&] {
    for (uint64_t seq = 0;; seq++) {
      char *dst = r.arena(0) + (seq % kPages) * kPage;
      size_t got = 0;
      while (got < kPage) {
        ssize_t n = read(fds[0], dst + got, kPage - got);
        if (n == 0) return;
        ASSERT_GT(n, 0) << strerror(errno);
        got += (size_t)n;
      }
      const uint64_t *w = reinterpret_cast<const uint64_t *>(dst);
      for (size_t i = 0; i < kPage / 8; i++)
        if (w[i] != seq * 1000003 + i) {
          bad++;
          break;
        }
      chunks++;
    }
  });
  // Enough moves, and enough reads racing with them.
  int moved = 0;
  for (int i = 0; i < 5000 && (moved < 25 || chunks.load() < 300); i++)
    moved += MoveOnce(b_, r.start(0)) == 0;
  stop.store(true);
  feeder.join();
  reader.join();
  close(fds[0]);
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GE(chunks.load(), 300u);
  EXPECT_GE(moved, 25);
  printf("[ info     ] %s: %zu chunks read during %d moves\n", Label().c_str(), chunks.load(),
         moved);
}

// A failure injected at each step: the documented result, the contents intact,
// the writer running again, and the arena still movable afterwards.
TEST_P(BackendTest, FailureAtEveryStepLosesNothing) {
  struct Case {
    mv_move_step step;
    int want;
  } cases[] = {
      {MV_STEP_STAGE, -EAGAIN},
      {MV_STEP_HOLD, -EIO},
      {MV_STEP_MOVE_OUT, GetParam().kind == MV_BACKEND_MOVE ? -EAGAIN : 0},
      {MV_STEP_COPY, -EAGAIN},
      {MV_STEP_SWAP, -EIO},
  };
  for (const Case &c : cases) {
    SCOPED_TRACE("fail_at " + std::to_string(c.step));
    KhugepagedWatch khugepaged;
    Region r(1);
    Writer w(r);
    bool held_ok = true;
    auto once = [&] {
      w.Settle();
      return MoveOnce(b_, r.start(0), c.step, nullptr, [&] {
        uint64_t n = w.NextHole(0, c.step);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        held_ok &= b_->kind == MV_BACKEND_COLLAPSE || !w.HoleWriteDone(n);
      });
    };
    int rc = once();
    // Where the step does not apply, the move is real, and may meet a busy page.
    for (int i = 0; i < 20 && c.want == 0 && rc == -EAGAIN; i++) rc = once();
    EXPECT_EQ(rc, c.want);
    EXPECT_TRUE(held_ok) << "a first write to a hole went through while held";
    EXPECT_TRUE(WriterRuns(w)) << "writer still held";
    if (c.want == 0)
      EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
    else
      EXPECT_TRUE(khugepaged.Small(r.start(0)));
    std::string first;
    EXPECT_EQ(r.Verify(0, &first), 0u) << first;
    EXPECT_EQ(MoveRetrying(b_, r.start(0)), 0) << "not movable after the failure";
    w.Stop();
    EXPECT_EQ(w.CountLost(&first), 0u) << first;
    EXPECT_EQ(r.Verify(0, &first), 0u) << first;
    EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  }
}

// The owner's migrate() may read the arena it is moving before it calls
// movalloc_migration_move(), and the engine is the thread that calls it: with
// writers held, reads of what the arena holds must not wait (they would wait
// for the engine itself). Holes are not read: a read of a never-touched page of
// a range registered MISSING waits for its zero page.
TEST_P(BackendTest, HeldArenaReadsByTheEngineDoNotWait) {
  Region r(1);
  int moved = 0;
  for (int i = 0; i < 20; i++) {
    size_t bad = 0;
    int rc = MoveOnce(b_, r.start(0), MV_STEP_NONE, nullptr, [&] {
      for (size_t p = 0; p < kPages; p++) {
        if (IsHole(p)) continue;
        const uint64_t *w = reinterpret_cast<const uint64_t *>(r.arena(0) + p * kPage);
        for (size_t k = 0; k < kPage / 8; k += 64)
          bad += w[k] != Pattern(reinterpret_cast<uintptr_t>(&w[k]));
      }
    });
    EXPECT_EQ(bad, 0u) << "move " << i;
    if (rc != -EAGAIN) ASSERT_EQ(rc, 0) << "move " << i;
    moved += rc == 0;
  }
  EXPECT_GE(moved, 10);
  EXPECT_EQ(r.Verify(0), 0u);
}

// Three arenas in one VMA, the middle one moved. move and collapse leave one
// VMA; remap and mprotect leave three, and count the two they added.
TEST_P(BackendTest, VmaLayout) {
  Region r(3);
  uintptr_t lo = r.start(0), hi = r.start(2) + kArena;
  ASSERT_EQ(CountVmas(lo, hi), 1);
  bool remaps = b_->kind == MV_BACKEND_REMAP || b_->kind == MV_BACKEND_MPROTECT;
  bool registers = b_->kind == MV_BACKEND_REMAP || b_->kind == MV_BACKEND_MOVE;
  size_t before = mv_backend_remap_vmas();
  int during = -1;
  ASSERT_EQ(MoveOnce(b_, r.start(1), MV_STEP_NONE, nullptr, [&] { during = CountVmas(lo, hi); }),
            0);
  int after = CountVmas(lo, hi);
  printf("[ info     ] %s: VMAs over 3 arenas: 1 before, %d while held, %d after; counted +%zu\n",
         Label().c_str(), during, after, mv_backend_remap_vmas() - before);
  EXPECT_EQ(during, registers || b_->kind == MV_BACKEND_MPROTECT ? 3 : 1);
  EXPECT_EQ(after, remaps ? 3 : 1);
  EXPECT_EQ(mv_backend_remap_vmas() - before, remaps ? 2u : 0u);
  // Moving an arena that is already its own VMA adds none.
  before = mv_backend_remap_vmas();
  ASSERT_EQ(MoveRetrying(b_, r.start(1)), 0);
  ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(CountVmas(lo, hi), after);
  EXPECT_EQ(mv_backend_remap_vmas() - before, 0u);
  for (size_t a = 0; a < 3; a++) EXPECT_EQ(r.Verify(a), 0u);
}

// An mlock()ed arena is still locked on its new page (and the move backend,
// whose UFFDIO_MOVE refuses locked-to-unlocked moves, still moves it).
TEST_P(BackendTest, MlockedArenaStaysLocked) {
  Region r(1);
  ASSERT_EQ(mlock(r.arena(0), kArena), 0) << strerror(errno);
  ASSERT_EQ(LockedKb(r.start(0)), (long)(kArena / 1024));
  ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  EXPECT_EQ(LockedKb(r.start(0)), (long)(kArena / 1024));
  EXPECT_EQ(r.Verify(0), 0u);
  // And an unlocked one is not locked by the move.
  Region u(1);
  ASSERT_EQ(MoveRetrying(b_, u.start(0)), 0);
  EXPECT_EQ(LockedKb(u.start(0)), 0);
}

INSTANTIATE_TEST_SUITE_P(All, BackendTest,
                         testing::Values(Param{MV_BACKEND_MOVE, true},
                                         Param{MV_BACKEND_MOVE, false},
                                         Param{MV_BACKEND_REMAP, true},
                                         Param{MV_BACKEND_REMAP, false},
                                         Param{MV_BACKEND_COLLAPSE, true},
                                         Param{MV_BACKEND_MPROTECT, true}),
                         Name);

}  // namespace
}  // namespace mvtest
