// The compactor's policy: the CPU budget (token bucket), the pressure signal and
// purge rule, partial release inside arenas (faked madvise), its options, and
// released arenas coming back before the heap grows.
#include <gtest/gtest.h>
#include <string.h>
#include <dirent.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <set>
#include <string>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
#include "compactor/mv_engine.h"
#include "compactor/mv_policy.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
}

namespace {

constexpr uint64_t kMs = 1000000;
constexpr uint64_t kS = 1000 * kMs;

TEST(Budget, StartsFullAndEarnsPctOfWallTimeUpToTheWindow) {
  struct mv_cpu_budget b;
  mv_budget_init(&b, 2, 300 * kS);
  EXPECT_EQ(b.credit_ns, (int64_t)(6 * kS));  // 2% of 300 s
  mv_budget_spend(&b, 5 * kS);
  EXPECT_EQ(b.credit_ns, (int64_t)(1 * kS));
  mv_budget_earn(&b, 10 * kS);  // 2% of 10 s
  EXPECT_EQ(b.credit_ns, (int64_t)(1 * kS + 200 * kMs));
  mv_budget_earn(&b, 1000 * kS);  // capped at the window
  EXPECT_EQ(b.credit_ns, (int64_t)(6 * kS));
}

TEST(Budget, MovesWhatTheCreditPaysForWithinTheCap) {
  struct mv_cpu_budget b;
  mv_budget_init(&b, 2, 300 * kS);
  EXPECT_EQ(mv_budget_moves(&b, 4 * kMs, 256), 256);   // 6 s / 4 ms = 1500, capped
  mv_budget_spend(&b, 6 * kS - 40 * kMs);
  EXPECT_EQ(mv_budget_moves(&b, 4 * kMs, 256), 10);    // 40 ms / 4 ms
  mv_budget_spend(&b, 39 * kMs);
  EXPECT_EQ(mv_budget_moves(&b, 4 * kMs, 256), 1);     // some credit: one move
  mv_budget_spend(&b, 2 * kMs);                         // overspent
  EXPECT_EQ(mv_budget_moves(&b, 4 * kMs, 256), 0);
  // An overspent round is paid back before the next move: 1 ms owed, 2% of
  // 50 ms earned is exactly 1 ms: still nothing.
  mv_budget_earn(&b, 50 * kMs);
  EXPECT_EQ(b.credit_ns, 0);
  EXPECT_EQ(mv_budget_moves(&b, 4 * kMs, 256), 0);
}

TEST(Budget, AveragesAtMostPctOverALongRun) {
  // A compactor that always has work spends whatever it may, each move
  // costing 3 ms, one round a second for an hour.
  struct mv_cpu_budget b;
  mv_budget_init(&b, 2, 300 * kS);
  uint64_t spent = 0;
  for (int s = 0; s < 3600; s++) {
    mv_budget_earn(&b, kS);
    int n = mv_budget_moves(&b, 3 * kMs, 256);
    mv_budget_spend(&b, (uint64_t)n * 3 * kMs);
    spent += (uint64_t)n * 3 * kMs;
  }
  // At most 2% of the hour plus the initial credit (6 s), plus one move.
  EXPECT_LE(spent, 3600 * kS / 50 + 6 * kS + 3 * kMs);
  EXPECT_GE(spent, 3600 * kS / 50);  // and it does use its budget
}

const char kMeminfo[] =
    "MemTotal:       24000000 kB\n"
    "MemFree:         1000000 kB\n"
    "MemAvailable:    1100000 kB\n"
    "Buffers:            1000 kB\n";

TEST(Pressure, ParsesMeminfo) {
  uint64_t avail = 0, total = 0;
  ASSERT_TRUE(mv_policy_parse_meminfo(kMeminfo, &avail, &total));
  EXPECT_EQ(avail, 1100000u);
  EXPECT_EQ(total, 24000000u);
  EXPECT_FALSE(mv_policy_parse_meminfo("MemTotal: 5 kB\nMemFree: 1 kB\n", &avail, &total));
  EXPECT_FALSE(mv_policy_parse_meminfo("", &avail, &total));
}

TEST(Pressure, IsAvailableBelowThePercentOfTotal) {
  EXPECT_TRUE(mv_policy_under_pressure(1100000, 24000000, 5));    // 4.6% < 5%
  EXPECT_FALSE(mv_policy_under_pressure(1100000, 24000000, 4));   // 4.6% >= 4%
  EXPECT_FALSE(mv_policy_under_pressure(1200000, 24000000, 5));   // exactly 5%
}

int pressure_reads;
bool Pressured() { return ++pressure_reads, true; }
bool Relaxed() { return ++pressure_reads, false; }

TEST(Purge, RuleFollowsTheMode) {
  pressure_reads = 0;
  EXPECT_FALSE(mv_policy_should_purge(MV_PURGE_NEVER, Pressured));
  EXPECT_TRUE(mv_policy_should_purge(MV_PURGE_ALWAYS, Relaxed));
  EXPECT_EQ(pressure_reads, 0) << "never and always do not read /proc/meminfo";
  EXPECT_TRUE(mv_policy_should_purge(MV_PURGE_PRESSURE, Pressured));
  EXPECT_FALSE(mv_policy_should_purge(MV_PURGE_PRESSURE, Relaxed));
  EXPECT_EQ(pressure_reads, 2);
}

TEST(Purge, OptionsParse) {
  struct mv_options saved = mv_options;
  const char *env[] = {"MOVALLOC_PURGE=always", "MOVALLOC_PURGE_FREE_PCT=20",
                       "MOVALLOC_COMPACT_CPU=5", "MOVALLOC_COMPACT_DENSITY=95", nullptr};
  mv_options_load(const_cast<char *const *>(env));
  EXPECT_EQ(mv_options.purge, MV_PURGE_ALWAYS);
  EXPECT_EQ(mv_options.purge_free_pct, 20u);
  EXPECT_EQ(mv_options.compact_cpu_pct, 5u);
  EXPECT_EQ(mv_options.compact_density, 95u);
  const char *bad[] = {"MOVALLOC_PURGE=sometimes", "MOVALLOC_COMPACT_CPU=0",
                       "MOVALLOC_COMPACT_DENSITY=101", nullptr};
  mv_options_load(const_cast<char *const *>(bad));  // reported on stderr, defaults kept
  EXPECT_EQ(mv_options.purge, MV_PURGE_PRESSURE);
  EXPECT_EQ(mv_options.compact_cpu_pct, 2u);
  EXPECT_EQ(mv_options.compact_density, 88u);
  mv_options = saved;
}

// Every MADV_DONTNEED, recorded, then done for real.
struct Advice {
  uintptr_t addr;
  size_t len;
};
std::vector<Advice> *dontneeds;
int RecordingMadvise(void *addr, size_t len, int advice) {
  if (advice == MADV_DONTNEED && dontneeds) dontneeds->push_back({(uintptr_t)addr, len});
  return mv_prim_real.madvise(addr, len, advice);
}

// The madvise calls that fell inside arena a.
std::vector<Advice> Inside(const std::vector<Advice> &all, const mv_arena_t *a) {
  uintptr_t base = mv_heap_base + ((uintptr_t)a->index << MV_ARENA_SHIFT);
  std::vector<Advice> in;
  for (const Advice &d : all)
    if (d.addr >= base && d.addr < base + MV_ARENA_SIZE) in.push_back({d.addr - base, d.len});
  return in;
}

// A run of n slices at the start of a fresh arena: fills the room left in the
// test process's own arenas first (those pages go into *filler).
mv_page_t *FreshArenaRun(unsigned n, std::vector<mv_page_t *> *filler) {
  bool zeroed;
  for (;;) {
    mv_page_t *p = mv_arena_alloc_slices(n, &zeroed);
    if (p->start % MV_ARENA_SIZE == 0 && mv_arena_of(p->start)->free_count == MV_SLICES - n)
      return p;
    filler->push_back(p);
  }
}

// One arena taken whole by three runs: slices 0-7 (p[0]), 8-15 (p[1]) and
// 16-31 (p[2]), every byte written with fill.
struct ThreeRuns {
  mv_page_t *p[3];
  mv_arena_t *arena;
};

ThreeRuns FillOneArena(int fill, std::vector<mv_page_t *> *filler) {
  bool zeroed;
  ThreeRuns r;
  r.p[0] = FreshArenaRun(8, filler);
  r.arena = mv_arena_of(r.p[0]->start);
  r.p[1] = mv_arena_alloc_slices(8, &zeroed);
  r.p[2] = mv_arena_alloc_slices(16, &zeroed);
  EXPECT_EQ(mv_arena_of(r.p[1]->start), r.arena);
  EXPECT_EQ(mv_arena_of(r.p[2]->start), r.arena);
  EXPECT_EQ(r.p[1]->start - r.p[0]->start, 8 * MV_SLICE_SIZE);
  for (mv_page_t *p : r.p) memset((void *)p->start, fill, p->slice_count * MV_SLICE_SIZE);
  return r;
}

TEST(Purge, ReleasesExactlyTheDirtyFreeSlicesOfActiveArenas) {
  bool zeroed;
  std::vector<mv_page_t *> filler;
  // One arena: slices 0-7 in use, 8-15 freed after being written, 16-31 in use.
  ThreeRuns r = FillOneArena(0xab, &filler);
  ASSERT_FALSE(HasFailure());
  mv_page_t *p0 = r.p[0], *p1 = r.p[1], *p2 = r.p[2];
  mv_arena_t *a = r.arena;
  mv_arena_free_slices(p1);
  a->thp = true;  // as if the compactor had moved it: the purge must say it no longer is

  std::vector<Advice> calls;
  dontneeds = &calls;
  struct mv_prim fake = mv_prim_real;
  fake.madvise = RecordingMadvise;
  mv_prim_set(&fake);
  size_t purged = mv_arena_purge();
  mv_prim_reset();
  dontneeds = nullptr;

  std::vector<Advice> in = Inside(calls, a);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].addr, 8 * MV_SLICE_SIZE);
  EXPECT_EQ(in[0].len, 8 * MV_SLICE_SIZE);
  EXPECT_GE(purged, 8 * MV_SLICE_SIZE);
  EXPECT_FALSE(a->thp) << "a partial release breaks the huge page";
  EXPECT_EQ(a->zero_mask & 0xff00u, 0xff00u) << "purged slices are known zero";
  EXPECT_EQ(((unsigned char *)p1->start)[100], 0) << "the memory went back";
  EXPECT_EQ(((unsigned char *)p0->start)[100], 0xab) << "live slices untouched";
  EXPECT_EQ(((unsigned char *)p2->start)[100], 0xab);

  // Again: nothing dirty is left in this arena, so no call for it.
  calls.clear();
  dontneeds = &calls;
  mv_prim_set(&fake);
  mv_arena_purge();
  mv_prim_reset();
  dontneeds = nullptr;
  EXPECT_TRUE(Inside(calls, a).empty());

  // A zeroed slice handed out again is reported zeroed (no memset needed).
  mv_page_t *p3 = mv_arena_alloc_slices(8, &zeroed);
  if (mv_arena_of(p3->start) == a) {
    EXPECT_TRUE(zeroed);
  }
  for (mv_page_t *p : {p0, p2, p3}) mv_arena_free_slices(p);
  for (mv_page_t *p : filler) mv_arena_free_slices(p);
}

TEST(Purge, LeavesIsolatedArenasAlone) {
  bool zeroed;
  std::vector<mv_page_t *> filler;
  mv_page_t *p0 = FreshArenaRun(16, &filler);
  mv_arena_t *a = mv_arena_of(p0->start);
  mv_page_t *p1 = mv_arena_alloc_slices(16, &zeroed);
  ASSERT_EQ(mv_arena_of(p1->start), a);
  memset((void *)p1->start, 1, 16 * MV_SLICE_SIZE);
  mv_arena_free_slices(p1);
  ASSERT_TRUE(mv_arena_isolate(a));

  std::vector<Advice> calls;
  dontneeds = &calls;
  struct mv_prim fake = mv_prim_real;
  fake.madvise = RecordingMadvise;
  mv_prim_set(&fake);
  mv_arena_purge();
  mv_prim_reset();
  dontneeds = nullptr;
  EXPECT_TRUE(Inside(calls, a).empty()) << "the engine may be moving it";
  mv_arena_unisolate(a, false);
  mv_arena_free_slices(p0);
  for (mv_page_t *p : filler) mv_arena_free_slices(p);
}

TEST(Release, ReleasedArenasAreReusedBeforeTheHeapGrows) {
  bool zeroed;
  mv_page_t *p = mv_arena_alloc_slices(MV_SLICES, &zeroed);  // a whole arena
  uint32_t index = mv_arena_of(p->start)->index;
  mv_arena_free_slices(p);
  while (mv_arena_trim() > 0) {
  }  // every cached empty arena goes back to the kernel
  ASSERT_FALSE(mv_arenas[index].committed);
  uint32_t frontier = mv_arena_frontier();
  mv_page_t *q = mv_arena_alloc_slices(MV_SLICES, &zeroed);
  EXPECT_EQ(mv_arena_frontier(), frontier) << "no new arena while a released one is free";
  EXPECT_LE(mv_arena_of(q->start)->index, index) << "lowest free index first";
  EXPECT_TRUE(zeroed) << "a released arena reads as zero";
  mv_arena_free_slices(q);
}

TEST(Purge, TheCompactorMovesAPurgedArenaBackOnceItIsDenseAgain) {
  struct movalloc_stats st;
  movalloc_stats_get(&st);
  if (strcmp(st.backend, "off") == 0) GTEST_SKIP() << "no migration backend: " << st.backend_reason;
  bool zeroed;
  std::vector<mv_page_t *> filler;
  ThreeRuns r = FillOneArena(7, &filler);
  ASSERT_FALSE(HasFailure());
  mv_page_t *p0 = r.p[0], *p1 = r.p[1], *p2 = r.p[2];
  mv_arena_t *a = r.arena;
  movalloc_compact(0);
  ASSERT_TRUE(a->thp) << "a dense arena moves onto a huge page";

  mv_arena_free_slices(p1);
  mv_arena_purge();  // a quarter of it goes back: no longer huge, and too sparse to move
  EXPECT_FALSE(a->thp);
  movalloc_compact(0);
  EXPECT_FALSE(a->thp) << "75% resident is below MOVALLOC_COMPACT_DENSITY (88%)";

  mv_page_t *p3 = mv_arena_alloc_slices(8, &zeroed);  // the fullest arena with room: a
  ASSERT_EQ(mv_arena_of(p3->start), a);
  memset((void *)p3->start, 9, 8 * MV_SLICE_SIZE);
  movalloc_compact(0);
  EXPECT_TRUE(a->thp) << "dense again: repaired";
  EXPECT_EQ(((unsigned char *)p0->start)[4096], 7);
  EXPECT_EQ(((unsigned char *)p3->start)[4096], 9);
  for (mv_page_t *p : {p0, p2, p3}) mv_arena_free_slices(p);
  for (mv_page_t *p : filler) mv_arena_free_slices(p);
}

// VmFlags of the VMA holding addr, from /proc/self/smaps ("" if not found).
std::string VmFlagsAt(uintptr_t addr) {
  FILE *f = fopen("/proc/self/smaps", "r");
  char line[512];
  bool inside = false;
  std::string flags;
  while (f && fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
      inside = addr >= lo && addr < hi;
    } else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
      flags = line + 8;
      break;
    }
  }
  if (f) fclose(f);
  return flags;
}

TEST(Placement, AutoAsksForHugePagesAtFaultOnlyBeyondTheFirstArenas) {
  if (mv_options.thp != MV_THP_AUTO) GTEST_SKIP() << "MOVALLOC_THP is not auto here";
  bool zeroed;
  std::vector<mv_page_t *> whole;
  while (mv_arena_frontier() < MV_THP_AUTO_FROM + 4)
    whole.push_back(mv_arena_alloc_slices(MV_SLICES, &zeroed));
  uintptr_t low = mv_heap_base + ((uintptr_t)(MV_THP_AUTO_FROM - 1) << MV_ARENA_SHIFT);
  uintptr_t high = mv_heap_base + ((uintptr_t)(MV_THP_AUTO_FROM + 1) << MV_ARENA_SHIFT);
  EXPECT_EQ(VmFlagsAt(low).find(" hg"), std::string::npos) << VmFlagsAt(low);
  EXPECT_NE(VmFlagsAt(high).find(" hg"), std::string::npos) << VmFlagsAt(high);
  for (mv_page_t *p : whole) mv_arena_free_slices(p);
}

// Threads of this process named movalloc-cmpct.
int CompactorThreads() {
  int n = 0;
  DIR *d = opendir("/proc/self/task");
  while (struct dirent *e = d ? readdir(d) : nullptr) {
    if (e->d_name[0] == '.') continue;
    char path[320], name[32] = "";
    snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    FILE *f = fopen(path, "r");
    if (f && fgets(name, sizeof name, f)) n += strncmp(name, "movalloc-cmpct", 14) == 0;
    if (f) fclose(f);
  }
  if (d) closedir(d);
  return n;
}

// body() in a fork child: its exit status, -1 if it did not exit.
int ExitStatusOfChild(const std::function<int()> &body) {
  pid_t pid = fork();
  if (pid == 0) _exit(body());
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

TEST(Compactor, StopsAtForkAndStartsAgainInTheChild) {
  if (!mv_options.compact) GTEST_SKIP() << "MOVALLOC_COMPACT=0 here";
  std::vector<void *> big;
  for (int i = 0; i < 12 && !mv_compactor_running(); i++) big.push_back(malloc(3 << 20));
  ASSERT_TRUE(mv_compactor_running());
  for (int i = 0; i < 100 && CompactorThreads() == 0; i++) usleep(10000);
  ASSERT_EQ(CompactorThreads(), 1);
  int status = ExitStatusOfChild([] {
    int code = 0;
    if (mv_compactor_running() || CompactorThreads() != 0) code = 1;  // none in the child
    void *volatile p = malloc(3 << 20);  // the heap grows: the next poke starts one
    if (!mv_compactor_running()) code = 2;
    for (int i = 0; i < 100 && CompactorThreads() == 0; i++) usleep(10000);
    if (CompactorThreads() != 1) code = 3;
    if (code == 3) system("grep . /proc/$PPID/task/*/comm /proc/self/task/*/comm >&2; echo child $$ >&2");
    free(p);
    return code;
  });
  EXPECT_EQ(status, 0) << "1: a compactor in the child at once, 2: not restarted, 3: no thread";
  for (void *p : big) free(p);
}

// Descriptors open in this process (the listing's own left out).
std::set<int> OpenFds() {
  std::set<int> fds;
  DIR *d = opendir("/proc/self/fd");
  while (struct dirent *e = d ? readdir(d) : nullptr)
    if (e->d_name[0] != '.' && atoi(e->d_name) != dirfd(d)) fds.insert(atoi(e->d_name));
  if (d) closedir(d);
  return fds;
}

// Every descriptor the compactor uses is opened by the thread that starts it,
// inside that thread's malloc: a descriptor is born at the lowest free number
// before it moves high, and on the compactor's own thread that instant could
// fall inside a listing the program makes of its descriptors. In a fork child
// (no compactor yet, the parent's descriptors not its own), stressed so that
// every round moves arenas, with the backend chosen as under
// MOVALLOC_COMPACT_STRESS from the start: nothing opened after the start stays
// open.
TEST(Compactor, ItsThreadOpensNoDescriptor) {
  if (!mv_options.compact) GTEST_SKIP() << "MOVALLOC_COMPACT=0 here";
  struct movalloc_stats st;
  movalloc_stats_get(&st);  // chooses the backend, as start-up does under stress
  int status = ExitStatusOfChild([] {
    mv_options.compact_stress = true;
    void *volatile p = malloc(3 << 20);  // the heap grows: the poke starts the compactor
    if (!mv_compactor_running()) return 2;
    std::set<int> at_start = OpenFds();
    for (int i = 0; i < 100 && CompactorThreads() == 0; i++) usleep(10000);
    usleep(300 * 1000);  // 30 rounds or so
    int code = 0;
    for (int fd : OpenFds()) {
      if (at_start.count(fd)) continue;
      char link[128] = "", path[64];
      snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
      if (readlink(path, link, sizeof link - 1) < 0) continue;
      fprintf(stderr, "opened by the compactor's thread: fd %d -> %s\n", fd, link);
      code = 1;
    }
    free(p);
    return code;
  });
  EXPECT_EQ(status, 0) << "1: the compactor's thread opened descriptors (above), "
                          "2: no compactor started";
}

}  // namespace
