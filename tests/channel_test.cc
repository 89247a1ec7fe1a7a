// The inspection channel (shim/mv_channel.h): what `movalloc stat/top/trace`
// read. Owner-only, a fresh one per process after fork(), paced publishing,
// the event ring.
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "arena/mv_alloc.h"
extern "C" {
#include "arena/mv_arena.h"
}
#include "include/movalloc.h"
#include "shim/mv_channel.h"
#include "shim/mv_options.h"

namespace {

// The channel as a reader sees it: opened again through /proc/PID/fd.
struct Reader {
  int fd = -1;
  explicit Reader(pid_t pid, int chan_fd) {
    std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(chan_fd);
    fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  }
  ~Reader() {
    if (fd >= 0) close(fd);
  }
  mv_channel header() const {
    mv_channel h;
    EXPECT_EQ(pread(fd, &h, sizeof h, 0), (ssize_t)sizeof h);
    return h;
  }
  mv_channel_arena arena(const mv_channel &h, uint32_t i) const {
    mv_channel_arena a;
    EXPECT_EQ(pread(fd, &a, sizeof a, h.arenas_offset + i * sizeof a), (ssize_t)sizeof a);
    return a;
  }
  struct mv_channel_event event(const mv_channel &h, uint64_t n) const {
    struct mv_channel_event e;
    EXPECT_EQ(pread(fd, &e, sizeof e, h.events_offset + (n % h.event_cap) * sizeof e),
              (ssize_t)sizeof e);
    return e;
  }
};

uint32_t arena_index(const void *p) {
  return (uint32_t)(((uintptr_t)p - mv_heap_base) >> MV_ARENA_SHIFT);
}

TEST(Channel, PublishedSnapshotDescribesTheHeap) {
  std::vector<void *> blocks;
  for (int i = 0; i < 4000; i++) blocks.push_back(malloc(256)); // 1 MiB of live blocks
  mv_channel_publish();
  int fd = mv_channel_fd();
  ASSERT_GE(fd, 0) << "no channel after a publish";
  EXPECT_GE(fd, 3);
  char link[128] = {};
  std::string proc = "/proc/self/fd/" + std::to_string(fd);
  ASSERT_GT(readlink(proc.c_str(), link, sizeof link - 1), 0);
  EXPECT_EQ(std::string(link), "/memfd:movalloc (deleted)");
  EXPECT_EQ(fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << "the channel must not leak into exec";

  Reader r(getpid(), fd);
  ASSERT_GE(r.fd, 0);
  mv_channel h = r.header();
  EXPECT_EQ(h.magic, MV_CHANNEL_MAGIC);
  EXPECT_EQ(h.version, (uint32_t)MV_CHANNEL_VERSION);
  EXPECT_EQ(h.pid, getpid());
  EXPECT_EQ(h.seq % 2, 0u) << "published snapshots leave the seqlock even";
  EXPECT_GE(h.publishes, 1u);
  EXPECT_EQ(h.heap_base, (uint64_t)mv_heap_base);
  EXPECT_GE(h.stats.in_use_bytes, 4000u * 256);
  EXPECT_GE(h.stats.arena_count, 1u);
  uint32_t a = arena_index(blocks[2000]);
  ASSERT_LT(a, h.arena_count);
  mv_channel_arena e = r.arena(h, a);
  EXPECT_EQ(e.state, 1) << "an arena holding live blocks is ACTIVE";
  EXPECT_GT(e.in_use_bytes, 0u);
  EXPECT_LE(e.in_use_bytes, (uint32_t)MOVALLOC_ARENA_SIZE);
  for (void *p : blocks) free(p);
}

// poke publishes only where no compactor thread does, over a heap of
// MV_CHANNEL_MIN_ARENAS: keeps the process without a compactor, whatever heap
// the tests build, and such a heap for good; publishes. The channel's fd.
int PublishedWithPokesOn() {
  mv_options.compact = false;
  static void *heap = malloc((size_t)MV_CHANNEL_MIN_ARENAS << 21);
  if (!heap) return -1;
  mv_channel_publish();
  return mv_channel_fd();
}

TEST(Channel, PokePublishesAtMostOncePerPace) {
  int fd = PublishedWithPokesOn();
  ASSERT_GE(fd, 0);
  Reader r(getpid(), fd);
  uint64_t before = r.header().publishes;
  mv_channel_poke();
  mv_channel_poke();
  mv_channel_poke();
  // The snapshot above is younger than the pace: nothing happens.
  ASSERT_EQ(r.header().compactor, 0u);
  EXPECT_EQ(r.header().publishes, before);
  usleep((MV_CHANNEL_PACE_NS / 1000) + 20000);
  mv_channel_poke();
  EXPECT_EQ(r.header().publishes, before + 1);
}

TEST(Channel, ANewArenaPublishesAtOnce) {
  mv_options.compact = false;
  mv_channel_publish();
  int fd = mv_channel_fd();
  ASSERT_GE(fd, 0);
  Reader r(getpid(), fd);
  ASSERT_EQ(r.header().compactor, 0u);
  uint64_t before = r.header().publishes;
  uint32_t arenas = mv_arena_frontier();
  void *big = malloc(64 << 20); // a span of 32 arenas: more than any freed run here
  ASSERT_NE(big, nullptr);
  ASSERT_GT(mv_arena_frontier(), arenas) << "the test needs the heap to take new arenas";
  mv_channel h = r.header();
  EXPECT_EQ(h.publishes, before + 1) << "a new arena must publish without waiting for the pace";
  EXPECT_EQ(h.arenas_total, mv_arena_frontier());
  mv_channel_arena last = r.arena(h, (uint32_t)h.arenas_total - 1);
  EXPECT_EQ(last.huge, 1);
  EXPECT_EQ(last.state, 1);
  free(big);
}

TEST(Channel, MigrationsGoToTheRingAndTheArenaTable) {
  std::vector<char *> blocks;
  for (int i = 0; i < 512; i++) {
    char *p = (char *)malloc(4096);
    memset(p, 1, 4096);
    blocks.push_back(p);
  }
  mv_channel_publish();
  int fd = mv_channel_fd();
  ASSERT_GE(fd, 0);
  Reader r(getpid(), fd);
  uint64_t head = r.header().event_head;
  int moved = movalloc_compact(MOVALLOC_COMPACT_ALL);
  if (moved == -ENOSYS) GTEST_SKIP() << "no migration backend on this kernel";
  mv_channel h = r.header();
  ASSERT_GT(h.event_head, head) << "movalloc_compact tried migrations but the ring has none";
  struct mv_channel_event ev = r.event(h, h.event_head - 1);
  EXPECT_EQ(ev.seq, h.event_head);
  EXPECT_NE(ev.arena, 0u);
  EXPECT_LT(ev.outcome, 4);
  EXPECT_GT(strlen(ev.backend), 0u);
  EXPECT_EQ(ev.bytes, ev.outcome == 0 ? (uint32_t)MOVALLOC_ARENA_SIZE : 0u);
  uint32_t a = arena_index((void *)ev.arena);
  mv_channel_arena e = r.arena(h, a);
  EXPECT_GE(e.moved + e.not_moved, 1u);
  EXPECT_EQ(e.last_event_ns != 0, true);
  for (char *p : blocks) free(p);
}

// Runs fn in a fork child; its exit code, or -1 if it did not exit.
int InChild(const std::function<int()> &fn) {
  pid_t child = fork();
  if (child < 0) return -1;
  if (child == 0) _exit(fn());
  int status = 0;
  if (waitpid(child, &status, 0) != child || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// In a fork child: publish, then find a channel of its own naming its pid.
// 0, or 1: no channel, 2: the parent's (inode parent_ino), 3: the wrong pid.
int PublishesItsOwn(void (*publish)(void), ino_t parent_ino) {
  publish();
  int fd = mv_channel_fd();
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) return 1;
  if (st.st_ino == parent_ino) return 2;
  mv_channel c;
  if (pread(fd, &c, sizeof c, 0) != (ssize_t)sizeof c || c.pid != getpid()) return 3;
  return 0;
}

TEST(Channel, ForkChildGetsItsOwnAndLeavesTheParentsAlone) {
  free(malloc(64));
  mv_channel_publish();
  int fd = mv_channel_fd();
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  Reader parent(getpid(), fd);
  mv_channel before = parent.header();
  EXPECT_EQ(InChild([&] { return PublishesItsOwn(mv_channel_publish, st.st_ino); }), 0)
      << "1: no channel, 2: the parent's, 3: wrong pid";
  mv_channel after = parent.header();
  EXPECT_EQ(after.pid, getpid());
  EXPECT_EQ(after.publishes, before.publishes) << "the child published into the parent's channel";
}

// The parent's pacing does not hold back a fork child: its first poke
// publishes, into a channel of its own, though the parent just published.
TEST(Channel, ForkChildsFirstPokePublishes) {
  int fd = PublishedWithPokesOn();
  ASSERT_GE(fd, 0);
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(InChild([&] { return PublishesItsOwn(mv_channel_poke, st.st_ino); }), 0)
      << "1: the poke did not publish, 2: the parent's, 3: wrong pid";
}

TEST(Channel, AnotherUserCannotOpenIt) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to become another user";
  free(malloc(64));
  mv_channel_publish();
  int fd = mv_channel_fd();
  ASSERT_GE(fd, 0);
  std::string path = "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd);
  EXPECT_EQ(InChild([&] {
              if (setgid(65534) != 0 || setuid(65534) != 0) return 10; // nobody
              int f = open(path.c_str(), O_RDONLY);
              return f >= 0 ? 1 : errno == EACCES ? 0 : 2;
            }),
            0)
      << "1: nobody opened it, 2: failed other than EACCES, 10: setuid";
  // And the owner can (the positive control for the same path).
  int f = open(path.c_str(), O_RDONLY);
  EXPECT_GE(f, 0);
  if (f >= 0) close(f);
}

}  // namespace
