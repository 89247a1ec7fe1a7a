// The misuse table: every row is one kind of misuse with its documented
// outcome in the default mode and under MOVALLOC_CHECK=1, exactly as README's
// "Misuse: what happens" lists it (the last test compares the two tables).
// Every row runs in a fresh process (GoogleTest's threadsafe death-test style
// re-executes this binary), with MOVALLOC_CHECK set or unset in its
// environment, so check mode is on from start-up as it is for a user.
//
// Also here: the canaries of check mode (a write past a block is caught at
// free and realloc, no false positive anywhere else).
#include <dlfcn.h>
#include <errno.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <fstream>
#include <new>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
// glibc's own malloc, exported by libc.so.6: memory from another allocator.
void *__libc_malloc(size_t);
}

namespace {

void *Opaque(void *p) {
  asm volatile("" : "+r"(p));
  return p;
}
// Makes the writes to *p happen: without it, stores right before free(p) are
// dead to the compiler and vanish.
void Escape(void *p) { asm volatile("" : : "r"(p) : "memory"); }
size_t OpaqueSize(size_t n) {
  asm volatile("" : "+r"(n));
  return n;
}

struct movalloc_stats Stats() {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  return s;
}

// Each act performs one misuse and returns "" when everything it can observe
// afterwards is as documented, or what was not. (Under check mode most acts
// never return: the process aborts.)
typedef std::string (*Act)();

std::string Expect(bool ok, const std::string &what) { return ok ? "" : what + "; "; }

// A freed block must never be handed out twice afterwards.
std::string NoBlockTwice(size_t size) {
  std::set<void *> seen;
  std::vector<void *> blocks;
  std::string err;
  for (int i = 0; i < 1000; i++) {
    void *q = malloc(size);
    if (!seen.insert(q).second) err = "a block was handed out twice; ";
    blocks.push_back(q);
  }
  for (void *q : blocks) free(q);
  return err;
}

std::string IgnoredFree(void *p, bool is_double) {
  struct movalloc_stats before = Stats();
  free(p);
  struct movalloc_stats after = Stats();
  return Expect(is_double ? after.double_frees == before.double_frees + 1
                          : after.invalid_frees == before.invalid_frees + 1,
                std::string("not counted in ") + (is_double ? "double_frees" : "invalid_frees"));
}

std::string DoubleFreeSmall() {
  void *p = Opaque(malloc(64));
  free(p);
  return IgnoredFree(p, true) + NoBlockTwice(64);
}

// The two frees from different threads: the block sits on the other list.
std::string DoubleFreeAcrossThreads(bool owner_first) {
  void *p = Opaque(malloc(64));
  struct movalloc_stats before = Stats();
  if (owner_first) {
    free(p);
    std::thread([p] { free(p); }).join();
  } else {
    std::thread([p] { free(p); }).join();
    free(p);
  }
  return Expect(Stats().double_frees == before.double_frees + 1, "not counted in double_frees") +
         NoBlockTwice(64);
}
std::string DoubleFreeOwnerThenOther() { return DoubleFreeAcrossThreads(true); }
std::string DoubleFreeOtherThenOwner() { return DoubleFreeAcrossThreads(false); }

std::string DoubleFreeLarge() {
  void *p = Opaque(malloc(200000));
  free(p);
  return IgnoredFree(p, true) + NoBlockTwice(200000);
}

std::string DoubleFreeHuge() {
  void *p = Opaque(malloc((size_t)5 << 20));
  free(p);
  return IgnoredFree(p, true);
}

std::string FreeStack() {
  char buf[64];
  return IgnoredFree(Opaque(buf + 16), false);
}

std::string FreeGlobal() {
  static char global[64];
  return IgnoredFree(Opaque(global), false);
}

std::string FreeInReservationBeyondArenas() {
  malloc(16);  // the heap exists
  return IgnoredFree((void *)(mv_heap_base + ((size_t)512 << 30)), false);
}

std::string FreeOutsideHeap() { return IgnoredFree((void *)0x1000, false); }

std::string FreeMmap() {
  void *m = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  std::string err = IgnoredFree(m, false);
  ((char *)m)[0] = 1;  // still mapped, untouched
  munmap(m, 4096);
  return err;
}

std::string FreeGlibcBlock() {
  char *g = (char *)__libc_malloc(100);
  memset(g, 7, 100);
  std::string err = IgnoredFree(g, false);
  for (int i = 0; i < 100; i++)
    if (g[i] != 7) return err + "the glibc block was written; ";
  return err;  // the glibc block is left alone (leaked)
}

std::string FreeInteriorMisaligned() {
  char *p = (char *)Opaque(malloc(1000));
  std::string err = IgnoredFree(p + 3, false);
  free(p);
  return err;
}

std::string FreeInteriorAligned() {
  char *p = (char *)Opaque(malloc(256));
  free(p + 32);  // not checked on the fast path: p + 32 goes on the free list
  for (int i = 0; i < 10000; i++)  // once the page's other free blocks are used up
    if (malloc(256) == p + 32) return "";
  return "p + 32 was not handed out again (documented: it is)";
}

std::string FreeInteriorLarge() {
  char *p = (char *)Opaque(malloc(300000));
  std::string err = IgnoredFree(p + 4096, false);
  free(p);
  return err;
}

std::string ReallocFreedSmall() {
  void *p = Opaque(malloc(100));
  free(p);
  struct movalloc_stats before = Stats();
  errno = 0;
  void *q = realloc(p, 200);
  int e = errno;
  return Expect(q == nullptr && e == EINVAL, "realloc did not return NULL with EINVAL") +
         Expect(Stats().double_frees == before.double_frees + 1, "not counted in double_frees");
}

std::string ReallocFreedLarge() {
  void *p = Opaque(malloc(200000));
  free(p);
  struct movalloc_stats before = Stats();
  errno = 0;
  void *q = realloc(p, 300000);
  int e = errno;
  return Expect(q == nullptr && e == EINVAL, "realloc did not return NULL with EINVAL") +
         Expect(Stats().invalid_frees == before.invalid_frees + 1, "not counted in invalid_frees");
}

std::string NullWith(void *r, int e, int want, const char *call) {
  return Expect(r == nullptr && e == want,
                std::string(call) + ": want NULL errno " + std::to_string(want) + ", got " +
                    (r ? "a block" : "NULL") + " errno " + std::to_string(e));
}

#define NULL_ERRNO(call, want)          \
  do {                                  \
    errno = 0;                          \
    void *r_ = Opaque((void *)(call));  \
    int e_ = errno;                     \
    err += NullWith(r_, e_, want, #call); \
  } while (0)

std::string CallocOverflow() {
  std::string err;
  size_t half = OpaqueSize(SIZE_MAX / 2 + 1);
  NULL_ERRNO(calloc(half, 2), ENOMEM);
  NULL_ERRNO(calloc(2, half), ENOMEM);
  NULL_ERRNO(calloc(OpaqueSize(SIZE_MAX), OpaqueSize(SIZE_MAX)), ENOMEM);
  return err;
}

std::string ReallocarrayOverflow() {
  std::string err;
  size_t half = OpaqueSize(SIZE_MAX / 2 + 1);
  NULL_ERRNO(reallocarray(nullptr, half, 2), ENOMEM);
  char *p = (char *)malloc(32);
  memset(p, 5, 32);
  NULL_ERRNO(reallocarray(p, half, 2), ENOMEM);
  for (int i = 0; i < 32; i++)
    if (p[i] != 5) return err + "p was changed; ";
  free(p);  // p is still live
  return err;
}

const size_t kAbsurd[] = {SIZE_MAX, SIZE_MAX - 4096, (size_t)PTRDIFF_MAX + 1, PTRDIFF_MAX};

std::string AbsurdSizes() {
  std::string err;
  char *live = (char *)malloc(100);
  memset(live, 9, 100);
  for (size_t s : kAbsurd) {
    size_t n = OpaqueSize(s);
    NULL_ERRNO(malloc(n), ENOMEM);
    NULL_ERRNO(calloc(1, n), ENOMEM);
    NULL_ERRNO(realloc(nullptr, n), ENOMEM);
    NULL_ERRNO(realloc(live, n), ENOMEM);
    NULL_ERRNO(reallocarray(live, 1, n), ENOMEM);
    NULL_ERRNO(valloc(n), ENOMEM);
    NULL_ERRNO(pvalloc(n), ENOMEM);
    NULL_ERRNO(memalign(16, n), ENOMEM);
    NULL_ERRNO(memalign(4096, n), ENOMEM);
    NULL_ERRNO(aligned_alloc(16, n), ENOMEM);
    NULL_ERRNO(aligned_alloc((size_t)1 << 21, n), ENOMEM);
    NULL_ERRNO(operator new(n, std::nothrow), ENOMEM);
    NULL_ERRNO(operator new[](n, std::nothrow), ENOMEM);
    NULL_ERRNO(operator new(n, std::align_val_t(64), std::nothrow), ENOMEM);
  }
  for (int i = 0; i < 100; i++)
    if (live[i] != 9) return err + "a failed realloc changed the block; ";
  free(live);
  return err;
}

std::string AbsurdSizesPosixMemalignAndNew() {
  std::string err;
  for (size_t s : kAbsurd) {
    size_t n = OpaqueSize(s);
    bool threw = false;
    try {
      Opaque(operator new(n));
    } catch (const std::bad_alloc &) {
      threw = true;
    }
    err += Expect(threw, "operator new did not throw std::bad_alloc");
    void *out = (void *)0x1;
    errno = 0;
    int rc = posix_memalign(&out, 16, n);
    err += Expect(rc == ENOMEM && errno == 0 && out == (void *)0x1,
                  "posix_memalign: want ENOMEM, errno and out untouched");
  }
  return err;
}

bool Aligned(void *p, size_t a) { return p && ((uintptr_t)p & (a - 1)) == 0; }

std::string PosixMemalignBadAlignment() {
  std::string err;
  for (size_t a : {(size_t)0, (size_t)3, (size_t)4, (size_t)24, (size_t)SIZE_MAX}) {
    void *out = (void *)0x1;
    int rc = posix_memalign(&out, OpaqueSize(a), 16);
    err += Expect(rc == EINVAL && out == (void *)0x1,
                  "posix_memalign(" + std::to_string(a) + "): want EINVAL, out untouched");
  }
  for (size_t a : {(size_t)1 << 62, (size_t)1 << 63}) {
    void *out = (void *)0x1;
    int rc = posix_memalign(&out, OpaqueSize(a), 16);
    err += Expect(rc == ENOMEM && out == (void *)0x1,
                  "posix_memalign(2^" + std::to_string(__builtin_ctzl(a)) + "): want ENOMEM");
  }
  return err;
}

std::string MemalignBadAlignment() {
  std::string err;
  for (size_t a : {(size_t)0, (size_t)3, (size_t)24, (size_t)100}) {
    void *p = memalign(OpaqueSize(a), 16);
    size_t want = 16;
    while (want < a) want <<= 1;
    err += Expect(Aligned(p, want), "memalign(" + std::to_string(a) +
                                        ") is not aligned to " + std::to_string(want));
    free(p);
  }
  NULL_ERRNO(memalign(OpaqueSize((size_t)1 << 62), 16), ENOMEM);
  NULL_ERRNO(memalign(OpaqueSize((size_t)1 << 63), 16), ENOMEM);
  NULL_ERRNO(memalign(OpaqueSize(((size_t)1 << 63) + 1), 16), EINVAL);
  NULL_ERRNO(memalign(OpaqueSize(SIZE_MAX), 16), EINVAL);
  return err;
}

std::string AlignedAllocBadAlignment() {
  std::string err;
  void *p = aligned_alloc(OpaqueSize(0), 16);
  err += Expect(Aligned(p, 16), "aligned_alloc(0, 16) did not give a 16-byte aligned block");
  free(p);
  NULL_ERRNO(aligned_alloc(OpaqueSize(3), 16), EINVAL);
  NULL_ERRNO(aligned_alloc(OpaqueSize(24), 16), EINVAL);
  NULL_ERRNO(aligned_alloc(OpaqueSize(SIZE_MAX), 16), EINVAL);
  NULL_ERRNO(aligned_alloc(OpaqueSize((size_t)1 << 62), 16), ENOMEM);
  NULL_ERRNO(aligned_alloc(OpaqueSize((size_t)1 << 63), 16), ENOMEM);
  return err;
}

std::string UsableSizeForeign() {
  char stack[32];
  static char global[32];
  void *m = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void *g = __libc_malloc(100);
  std::string err;
  for (void *p : {(void *)stack, (void *)global, m, g, (void *)nullptr})
    err += Expect(malloc_usable_size(Opaque(p)) == 0, "malloc_usable_size of a foreign pointer");
  munmap(m, 4096);
  return err;
}

// One byte past the requested size: in the default mode it lands in the
// block's slack (these sizes have some) and nothing notices.
std::string WritePast(size_t n) {
  char *p = (char *)Opaque(malloc(n));
  memset(p, 1, n + 1);
  Escape(p);
  free(p);
  return "";
}
std::string WritePastSmall() { return WritePast(100); }
std::string WritePastLarge() { return WritePast(100000); }
std::string WritePastHuge() { return WritePast(3000000); }

std::string WritePastThenRealloc() {
  char *p = (char *)Opaque(malloc(100));
  memset(p, 1, 101);
  Escape(p);
  p = (char *)realloc(p, 5000);
  free(p);
  return "";
}

struct Outcome {
  bool aborts;
  const char *stderr_regex;  // must appear on stderr
  const char *text;          // README's cell
};

struct Row {
  const char *name;  // README's first cell
  Act act;
  Outcome normal, check;
};

#define PTR "\\(0x[0-9a-f]+\\)"
#define IGNORED(what, counter) \
  {false, "ignored free" PTR ": " what, "ignored, counted in `" counter "`"}
#define ABORTS(call, what) {true, "movalloc: " call PTR ": " what, "abort: `" call "(p): " what "`"}

const Row kTable[] = {
    {"`free(p)` twice, small block", DoubleFreeSmall,
     IGNORED("double free", "double_frees"), ABORTS("free", "double free")},
    {"`free(p)` twice, small block, by its thread then another", DoubleFreeOwnerThenOther,
     IGNORED("double free", "double_frees"), ABORTS("free", "double free")},
    {"`free(p)` twice, small block, by another thread then its own", DoubleFreeOtherThenOwner,
     IGNORED("double free", "double_frees"), ABORTS("free", "double free")},
    {"`free(p)` twice, large block (64 KiB to 1 MiB)", DoubleFreeLarge,
     IGNORED("double free, or never allocated", "double_frees"),
     ABORTS("free", "double free, or never allocated")},
    {"`free(p)` twice, huge block (over 1 MiB)", DoubleFreeHuge,
     IGNORED("double free, or never allocated", "double_frees"),
     ABORTS("free", "double free, or never allocated")},
    {"`free` of a stack address", FreeStack,
     IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free` of a global", FreeGlobal, IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free` of an address inside the heap reservation, beyond the arenas in use",
     FreeInReservationBeyondArenas, IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free((void *)0x1000)`, outside the heap", FreeOutsideHeap,
     IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free` of memory from `mmap`", FreeMmap,
     IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free` of a block from glibc's malloc (`__libc_malloc`)", FreeGlibcBlock,
     IGNORED("not allocated by movalloc", "invalid_frees"),
     ABORTS("free", "not allocated by movalloc")},
    {"`free(p + 3)`, interior of a small block", FreeInteriorMisaligned,
     IGNORED("not the start of a block", "invalid_frees"),
     ABORTS("free", "not the start of a block")},
    {"`free(p + 32)`, 16-byte aligned interior of a small block", FreeInteriorAligned,
     {false, "", "not detected: `p + 32` goes on the free list and is handed out again"},
     ABORTS("free", "not the start of a block")},
    {"`free(p + 4096)`, interior of a large block", FreeInteriorLarge,
     IGNORED("not the start of a block", "invalid_frees"),
     ABORTS("free", "not the start of a block")},
    {"`realloc` of a freed small block", ReallocFreedSmall,
     {false, "ignored realloc" PTR ": a freed block",
      "NULL, errno `EINVAL`, counted in `double_frees`"},
     ABORTS("realloc", "a freed block")},
    {"`realloc` of a freed large block", ReallocFreedLarge,
     {false, "ignored realloc" PTR ": not a live block",
      "NULL, errno `EINVAL`, counted in `invalid_frees`"},
     ABORTS("realloc", "not a live block")},
    {"`calloc(n, m)` with `n * m` overflowing", CallocOverflow,
     {false, "", "NULL, errno `ENOMEM`"}, {false, "", "same"}},
    {"`reallocarray(p, n, m)` with `n * m` overflowing", ReallocarrayOverflow,
     {false, "", "NULL, errno `ENOMEM`, `p` untouched"}, {false, "", "same"}},
    {"size `SIZE_MAX`, `SIZE_MAX - 4096`, `PTRDIFF_MAX + 1` or `PTRDIFF_MAX` to `malloc calloc "
     "realloc reallocarray valloc pvalloc memalign aligned_alloc`, nothrow `new`",
     AbsurdSizes, {false, "", "NULL, errno `ENOMEM` (realloc: `p` untouched)"},
     {false, "", "same"}},
    {"the same sizes to `posix_memalign`; throwing `new`", AbsurdSizesPosixMemalignAndNew,
     {false, "", "returns `ENOMEM`, `errno` and `*out` untouched; `std::bad_alloc`"},
     {false, "", "same"}},
    {"`posix_memalign` alignment 0, 3, 4, 24, `SIZE_MAX` / 2^62, 2^63",
     PosixMemalignBadAlignment,
     {false, "", "returns `EINVAL` / `ENOMEM`, `*out` untouched"}, {false, "", "same"}},
    {"`memalign` alignment 0, 3, 24, 100 / 2^62, 2^63 / 2^63 + 1, `SIZE_MAX`",
     MemalignBadAlignment,
     {false, "", "rounded up to a power of two (at least 16) / NULL, `ENOMEM` / NULL, `EINVAL`"},
     {false, "", "same"}},
    {"`aligned_alloc` alignment 0 / 3, 24, `SIZE_MAX` / 2^62, 2^63", AlignedAllocBadAlignment,
     {false, "", "a 16-byte aligned block / NULL, `EINVAL` / NULL, `ENOMEM`"},
     {false, "", "same"}},
    {"`malloc_usable_size` of a stack, global, `mmap` or glibc pointer, or NULL",
     UsableSizeForeign, {false, "", "0"}, {false, "", "same"}},
    {"one byte written past a small block, then `free`", WritePastSmall,
     {false, "", "not detected"},
     {true, "movalloc: free" PTR ": write past the end of a 100-byte block \\(byte 100 changed\\)",
      "abort: `free(p): write past the end of a 100-byte block (byte 100 changed)`"}},
    {"one byte written past a large block, then `free`", WritePastLarge,
     {false, "", "not detected"},
     {true, "movalloc: free" PTR ": write past the end of a 100000-byte block",
      "abort: `free(p): write past the end of a 100000-byte block (...)`"}},
    {"one byte written past a huge block, then `free`", WritePastHuge,
     {false, "", "not detected"},
     {true, "movalloc: free" PTR ": write past the end of a 3000000-byte block",
      "abort: `free(p): write past the end of a 3000000-byte block (...)`"}},
    {"one byte written past a block, then `realloc`", WritePastThenRealloc,
     {false, "", "not detected"},
     {true, "movalloc: realloc" PTR ": write past the end of a 100-byte block",
      "abort: `realloc(p): write past the end of a 100-byte block (...)`"}},
};

// Runs act in a fresh process (this binary, re-executed) with check mode on or
// off from start-up, and checks the row's outcome.
void RunRow(const Row &row, bool check) {
  const Outcome &o = check ? row.check : row.normal;
  const Outcome &want = (!check || strcmp(o.text, "same") != 0) ? o : row.normal;
  if (check) setenv("MOVALLOC_CHECK", "1", 1);
  else unsetenv("MOVALLOC_CHECK");
  if (want.aborts) {
    EXPECT_DEATH(row.act(), want.stderr_regex);
  } else {
    EXPECT_EXIT(
        {
          std::string err = row.act();
          if (!err.empty()) fprintf(stderr, "%s\n", err.c_str());
          fflush(stderr);
          _exit(err.empty() ? 0 : 1);
        },
        ::testing::ExitedWithCode(0), want.stderr_regex);
  }
  unsetenv("MOVALLOC_CHECK");
}

class MisuseTable : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(MisuseTable, DefaultMode) {
  for (const Row &row : kTable) {
    SCOPED_TRACE(row.name);
    RunRow(row, false);
  }
}

TEST_F(MisuseTable, CheckMode) {
  for (const Row &row : kTable) {
    SCOPED_TRACE(row.name);
    RunRow(row, true);
  }
}

// README's "Misuse: what happens" table has exactly these rows and cells.
TEST(MisuseTableDoc, ReadmeAgreesWithTheTest) {
  std::ifstream in("README.md");
  ASSERT_TRUE(in) << "README.md is not in the test's runfiles";
  std::string line;
  bool in_section = false;
  std::vector<std::string> rows;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) in_section = line == "## Misuse: what happens";
    if (in_section && line.rfind("|", 0) == 0) rows.push_back(line);
  }
  ASSERT_GE(rows.size(), 2u) << "no table under \"## Misuse: what happens\"";
  rows.erase(rows.begin(), rows.begin() + 2);  // header and separator
  ASSERT_EQ(rows.size(), sizeof kTable / sizeof kTable[0]);
  for (size_t i = 0; i < rows.size(); i++) {
    const Row &r = kTable[i];
    std::string want = std::string("| ") + r.name + " | " + r.normal.text + " | " +
                       r.check.text + " |";
    EXPECT_EQ(rows[i], want) << "row " << i + 1;
  }
}

// The glibc-block row again, for real: a program with libmovalloc.so preloaded
// frees a block glibc's own malloc handed out.
std::string RunPreloaded(bool check, int *status) {
  std::string dir = std::string(getenv("TEST_SRCDIR")) + "/movalloc/";
  std::string prog = dir + "tests/foreign_free", preload = "LD_PRELOAD=" + dir + "shim/libmovalloc.so";
  int out[2];
  EXPECT_EQ(pipe(out), 0);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(out[1], 2);
    char *argv[] = {(char *)prog.c_str(), nullptr};
    char *envp[] = {(char *)preload.c_str(),
                    (char *)(check ? "MOVALLOC_CHECK=1" : "MOVALLOC_CHECK=0"), nullptr};
    execve(prog.c_str(), argv, envp);
    _exit(127);
  }
  close(out[1]);
  std::string text;
  char buf[512];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) text.append(buf, n);
  close(out[0]);
  waitpid(pid, status, 0);
  return text;
}

TEST(MisusePreloaded, FreeOfAGlibcBlockIsIgnored) {
  int status;
  std::string out = RunPreloaded(false, &status);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out;
  EXPECT_TRUE(::testing::internal::RE::PartialMatch(
      out, "movalloc: ignored free" PTR ": not allocated by movalloc"))
      << out;
  EXPECT_NE(out.find("intact usable=0\n"), std::string::npos) << out;
}

TEST(MisusePreloaded, FreeOfAGlibcBlockAbortsInCheckMode) {
  int status;
  std::string out = RunPreloaded(true, &status);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) << out;
  EXPECT_TRUE(::testing::internal::RE::PartialMatch(
      out, "^movalloc: free" PTR ": not allocated by movalloc\n$"))
      << out;
}

// ---- canaries under MOVALLOC_CHECK=1 ----

class Canary : public ::testing::Test {
 protected:
  void SetUp() override {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    setenv("MOVALLOC_CHECK", "1", 1);
  }
  void TearDown() override { unsetenv("MOVALLOC_CHECK"); }
};

TEST_F(Canary, TrailerOverwriteIsCaught) {
  // 100 bytes asked: canary bytes 100..103, the size record after them.
  EXPECT_DEATH(
      {
        char *p = (char *)Opaque(malloc(100));
        p[105] = 0x55;
        Escape(p);
        free(p);
      },
      "movalloc: free" PTR ": write past the end of the block \\(its size record");
}

TEST_F(Canary, OverflowCaughtByUsableSize) {
  EXPECT_DEATH(
      {
        char *p = (char *)Opaque(malloc(40));
        p[40] = 0;
        Escape(p);
        malloc_usable_size(p);
      },
      "movalloc: malloc_usable_size" PTR ": write past the end of a 40-byte block");
}

TEST_F(Canary, OverflowOfAlignedAndCallocBlocksIsCaught) {
  EXPECT_DEATH(
      {
        char *p = (char *)Opaque(aligned_alloc(4096, 5000));
        p[5000] = 0;
        Escape(p);
        free(p);
      },
      "free" PTR ": write past the end of a 5000-byte block");
  EXPECT_DEATH(
      {
        char *p = (char *)Opaque(calloc(10, 30));
        p[300] = 0;
        Escape(p);
        free(p);
      },
      "free" PTR ": write past the end of a 300-byte block");
  EXPECT_DEATH(
      {
        char *p = (char *)Opaque(operator new(77));
        p[77] = 0;
        Escape(p);
        operator delete(p);
      },
      "free" PTR ": write past the end of a 77-byte block");
}

// Fills p[0..n) with one byte value; Verify reads it back (memcmp of the
// block against itself shifted by one: all bytes equal, at libc speed).
void Fill(void *p, size_t n, unsigned seed) { memset(p, (unsigned char)seed, n); }
bool Verify(const void *p, size_t n, unsigned seed) {
  const unsigned char *b = (const unsigned char *)p;
  return n == 0 || (b[0] == (unsigned char)seed && memcmp(b, b + 1, n - 1) == 0);
}

// Check mode in this process? (The children below set it from start-up.)
std::string CheckModeOn() { return Expect(mv_options.check, "check mode is not on"); }

std::string ReallocChains() {
  std::string err = CheckModeOn();
  const size_t sizes[] = {1,      15,      16,      17,     100,          1000,
                          5000,   65535,   65536,   70000,  (size_t)1 << 20, 3000000,
                          700000, 200000,  40000,   300,    24,           (size_t)9 << 20,
                          1 << 21, 50};
  void *p = nullptr;
  size_t have = 0;
  for (size_t n : sizes) {
    p = realloc(p, n);
    if (!p) return err + "realloc failed";
    size_t keep = have < n ? have : n;
    if (!Verify(p, keep, 3)) err += "realloc lost data at " + std::to_string(n) + "; ";
    err += Expect(malloc_usable_size(p) == n, "usable size is not the requested size");
    Fill(p, n, 3);  // every requested byte, up to the canary
    have = n;
  }
  free(p);
  return err;
}

std::string AlignedEverywhere() {
  std::string err = CheckModeOn();
  for (size_t a = 1; a <= ((size_t)4 << 20); a <<= 1) {
    for (size_t n : {(size_t)0, (size_t)1, a - 1, a, a + 1, (size_t)3 * a + 5}) {
      void *ps[5] = {};
      ps[0] = memalign(a, n);
      if (a >= sizeof(void *) && posix_memalign(&ps[1], a, n) != 0) ps[1] = nullptr;
      ps[2] = aligned_alloc(a, n);
      ps[3] = operator new(n ? n : 1, std::align_val_t(a < 16 ? 16 : a));
      ps[4] = a == 4096 ? valloc(n) : calloc(1, n);
      for (int k = 0; k < 5; k++) {
        if (!ps[k]) {
          if (!(k == 1 && a < sizeof(void *))) err += "an aligned allocation failed; ";
          continue;
        }
        if (k < 4 && !Aligned(ps[k], a < 16 ? 16 : a)) err += "misaligned; ";
        err += Expect(malloc_usable_size(ps[k]) == (k == 3 && n == 0 ? 1 : n),
                      "usable size of an aligned block is not what was asked");
        Fill(ps[k], n, (unsigned)k);
      }
      for (int k = 0; k < 5; k++) {
        if (ps[k] && !Verify(ps[k], n, (unsigned)k)) err += "aligned block changed; ";
        if (k == 3) operator delete(ps[k], std::align_val_t(a < 16 ? 16 : a));
        else free(ps[k]);
      }
    }
  }
  void *pv = pvalloc(5000);
  err += Expect(malloc_usable_size(pv) == 8192, "pvalloc(5000) usable size is not 8192");
  Fill(pv, 8192, 1);
  free(pv);
  return err;
}

// Random calls of every kind, every live byte written and read back: no
// false positive, no lost data.
std::string RandomRun() {
  std::string err = CheckModeOn();
  std::mt19937_64 rng(12345);
  struct Live {
    void *p;
    size_t n;
    unsigned seed;
  };
  std::vector<Live> live;
  auto size = [&]() -> size_t {
    switch (rng() % 8) {
      case 0: return rng() % 16;
      case 1: case 2: case 3: return rng() % 1024;
      case 4: case 5: return rng() % 65536;
      case 6: return rng() % (1 << 20);
      default: return rng() % (3 << 20);
    }
  };
  for (int i = 0; i < 30000 && err.size() < 1000; i++) {
    unsigned op = rng() % 10;
    if (op < 4 || live.empty()) {
      size_t n = size();
      void *p;
      switch (rng() % 5) {
        case 0: p = malloc(n); break;
        case 1: p = calloc(1, n); break;
        case 2: p = aligned_alloc((size_t)16 << (rng() % 9), n); break;
        case 3: p = memalign((size_t)1 << (rng() % 13), n); break;
        default: p = operator new[](n); break;
      }
      if (!p) return err + "allocation failed";
      err += Expect(malloc_usable_size(p) == n, "usable size is not the requested size");
      unsigned seed = (unsigned)rng();
      Fill(p, n, seed);
      live.push_back({p, n, seed});
    } else {
      size_t k = rng() % live.size();
      Live &l = live[k];
      if (!Verify(l.p, l.n, l.seed)) err += "block content changed; ";
      if (op < 7) {
        size_t n = size();
        void *q = realloc(l.p, n ? n : 1);
        if (!q) return err + "realloc failed";
        size_t keep = l.n < n ? l.n : n;
        if (!Verify(q, keep, l.seed)) err += "realloc lost data; ";
        l.p = q;
        l.n = n ? n : 1;
        Fill(q, l.n, l.seed);
      } else {
        free(l.p);
        live[k] = live.back();
        live.pop_back();
      }
    }
  }
  for (Live &l : live) {
    if (!Verify(l.p, l.n, l.seed)) err += "block content changed; ";
    free(l.p);
  }
  return err;
}

void ExpectCleanChild(Act act) {
  EXPECT_EXIT(
      {
        std::string err = act();
        if (!err.empty()) fprintf(stderr, "%s\n", err.c_str());
        _exit(err.empty() ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "^$");
}

TEST_F(Canary, NoFalsePositiveAcrossReallocGrowthAndShrink) { ExpectCleanChild(ReallocChains); }
TEST_F(Canary, NoFalsePositiveForAlignedAllocations) { ExpectCleanChild(AlignedEverywhere); }
TEST_F(Canary, NoFalsePositiveInALongRandomRun) { ExpectCleanChild(RandomRun); }

// ---- hardened free-list links ----

// An overflow (or a write after free) that plants a plain address in a freed
// block's link must not make malloc hand out that address: the link is decoded
// with the per-process secret, so the plain address decodes to garbage. In the
// default mode the allocation that follows the damaged one touches the garbage
// and the process dies (SIGSEGV) instead of writing where the attacker chose;
// under check mode the damaged link is caught before it is followed.
alignas(64) char planted_target[4096];

void PlantAndAllocate() {
  void *p = Opaque(malloc(64));
  free(p);
  *(uintptr_t *)p = (uintptr_t)planted_target;  // the raw address, not encoded
  Escape(p);
  for (int i = 0; i < 10000; i++) {
    void *q = malloc(64);
    if (q >= (void *)planted_target && q < (void *)(planted_target + sizeof planted_target)) {
      fprintf(stderr, "malloc returned the planted address %p\n", q);
      _exit(1);
    }
  }
  _exit(0);
}

bool DiedOfGarbageOrNothingRedirected(int status) {
  return (WIFEXITED(status) && WEXITSTATUS(status) == 0) ||
         (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
}

TEST(HardenedLinks, PlantedPlainPointerDoesNotRedirectAllocation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  unsetenv("MOVALLOC_CHECK");
  EXPECT_EXIT(PlantAndAllocate(), DiedOfGarbageOrNothingRedirected, "");
}

TEST(HardenedLinks, CheckModeCatchesThePlantedPointer) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  setenv("MOVALLOC_CHECK", "1", 1);
  EXPECT_DEATH(PlantAndAllocate(),
               "movalloc: malloc: heap corruption: the free block 0x[0-9a-f]+ has a damaged link");
  unsetenv("MOVALLOC_CHECK");
}

}  // namespace
