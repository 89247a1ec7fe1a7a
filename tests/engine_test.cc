// The migration engine: compaction of movalloc's own arenas onto huge pages
// with every byte kept, third-party regions with vetoes, failures ending in
// putback, and writers running throughout.
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h" /* MADV_COLLAPSE, for glibc 2.36 */
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
}
#include "tests/khugepaged.h"

namespace {

struct movalloc_stats Stats() {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  return s;
}

// The backend the engine picked on this machine; tests that need one moving
// memory skip (with the reason) where the kernel offers none.
bool HaveMovingBackend(std::string *why) {
  struct movalloc_stats s = Stats();
  *why = std::string(s.backend) + ": " + s.backend_reason;
  return strcmp(s.backend, "off") != 0;
}

// AnonHugePages of /proc/self/smaps inside [lo, hi), in kB.
long AnonHugeKb(uintptr_t lo, uintptr_t hi) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  long total = 0;
  bool inside = false;
  while (std::getline(smaps, line)) {
    unsigned long a, b;
    if (sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 && line.find(':') > 12) {
      inside = a < hi && b > lo;
      continue;
    }
    long kb;
    if (inside && sscanf(line.c_str(), "AnonHugePages: %ld kB", &kb) == 1) total += kb;
  }
  return total;
}

unsigned char Pattern(uintptr_t addr) { return (unsigned char)((addr * 0x9e3779b1u) >> 11); }

TEST(Engine, CompactionPutsDenseArenasOnHugePagesAndKeepsEveryByte) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << "no migration backend here: " << why;
  // Dense arenas of 4 KiB pages: 24 MiB of 200-byte blocks, every byte patterned.
  std::vector<unsigned char *> blocks;
  for (int i = 0; i < 120000; i++) {
    unsigned char *p = (unsigned char *)malloc(200);
    for (int k = 0; k < 200; k++) p[k] = Pattern((uintptr_t)(p + k));
    blocks.push_back(p);
  }
  uintptr_t lo = mv_heap_base, hi = mv_heap_base + atomic_load(&mv_heap_limit);
  long before = AnonHugeKb(lo, hi);
  struct movalloc_stats s0 = Stats();
  int moved = movalloc_compact(0);
  struct movalloc_stats s1 = Stats();
  ASSERT_GT(moved, 5) << why;
  EXPECT_EQ(s1.migrated - s0.migrated, (uint64_t)moved);
  EXPECT_GE(s1.bytes_moved - s0.bytes_moved, (uint64_t)moved * MV_ARENA_SIZE);
  EXPECT_GE(AnonHugeKb(lo, hi), before + moved * 2048L);
  EXPECT_GE(s1.huge_page_bytes, (uint64_t)moved * MV_ARENA_SIZE);
  size_t bad = 0;
  for (unsigned char *p : blocks)
    for (int k = 0; k < 200; k++) bad += p[k] != Pattern((uintptr_t)(p + k));
  EXPECT_EQ(bad, 0u);
  // Moved arenas keep serving allocations and frees.
  for (unsigned char *p : blocks) free(p);
  // A second compaction finds nothing new to move.
  EXPECT_EQ(movalloc_compact(0), 0);
}

TEST(Engine, WritersKeepRunningDuringCompaction) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  const int n = 64 * 1024;
  std::vector<long *> counters;
  for (int i = 0; i < n; i++) counters.push_back((long *)calloc(1, 64));
  std::atomic<bool> stop{false};
  std::atomic<long> increments{0};
  std::thread writer([&] {
    long local = 0;
    for (unsigned i = 0; !stop; i++, local++) (*counters[(i * 7919u) % n])++;
    increments = local;
  });
  int moved = 0;
  for (int round = 0; round < 4; round++) moved += movalloc_compact(MOVALLOC_COMPACT_ALL);
  stop = true;
  writer.join();
  long sum = 0;
  for (long *c : counters) sum += *c;
  EXPECT_EQ(sum, increments.load()) << "a write was lost during migration";
  EXPECT_GT(moved, 0);
  for (long *c : counters) free(c);
}

// A region whose owner vetoes moves while "pinned".
struct Region {
  unsigned char *base = nullptr;
  std::atomic<bool> pinned{false};
  std::atomic<int> isolations{0}, migrations{0}, putbacks{0};
};

bool RegionIsolate(void *ctx, void *start, size_t len) {
  Region *r = (Region *)ctx;
  if (r->pinned) return false;
  r->isolations++;
  return true;
}

int RegionMigrate(void *ctx, struct movalloc_migration *m) {
  Region *r = (Region *)ctx;
  r->migrations++;
  EXPECT_EQ(movalloc_compact(0), -EBUSY);  // no compaction from inside a callback
  return movalloc_migration_move(m);
}

void RegionPutback(void *ctx, void *start, size_t len) { ((Region *)ctx)->putbacks++; }

const struct movalloc_movable_ops kRegionOps = {RegionIsolate, RegionMigrate, RegionPutback};

unsigned char *MapAligned(size_t len) {
  void *map = mmap(nullptr, len + MV_ARENA_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uintptr_t start = ((uintptr_t)map + MV_ARENA_SIZE - 1) & ~(MV_ARENA_SIZE - 1);
  madvise((void *)start, len, MADV_NOHUGEPAGE);  // built from 4 KiB pages
  for (size_t i = 0; i < len; i++) ((unsigned char *)start)[i] = Pattern(start + i);
  madvise((void *)start, len, MADV_HUGEPAGE);
  return (unsigned char *)start;
}

TEST(Engine, RegionOwnerVetoesWhilePinnedAndAllowsLater) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  mvtest::KhugepagedWatch khugepaged;
  Region r;
  r.base = MapAligned(2 * MV_ARENA_SIZE);
  ASSERT_EQ(movalloc_region_register(r.base, 2 * MV_ARENA_SIZE, &kRegionOps, &r), 0);
  r.pinned = true;
  uint64_t refused0 = Stats().isolate_refused;
  int pinned = khugepaged.ToMove((uintptr_t)r.base, 2);
  movalloc_compact(0);
  EXPECT_EQ(r.migrations.load(), 0);
  EXPECT_GE(Stats().isolate_refused, refused0 + pinned);
  EXPECT_TRUE(khugepaged.Small((uintptr_t)r.base));
  r.pinned = false;
  int to_move = khugepaged.ToMove((uintptr_t)r.base, 2);
  movalloc_compact(0);
  EXPECT_EQ(r.isolations.load(), to_move);
  EXPECT_EQ(r.migrations.load(), to_move);
  EXPECT_EQ(r.putbacks.load(), 0);
  EXPECT_EQ(mv_thp_is_huge((uintptr_t)r.base), 1);
  EXPECT_EQ(mv_thp_is_huge((uintptr_t)r.base + MV_ARENA_SIZE), 1);
  for (size_t i = 0; i < 2 * MV_ARENA_SIZE; i++)
    ASSERT_EQ(r.base[i], Pattern((uintptr_t)r.base + i)) << i;
  EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  EXPECT_EQ(movalloc_region_unregister(r.base), -ENOENT);
}

// A signal that comes to the thread running the engine (a program's
// movalloc_compact) while an arena's writers are held is handled once they are
// released: a handler that wrote the arena inside would wait for the engine,
// that is for itself. The region's migrate callback raises it inside; a
// watchdog ends the process if the handler hangs there.
volatile sig_atomic_t handled_inside = -1;
std::atomic<bool> inside{false};
unsigned char *signal_target;

void WritingHandler(int) {
  handled_inside = inside.load();
  signal_target[0] ^= 0xff;
}

int RaisingMigrate(void *ctx, struct movalloc_migration *m) {
  ((Region *)ctx)->migrations++;
  inside = true;
  pthread_kill(pthread_self(), SIGUSR2);
  int rc = movalloc_migration_move(m);
  inside = false;
  return rc;
}

const struct movalloc_movable_ops kRaisingOps = {RegionIsolate, RaisingMigrate, RegionPutback};

TEST(Engine, ASignalInsideTheWindowIsHandledAfterIt) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  struct sigaction sa = {}, old;
  sa.sa_handler = WritingHandler;
  ASSERT_EQ(sigaction(SIGUSR2, &sa, &old), 0);
  Region r;
  r.base = MapAligned(MV_ARENA_SIZE);
  signal_target = r.base;
  ASSERT_EQ(movalloc_region_register(r.base, MV_ARENA_SIZE, &kRaisingOps, &r), 0);
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    for (int i = 0; i < 300 && !done; i++) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!done) {
      fprintf(stderr, "engine_test: the signal handler hangs inside the window\n");
      _exit(1);
    }
  });
  movalloc_compact(MOVALLOC_COMPACT_ALL);
  done = true;
  watchdog.join();
  EXPECT_GE(r.migrations.load(), 1) << "the region never moved: nothing tested";
  EXPECT_EQ(handled_inside, 0) << "-1: never handled; 1: handled inside the window";
  EXPECT_EQ(r.base[0], (unsigned char)(Pattern((uintptr_t)r.base) ^ 0xff));
  for (size_t i = 1; i < MV_ARENA_SIZE; i++)
    ASSERT_EQ(r.base[i], Pattern((uintptr_t)r.base + i)) << i;
  EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  sigaction(SIGUSR2, &old, nullptr);
}

TEST(Engine, RegionRegistrationIsValidated) {
  Region r;
  unsigned char *base = MapAligned(MV_ARENA_SIZE);
  EXPECT_EQ(movalloc_region_register(base + 4096, MV_ARENA_SIZE, &kRegionOps, &r), -EINVAL);
  EXPECT_EQ(movalloc_region_register(base, 4096, &kRegionOps, &r), -EINVAL);
  EXPECT_EQ(movalloc_region_register(base, MV_ARENA_SIZE, nullptr, &r), -EINVAL);
  EXPECT_EQ(movalloc_region_register((void *)mv_heap_base, MV_ARENA_SIZE, &kRegionOps, &r),
            -EINVAL);  // movalloc's own heap
  ASSERT_EQ(movalloc_region_register(base, MV_ARENA_SIZE, &kRegionOps, &r), 0);
  EXPECT_EQ(movalloc_region_register(base, MV_ARENA_SIZE, &kRegionOps, &r), -EINVAL);  // overlap
  EXPECT_EQ(movalloc_region_unregister(base), 0);
}

TEST(Engine, InjectedFailuresEndInPutbackWithDataIntact) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  const struct mv_backend *b = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0);
  for (enum mv_move_step step : {MV_STEP_STAGE, MV_STEP_SWAP}) {
    Region r;
    r.base = MapAligned(MV_ARENA_SIZE);
    ASSERT_EQ(movalloc_region_register(r.base, MV_ARENA_SIZE, &kRegionOps, &r), 0);
    mv_engine_use_backend(b, step);
    struct movalloc_stats s0 = Stats();
    EXPECT_EQ(movalloc_compact(0), 0);
    struct movalloc_stats s1 = Stats();
    mv_engine_use_backend(b, MV_STEP_NONE);
    if (step == MV_STEP_STAGE) {
      EXPECT_EQ(r.isolations.load(), 0) << "nothing is isolated without a huge page";
      EXPECT_GT(s1.staging_failed, s0.staging_failed);
    } else {
      EXPECT_EQ(r.putbacks.load(), r.migrations.load());
      EXPECT_GT(s1.migrate_failed, s0.migrate_failed);
    }
    for (size_t i = 0; i < MV_ARENA_SIZE; i++)
      ASSERT_EQ(r.base[i], Pattern((uintptr_t)r.base + i)) << i;
    EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  }
}

// When the kernel has no huge page to stage onto (fragmented memory), a call
// stops after a few staging failures in a row instead of paying a failed THP
// fault for every arena in every pass; the next call tries again.
TEST(Engine, StagingFailuresInARowEndTheCall) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  const struct mv_backend *b = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0);
  if (b->kind == MV_BACKEND_COLLAPSE) GTEST_SKIP() << "collapse stages nothing";
  const size_t arenas = 16;
  Region r;
  r.base = MapAligned(arenas * MV_ARENA_SIZE);
  ASSERT_EQ(movalloc_region_register(r.base, arenas * MV_ARENA_SIZE, &kRegionOps, &r), 0);
  mv_engine_use_backend(b, MV_STEP_STAGE);
  for (int call = 0; call < 2; call++) {
    struct movalloc_stats s0 = Stats();
    EXPECT_EQ(movalloc_compact(0), 0);
    EXPECT_EQ(Stats().staging_failed - s0.staging_failed, 4u) << "call " << call;
  }
  mv_engine_use_backend(b, MV_STEP_NONE);
  EXPECT_EQ(r.isolations.load(), 0);
  EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  munmap(r.base, arenas * MV_ARENA_SIZE);
}

TEST(Engine, TraceHasALinePerMigration) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  std::string path = "/tmp/movalloc_trace_test_" + std::to_string(getpid()) + ".csv";
  unlink(path.c_str());
  mv_options.trace = path.c_str();
  mv_engine_trace_open();
  Region r;
  r.base = MapAligned(2 * MV_ARENA_SIZE);
  ASSERT_EQ(movalloc_region_register(r.base, 2 * MV_ARENA_SIZE, &kRegionOps, &r), 0);
  int moved = movalloc_compact(0);
  mv_options.trace = nullptr;
  mv_engine_trace_open();  // closes it
  EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  std::ifstream in(path);
  std::string header, line;
  std::getline(in, header);
  EXPECT_EQ(header, "time_ns,pid,arena,backend,outcome,rc,bytes,stall_us");
  int lines = 0, moved_lines = 0;
  while (std::getline(in, line)) {
    lines++;
    moved_lines += line.find(",moved,0,2097152,") != std::string::npos;
  }
  EXPECT_EQ(moved_lines, moved);
  EXPECT_GE(lines, 2);
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the trace is readable by its owner only";
  unlink(path.c_str());
}

// Pages shared copy-on-write with a child are not the parent's alone: the move
// backend refuses them (-EAGAIN), the arena is put back intact, and the last
// pass hands it to MADV_COLLAPSE, which copies (breaking the sharing).
TEST(Engine, SharedAfterForkIsPutBackIntactThenCollapsed) {
  const struct mv_backend *move = mv_backend_select(MV_BACKEND_MOVE, nullptr, 0);
  if (move->kind != MV_BACKEND_MOVE) GTEST_SKIP() << "no move backend on this kernel";
  const struct mv_backend *saved = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0);
  mv_engine_use_backend(move, MV_STEP_NONE);
  Region r;
  r.base = MapAligned(MV_ARENA_SIZE);
  ASSERT_EQ(movalloc_region_register(r.base, MV_ARENA_SIZE, &kRegionOps, &r), 0);
  int to_child[2];
  ASSERT_EQ(pipe(to_child), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // keeps the pages shared until told to go
    char c;
    (void)!read(to_child[0], &c, 1);
    _exit(0);
  }
  struct movalloc_stats s0 = Stats();
  int moved = movalloc_compact(0);
  struct movalloc_stats s1 = Stats();
  EXPECT_GT(s1.migrate_retries, s0.migrate_retries) << "move refused the shared pages";
  EXPECT_GT(r.putbacks.load(), 0);
  bool collapse = mv_backend_select(MV_BACKEND_COLLAPSE, nullptr, 0)->kind == MV_BACKEND_COLLAPSE;
  EXPECT_EQ(moved, collapse ? 1 : 0);
  for (size_t i = 0; i < MV_ARENA_SIZE; i++)
    ASSERT_EQ(r.base[i], Pattern((uintptr_t)r.base + i)) << i;
  (void)!write(to_child[1], "x", 1);
  int status;
  waitpid(pid, &status, 0);
  EXPECT_EQ(movalloc_region_unregister(r.base), 0);
  mv_engine_use_backend(saved, MV_STEP_NONE);
}

// fork() while another thread compacts: the prepare handler waits for the
// migration in flight; the child's heap is consistent and can compact too.
TEST(Engine, ForkWhileCompacting) {
  std::string why;
  if (!HaveMovingBackend(&why)) GTEST_SKIP() << why;
  std::vector<unsigned char *> blocks;
  for (int i = 0; i < 40000; i++) {
    unsigned char *p = (unsigned char *)malloc(300);
    for (int k = 0; k < 300; k++) p[k] = Pattern((uintptr_t)(p + k));
    blocks.push_back(p);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> moved{0};
  std::thread compactor([&] {
    while (!stop) moved += movalloc_compact(MOVALLOC_COMPACT_ALL);
  });
  for (int i = 0; i < 10; i++) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      size_t bad = 0;
      for (unsigned char *p : blocks)
        for (int k = 0; k < 300; k++) bad += p[k] != Pattern((uintptr_t)(p + k));
      for (int k = 0; k < 1000; k++) free(malloc(k + 1));
      int rc = movalloc_compact(MOVALLOC_COMPACT_ALL);  // the child's own engine
      _exit(bad == 0 && rc >= 0 ? 0 : 1);
    }
    int status;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child " << i;
  }
  stop = true;
  compactor.join();
  EXPECT_GT(moved.load(), 0);
  size_t bad = 0;
  for (unsigned char *p : blocks)
    for (int k = 0; k < 300; k++) bad += p[k] != Pattern((uintptr_t)(p + k));
  EXPECT_EQ(bad, 0u);
  for (unsigned char *p : blocks) free(p);
}

// POSIX: a process whose main thread calls pthread_exit ends (status 0, atexit
// handlers run) when its last thread does; the compactor thread must not keep
// it alive.
TEST(Engine, CompactorDoesNotKeepTheProcessAlive) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::thread([] {
      for (int i = 0; i < 200000; i++) memset(malloc(500), 1, 500);  // starts the compactor
      usleep(200 * 1000);
    }).detach();
    // pthread_exit would unwind through GoogleTest, which catches the unwind;
    // ending only this thread is what matters here.
    syscall(SYS_exit, 0);
  }
  int status = -1;
  for (int waited = 0; waited < 100 && waitpid(pid, &status, WNOHANG) == 0; waited++)
    usleep(100 * 1000);
  if (waitpid(pid, &status, WNOHANG) == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "the process was still alive 10 s after its last program thread ended";
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// The compactor's reads of every round (/proc/meminfo for the purge rule, the
// thread list for its exit check) go through descriptors it keeps at 512 and
// above: once its first rounds have opened them, a program that lists its low
// descriptors never sees one of movalloc's come and go (python's
// test_subprocess did, under stress).
TEST(Engine, CompactorRoundsOpenNoLowDescriptors) {
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    mv_options.compact = true;
    mv_options.compact_stress = true; // a round every 10 ms
    mv_options.purge = MV_PURGE_PRESSURE;
    for (int i = 0; i < 200000; i++) memset(malloc(500), 1, 500); // starts the compactor
    usleep(300 * 1000);
    bool open_before[64];
    for (int fd = 0; fd < 64; fd++) open_before[fd] = fcntl(fd, F_GETFD) != -1;
    int appeared = 0;
    for (auto end = std::chrono::steady_clock::now() + std::chrono::seconds(2);
         std::chrono::steady_clock::now() < end;)
      for (int fd = 3; fd < 64; fd++) appeared += !open_before[fd] && fcntl(fd, F_GETFD) != -1;
    _exit(appeared == 0 ? 0 : 1);
  }
  int status = -1;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "a descriptor below 64 came and went while the compactor ran (status " << status << ")";
}

TEST(Engine, OffBackendRefusesToCompact) {
  const struct mv_backend *saved = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0);
  mv_engine_use_backend(mv_backend_get(MV_BACKEND_OFF), MV_STEP_NONE);
  EXPECT_EQ(movalloc_compact(0), -ENOSYS);
  mv_engine_use_backend(saved, MV_STEP_NONE);
}

// ---- realloc of huge objects: pages moved, not copied ----

// Uses the move backend for the test's length, restoring the engine's choice.
class MoveBackend {
 public:
  MoveBackend() : saved_(mv_backend_select(MV_BACKEND_AUTO, nullptr, 0)) {
    const struct mv_backend *move = mv_backend_select(MV_BACKEND_MOVE, nullptr, 0);
    ok_ = move->kind == MV_BACKEND_MOVE;
    if (ok_) mv_engine_use_backend(move, MV_STEP_NONE);
  }
  ~MoveBackend() { mv_engine_use_backend(saved_, MV_STEP_NONE); }
  bool ok() const { return ok_; }

 private:
  const struct mv_backend *saved_;
  bool ok_;
};

// Bytes of [dst, dst + len) that differ from the pattern written at src.
size_t Mismatches(const unsigned char *dst, uintptr_t src, size_t len) {
  size_t bad = 0;
  for (size_t i = 0; i < len; i++) bad += dst[i] != Pattern(src + i);
  return bad;
}

bool AllZero(const unsigned char *p, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (p[i]) return false;
  return true;
}

// Makes each arena of [p, p + len) a huge page (len: whole arenas), keeping
// its bytes: MADV_COLLAPSE (Linux 6.1). False with the reason when the kernel
// cannot give one now.
bool MakeHuge(unsigned char *p, size_t len, std::string *why) {
  madvise(p, len, MADV_HUGEPAGE);
  for (size_t off = 0; off < len; off += MV_ARENA_SIZE) {
    if (mv_thp_is_huge((uintptr_t)p + off) == 1) continue;
    if (madvise(p + off, MV_ARENA_SIZE, MADV_COLLAPSE) != 0 ||
        mv_thp_is_huge((uintptr_t)p + off) != 1) {
      *why = std::string("no huge page to test with: MADV_COLLAPSE: ") + strerror(errno);
      return false;
    }
  }
  return true;
}

TEST(Engine, MoveSpanMovesHugePagesWhole) {
  MoveBackend backend;
  if (!backend.ok()) GTEST_SKIP() << "no move backend on this kernel";
  const size_t len = 3 * MV_ARENA_SIZE + 12345;  // a tail shorter than an arena
  unsigned char *src = MapAligned(4 * MV_ARENA_SIZE);
  std::string why;
  if (!MakeHuge(src, 3 * MV_ARENA_SIZE, &why)) GTEST_SKIP() << why;
  unsigned char *dst = MapAligned(4 * MV_ARENA_SIZE);
  madvise(dst, MV_ARENA_SIZE, MADV_DONTNEED);  // one arena empty, the others full
  struct movalloc_stats s0 = Stats();
  EXPECT_EQ(mv_engine_move_span(dst, src, len), 3 * MV_ARENA_SIZE);
  EXPECT_EQ(Stats().realloc_moved_bytes - s0.realloc_moved_bytes, 3 * MV_ARENA_SIZE);
  EXPECT_EQ(Mismatches(dst, (uintptr_t)src, len), 0u);
  for (size_t off = 0; off < 3 * MV_ARENA_SIZE; off += MV_ARENA_SIZE)
    EXPECT_EQ(mv_thp_is_huge((uintptr_t)dst + off), 1) << "arena " << off / MV_ARENA_SIZE;
  // Moved, not copied: the source's arenas hold no page any more.
  EXPECT_TRUE(AllZero(src, 3 * MV_ARENA_SIZE));
  EXPECT_EQ(Mismatches(src + 3 * MV_ARENA_SIZE, (uintptr_t)src + 3 * MV_ARENA_SIZE, 12345), 0u);
}

// Small pages are copied: into fresh memory the copy may get a huge page at
// fault time, where moved small pages would stay small.
TEST(Engine, MoveSpanCopiesSmallPages) {
  MoveBackend backend;
  if (!backend.ok()) GTEST_SKIP() << "no move backend on this kernel";
  unsigned char *src = MapAligned(2 * MV_ARENA_SIZE);
  madvise(src, 2 * MV_ARENA_SIZE, MADV_NOHUGEPAGE);
  unsigned char *dst = MapAligned(2 * MV_ARENA_SIZE);
  madvise(dst, 2 * MV_ARENA_SIZE, MADV_DONTNEED);
  EXPECT_EQ(mv_engine_move_span(dst, src, 2 * MV_ARENA_SIZE), 0u);
  EXPECT_EQ(Mismatches(dst, (uintptr_t)src, 2 * MV_ARENA_SIZE), 0u);
  EXPECT_EQ(Mismatches(src, (uintptr_t)src, 2 * MV_ARENA_SIZE), 0u);  // copied
}

// A huge page shared with a fork() child cannot change hands (UFFDIO_MOVE:
// EBUSY): it is copied, and the child keeps its own view.
TEST(Engine, MoveSpanCopiesPagesSharedWithAChild) {
  MoveBackend backend;
  if (!backend.ok()) GTEST_SKIP() << "no move backend on this kernel";
  unsigned char *src = MapAligned(MV_ARENA_SIZE);
  std::string why;
  if (!MakeHuge(src, MV_ARENA_SIZE, &why)) GTEST_SKIP() << why;
  unsigned char *dst = MapAligned(MV_ARENA_SIZE);
  madvise(dst, MV_ARENA_SIZE, MADV_DONTNEED);
  int to_child[2];
  ASSERT_EQ(pipe(to_child), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // keeps the pages shared until told to check them
    char c;
    (void)!read(to_child[0], &c, 1);
    _exit(Mismatches(src, (uintptr_t)src, MV_ARENA_SIZE) == 0 ? 0 : 1);
  }
  EXPECT_EQ(mv_engine_move_span(dst, src, MV_ARENA_SIZE), 0u);
  EXPECT_EQ(Mismatches(dst, (uintptr_t)src, MV_ARENA_SIZE), 0u);
  memset(src, 0, MV_ARENA_SIZE);  // the parent's writes stay its own
  (void)!write(to_child[1], "x", 1);
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

// A huge object hemmed in by others cannot grow in place: realloc gives it a
// new span, and its pages move there. Rounds of it, checking every byte, first
// alone, then with compactions in between (the engine lock is taken per arena,
// so a compaction may come between two arenas of one span). Returns how many
// objects were hemmed in; *huge counts those made huge pages (the ones that
// move), *why says why one could not be.
size_t HemmedInReallocs(int rounds, size_t *huge, std::string *why) {
  size_t hemmed = 0;
  for (int round = 0; round < rounds; round++) {
    size_t size = (size_t)(4 + round % 5) * MV_ARENA_SIZE;
    unsigned char *p = (unsigned char *)malloc(size);
    EXPECT_NE(p, nullptr);
    if (!p) return hemmed;
    for (size_t i = 0; i < size; i += 512) memset(p + i, Pattern((uintptr_t)p + i), 512);
    *huge += MakeHuge(p, size, why);
    // A span goes to a free run, cached arenas first, else the lowest: take
    // one-arena spans until one lands right after p (or p sits in a run that
    // ends there already).
    std::vector<void *> blockers;
    for (int k = 0; k < 64; k++) {
      blockers.push_back(malloc(MV_ARENA_SIZE));
      if (blockers.back() == p + size) break;
    }
    uintptr_t tag = (uintptr_t)p;  // the pattern follows the old address
    unsigned char *q = (unsigned char *)realloc(p, 3 * size);
    EXPECT_NE(q, nullptr);
    if (!q) return hemmed;
    hemmed += q != p;
    size_t bad = 0;
    for (size_t i = 0; i < size; i += 512)
      for (size_t k = 0; k < 512; k++) bad += q[i + k] != Pattern(tag + i);
    EXPECT_EQ(bad, 0u) << "round " << round;
    free(q);
    for (void *b : blockers) free(b);
  }
  return hemmed;
}

TEST(Engine, ReallocMovesTheHugeObjectsItCannotGrowInPlace) {
  if (mv_options.check) GTEST_SKIP() << "MOVALLOC_CHECK=1's realloc copies (check_realloc)";
  MoveBackend backend;
  if (!backend.ok()) GTEST_SKIP() << "no move backend on this kernel";
  malloc_trim(0);
  struct movalloc_stats s0 = Stats();
  size_t huge = 0;
  std::string why;
  EXPECT_GT(HemmedInReallocs(10, &huge, &why), 0u) << "no object was hemmed in: nothing was tested";
  if (huge == 0) GTEST_SKIP() << why;
  EXPECT_GT(Stats().realloc_moved_bytes, s0.realloc_moved_bytes);
}

TEST(Engine, ReallocOfHugeObjectsKeepsEveryByteBetweenCompactions) {
  MoveBackend backend;
  if (!backend.ok()) GTEST_SKIP() << "no move backend on this kernel";
  std::atomic<bool> stop{false};
  std::atomic<int> passes{0};
  std::thread compactor([&] {
    while (!stop) {
      movalloc_compact(MOVALLOC_COMPACT_ALL);
      passes++;
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });
  size_t huge = 0;
  std::string why;
  EXPECT_GT(HemmedInReallocs(30, &huge, &why), 0u);
  stop = true;
  compactor.join();
  EXPECT_GT(passes.load(), 0);
}

}  // namespace
