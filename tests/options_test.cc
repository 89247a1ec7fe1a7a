// MOVALLOC_* parsing: good values, bad values reported with the option, the
// value and what it accepts, and the default kept.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

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
  EXPECT_EQ(o.arena_cache, 8u);
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
  EXPECT_EQ(o.arena_cache, 8u);
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

}  // namespace
