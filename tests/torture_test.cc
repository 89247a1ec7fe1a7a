// Migration torture, for every backend this kernel runs: writer threads
// increment counters and rewrite address-derived patterns across many arenas,
// a reader verifies every byte it reads, a thread read()s from a pipe into heap
// buffers, and (pin-safe backends) O_DIRECT reads land in heap buffers, all
// while movalloc_compact() moves every arena again and again. At the end every
// counter equals its increments and every byte is right.
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
}

namespace {

constexpr int kBlocks = 48 * 1024;  // 512 B each: 24 MiB, a dozen arenas
constexpr size_t kBlockSize = 512;
constexpr int kWriters = 2;

unsigned char Pattern(const unsigned char *addr) {
  return (unsigned char)(((uintptr_t)addr * 0x9e3779b1u) >> 9);
}

struct Block {
  long counter;  // incremented only by the writer that owns the block
  unsigned char bytes[kBlockSize - sizeof(long)];
};

void FillPattern(Block *b) {
  for (size_t i = 0; i < sizeof b->bytes; i++) b->bytes[i] = Pattern(&b->bytes[i]);
}

size_t BadBytes(const Block *b) {
  size_t bad = 0;
  for (size_t i = 0; i < sizeof b->bytes; i++) bad += b->bytes[i] != Pattern(&b->bytes[i]);
  return bad;
}

class Torture : public ::testing::TestWithParam<mv_backend_kind> {
 protected:
  void SetUp() override {
    const struct mv_backend *b = mv_backend_select(GetParam(), why_, sizeof why_);
    if (b->kind != GetParam())
      GTEST_SKIP() << mv_backend_name(GetParam()) << " does not run here: " << why_;
    backend_ = b;
    saved_ = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0);
    mv_engine_use_backend(b, MV_STEP_NONE);
  }
  void TearDown() override {
    if (saved_) mv_engine_use_backend(saved_, MV_STEP_NONE);
  }
  char why_[160] = {0};
  const struct mv_backend *backend_ = nullptr;
  const struct mv_backend *saved_ = nullptr;
};

TEST_P(Torture, NoWriteIsLostAndEveryByteIsRight) {
  std::vector<Block *> blocks(kBlocks);
  for (auto &b : blocks) {
    b = (Block *)malloc(sizeof(Block));
    b->counter = 0;
    FillPattern(b);
  }
  std::atomic<bool> stop{false};
  std::atomic<size_t> reader_bad{0}, pipe_bad{0}, pipe_reads{0}, direct_bad{0}, direct_reads{0};
  std::vector<long> increments(kWriters, 0);
  std::vector<std::thread> threads;

  for (int w = 0; w < kWriters; w++)
    threads.emplace_back([&, w] {
      uint64_t x = 0x2545f4914f6cdd1dull * (w + 1);
      long n = 0;
      while (!stop) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int i = (int)(x % (kBlocks / kWriters)) * kWriters + w;  // blocks of writer w
        blocks[i]->counter++;
        n++;
        if ((x & 255) == 0) FillPattern(blocks[i]);  // a rewrite of the same bytes
      }
      increments[w] = n;
    });

  threads.emplace_back([&] {
    uint64_t x = 88172645463325252ull;
    while (!stop) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      reader_bad += BadBytes(blocks[x % kBlocks]);
    }
  });

  // read() from a pipe into heap buffers: the kernel writes into arena memory.
  threads.emplace_back([&] {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    std::vector<unsigned char *> buffers;
    for (int i = 0; i < 64; i++) buffers.push_back((unsigned char *)malloc(3000));
    unsigned char src[3000];
    for (unsigned round = 0; !stop; round++) {
      for (size_t i = 0; i < sizeof src; i++) src[i] = (unsigned char)(round * 31 + i);
      ASSERT_EQ(write(fds[1], src, sizeof src), (ssize_t)sizeof src);
      unsigned char *dst = buffers[round % buffers.size()];
      size_t got = 0;
      while (got < sizeof src) {
        ssize_t n = read(fds[0], dst + got, sizeof src - got);
        ASSERT_GT(n, 0) << strerror(errno);
        got += (size_t)n;
      }
      pipe_bad += memcmp(dst, src, sizeof src) != 0;
      pipe_reads++;
    }
    for (auto *b : buffers) free(b);
    close(fds[0]);
    close(fds[1]);
  });

  // O_DIRECT reads into heap buffers: a device (here the block layer) writing
  // pinned pages. Only pin-safe backends may run under them.
  std::string path = "/var/tmp/movalloc_torture_" + std::to_string(getpid());
  if (backend_->pin_safe) {
    const size_t len = 1 << 16;
    {
      int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
      ASSERT_GE(fd, 0);
      std::vector<unsigned char> data(len);
      for (size_t i = 0; i < len; i++) data[i] = (unsigned char)(i * 7 + 3);
      ASSERT_EQ(write(fd, data.data(), len), (ssize_t)len);
      fsync(fd);
      close(fd);
    }
    threads.emplace_back([&, len] {
      int fd = open(path.c_str(), O_RDONLY | O_DIRECT);
      if (fd < 0) return;  // a filesystem without O_DIRECT: nothing to test
      std::vector<unsigned char *> buffers;
      for (int i = 0; i < 16; i++) {
        void *p = nullptr;
        ASSERT_EQ(posix_memalign(&p, 4096, len), 0);
        buffers.push_back((unsigned char *)p);
      }
      for (unsigned round = 0; !stop; round++) {
        unsigned char *dst = buffers[round % buffers.size()];
        memset(dst, 0, len);
        ASSERT_EQ(pread(fd, dst, len, 0), (ssize_t)len) << strerror(errno);
        size_t bad = 0;
        for (size_t i = 0; i < len; i++) bad += dst[i] != (unsigned char)(i * 7 + 3);
        direct_bad += bad;
        direct_reads++;
      }
      for (auto *b : buffers) free(b);
      close(fd);
    });
  }

  int moved = 0;
  uint64_t deadline = mv_os_now_ns() + 2500000000ull;
  while (mv_os_now_ns() < deadline) {
    int rc = movalloc_compact(MOVALLOC_COMPACT_ALL);
    ASSERT_GE(rc, 0) << strerror(-rc);
    moved += rc;
  }
  stop = true;
  for (auto &t : threads) t.join();
  unlink(path.c_str());

  EXPECT_GT(moved, 10) << "migrations under the writers";
  long expected[kWriters] = {0};
  for (int i = 0; i < kBlocks; i++) expected[i % kWriters] += blocks[i]->counter;
  for (int w = 0; w < kWriters; w++)
    EXPECT_EQ(expected[w], increments[w]) << "writer " << w << " lost increments";
  size_t bad = 0;
  for (auto *b : blocks) bad += BadBytes(b);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(reader_bad.load(), 0u);
  EXPECT_GT(pipe_reads.load(), 0u);
  EXPECT_EQ(pipe_bad.load(), 0u);
  EXPECT_EQ(direct_bad.load(), 0u);
  RecordProperty("migrations", moved);
  RecordProperty("pipe_reads", (int)pipe_reads.load());
  RecordProperty("direct_reads", (int)direct_reads.load());
  for (auto *b : blocks) free(b);
}

INSTANTIATE_TEST_SUITE_P(EveryBackend, Torture,
                         ::testing::Values(MV_BACKEND_MOVE, MV_BACKEND_REMAP, MV_BACKEND_COLLAPSE,
                                           MV_BACKEND_MPROTECT),
                         [](const ::testing::TestParamInfo<mv_backend_kind> &info) {
                           return std::string(mv_backend_name(info.param));
                         });

}  // namespace
