// MOVALLOC_* parsing: good values, bad values reported with the option, the
// value and what it accepts, and the default kept.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string.h>

#include <string>
#include <vector>

extern "C" {
#include "compactor/mv_backend.h"
#include "shim/mv_options.h"
}

namespace {

// Loads options from a fake environment; returns what was printed on stderr.
// The live options are restored afterwards (the allocator under the test uses them).
std::string Load(std::initializer_list<const char *> env, struct mv_options *out) {
  struct mv_options saved = mv_options;
  std::vector<char *> envp;
  for (const char *e : env) envp.push_back(const_cast<char *>(e));
  envp.push_back(nullptr);
  int pipefd[2];
  EXPECT_EQ(pipe(pipefd), 0);
  int saved_err = dup(2);
  dup2(pipefd[1], 2);
  mv_options_load(envp.data());
  dup2(saved_err, 2);
  close(saved_err);
  close(pipefd[1]);
  char buf[4096];
  ssize_t n = read(pipefd[0], buf, sizeof buf - 1);
  close(pipefd[0]);
  *out = mv_options;
  mv_options = saved;
  return std::string(buf, n > 0 ? n : 0);
}

TEST(Options, Defaults) {
  struct mv_options o;
  EXPECT_EQ(Load({}, &o), "");
  EXPECT_FALSE(o.stats);
  EXPECT_FALSE(o.check);
  EXPECT_EQ(o.migrate, MV_BACKEND_AUTO);
  EXPECT_TRUE(o.compact);
  EXPECT_EQ(o.thp, MV_THP_AUTO);
  EXPECT_EQ(o.reserve_gib, 1024u);
  EXPECT_EQ(o.arena_cache, 2u);
}

TEST(Options, GoodValues) {
  struct mv_options o;
  EXPECT_EQ(Load({"MOVALLOC_STATS=1", "MOVALLOC_CHECK=yes", "MOVALLOC_MIGRATE=remap",
                  "MOVALLOC_COMPACT=off", "MOVALLOC_THP=fault", "MOVALLOC_RESERVE_GIB=64",
                  "MOVALLOC_ARENA_CACHE=0", "UNRELATED=1"},
                 &o),
            "");
  EXPECT_TRUE(o.stats);
  EXPECT_TRUE(o.check);
  EXPECT_EQ(o.migrate, MV_BACKEND_REMAP);
  EXPECT_FALSE(o.compact);
  EXPECT_EQ(o.thp, MV_THP_FAULT);
  EXPECT_EQ(o.reserve_gib, 64u);
  EXPECT_EQ(o.arena_cache, 0u);
}

TEST(Options, EveryBackendName) {
  const char *names[] = {"off", "mprotect", "collapse", "remap", "move"};
  for (int kind = 0; kind < MV_BACKEND_COUNT; kind++) {
    std::string env = std::string("MOVALLOC_MIGRATE=") + names[kind];
    struct mv_options o;
    EXPECT_EQ(Load({env.c_str()}, &o), "");
    EXPECT_EQ(o.migrate, kind) << names[kind];
  }
}

TEST(Options, BadValuesSayWhatIsAcceptedAndKeepTheDefault) {
  struct mv_options o;
  std::string err = Load({"MOVALLOC_STATS=maybe", "MOVALLOC_MIGRATE=teleport",
                          "MOVALLOC_RESERVE_GIB=0", "MOVALLOC_ARENA_CACHE=12x"},
                         &o);
  EXPECT_NE(err.find("MOVALLOC_STATS=maybe is not valid: expected 1|0"), std::string::npos) << err;
  EXPECT_NE(err.find("MOVALLOC_MIGRATE=teleport is not valid: expected one of "
                     "off|mprotect|collapse|remap|move|auto"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("MOVALLOC_RESERVE_GIB=0 is not valid: expected a whole number from 1 to 65536"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("MOVALLOC_ARENA_CACHE=12x"), std::string::npos) << err;
  EXPECT_FALSE(o.stats);
  EXPECT_EQ(o.migrate, MV_BACKEND_AUTO);
  EXPECT_EQ(o.reserve_gib, 1024u);
  EXPECT_EQ(o.arena_cache, 2u);
}

TEST(Options, TraceTakesAnAbsolutePath) {
  struct mv_options o;
  EXPECT_EQ(Load({"MOVALLOC_TRACE=/tmp/x.csv"}, &o), "");
  EXPECT_STREQ(o.trace, "/tmp/x.csv");
  std::string err = Load({"MOVALLOC_TRACE=relative.csv"}, &o);
  EXPECT_NE(err.find("expected an absolute path"), std::string::npos) << err;
  EXPECT_EQ(o.trace, nullptr);
}

TEST(Options, OverflowingNumbersAreRejected) {
  struct mv_options o;
  std::string err = Load({"MOVALLOC_RESERVE_GIB=99999999999999999999999"}, &o);
  EXPECT_NE(err.find("not valid"), std::string::npos);
  EXPECT_EQ(o.reserve_gib, 1024u);
}

TEST(Options, DescribeListsEveryOption) {
  char path[] = "/tmp/mv_optsXXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  mv_options_describe(fd);
  lseek(fd, 0, SEEK_SET);
  char buf[8192];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  unlink(path);
  std::string text(buf, n > 0 ? n : 0);
  for (const char *name : {"MOVALLOC_STATS", "MOVALLOC_CHECK", "MOVALLOC_MIGRATE",
                           "MOVALLOC_COMPACT", "MOVALLOC_THP", "MOVALLOC_RESERVE_GIB",
                           "MOVALLOC_ARENA_CACHE", "MOVALLOC_VERBOSE", "MOVALLOC_TRACE",
                           "MOVALLOC_COMPACT_PERIOD_MS", "MOVALLOC_COMPACT_MBPS",
                           "MOVALLOC_COMPACT_STRESS", "MOVALLOC_HELP"})
    EXPECT_NE(text.find(name), std::string::npos) << name;
}

// Garbage in every option of the real table: each value is reported with the
// option's name, the value and what the option accepts, and every option
// (not just the bad one) keeps its default.
std::vector<std::string> Garbage(const struct mv_option &o) {
  std::vector<std::string> g = {"", " ", "garbage", "-1", "1x", "0x10", " 1", "1 ",
                                "99999999999999999999999", "18446744073709551616",
                                "\xff\xfe", std::string(200, '7') + "x"};
  switch (o.type) {
    case MV_OPT_BOOL:
      g.insert(g.end(), {"2", "TRUE", "yes please", "00"});
      break;
    case MV_OPT_UINT:
      if (o.min > 0) g.push_back(std::to_string(o.min - 1));
      g.insert(g.end(), {std::to_string(o.max + 1), "18446744073709551615", "+5", "1e3",
                         "5.0"});
      break;
    case MV_OPT_ENUM: {
      std::string first(o.choices, strcspn(o.choices, "|"));
      std::string upper = first;
      for (char &c : upper) c = (char)toupper(c);
      g.insert(g.end(), {upper, first.substr(0, first.size() - 1), first + "x",
                         std::string(o.choices), "1"});
      break;
    }
    case MV_OPT_PATH:
      g.insert(g.end(), {"relative.csv", "./x.csv", "~/x.csv"});
      break;
  }
  return g;
}

TEST(Options, GarbageInEveryOptionIsReportedAndTheDefaultKept) {
  struct mv_options defaults;
  ASSERT_EQ(Load({}, &defaults), "");
  ASSERT_GE(mv_option_count, 13u);
  for (size_t i = 0; i < mv_option_count; i++) {
    const struct mv_option &o = mv_option_table[i];
    char accepts[128];
    mv_option_accepted(&o, accepts, sizeof accepts);
    for (const std::string &value : Garbage(o)) {
      std::string env = std::string(o.name) + "=" + value;
      struct mv_options got;
      std::string err = Load({env.c_str()}, &got);
      std::string want = std::string("movalloc: ") + o.name + "=" + value +
                         " is not valid: expected " + accepts + "; using the default\n";
      EXPECT_EQ(err, want) << env;
      EXPECT_EQ(memcmp(&got, &defaults, sizeof got), 0) << env << ": not every default kept";
    }
  }
}

// The message says what each kind of option accepts.
TEST(Options, AcceptedValuesAreSpelledOut) {
  for (size_t i = 0; i < mv_option_count; i++) {
    const struct mv_option &o = mv_option_table[i];
    char accepts[128];
    mv_option_accepted(&o, accepts, sizeof accepts);
    std::string a(accepts);
    switch (o.type) {
      case MV_OPT_BOOL: EXPECT_EQ(a, "1|0 (or true|false, yes|no, on|off)") << o.name; break;
      case MV_OPT_UINT:
        EXPECT_EQ(a, "a whole number from " + std::to_string(o.min) + " to " +
                         std::to_string(o.max))
            << o.name;
        break;
      case MV_OPT_ENUM: EXPECT_EQ(a, std::string("one of ") + o.choices) << o.name; break;
      case MV_OPT_PATH: EXPECT_EQ(a, "an absolute path") << o.name; break;
    }
  }
}

}  // namespace
