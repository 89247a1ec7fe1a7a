// The allocation-free printer: every conversion the code base uses; and the
// summary MOVALLOC_STATS=1 prints with it.
#include <gtest/gtest.h>

#include <string>

extern "C" {
#include "arena/mv_print.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
#include "shim/mv_stats.h"
}

namespace {

std::string Fmt(const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  mv_vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

TEST(Print, Integers) {
  EXPECT_EQ(Fmt("%d %i %u", -42, 7, 4000000000u), "-42 7 4000000000");
  EXPECT_EQ(Fmt("%ld %lu %lld %llu", -1L, 2UL, -3LL, 18446744073709551615ULL),
            "-1 2 -3 18446744073709551615");
  EXPECT_EQ(Fmt("%zu %zx %x", (size_t)12345, (size_t)255, 0xbeefu), "12345 ff beef");
}

TEST(Print, WidthAndFlags) {
  EXPECT_EQ(Fmt("[%5d]", 42), "[   42]");
  EXPECT_EQ(Fmt("[%-5d]", 42), "[42   ]");
  EXPECT_EQ(Fmt("[%05d]", -42), "[-0042]");
  EXPECT_EQ(Fmt("[%08lx]", 0xabcUL), "[00000abc]");
  EXPECT_EQ(Fmt("[%-6s|%4s]", "ab", "xy"), "[ab    |  xy]");
}

TEST(Print, PointersStringsChars) {
  EXPECT_EQ(Fmt("%p", (void *)0x1234), "0x1234");
  EXPECT_EQ(Fmt("%s %c %%", "hi", 'z'), "hi z %");
  EXPECT_EQ(Fmt("%s", (const char *)nullptr), "(null)");
  EXPECT_EQ(Fmt("%q"), "%q");  // unknown conversions are printed as written
}

TEST(Print, TruncatesAndTerminates) {
  char buf[8];
  size_t n = mv_snprintf(buf, sizeof buf, "%s", "0123456789");
  EXPECT_EQ(n, 7u);
  EXPECT_STREQ(buf, "0123456");
  EXPECT_EQ(mv_snprintf(buf, 1, "abc"), 0u);
  EXPECT_STREQ(buf, "");
}

// The summary does not choose a backend for a program that moved nothing:
// choosing probes the kernel (a huge page faulted in, milliseconds). This
// binary never compacts, so nothing has chosen one before.
TEST(Summary, NamesNoBackendUntilOneIsChosen) {
  if (mv_options.verbose || mv_options.compact_stress)
    GTEST_SKIP() << "MOVALLOC_VERBOSE and MOVALLOC_COMPACT_STRESS choose it at start-up";
  ASSERT_FALSE(mv_engine_backend_chosen());
  char buf[2048];
  std::string before(buf, mv_stats_format(buf, sizeof buf, "stats"));
  EXPECT_NE(before.find("migration   backend - (not chosen yet)"), std::string::npos) << before;
  EXPECT_FALSE(mv_engine_backend_chosen()) << "the summary probed the kernel";
  struct movalloc_stats st;
  ASSERT_EQ(movalloc_stats_get(&st), 0);  // the API does choose, as documented
  ASSERT_TRUE(mv_engine_backend_chosen());
  std::string after(buf, mv_stats_format(buf, sizeof buf, "stats"));
  EXPECT_NE(after.find(std::string("migration   backend ") + st.backend + " ("), std::string::npos)
      << after;
}

}  // namespace
