// The OS saying no: allocation fails cleanly with ENOMEM, nothing crashes, and
// the allocator works again once the OS does.
#include <errno.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_prim.h"
}

namespace {

void *Opaque(void *p) {
  asm volatile("" : "+r"(p));
  return p;
}

int FailingMprotect(void *addr, size_t len, int prot) {
  errno = ENOMEM;
  return -1;
}

int FailingMadvise(void *addr, size_t len, int advice) {
  errno = ENOMEM;
  return -1;
}

// Growing the heap needs mprotect: with it failing, a huge block (which needs
// fresh arenas) fails with ENOMEM, and succeeds again afterwards.
TEST(Fault, CommitFailureGivesEnomem) {
  struct mv_prim fake = mv_prim_real;
  fake.mprotect = FailingMprotect;
  mv_prim_set(&fake);
  errno = 0;
  void *p = Opaque(malloc((size_t)900 << 20));
  int err = errno;
  mv_prim_reset();
  EXPECT_EQ(p, nullptr);
  EXPECT_EQ(err, ENOMEM);
  void *q = Opaque(malloc((size_t)900 << 20));
  EXPECT_NE(q, nullptr);
  free(q);
}

// Returning memory to the kernel failing must not lose the arena: it stays
// committed and is reused.
TEST(Fault, ReleaseFailureKeepsArenasUsable) {
  struct mv_prim fake = mv_prim_real;
  fake.madvise = FailingMadvise;
  mv_prim_set(&fake);
  for (int i = 0; i < 20; i++) free(Opaque(malloc((size_t)30 << 20)));
  mv_prim_reset();
  char *p = (char *)Opaque(malloc((size_t)30 << 20));
  ASSERT_NE(p, nullptr);
  p[0] = 1;
  p[(30 << 20) - 1] = 1;
  free(p);
}

// A thread whose heap cannot be created (the mmap of a new chunk of heap
// descriptors fails): its malloc returns NULL with ENOMEM, nothing crashes, and
// once mmap works again a new thread allocates. Threads stay alive, so their
// heaps are not adopted and new ones keep being needed.
std::atomic<int> heap_mmaps_refused{0};
void *NoSmallMmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (len == (size_t)64 << 10 && prot == (PROT_READ | PROT_WRITE)) {
    heap_mmaps_refused++;
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return mv_prim_real.mmap(addr, len, prot, flags, fd, off);
}

TEST(Fault, NewThreadHeapFailureGivesEnomem) {
  struct mv_prim fake = mv_prim_real;
  fake.mmap = NoSmallMmap;
  mv_prim_set(&fake);
  std::atomic<bool> release{false};
  std::atomic<int> nulls{0}, enomem{0}, ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 400 && heap_mmaps_refused == 0; i++) {
    std::atomic<bool> done{false};
    threads.emplace_back([&] {
      errno = 0;
      void *p = Opaque(malloc(100));
      int err = errno;
      if (p) {
        ok++;
        memset(p, 1, 100);
      } else {
        nulls++;
        enomem += err == ENOMEM;
      }
      done = true;
      while (!release) usleep(1000);
      free(p);
    });
    while (!done) usleep(100);
  }
  mv_prim_reset();
  release = true;
  for (std::thread &t : threads) t.join();
  ASSERT_GT(heap_mmaps_refused.load(), 0) << "never needed a new heap chunk in 400 threads";
  EXPECT_GT(nulls.load(), 0);
  EXPECT_EQ(enomem.load(), nulls.load());
  std::thread([] {
    void *p = Opaque(malloc(100));
    EXPECT_NE(p, nullptr);
    free(p);
  }).join();
}

}  // namespace
