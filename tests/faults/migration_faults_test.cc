// Faults in the middle of migrations, in this process, for every backend the
// kernel runs (README "Faults: what happens"): no staging huge page, the OS
// refusing mremap/madvise/mprotect at a chosen call, a thread exiting or killed
// while its arena is held, fork/vfork/posix_spawn while an arena is held.
// Every data check reads every byte.
#include <errno.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
}

extern char **environ;

namespace {

struct movalloc_stats Stats() {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  return s;
}

unsigned char Pattern(uintptr_t addr) { return (unsigned char)((addr * 0x9e3779b1u) >> 11); }

uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

// Backends the kernel runs, by name (collapse holds nothing itself).
std::vector<const mv_backend *> MovingBackends() {
  std::vector<const mv_backend *> out;
  for (mv_backend_kind k : {MV_BACKEND_MOVE, MV_BACKEND_REMAP, MV_BACKEND_COLLAPSE,
                            MV_BACKEND_MPROTECT}) {
    const mv_backend *b = mv_backend_select(k, nullptr, 0);
    if (b->kind == k) out.push_back(b);
  }
  return out;
}

// ---- a third-party region, to aim a fault at exactly one arena ----

struct Region {
  unsigned char *base = nullptr;
  std::atomic<int> isolations{0}, migrations{0}, putbacks{0};
  Region() {
    void *map = mmap(nullptr, 2 * MV_ARENA_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base = (unsigned char *)(((uintptr_t)map + MV_ARENA_SIZE - 1) & ~(MV_ARENA_SIZE - 1));
    madvise(base, MV_ARENA_SIZE, MADV_NOHUGEPAGE);  // 4 KiB pages, so a move is needed
    for (size_t i = 0; i < MV_ARENA_SIZE; i++) base[i] = Pattern((uintptr_t)base + i);
    madvise(base, MV_ARENA_SIZE, MADV_HUGEPAGE);
  }
  size_t Bad() const {
    size_t bad = 0;
    for (size_t i = 0; i < MV_ARENA_SIZE; i++) bad += base[i] != Pattern((uintptr_t)base + i);
    return bad;
  }
};

bool RIsolate(void *ctx, void *, size_t) {
  ((Region *)ctx)->isolations++;
  return true;
}
int RMigrate(void *ctx, struct movalloc_migration *m) {
  ((Region *)ctx)->migrations++;
  return movalloc_migration_move(m);
}
void RPutback(void *ctx, void *, size_t) { ((Region *)ctx)->putbacks++; }
const struct movalloc_movable_ops kOps = {RIsolate, RMigrate, RPutback};

// The fault's target: calls on other ranges (the allocator's own) go through.
std::atomic<uintptr_t> target{0};
bool Aimed(const void *addr) {
  uintptr_t a = (uintptr_t)addr, t = target.load();
  return t && a >= t && a < t + MV_ARENA_SIZE;
}
std::atomic<int> faults_injected{0};

void *MremapNoMem(void *old_addr, size_t old_len, size_t new_len, int flags, void *new_addr) {
  if ((flags & MREMAP_FIXED) && Aimed(new_addr)) {
    faults_injected++;
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return mv_prim_real.mremap(old_addr, old_len, new_len, flags, new_addr);
}
int MadviseNoMem(void *addr, size_t len, int advice) {
  if (Aimed(addr) && advice != MADV_HUGEPAGE && advice != MADV_NOHUGEPAGE) {
    faults_injected++;
    errno = ENOMEM;
    return -1;
  }
  return mv_prim_real.madvise(addr, len, advice);
}
int MprotectNoMem(void *addr, size_t len, int prot) {
  if (Aimed(addr) && prot == PROT_READ) {
    faults_injected++;
    errno = ENOMEM;
    return -1;
  }
  return mv_prim_real.mprotect(addr, len, prot);
}
// Staging: the 4 MiB map an aligned staging page is cut from, or the huge page
// itself, refused.
void *MmapNoStaging(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
  if (len == 2 * MV_ARENA_SIZE && (flags & MAP_NORESERVE)) {
    faults_injected++;
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return mv_prim_real.mmap(addr, len, prot, flags, fd, off);
}
int MadviseNoHuge(void *addr, size_t len, int advice) {
  if (advice == MADV_HUGEPAGE && !Aimed(addr)) {
    faults_injected++;
    errno = EINVAL;
    return -1;
  }
  return mv_prim_real.madvise(addr, len, advice);
}
int MadviseNoPopulate(void *addr, size_t len, int advice) {
  if (advice == MADV_POPULATE_WRITE && !Aimed(addr)) {
    faults_injected++;
    errno = ENOMEM;
    return -1;
  }
  return mv_prim_real.madvise(addr, len, advice);
}

class Faults : public testing::Test {
 protected:
  void SetUp() override { saved_ = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0); }
  void TearDown() override {
    mv_prim_reset();
    target = 0;
    mv_engine_use_backend(saved_, MV_STEP_NONE);
  }
  const mv_backend *saved_;
};

// No huge page to move onto (no staging map, MADV_HUGEPAGE refused, the THP
// fault failing): -EAGAIN before anything is isolated, counted staging_failed,
// data untouched; the same arena moves once the kernel gives a page again (with
// move, the engine's last pass already hands it to MADV_COLLAPSE).
TEST_F(Faults, StagingHugePageUnavailable) {
  struct Case {
    const char *what;
    void (*fake)(struct mv_prim *);
  } cases[] = {
      {"mmap ENOMEM", [](struct mv_prim *p) { p->mmap = MmapNoStaging; }},
      {"MADV_HUGEPAGE EINVAL", [](struct mv_prim *p) { p->madvise = MadviseNoHuge; }},
      {"MADV_POPULATE_WRITE ENOMEM", [](struct mv_prim *p) { p->madvise = MadviseNoPopulate; }},
  };
  for (const mv_backend *b : MovingBackends()) {
    if (b->kind == MV_BACKEND_COLLAPSE) continue;  // stages nothing: the kernel finds its own
    for (const Case &c : cases) {
      SCOPED_TRACE(std::string(b->name) + ", " + c.what);
      mv_engine_use_backend(b, MV_STEP_NONE);
      Region r;
      target = (uintptr_t)r.base;
      ASSERT_EQ(movalloc_region_register(r.base, MV_ARENA_SIZE, &kOps, &r), 0);
      struct Unregister {
        unsigned char *base;
        ~Unregister() { EXPECT_EQ(movalloc_region_unregister(base), 0); }
      } unregister{r.base};
      struct mv_prim fake = mv_prim_real;
      c.fake(&fake);
      faults_injected = 0;
      uint64_t staging0 = Stats().staging_failed;
      mv_prim_set(&fake);
      int moved = movalloc_compact(0);
      mv_prim_reset();
      EXPECT_EQ(r.Bad(), 0u);
      EXPECT_GT(faults_injected.load(), 0);
      EXPECT_GT(Stats().staging_failed, staging0);
      if (b->kind == MV_BACKEND_MOVE) {
        // Never isolated for UFFDIO_MOVE; the last pass hands the arena to
        // MADV_COLLAPSE (ARCHITECTURE.md), which needs no staged page.
        EXPECT_EQ(r.isolations.load(), moved);
      } else {
        EXPECT_EQ(moved, 0);
        EXPECT_EQ(r.isolations.load(), 0) << "isolated without a huge page";
        EXPECT_EQ(movalloc_compact(0), 1) << "moves once the kernel gives a page";
      }
      EXPECT_EQ(r.Bad(), 0u);
    }
  }
}

// The OS refusing a step with ENOMEM: mremap over the arena (remap,
// mprotect), mprotect at hold (mprotect), MADV_COLLAPSE (collapse), and the
// MADV_DONTNEED that frees the page table before the move-in (move: only an
// optimisation, so the move may still succeed). Every isolation that does not
// end in a move ends in putback, every byte as before; afterwards the backend
// moves a fresh arena.
TEST_F(Faults, OsRefusesAStepWithEnomem) {
  for (const mv_backend *b : MovingBackends()) {
    std::vector<std::pair<const char *, void (*)(struct mv_prim *)>> fakes;
    switch (b->kind) {
      case MV_BACKEND_REMAP:
        fakes = {{"mremap", [](struct mv_prim *p) { p->mremap = MremapNoMem; }}};
        break;
      case MV_BACKEND_MPROTECT:
        fakes = {{"mremap", [](struct mv_prim *p) { p->mremap = MremapNoMem; }},
                 {"mprotect", [](struct mv_prim *p) { p->mprotect = MprotectNoMem; }}};
        break;
      default:
        fakes = {{"madvise", [](struct mv_prim *p) { p->madvise = MadviseNoMem; }}};
    }
    for (auto &f : fakes) {
      SCOPED_TRACE(std::string(b->name) + ": " + f.first + " ENOMEM");
      mv_engine_use_backend(b, MV_STEP_NONE);
      Region r;
      target = (uintptr_t)r.base;
      ASSERT_EQ(movalloc_region_register(r.base, MV_ARENA_SIZE, &kOps, &r), 0);
      struct mv_prim fake = mv_prim_real;
      f.second(&fake);
      faults_injected = 0;
      struct movalloc_stats s0 = Stats();
      mv_prim_set(&fake);
      int moved = movalloc_compact(0);
      mv_prim_reset();
      struct movalloc_stats s1 = Stats();
      EXPECT_GT(faults_injected.load(), 0) << "the fault was never reached";
      EXPECT_EQ(r.Bad(), 0u);
      EXPECT_GT(r.isolations.load(), 0);
      if (b->kind == MV_BACKEND_MOVE) {
        EXPECT_TRUE(moved == 1 || r.putbacks.load() == r.isolations.load()) << moved;
      } else {
        EXPECT_EQ(moved, 0);
        EXPECT_EQ(r.putbacks.load(), r.isolations.load());
        EXPECT_GT(s1.migrate_failed + s1.migrate_retries,
                  s0.migrate_failed + s0.migrate_retries);
        EXPECT_EQ(mv_thp_is_huge((uintptr_t)r.base), 0);
      }
      EXPECT_EQ(movalloc_region_unregister(r.base), 0);
      target = 0;
      Region fresh;
      ASSERT_EQ(movalloc_region_register(fresh.base, MV_ARENA_SIZE, &kOps, &fresh), 0);
      EXPECT_EQ(movalloc_compact(0), 1) << "the backend works again";
      EXPECT_EQ(fresh.Bad(), 0u);
      EXPECT_EQ(movalloc_region_unregister(fresh.base), 0);
    }
  }
}

}  // namespace
