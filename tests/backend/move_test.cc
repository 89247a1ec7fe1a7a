// The move backend's pin safety: an O_DIRECT read in flight and pages shared
// copy-on-write with a child make UFFDIO_MOVE refuse (EBUSY), the move says
// -EAGAIN, and nothing is lost.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/backend/backend_util.h"

namespace mvtest {
namespace {

class MoveBackend : public testing::Test {
 protected:
  void SetUp() override {
    mv_backend_mask_probe(nullptr);
    mv_backend_forget_probe();
    b_ = Runnable(MV_BACKEND_MOVE);
    if (!b_) GTEST_SKIP() << "no UFFDIO_MOVE on this kernel: " << mv_backend_probe()->why;
  }
  const mv_backend *b_ = nullptr;
};

// A thread keeps reading a file with O_DIRECT into the arena while it is moved
// again and again: the device's writes all land (checked after every read).
TEST_F(MoveBackend, ODirectReadsRacingMoves) {
  char path[] = "/var/tmp/mv_odirect_XXXXXX";
  int wfd = mkstemp(path);
  ASSERT_GE(wfd, 0) << strerror(errno);
  std::vector<uint64_t> file(kArena / 8);
  for (size_t i = 0; i < file.size(); i++) file[i] = i * 0x2545F4914F6CDD1Dull + 7;
  ASSERT_EQ(write(wfd, file.data(), kArena), (ssize_t)kArena);
  fsync(wfd);
  close(wfd);
  int fd = open(path, O_RDONLY | O_DIRECT);
  unlink(path);
  if (fd < 0) GTEST_SKIP() << "O_DIRECT not supported on /var/tmp: " << strerror(errno);

  Region r(1);
  constexpr size_t kChunk = 64 << 10;
  std::atomic<bool> stop{false};
  std::atomic<size_t> bad{0}, reads{0};
  std::thread reader([&] {
    for (size_t k = 0; !stop.load(); k++) {
      size_t off = (k % (kArena / kChunk)) * kChunk;
      ssize_t n = pread(fd, r.arena(0) + off, kChunk, (off_t)off);
      ASSERT_EQ(n, (ssize_t)kChunk) << strerror(errno);
      if (memcmp(r.arena(0) + off, &file[off / 8], kChunk) != 0) bad++;
      reads++;
    }
  });
  int moved = 0, refused = 0;
  Timing t;
  for (int i = 0; i < 5000 && (i < 60 || reads.load() < 300); i++) {
    int rc = MoveOnce(b_, r.start(0), MV_STEP_NONE, &t);
    if (rc == -EAGAIN) refused++;
    else ASSERT_EQ(rc, 0);
    moved += rc == 0;
  }
  stop.store(true);
  reader.join();
  close(fd);
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GE(reads.load(), 300u);
  EXPECT_GT(moved, 0);
  printf("[ info     ] O_DIRECT: %zu reads of 64 KiB, %d moves, %d refused (-EAGAIN: pinned)\n",
         reads.load(), moved, refused);
  t.Print("move under O_DIRECT");
}

// Pages shared copy-on-write with a live child are not the parent's alone:
// refused, contents intact on both sides, writers released.
TEST_F(MoveBackend, CowSharedAfterForkIsRefused) {
  KhugepagedWatch khugepaged;
  Region r(1);
  int go[2], result[2];
  ASSERT_EQ(pipe(go), 0);
  ASSERT_EQ(pipe(result), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    char c;
    if (read(go[0], &c, 1) != 1) _exit(2);
    char ok = r.Verify(0) == 0 ? 'y' : 'n';
    if (write(result[1], &ok, 1) != 1) _exit(3);
    _exit(0);
  }
  EXPECT_EQ(MoveOnce(b_, r.start(0)), -EAGAIN);
  EXPECT_TRUE(khugepaged.Small(r.start(0)));
  EXPECT_EQ(r.Verify(0), 0u);
  // Released: a write goes through (and makes that one page exclusive again).
  *r.TouchedCounter(0, 0) = 0;
  char c = 'g', ok = 0;
  ASSERT_EQ(write(go[1], &c, 1), 1);
  ASSERT_EQ(read(result[0], &ok, 1), 1);
  EXPECT_EQ(ok, 'y') << "the child's copy changed";
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  // With the child gone the pages are still marked shared until written.
  int after_exit = MoveOnce(b_, r.start(0));
  printf("[ info     ] after the child exited, before any write: move -> %d\n", after_exit);
  if (after_exit != 0) {
    r.Fill(0);  // a write to each page makes it exclusive again
    EXPECT_EQ(MoveRetrying(b_, r.start(0)), 0);
  }
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  EXPECT_EQ(r.Verify(0), 0u);
  for (int fd : {go[0], go[1], result[0], result[1]}) close(fd);
}

// Linux 6.18's UFFDIO_MOVE can move pages without counting them (see
// mv_uffd_move). Reported that way at every UFFDIO_MOVE, a move out, a move of
// the THP in, and the puts back after a failed copy or swap still lose no byte
// and no write, and never abort (the put back used to: EEXIST).
TEST_F(MoveBackend, MovesTheKernelDidNotCountLoseNothing) {
  Region r(1);
  Writer w(r);
  struct Case {
    mv_move_step step;
    int want;
  } cases[] = {{MV_STEP_NONE, -EAGAIN},  // all moved, the THP in 4 KiB steps: split
               {MV_STEP_COPY, -EAGAIN},
               {MV_STEP_SWAP, -EIO}};
  for (const Case &c : cases) {
    SCOPED_TRACE("fail_at " + std::to_string(c.step));
    w.Settle();
    int rc;
    {
      UncountedMoves fake;
      rc = MoveOnce(b_, r.start(0), c.step, nullptr, [&] { w.NextHole(0, c.step); });
      EXPECT_GT(UncountedMoves::faked(), 100u);
    }
    EXPECT_EQ(rc, c.want);
    EXPECT_TRUE(WriterRuns(w));
    std::string first;
    EXPECT_EQ(r.Verify(0, &first), 0u) << first;
  }
  EXPECT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(mv_thp_is_huge(r.start(0)), 1);
  w.Stop();
  std::string first;
  EXPECT_EQ(w.CountLost(&first), 0u) << first;
  EXPECT_EQ(r.Verify(0, &first), 0u) << first;
}

// The same on the real kernel: compaction migrating the arena's pages makes
// UFFDIO_MOVE meet migration entries and locked folios (-EAGAIN inside it), and
// then miscount. Before mv_uffd_move counted from the page tables, this lost
// pages (a move out "failed" with pages left uncounted in scratch) within a
// few seconds, usually within 0.2 s.
TEST_F(MoveBackend, CompactionRacingMovesLosesNothing) {
  int probe = open("/proc/sys/vm/compact_memory", O_WRONLY | O_CLOEXEC);
  if (probe < 0) GTEST_SKIP() << "cannot write vm.compact_memory (needs root)";
  close(probe);
  std::atomic<bool> stop{false};
  std::thread compactor([&] {
    while (!stop.load()) {
      int fd = open("/proc/sys/vm/compact_memory", O_WRONLY | O_CLOEXEC);
      if (fd < 0) return;
      if (write(fd, "1", 1) != 1) break;
      close(fd);
    }
  });
  int moved = 0, retries = 0;
  uint64_t t0 = mv_os_now_ns();
  // 100 moves (about 1.5 s when the machine is idle), however long a loaded
  // machine takes for them.
  while (moved < 100 && mv_os_now_ns() - t0 < 60000000000ull && !HasFailure()) {
    Region r(4);
    Writer w(r);
    for (size_t a = 0; a < r.size(); a++) {
      int rc = MoveOnce(b_, r.start(a));
      if (rc == -EAGAIN) retries++;
      else EXPECT_EQ(rc, 0) << "move " << moved;
      moved += rc == 0;
    }
    w.Stop();
    std::string first;
    EXPECT_EQ(w.CountLost(&first), 0u) << first;
    for (size_t a = 0; a < r.size(); a++) EXPECT_EQ(r.Verify(a, &first), 0u) << first;
  }
  stop.store(true);
  compactor.join();
  EXPECT_GE(moved, 100);
  printf("[ info     ] %d moves (%d -EAGAIN) while compacting memory\n", moved, retries);
}

// Scratch is kept registered between moves (no mmap, munmap or registration
// per move), and not used once the userfaultfd it was registered with is gone:
// the program closed ours, a new one is opened, and moves still work.
TEST_F(MoveBackend, ScratchIsKeptForTheDescriptorItWasRegisteredWith) {
  Region r(1);
  ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);
  unsigned gen;
  void *kept = mv_spare_take(&mv_spare_scratch, &gen);
  ASSERT_NE(kept, nullptr) << "scratch kept after the move";
  EXPECT_EQ(gen, mv_uffd_generation());
  EXPECT_EQ(mv_thp_resident_pages(reinterpret_cast<uintptr_t>(kept), kArena), 0)
      << "the old pages were freed";
  mv_spare_keep(&mv_spare_scratch, kept, gen);
  ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(mv_spare_take(&mv_spare_scratch, &gen), kept) << "the same scratch again";
  mv_spare_keep(&mv_spare_scratch, kept, gen);

  ASSERT_EQ(close(mv_uffd_get()), 0);  // the program closes it: its ranges are unregistered
  ASSERT_GE(mv_uffd_get(), 0);
  EXPECT_NE(mv_uffd_generation(), gen);
  EXPECT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(r.Verify(0), 0u);
  void *now = mv_spare_take(&mv_spare_scratch, &gen);
  EXPECT_NE(now, nullptr);
  EXPECT_EQ(gen, mv_uffd_generation()) << "kept for the descriptor it is registered with";
  if (now) mv_spare_keep(&mv_spare_scratch, now, gen);
}

// The child of fork() inherits the parent's userfaultfd, which describes the
// parent's memory: after mv_backend_fork_child() it opens its own and moves its
// own arenas, and the parent's keeps working.
TEST_F(MoveBackend, ChildMovesWithItsOwnUserfaultfd) {
  {
    Region r(1);
    ASSERT_EQ(MoveRetrying(b_, r.start(0)), 0);  // the parent's fd is open now
  }
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    mv_backend_fork_child();
    Region mine(1);
    bool ok = MoveRetrying(b_, mine.start(0)) == 0 && mv_thp_is_huge(mine.start(0)) == 1 &&
              mine.Verify(0) == 0;
    _exit(ok ? 0 : 1);
  }
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  Region r(1);
  EXPECT_EQ(MoveRetrying(b_, r.start(0)), 0);
  EXPECT_EQ(r.Verify(0), 0u);
}

}  // namespace
}  // namespace mvtest
