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
#include <sys/prctl.h>
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
#include "compactor/mv_backend_int.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
}
#include "tests/khugepaged.h"

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
// MADV_HUGEPAGE accepted, but the fault gives 4 KiB pages (no free huge page:
// THP faults fall back silently), as if the kernel had none.
int MadviseHugeFallsBack(void *addr, size_t len, int advice) {
  if (advice == MADV_HUGEPAGE && !Aimed(addr)) {
    faults_injected++;
    return mv_prim_real.madvise(addr, len, MADV_NOHUGEPAGE);
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
      {"THP fault falls back to 4 KiB", [](struct mv_prim *p) { p->madvise = MadviseHugeFallsBack; }},
  };
  for (const mv_backend *b : MovingBackends()) {
    if (b->kind == MV_BACKEND_COLLAPSE) continue;  // stages nothing: the kernel finds its own
    for (const Case &c : cases) {
      SCOPED_TRACE(std::string(b->name) + ", " + c.what);
      mv_engine_use_backend(b, MV_STEP_NONE);
      mvtest::KhugepagedWatch khugepaged;
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
      mv_thp_forget_spares();  // staging maps and madvises afresh: the faked calls
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
        EXPECT_EQ(movalloc_compact(0), khugepaged.ToMove((uintptr_t)r.base, 1))
            << "moves once the kernel gives a page";
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
      mvtest::KhugepagedWatch khugepaged;
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
        EXPECT_TRUE(khugepaged.Small((uintptr_t)r.base));
      }
      EXPECT_EQ(movalloc_region_unregister(r.base), 0);
      target = 0;
      Region fresh;
      ASSERT_EQ(movalloc_region_register(fresh.base, MV_ARENA_SIZE, &kOps, &fresh), 0);
      EXPECT_EQ(movalloc_compact(0), khugepaged.ToMove((uintptr_t)fresh.base, 1))
          << "the backend works again";
      EXPECT_EQ(fresh.Bad(), 0u);
      EXPECT_EQ(movalloc_region_unregister(fresh.base), 0);
    }
  }
}

// A process without CAP_SYS_ADMIN sees no PFNs in pagemap: the check that
// MADV_COLLAPSE produced a huge page must still confirm it (PAGEMAP_SCAN), or
// collapse, the backend a non-root user gets, would retry every arena forever
// and move none. In a child running as user nobody.
TEST_F(Faults, CollapseIsConfirmedWithoutPrivilege) {
  const mv_backend *collapse = mv_backend_select(MV_BACKEND_COLLAPSE, nullptr, 0);
  if (collapse->kind != MV_BACKEND_COLLAPSE) GTEST_SKIP() << "no MADV_COLLAPSE here";
  if (geteuid() != 0) GTEST_SKIP() << "needs root to become user nobody";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Dumpable again, as after an exec: a uid change clears it and makes
    // /proc/self root's.
    if (setgid(65534) != 0 || setuid(65534) != 0 || prctl(PR_SET_DUMPABLE, 1) != 0) _exit(10);
    mv_engine_use_backend(collapse, MV_STEP_NONE);
    // The arena inside a larger VMA, as the heap's are: smaps cannot tell it.
    Region r;
    unsigned char *map = r.base - MV_ARENA_SIZE / 2;
    size_t len = 2 * MV_ARENA_SIZE;
    if (mmap(r.base + MV_ARENA_SIZE, MV_ARENA_SIZE / 2, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED ||
        mmap(map, MV_ARENA_SIZE / 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
             -1, 0) == MAP_FAILED ||
        madvise(map, len, MADV_HUGEPAGE) != 0)
      _exit(16);
    bool larger = false;
    if (FILE *maps = fopen("/proc/self/maps", "r")) {
      unsigned long lo, hi;
      char line[512];
      while (fgets(line, sizeof line, maps))
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= (uintptr_t)r.base &&
            hi > (uintptr_t)r.base)
          larger = lo < (uintptr_t)r.base || hi > (uintptr_t)r.base + MV_ARENA_SIZE;
      fclose(maps);
    }
    if (!larger) _exit(17);
    // Precondition: the PFN of a present page is hidden from this process.
    uint64_t entry = 0;
    FILE *pm = fopen("/proc/self/pagemap", "r");
    if (!pm || fseek(pm, (long)((uintptr_t)r.base / 4096 * 8), SEEK_SET) != 0 ||
        fread(&entry, 8, 1, pm) != 1)
      _exit(11);
    fclose(pm);
    if (!(entry >> 63) || (entry & ((1ull << 55) - 1)) != 0) _exit(12);
    if (movalloc_region_register(r.base, MV_ARENA_SIZE, &kOps, &r) != 0) _exit(13);
    int moved = movalloc_compact(0);
    if (r.Bad() != 0) _exit(14);
    if (moved != 1 || mv_thp_is_huge((uintptr_t)r.base) != 1) _exit(15);
    _exit(0);
  }
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "11-12, 16-17: precondition (PFNs hidden, arena inside a larger VMA) not met, "
         "14: data changed, 15: not moved or not confirmed";
}

// ---- events while an arena is held ----

// A backend that runs on_hold on the compacting thread right after the real
// backend holds an arena's writers, before anything is moved.
const mv_backend *hooked_real;
std::function<void(uintptr_t)> on_hold;
int HookedHold(struct mv_move *m) {
  int rc = hooked_real->hold(m);
  if (rc == 0 && on_hold) on_hold(m->start);
  return rc;
}
mv_backend Hooked(const mv_backend *real) {
  hooked_real = real;
  mv_backend b = *real;
  b.hold = HookedHold;
  return b;
}

uintptr_t ArenaOf(const void *p) { return (uintptr_t)p & ~(MV_ARENA_SIZE - 1); }

// Memory outside movalloc's heap, for bookkeeping that must not move or be
// held itself.
template <typename T>
T *Outside(size_t n) {
  void *p = mmap(nullptr, n * sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : (T *)p;
}

constexpr int kBlocks = 4096;
constexpr size_t kBlockSize = 256;

// Blocks whose first word is a counter and the rest the address pattern.
size_t BadBlocks(unsigned char **blocks, const uint64_t *shadow) {
  size_t bad = 0;
  for (int i = 0; i < kBlocks; i++) {
    uint64_t c;
    memcpy(&c, blocks[i], 8);
    if (shadow && c != shadow[i] && c != shadow[i] + 1) bad++;
    for (size_t k = 8; k < kBlockSize; k++)
      bad += blocks[i][k] != Pattern((uintptr_t)(blocks[i] + k));
  }
  return bad;
}

void FillBlocks(unsigned char **blocks) {
  for (int i = 0; i < kBlocks; i++) {
    blocks[i] = (unsigned char *)malloc(kBlockSize);
    memset(blocks[i], 0, 8);
    for (size_t k = 8; k < kBlockSize; k++) blocks[i][k] = Pattern((uintptr_t)(blocks[i] + k));
  }
}

// Writes every block's pattern again: the same bytes, but a write each.
void RewriteBlocks(unsigned char **blocks) {
  for (int i = 0; i < kBlocks; i++)
    for (size_t k = 8; k < kBlockSize; k++) blocks[i][k] = Pattern((uintptr_t)(blocks[i] + k));
}

enum class Exit { kPthreadExit, kSignalPthreadExit, kSignalSysExit };

struct Victim {
  unsigned char **blocks;  // allocated by the victim: its own heap's arenas
  uint64_t *shadow;        // the counters' values, outside the heap
  std::atomic<bool> ready{false}, exit_now{false};
};
Victim *victim;

void *VictimMain(void *) {
  FillBlocks(victim->blocks);
  victim->ready = true;
  for (;;) {
    // A pass of writes into its arenas, then a pause in which it notices the
    // request to exit: it exits while the arena is held, not only after.
    for (int i = 0; i < kBlocks; i++) {
      uint64_t c = victim->shadow[i] + 1;
      memcpy(victim->blocks[i], &c, 8);
      victim->shadow[i] = c;
    }
    for (int k = 0; k < 20; k++) {
      if (victim->exit_now) {
        free(malloc(100));  // and the exit path allocates and frees
        pthread_exit(nullptr);
      }
      usleep(50);
    }
  }
}

void ExitByPthreadExit(int) { pthread_exit(nullptr); }
void ExitBySysExit(int) { syscall(SYS_exit, 0); }

// A thread exits while an arena it owns and writes is held: by pthread_exit,
// or killed by a signal handler that calls pthread_exit or the raw exit system
// call (no thread-exit cleanup at all). The migration completes, no thread
// hangs, every byte and counter is right, and the heap it left serves others.
TEST_F(Faults, ThreadExitsWhileItsArenaIsHeld) {
  for (const mv_backend *b : MovingBackends()) {
    for (Exit how : {Exit::kPthreadExit, Exit::kSignalPthreadExit, Exit::kSignalSysExit}) {
      SCOPED_TRACE(std::string(b->name) + ", exit kind " + std::to_string((int)how));
      Victim v;
      v.blocks = Outside<unsigned char *>(kBlocks);
      v.shadow = Outside<uint64_t>(kBlocks);
      victim = &v;
      struct sigaction sa = {};
      sa.sa_handler = how == Exit::kSignalSysExit ? ExitBySysExit : ExitByPthreadExit;
      sigaction(SIGUSR1, &sa, nullptr);
      pthread_t tid;
      ASSERT_EQ(pthread_create(&tid, nullptr, VictimMain, nullptr), 0);
      while (!v.ready) usleep(1000);

      std::atomic<bool> fired{false};
      uintptr_t arena = ArenaOf(v.blocks[kBlocks / 2]);
      on_hold = [&](uintptr_t start) {
        if (start != arena || fired) return;
        fired = true;
        if (how == Exit::kPthreadExit) v.exit_now = true;
        else pthread_kill(tid, SIGUSR1);
        usleep(30 * 1000);  // it exits (or blocks on the held arena) meanwhile
      };
      mv_backend hooked = Hooked(b);
      mv_engine_use_backend(&hooked, MV_STEP_NONE);
      for (int round = 0; round < 20 && !fired; round++) movalloc_compact(MOVALLOC_COMPACT_ALL);
      mv_engine_use_backend(saved_, MV_STEP_NONE);
      on_hold = nullptr;
      EXPECT_TRUE(fired.load()) << "the victim's arena was never held";
      if (!fired) pthread_kill(tid, SIGUSR1);
      struct timespec deadline;
      clock_gettime(CLOCK_REALTIME, &deadline);
      deadline.tv_sec += 10;
      ASSERT_EQ(pthread_timedjoin_np(tid, nullptr, &deadline), 0) << "the thread hung";
      EXPECT_EQ(BadBlocks(v.blocks, v.shadow), 0u);
      // Its heap serves a new thread; its blocks are freed from here.
      std::thread([] {
        std::vector<void *> ps;
        for (int i = 0; i < 20000; i++) ps.push_back(malloc(i % 700 + 1));
        for (void *p : ps) free(p);
      }).join();
      EXPECT_GE(movalloc_compact(MOVALLOC_COMPACT_ALL), 0);
      EXPECT_EQ(BadBlocks(v.blocks, v.shadow), 0u);
      for (int i = 0; i < kBlocks; i++) free(v.blocks[i]);
      signal(SIGUSR1, SIG_DFL);
      munmap(v.blocks, kBlocks * sizeof(unsigned char *));
      munmap(v.shadow, kBlocks * sizeof(uint64_t));
    }
  }
}

std::string SoakPath() {
  const char *dir = getenv("TEST_SRCDIR"), *ws = getenv("TEST_WORKSPACE");
  return std::string(dir ? dir : ".") + "/" + (ws ? ws : "movalloc") + "/tests/soak/soak";
}

// Another thread calls fork(), vfork() or posix_spawn() while an arena is
// held. fork() waits for the engine (the atfork handler quiesces it), so the
// child never starts with an arena held; its copy of the heap is whole, it
// allocates and compacts. vfork() and posix_spawn() run no atfork handlers and
// go ahead during the hold: the vfork child reads every byte of the held arena,
// the spawned program (the soak, 1 s under stress) allocates, checks and
// migrates. The parent's data stays intact throughout.
TEST_F(Faults, ForkVforkPosixSpawnWhileAnArenaIsHeld) {
  unsigned char **blocks = Outside<unsigned char *>(kBlocks);
  FillBlocks(blocks);
  std::string soak = SoakPath();
  ASSERT_EQ(access(soak.c_str(), X_OK), 0) << soak;
  for (const mv_backend *b : MovingBackends()) {
    for (const char *how : {"fork", "vfork", "posix_spawn"}) {
      SCOPED_TRACE(std::string(b->name) + ", " + how);
      // After a fork the pages are shared until written, and the move
      // backend refuses to move shared pages: written again here
      // (the same bytes), they are the parent's alone.
      RewriteBlocks(blocks);
      std::atomic<int> request{0};    // 1: go
      std::atomic<bool> done{false};  // the call returned in the parent
      std::atomic<uint64_t> returned_ns{0}, hook_end_ns{0};
      pid_t child = -1;
      std::thread spawner([&] {
        while (request.load() == 0) usleep(200);
        if (!strcmp(how, "fork")) {
          child = fork();
          if (child == 0) {
            size_t bad = BadBlocks(blocks, nullptr);
            std::vector<void *> ps;
            for (int i = 0; i < 10000; i++) ps.push_back(malloc(i % 1000 + 1));
            for (void *p : ps) free(p);
            int rc = movalloc_compact(MOVALLOC_COMPACT_ALL);
            _exit(bad == 0 && rc >= 0 ? 0 : 1);
          }
        } else if (!strcmp(how, "vfork")) {
          child = vfork();
          if (child == 0) _exit(BadBlocks(blocks, nullptr) == 0 ? 0 : 1);
        } else {
          const char *argv[] = {soak.c_str(), "--seconds", "1", "--threads", "2",
                                "--live", "500", "--min-migrations", "1", nullptr};
          std::vector<char *> env;
          for (char **e = environ; *e; e++)
            if (strncmp(*e, "MOVALLOC_", 9)) env.push_back(*e);
          char stress[] = "MOVALLOC_COMPACT_STRESS=1";
          env.push_back(stress);
          env.push_back(nullptr);
          if (posix_spawn(&child, argv[0], nullptr, nullptr, (char **)argv, env.data()) != 0)
            child = -1;
        }
        returned_ns = NowNs();
        done = true;
      });
      uintptr_t arena = ArenaOf(blocks[kBlocks / 2]);
      std::atomic<bool> fired{false}, done_while_held{false};
      on_hold = [&](uintptr_t start) {
        if (start != arena || fired) return;
        fired = true;
        request = 1;
        // Up to 2 s for the call to return while the arena is held (fork is
        // expected not to, until the engine lets go).
        for (int i = 0; i < (strcmp(how, "fork") ? 2000 : 50) && !done; i++) usleep(1000);
        done_while_held = done.load();
        hook_end_ns = NowNs();
      };
      mv_backend hooked = Hooked(b);
      mv_engine_use_backend(&hooked, MV_STEP_NONE);
      for (int round = 0; round < 20 && !fired; round++) movalloc_compact(MOVALLOC_COMPACT_ALL);
      mv_engine_use_backend(saved_, MV_STEP_NONE);
      on_hold = nullptr;
      request = 1;
      spawner.join();
      EXPECT_TRUE(fired.load());
      ASSERT_GT(child, 0);
      if (!strcmp(how, "fork")) {
        EXPECT_FALSE(done_while_held.load()) << "fork() went ahead during a hold";
        EXPECT_GE(returned_ns.load(), hook_end_ns.load());
      } else {
        EXPECT_TRUE(done_while_held.load()) << how << " waited for the hold";
      }
      int status = -1;
      ASSERT_EQ(waitpid(child, &status, 0), child);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << how << " child: " << status;
      EXPECT_EQ(BadBlocks(blocks, nullptr), 0u);
    }
  }
  for (int i = 0; i < kBlocks; i++) free(blocks[i]);
  munmap(blocks, kBlocks * sizeof(unsigned char *));
}

}  // namespace
