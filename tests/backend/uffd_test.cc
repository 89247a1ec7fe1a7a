// The process-wide userfaultfd: UFFDIO_MOVE counted from the page tables when
// the kernel's count is wrong; and the descriptors the backends keep (the
// userfaultfd, /proc files) out of the program's way: high numbers, reopened
// when the program closes or replaces them, none taken low meanwhile.
#include <dirent.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/backend/backend_util.h"

namespace mvtest {
namespace {

class Uffd : public testing::Test {
 protected:
  void SetUp() override {
    mv_backend_mask_probe(nullptr);
    mv_backend_forget_probe();
    if (!mv_backend_probe()->uffd_wp) GTEST_SKIP() << "no userfaultfd-wp here";
  }
  void TearDown() override { mv_backend_forget_probe(); }
};

// 1 if the page at addr is mapped (present or swapped), from pagemap.
int Mapped(const char *addr) {
  mv_page_map map;
  if (mv_thp_page_map(reinterpret_cast<uintptr_t>(addr), &map) != 0) return -1;
  return map.bits[0] & 1;
}

// A move that the kernel reports short (EEXIST with nothing counted, or fewer
// bytes than it moved) still completes, and every byte arrives: src keeps
// nothing, dst has the pattern where src had it and holes where it had holes.
TEST_F(Uffd, MovesTheKernelDidNotCountAreFound) {
  if (!mv_backend_probe()->uffd_move) GTEST_SKIP() << "no UFFDIO_MOVE here";
  for (bool holes : {true, false}) {
    SCOPED_TRACE(holes ? "holes allowed" : "no holes");
    Region src(1);
    for (size_t p = 0; p < kPages && !holes; p += 4) src.arena(0)[(p + 3) * kPage] = 1;
    char *dst = static_cast<char *>(mv_thp_map_aligned(kArena));
    ASSERT_NE(dst, nullptr);
    ASSERT_EQ(mv_uffd_register(reinterpret_cast<uintptr_t>(dst), kArena, false, true), 0);
    std::vector<char> want(kArena);  // read without faulting the holes in
    for (size_t p = 0; p < kPages; p++)
      if (!holes || !IsHole(p)) memcpy(&want[p * kPage], src.arena(0) + p * kPage, kPage);
    uint64_t mode = UFFDIO_MOVE_MODE_DONTWAKE | (holes ? UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES : 0);
    int err = -1;
    size_t moved;
    {
      UncountedMoves fake;
      moved = mv_uffd_move(reinterpret_cast<uintptr_t>(dst), src.start(0), kArena, mode, &err);
      EXPECT_GT(UncountedMoves::faked(), 100u);
    }
    EXPECT_EQ(err, 0) << strerror(err);
    EXPECT_EQ(moved, kArena);
    EXPECT_EQ(mv_thp_resident_pages(src.start(0), kArena), 0);
    for (size_t p = 0; p < kPages; p++)
      ASSERT_EQ(Mapped(dst + p * kPage), holes && IsHole(p) ? 0 : 1) << "page " << p;
    EXPECT_EQ(memcmp(dst, want.data(), kArena), 0);
    munmap(dst, kArena);
  }
}

// The pre-copy's reads of a range registered MISSING: a hole ends the read
// with what came before it, instead of waiting for a server (this thread).
TEST_F(Uffd, ReadsOfMemoryEndAtAHoleInsteadOfWaiting) {
  Region r(1);
  size_t hole = 0;
  while (!IsHole(hole)) hole++;
  ASSERT_EQ(mv_uffd_register(r.start(0), kArena, true, true), 0);
  std::vector<char> buf((hole + 2) * kPage);
  EXPECT_EQ(mv_thp_read_mem(buf.data(), r.start(0), buf.size()), (ssize_t)(hole * kPage));
  EXPECT_EQ(memcmp(buf.data(), r.arena(0), hole * kPage), 0);
  EXPECT_EQ(mv_thp_read_mem(buf.data(), r.start(0) + hole * kPage, kPage), 0);
  EXPECT_EQ(Mapped(r.arena(0) + hole * kPage), 0) << "the read did not fill the hole";
  EXPECT_EQ(mv_uffd_unregister(r.start(0), kArena), 0);
  EXPECT_EQ(mv_thp_read_mem(buf.data(), r.start(0) + hole * kPage, kPage), (ssize_t)kPage)
      << "unregistered, a hole reads as zeros";
}

// The lowest number a program would get, with nothing else opening meanwhile.
int LowestFree() {
  int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) close(fd);
  return fd;
}

int Floor() {
  rlimit rl;
  EXPECT_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
  return rl.rlim_cur / 2 < 512 ? (int)(rl.rlim_cur / 2) : 512;
}

bool IsUserfaultfd(int fd) {
  uffdio_range r = {.start = 0, .len = 0};
  // Any userfaultfd answers UFFDIO_WAKE of nothing with EINVAL, other files
  // with ENOTTY (or EBADF when closed).
  return ioctl(fd, UFFDIO_WAKE, &r) == -1 && errno == EINVAL;
}

// The descriptor lives at >= 512, and the lowest free number is still free.
TEST_F(Uffd, DescriptorIsHigh) {
  int lowest = LowestFree();
  int fd = mv_uffd_get();
  ASSERT_GE(fd, 0);
  EXPECT_GE(fd, Floor());
  EXPECT_TRUE(IsUserfaultfd(fd));
  EXPECT_EQ(fcntl(fd, F_GETFD), FD_CLOEXEC);
  EXPECT_EQ(LowestFree(), lowest) << "a low descriptor was taken";
  EXPECT_EQ(mv_uffd_get(), fd);
}

// Under a small soft RLIMIT_NOFILE with room below the hard one, it goes above
// the soft limit, where a program's scan of [0, sysconf(_SC_OPEN_MAX)) does not
// look and no open() of the program can land; the limit is put back.
TEST_F(Uffd, DescriptorIsAboveASmallSoftLimit) {
  rlimit old;
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
  if (old.rlim_max < 512 + 16) GTEST_SKIP() << "hard limit " << old.rlim_max << " leaves no room";
  mv_uffd_drop();
  rlimit small = old;
  small.rlim_cur = 64;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &small), 0);
  int fd = mv_uffd_get();
  rlimit now;
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &now), 0);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
  EXPECT_GE(fd, 512);
  EXPECT_TRUE(IsUserfaultfd(fd));
  EXPECT_EQ(now.rlim_cur, 64u) << "the soft limit was not put back";
  EXPECT_EQ(now.rlim_max, old.rlim_max);
}

// With the soft limit equal to the hard one (no room above), it still goes to
// the upper half of the program's range. In a child: lowering the hard limit
// is for good.
TEST_F(Uffd, DescriptorIsHighUnderASmallHardLimit) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    mv_uffd_drop();
    rlimit tight = {64, 64};
    if (setrlimit(RLIMIT_NOFILE, &tight) != 0) _exit(2);
    int fd = mv_uffd_get();
    rlimit now;
    if (getrlimit(RLIMIT_NOFILE, &now) != 0 || now.rlim_cur != 64 || now.rlim_max != 64) _exit(3);
    _exit(fd >= 32 && fd < 64 && IsUserfaultfd(fd) ? 0 : 4);
  }
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

// The program closes it (closefrom, close_range): the next use opens another,
// and migrations go on.
TEST_F(Uffd, ClosedByTheProgramIsReopened) {
  int fd = mv_uffd_get();
  ASSERT_GE(fd, 0);
  ASSERT_EQ(close(fd), 0);
  int again = mv_uffd_get();
  ASSERT_GE(again, 0);
  EXPECT_TRUE(IsUserfaultfd(again));
  const mv_backend *b = Runnable(MV_BACKEND_MOVE);
  if (!b) b = Runnable(MV_BACKEND_REMAP);
  ASSERT_NE(b, nullptr);
  Region r(1);
  EXPECT_EQ(MoveRetrying(b, r.start(0)), 0);
  EXPECT_EQ(r.Verify(0), 0u);
}

// The program puts its own file on that number (dup2): movalloc neither uses
// nor closes it, and opens its own elsewhere.
TEST_F(Uffd, ReplacedByTheProgramIsLeftAlone) {
  int fd = mv_uffd_get();
  ASSERT_GE(fd, 0);
  int theirs = open("/dev/null", O_RDONLY);
  ASSERT_GE(theirs, 0);
  ASSERT_EQ(dup2(theirs, fd), fd);
  close(theirs);
  struct stat before;
  ASSERT_EQ(fstat(fd, &before), 0);
  int mine = mv_uffd_get();
  ASSERT_GE(mine, 0);
  EXPECT_NE(mine, fd);
  EXPECT_TRUE(IsUserfaultfd(mine));
  mv_uffd_drop();  // closes movalloc's, not the program's
  struct stat after;
  ASSERT_EQ(fstat(fd, &after), 0) << "the program's file was closed";
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(after.st_rdev, before.st_rdev);
  EXPECT_EQ(fcntl(mine, F_GETFD), -1) << "movalloc's own was not closed";
  close(fd);
}

// Descriptors below n that are open, from /proc/self/fd.
std::vector<int> OpenBelow(int n) {
  std::vector<int> fds;
  DIR *d = opendir("/proc/self/fd");
  if (!d) return fds;
  int self = dirfd(d);
  while (dirent *e = readdir(d)) {
    int fd = atoi(e->d_name);
    if (e->d_name[0] != '.' && fd != self && fd < n) fds.push_back(fd);
  }
  closedir(d);
  std::sort(fds.begin(), fds.end());
  return fds;
}

// Everything the backends ask of the kernel, once per backend that runs here.
void UseEverything(const Region &r) {
  mv_page_map map;
  EXPECT_EQ(mv_thp_page_map(r.start(0), &map), 0);
  EXPECT_GE(mv_thp_is_huge(r.start(0)), 0);
  EXPECT_GE(mv_thp_is_huge_smaps(r.start(0)), -EOPNOTSUPP);
  mv_remap_vma_delta(r.start(0));
  for (mv_backend_kind k : {MV_BACKEND_MOVE, MV_BACKEND_REMAP})
    if (const mv_backend *b = Runnable(k)) EXPECT_EQ(MoveRetrying(b, r.start(0)), 0);
}

// The /proc files and the userfaultfd stay open at high numbers: the
// descriptors below stay exactly the program's.
TEST_F(Uffd, KeptDescriptorsAreHigh) {
  Region r(1);
  std::vector<int> low = OpenBelow(Floor());
  UseEverything(r);
  EXPECT_EQ(OpenBelow(Floor()), low);
  EXPECT_EQ(r.Verify(0), 0u);
}

// closefrom()/close_range() of everything above stderr: every kept descriptor
// is gone, and the next use opens them again.
TEST_F(Uffd, ClosefromIsSurvived) {
  Region r(1);
  UseEverything(r);
  ASSERT_EQ(syscall(SYS_close_range, Floor(), ~0u, 0), 0);
  UseEverything(r);
  EXPECT_GE(mv_uffd_get(), Floor());
  EXPECT_EQ(r.Verify(0), 0u);
}

// A program thread closes a number and opens a file, expecting that number
// back, or dup2()s onto it, again and again, while arenas move: movalloc never
// takes the number in between (the file would land elsewhere, dup2 would fail
// with EBUSY, and a close of ours would hit the program's next file).
TEST_F(Uffd, LowNumbersStayTheProgramsDuringMoves) {
  Region r(2);
  UseEverything(r);  // the first use of each descriptor opens it low, once
  int mine = open("/dev/null", O_RDONLY | O_CLOEXEC);
  ASSERT_GE(mine, 0);
  std::atomic<bool> stop{false};
  std::atomic<int> cycles{0}, elsewhere{0}, dup2_failed{0};
  std::thread program([&] {
    for (; !stop.load(); cycles++) {
      close(mine);
      int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (fd != mine) {
        elsewhere++;
        if (fd >= 0) dup2(fd, mine), close(fd);
      }
      int other = open("/dev/zero", O_RDONLY | O_CLOEXEC);
      if (other >= 0) {
        if (dup2(other, mine) != mine) dup2_failed++;
        close(other);
      }
    }
  });
  int moves = 0;
  for (uint64_t t0 = mv_os_now_ns(); mv_os_now_ns() - t0 < 1500000000ull; moves++) {
    for (mv_backend_kind k : {MV_BACKEND_MOVE, MV_BACKEND_REMAP})
      if (const mv_backend *b = Runnable(k)) MoveOnce(b, r.start(moves % 2));
  }
  stop.store(true);
  program.join();
  close(mine);
  EXPECT_GT(cycles.load(), 1000);
  EXPECT_EQ(elsewhere.load(), 0) << "of " << cycles.load() << " opens";
  EXPECT_EQ(dup2_failed.load(), 0);
  for (size_t a = 0; a < r.size(); a++) EXPECT_EQ(r.Verify(a), 0u);
  printf("[ info     ] %d rounds of moves, %d close/open/dup2 cycles\n", moves, cycles.load());
}

}  // namespace
}  // namespace mvtest
