// The exported malloc family behaves as glibc's does, corners included, and
// the memory really comes from movalloc's arenas.
#include <errno.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
int mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen);
size_t nallocx(size_t size, int flags);
void malloc_stats_print(void (*write_cb)(void *, const char *), void *cbopaque, const char *opts);
}

namespace {

// Keeps the compiler from folding malloc/free pairs away.
void *Opaque(void *p) {
  asm volatile("" : "+r"(p));
  return p;
}

TEST(Alloc, MemoryIsMovallocs) {
  void *p = malloc(100);
  EXPECT_TRUE(mv_owns(p));
  free(p);
}

TEST(Alloc, SixteenByteAlignmentForEverySize) {
  std::vector<void *> blocks;
  for (size_t size = 0; size < 5000; size += 7) {
    void *p = malloc(size);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ((uintptr_t)p % 16, 0u) << size;
    EXPECT_GE(malloc_usable_size(p), size);
    memset(p, 0xab, size);
    blocks.push_back(p);
  }
  for (void *p : blocks) free(p);
}

TEST(Alloc, LargeAndHugeSizes) {
  for (size_t size : {(size_t)64 << 10, (size_t)65 << 10, (size_t)1 << 20, ((size_t)1 << 20) + 1,
                      (size_t)5 << 20, (size_t)64 << 20, (size_t)257 << 20}) {
    char *p = (char *)malloc(size);
    ASSERT_NE(p, nullptr) << size;
    EXPECT_TRUE(mv_owns(p));
    EXPECT_GE(malloc_usable_size(p), size);
    p[0] = 1;
    p[size - 1] = 2;  // the whole block is writable
    EXPECT_EQ(p[0] + p[size - 1], 3);
    free(p);
  }
}

TEST(Alloc, HugeFailsWithEnomem) {
  errno = 0;
  EXPECT_EQ(Opaque(malloc(SIZE_MAX)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  errno = 0;
  EXPECT_EQ(Opaque(malloc(PTRDIFF_MAX)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  errno = 0;
  EXPECT_EQ(Opaque(malloc((size_t)1 << 46)), nullptr);  // beyond the reservation
  EXPECT_EQ(errno, ENOMEM);
}

TEST(Alloc, CallocZeroesAndChecksOverflow) {
  for (size_t size : {(size_t)24, (size_t)3000, (size_t)100000, (size_t)3 << 20}) {
    // Dirty memory first, so a calloc that skipped zeroing would show.
    unsigned char *d = (unsigned char *)malloc(size);
    memset(d, 0xff, size);
    free(d);
    unsigned char *p = (unsigned char *)calloc(1, size);
    ASSERT_NE(p, nullptr);
    for (size_t i = 0; i < size; i++) ASSERT_EQ(p[i], 0) << size << " at " << i;
    free(p);
  }
  errno = 0;
  EXPECT_EQ(Opaque(calloc(SIZE_MAX / 2, 3)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
}

TEST(Alloc, ReallocKeepsContents) {
  char *p = nullptr;
  size_t size = 1, last = 0;
  for (; size < ((size_t)8 << 20); last = size, size = size * 3 / 2 + 1) {
    char *q = (char *)realloc(p, size);
    ASSERT_NE(q, nullptr);
    if (p == nullptr) q[0] = 0;
    for (size_t i = 1; i < size; i++) q[i] = (char)(i * 7);
    for (size_t i = 1; i < size; i += 4093) ASSERT_EQ(q[i], (char)(i * 7));
    p = q;
  }
  for (size = last / 3; size > 1; size /= 3) {
    p = (char *)realloc(p, size);
    ASSERT_NE(p, nullptr);
    for (size_t i = 1; i < size; i += 97) ASSERT_EQ(p[i], (char)(i * 7));
  }
  free(p);
}

TEST(Alloc, ReallocZeroFreesAndNullMallocs) {
  void *p = malloc(10);
  EXPECT_EQ(realloc(p, 0), nullptr);  // glibc: frees, returns NULL
  void *q = realloc(nullptr, 10);
  EXPECT_NE(q, nullptr);
  free(q);
  errno = 0;
  void *r = malloc(10);
  EXPECT_EQ(Opaque(realloc(r, SIZE_MAX)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  free(r);  // still valid after a failed realloc
}

TEST(Alloc, ReallocarrayOverflow) {
  errno = 0;
  EXPECT_EQ(reallocarray(nullptr, SIZE_MAX / 4, 8), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  void *p = reallocarray(nullptr, 10, 10);
  EXPECT_NE(p, nullptr);
  EXPECT_GE(malloc_usable_size(p), 100u);
  free(p);
}

TEST(Alloc, AlignmentsUpToFourMegabytes) {
  for (size_t align = 16; align <= ((size_t)4 << 20); align *= 2) {
    for (size_t size : {(size_t)1, align - 1, align, align + 1, (size_t)100000}) {
      void *p = nullptr;
      ASSERT_EQ(posix_memalign(&p, align, size), 0);
      EXPECT_EQ((uintptr_t)p % align, 0u) << align << " " << size;
      EXPECT_GE(malloc_usable_size(p), size);
      memset(p, 1, size);
      free(p);
      p = aligned_alloc(align, size);
      ASSERT_NE(p, nullptr);
      EXPECT_EQ((uintptr_t)p % align, 0u);
      free(p);
      p = memalign(align, size);
      ASSERT_NE(p, nullptr);
      EXPECT_EQ((uintptr_t)p % align, 0u);
      free(p);
    }
  }
}

TEST(Alloc, AlignmentErrors) {
  void *p = (void *)0x1;
  EXPECT_EQ(posix_memalign(&p, 24, 10), EINVAL);
  EXPECT_EQ(posix_memalign(&p, 4, 10), EINVAL);  // not a multiple of sizeof(void *)
  EXPECT_EQ(p, (void *)0x1);                     // untouched on failure
  EXPECT_EQ(posix_memalign(&p, 64, SIZE_MAX - 10), ENOMEM);
  errno = 0;
  EXPECT_EQ(aligned_alloc(24, 48), nullptr);
  EXPECT_EQ(errno, EINVAL);
  errno = 0;
  EXPECT_EQ(memalign(SIZE_MAX / 2 + 2, 10), nullptr);
  EXPECT_EQ(errno, EINVAL);
  errno = 0;
  EXPECT_EQ(memalign(64, SIZE_MAX - 100), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  void *q = memalign(48, 10);  // glibc rounds the alignment up to 64
  ASSERT_NE(q, nullptr);
  EXPECT_EQ((uintptr_t)q % 64, 0u);
  free(q);
}

TEST(Alloc, VallocAndPvalloc) {
  long page = sysconf(_SC_PAGESIZE);
  void *v = valloc(10);
  ASSERT_NE(v, nullptr);
  EXPECT_EQ((uintptr_t)v % page, 0u);
  void *pv = pvalloc(10);
  ASSERT_NE(pv, nullptr);
  EXPECT_EQ((uintptr_t)pv % page, 0u);
  EXPECT_GE(malloc_usable_size(pv), (size_t)page);
  free(v);
  free(pv);
  errno = 0;
  EXPECT_EQ(valloc(SIZE_MAX - 10), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  errno = 0;
  EXPECT_EQ(pvalloc(SIZE_MAX - 10), nullptr);
  EXPECT_EQ(errno, ENOMEM);
}

TEST(Alloc, UsableSizeOfForeignAndNull) {
  EXPECT_EQ(malloc_usable_size(nullptr), 0u);
  int on_stack;
  EXPECT_EQ(malloc_usable_size(&on_stack), 0u);
  free(nullptr);
}

TEST(Alloc, MallinfoMalloptTrim) {
  std::vector<void *> blocks;
  for (int i = 0; i < 1000; i++) blocks.push_back(malloc(1000));
  struct mallinfo2 mi = mallinfo2();
  EXPECT_GE(mi.uordblks, 1000u * 1000u);
  EXPECT_GE(mi.arena, mi.uordblks);
  for (void *p : blocks) free(p);
  EXPECT_EQ(mallopt(M_MMAP_THRESHOLD, 1 << 20), 1);
  EXPECT_EQ(mallopt(M_ARENA_MAX, 1), 1);
  EXPECT_EQ(mallopt(12345, 1), 0);
  // Free a few huge blocks so empty arenas are cached, then trim them.
  for (int i = 0; i < 4; i++) free(Opaque(malloc((size_t)3 << 20)));
  struct movalloc_stats before, after;
  movalloc_stats_get(&before);
  malloc_trim(0);
  movalloc_stats_get(&after);
  EXPECT_EQ(after.arenas_cached, 0u);
  EXPECT_GE(after.arenas_released, before.arenas_released);
}

// Freed arenas stay resident for reuse, and go back to the kernel once nobody
// reused them for a second.
TEST(Alloc, CachedArenasDecay) {
  malloc_trim(0);
  void *big = Opaque(malloc((size_t)80 << 20));
  memset(big, 1, (size_t)80 << 20);
  free(big);
  struct movalloc_stats s0, s1;
  movalloc_stats_get(&s0);
  EXPECT_GE(s0.arenas_cached, 40u) << "freed arenas are kept for reuse";
  void *again = Opaque(malloc((size_t)80 << 20));  // reuses them: no new arenas
  struct movalloc_stats s_again;
  movalloc_stats_get(&s_again);
  EXPECT_LE(s_again.committed_bytes, s0.committed_bytes);
  free(again);
  usleep(1300 * 1000);
  void *trigger = Opaque(malloc((size_t)3 << 20));  // an allocation path runs the decay
  movalloc_stats_get(&s1);
  free(trigger);
  EXPECT_LE(s1.arenas_cached, mv_options.arena_cache);
  EXPECT_GE(s1.arenas_released, s0.arenas_released + 30);
}

// A huge object that cannot use the cached arenas (no run of them is long
// enough) faults in fresh ones, and as many cached arenas go back to the
// kernel: the heap grows by the object, not by the object beside idle arenas.
// Huge objects of whole arenas, less room for MOVALLOC_CHECK's canary.
constexpr size_t kArena = (size_t)2 << 20, kCanaryRoom = 64;

TEST(Alloc, HugeObjectOnFreshArenasSendsIdleCachedOnesBack) {
  malloc_trim(0);
  const size_t hole_len = 4 * kArena - kCanaryRoom, fence_len = 2 * kArena - kCanaryRoom;
  // A hole of 4 arenas with a live fence right after it, so that the 10-arena
  // object below cannot take the hole's arenas.
  std::vector<void *> misses;
  void *hole = nullptr, *fence = nullptr;
  for (int i = 0; i < 64; i++) {
    hole = Opaque(malloc(hole_len));
    fence = Opaque(malloc(fence_len));
    if ((char *)fence == (char *)hole + 4 * kArena) break;
    misses.push_back(hole);
    misses.push_back(fence);
    hole = fence = nullptr;
  }
  ASSERT_NE(fence, nullptr) << "no fence right after the hole";
  unsigned keep = mv_options.arena_cache;
  mv_options.arena_cache = 0;
  free(hole);
  struct movalloc_stats s0, s1;
  movalloc_stats_get(&s0);
  EXPECT_GE(s0.arenas_cached, 4u);
  void *big = Opaque(malloc((size_t)20 << 20));
  movalloc_stats_get(&s1);
  mv_options.arena_cache = keep;
  EXPECT_EQ(s1.arenas_cached, 0u) << "idle cached arenas kept beside fresh ones";
  EXPECT_GE(s1.arenas_released, s0.arenas_released + s0.arenas_cached);
  free(big);
  free(fence);
  for (void *p : misses) free(p);
}

// A huge object goes where cached arenas are, not onto arenas that were given
// back to the kernel, even when those come first: nothing to fault in, and no
// cached arena sent back in exchange.
TEST(Alloc, HugeObjectTakesTheRunOfCachedArenas) {
  const size_t len = 4 * kArena - kCanaryRoom, fence_len = 2 * kArena - kCanaryRoom;
  malloc_trim(0);
  void *low = Opaque(malloc(len));
  void *fence1 = Opaque(malloc(fence_len));
  void *high = Opaque(malloc(len));
  void *fence2 = Opaque(malloc(fence_len));
  ASSERT_LT(low, high);
  free(low);
  malloc_trim(0);  // low's arenas go back to the kernel
  free(high);      // high's stay cached
  struct movalloc_stats s0, s1;
  movalloc_stats_get(&s0);
  ASSERT_GE(s0.arenas_cached, 4u);
  void *again = Opaque(malloc(len));
  movalloc_stats_get(&s1);
  EXPECT_EQ(again, high);
  EXPECT_EQ(s1.arenas_cached, s0.arenas_cached - 4);
  EXPECT_EQ(s1.arenas_released, s0.arenas_released);
  free(again);
  free(fence1);
  free(fence2);
}

// The kernel's word on the mapping at addr: /proc/self/smaps' THPeligible.
int ThpEligible(const void *addr) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t from, to;
    if (sscanf(line.c_str(), "%lx-%lx ", &from, &to) == 2)
      inside = from <= (uintptr_t)addr && (uintptr_t)addr < to;
    else if (inside && line.rfind("THPeligible:", 0) == 0)
      return atoi(line.c_str() + 12);
  }
  return -1;
}

// Where huge pages come at fault time, a huge object's last arena takes small
// pages while the object uses less than half of it, and huge pages again when
// the object fills it, shrinks off it or is freed.
TEST(Alloc, AHugeObjectsLastArenaTakesSmallPagesWhileMostlyUnused) {
  auto thp = mv_options.thp;
  mv_options.thp = MV_THP_FAULT;  // fault-time huge pages for every arena
  const size_t full = 3 * kArena - 1024, sparse = 2 * kArena + 65536;  // 3 arenas each
  char *p = (char *)Opaque(malloc(full));
  ASSERT_NE(p, nullptr);
  mv_arena_t *last = mv_arena_of((uintptr_t)p + 2 * kArena), *mid = last - 1;
  EXPECT_FALSE(last->small_tail) << "a last arena nearly full";
  int first_arena = ThpEligible(p);
  ASSERT_EQ(realloc(p, sparse), p);  // in place: the same three arenas
  EXPECT_TRUE(last->small_tail);
  EXPECT_EQ(ThpEligible(p + 2 * kArena), 0);
  EXPECT_EQ(ThpEligible(p), first_arena) << "the other arenas' mapping changed";
  ASSERT_EQ(realloc(p, full), p);
  EXPECT_FALSE(last->small_tail) << "filled again";
  EXPECT_EQ(ThpEligible(p + 2 * kArena), 1);
  ASSERT_EQ(realloc(p, kArena + 4096), p);  // two arenas: the third goes
  EXPECT_TRUE(mid->small_tail);
  EXPECT_FALSE(last->small_tail);
  free(p);
  EXPECT_FALSE(mid->small_tail) << "freed with small pages";
  EXPECT_EQ(ThpEligible(p + kArena), 1);
  mv_options.thp = thp;
}

TEST(Alloc, CxxOperators) {
  int *one = new int(7);
  EXPECT_TRUE(mv_owns(one));
  delete one;
  struct alignas(256) Wide {
    char c[300];
  };
  Wide *w = new Wide[3];
  EXPECT_EQ((uintptr_t)w % 256, 0u);
  EXPECT_TRUE(mv_owns(w));
  delete[] w;
  EXPECT_THROW((void)Opaque(new char[(size_t)1 << 50]), std::bad_alloc);
  char *nothrow = new (std::nothrow) char[(size_t)1 << 50];
  EXPECT_EQ(nothrow, nullptr);
}

TEST(Alloc, JemallocCompatibility) {
  uint64_t epoch = 1;
  size_t len = sizeof epoch;
  EXPECT_EQ(mallctl("epoch", &epoch, &len, &epoch, sizeof epoch), 0);
  void *p = Opaque(malloc(1 << 20));
  size_t allocated = 0, resident = 0;
  len = sizeof allocated;
  EXPECT_EQ(mallctl("stats.allocated", &allocated, &len, nullptr, 0), 0);
  EXPECT_GE(allocated, (size_t)1 << 20);
  EXPECT_EQ(mallctl("stats.resident", &resident, &len, nullptr, 0), 0);
  EXPECT_GE(resident, allocated);
  EXPECT_EQ(mallctl("stats.allocated", &allocated, &len, &allocated, len), EPERM);
  size_t wrong = 3;
  EXPECT_EQ(mallctl("stats.allocated", &allocated, &wrong, nullptr, 0), EINVAL);
  EXPECT_EQ(mallctl("opt.narenas", nullptr, nullptr, nullptr, 0), ENOENT);
  EXPECT_EQ(mallctl("no.such.name", nullptr, nullptr, nullptr, 0), ENOENT);
  EXPECT_EQ(mallctl("arena.4096.purge", nullptr, nullptr, nullptr, 0), 0);
  free(p);
  // The size class malloc would give; under MOVALLOC_CHECK the size asked for,
  // as malloc_usable_size says there (beyond it is canary).
  bool check = mv_options.check;
  EXPECT_EQ(nallocx(1, 0), check ? 1u : 16u);
  EXPECT_EQ(nallocx(100, 0), check ? 100u : 112u);
  void *q = malloc(100);
  EXPECT_EQ(nallocx(100, 0), malloc_usable_size(q));
  free(q);
  EXPECT_EQ(nallocx(100, 12), check ? 100u : 4096u);  // MALLOCX_LG_ALIGN(12)
  std::string out;
  malloc_stats_print([](void *o, const char *s) { *(std::string *)o += s; }, &out, nullptr);
  EXPECT_NE(out.find("in use"), std::string::npos);
}

TEST(Alloc, StatsCountWhatIsLive) {
  struct movalloc_stats s0, s1;
  ASSERT_EQ(movalloc_stats_get(&s0), 0);
  EXPECT_EQ(movalloc_stats_get(nullptr), -EINVAL);
  std::vector<void *> blocks;
  for (int i = 0; i < 100; i++) blocks.push_back(malloc(10000));
  void *huge = Opaque(malloc((size_t)10 << 20));
  ASSERT_EQ(movalloc_stats_get(&s1), 0);
  EXPECT_GE(s1.in_use_bytes, s0.in_use_bytes + 100 * 10000 + ((size_t)10 << 20));
  EXPECT_EQ(s1.huge_objects, s0.huge_objects + 1);
  EXPECT_GE(s1.committed_bytes, s1.in_use_bytes);
  EXPECT_GE(s1.reserved_bytes, s1.committed_bytes);
  EXPECT_GT(s1.arena_count, 0u);
  EXPECT_GT(s1.heaps, 0u);
  EXPECT_GT(strlen(s1.backend), 0u);
  for (void *p : blocks) free(p);
  free(huge);
}

}  // namespace
