// What movalloc writes cannot be aimed at, or read from, another user's file:
// MOVALLOC_TRACE refuses symbolic links, files of other users and files open
// to group or others. A setuid program ignores every MOVALLOC_* variable
// (secure_getenv), so a user cannot make it write a trace where they like.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
}

namespace {

class TraceFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mv_security_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::string cmd = "rm -rf " + dir_;
    EXPECT_EQ(system(cmd.c_str()), 0);
  }
  // Opens path as MOVALLOC_TRACE, closes it again; returns what was logged.
  std::string Open(const std::string &path) {
    int pipefd[2];
    EXPECT_EQ(pipe(pipefd), 0);
    int saved = dup(2);
    dup2(pipefd[1], 2);
    mv_options.trace = path.c_str();
    mv_engine_trace_open();
    mv_options.trace = nullptr;
    mv_engine_trace_open();  // closes it
    dup2(saved, 2);
    close(saved);
    close(pipefd[1]);
    char buf[1024];
    ssize_t n = read(pipefd[0], buf, sizeof buf);
    close(pipefd[0]);
    return std::string(buf, n > 0 ? n : 0);
  }
  static std::string Contents(const std::string &path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
  std::string dir_;
};

const char kHeader[] = "time_ns,pid,arena,backend,outcome,rc,bytes,stall_us\n";

TEST_F(TraceFile, NewFileIsCreatedForTheOwnerOnly) {
  std::string path = dir_ + "/trace.csv";
  EXPECT_EQ(Open(path), "");
  EXPECT_EQ(Contents(path), kHeader);
  struct stat st;
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(st.st_uid, geteuid());
}

// Descriptors of this process open on path.
int DescriptorsOn(const std::string &path) {
  int n = 0;
  DIR *d = opendir("/proc/self/fd");
  while (struct dirent *e = readdir(d)) {
    char target[4096];
    ssize_t len = readlinkat(dirfd(d), e->d_name, target, sizeof target);
    if (len > 0 && std::string(target, len) == path) n++;
  }
  closedir(d);
  return n;
}

// Threads that ask for the stats at once before a backend is chosen (the
// compactor's first round and a program's movalloc_stats_get, say) choose it
// once: one of them opens the trace, no descriptor is left behind, and the
// file has one header. In a child, which forgets the backend twenty times.
TEST_F(TraceFile, ThreadsChoosingTheBackendAtOnceOpenItOnce) {
  std::string path = dir_ + "/trace.csv";
  pid_t pid = fork();
  if (pid == 0) {
    mv_options.trace = path.c_str();
    for (int round = 0; round < 20; round++) {
      mv_engine_use_backend(nullptr, MV_STEP_NONE);
      std::atomic<int> ready{0};
      std::vector<std::thread> ts;
      for (int t = 0; t < 8; t++)
        ts.emplace_back([&] {
          ready++;
          while (ready.load() < 8) {
          }
          struct movalloc_stats st;
          movalloc_stats_get(&st);
        });
      for (auto &t : ts) t.join();
      int open = DescriptorsOn(path);
      if (open != 1) _exit(10 + open);
    }
    _exit(0);
  }
  int status;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "descriptors on the trace: " << WEXITSTATUS(status) - 10;
  EXPECT_EQ(Contents(path), kHeader);
}

TEST_F(TraceFile, SymbolicLinkIsRefused) {
  std::string target = dir_ + "/victim", link = dir_ + "/trace.csv";
  int fd = open(target.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  ASSERT_EQ(symlink(target.c_str(), link.c_str()), 0);
  std::string err = Open(link);
  EXPECT_EQ(err, "movalloc: MOVALLOC_TRACE=" + link +
                     ": is a symbolic link: refused (give the file itself); no trace\n");
  EXPECT_EQ(Contents(target), "") << "written through the link";
  // A dangling link is not followed to create its target either.
  ASSERT_EQ(unlink(target.c_str()), 0);
  EXPECT_NE(Open(link).find("is a symbolic link: refused"), std::string::npos);
  EXPECT_NE(access(target.c_str(), F_OK), 0) << "the link's target was created";
}

TEST_F(TraceFile, FileOpenToGroupOrOthersIsRefused) {
  std::string path = dir_ + "/trace.csv";
  int fd = open(path.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fchmod(fd, 0644), 0);
  close(fd);
  std::string err = Open(path);
  EXPECT_EQ(err, "movalloc: MOVALLOC_TRACE=" + path + ": open to group or others (owner uid " +
                     std::to_string(geteuid()) +
                     ", mode 644): refused; movalloc writes only to a regular file of its own "
                     "user with mode 600 (or one it creates); no trace\n");
  EXPECT_EQ(Contents(path), "");
  ASSERT_EQ(chmod(path.c_str(), 0620), 0);  // group-writable: others could inject lines
  EXPECT_NE(Open(path).find("open to group or others"), std::string::npos);
  ASSERT_EQ(chmod(path.c_str(), 0600), 0);
  EXPECT_EQ(Open(path), "");
  EXPECT_EQ(Contents(path), kHeader);
}

TEST_F(TraceFile, AnotherUsersFileIsRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to give a file to another user";
  std::string path = dir_ + "/trace.csv";
  int fd = open(path.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fchown(fd, 65534, 65534), 0);
  close(fd);
  std::string err = Open(path);
  EXPECT_NE(err.find(": owned by another user (owner uid 65534, mode 600): refused"),
            std::string::npos)
      << err;
  EXPECT_EQ(Contents(path), "");
}

TEST_F(TraceFile, NotARegularFileIsRefused) {
  std::string fifo = dir_ + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  std::string err = Open(fifo);  // must not hang waiting for a reader either
  EXPECT_NE(err.find("cannot open it (errno " + std::to_string(ENXIO) + ")"), std::string::npos)
      << err;
  EXPECT_NE(Open(dir_).find("cannot open it (errno " + std::to_string(EISDIR) + ")"),
            std::string::npos);
}

// Runs the probe as user nobody with MOVALLOC_* set; returns its output.
std::string RunProbeAsNobody(const std::string &probe, const std::string &trace) {
  int out[2];
  EXPECT_EQ(pipe(out), 0);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(3);
    std::string t = "MOVALLOC_TRACE=" + trace;
    char *envp[] = {(char *)"MOVALLOC_STATS=1", (char *)"MOVALLOC_CHECK=1", (char *)t.c_str(),
                    nullptr};
    char *argv[] = {(char *)probe.c_str(), nullptr};
    execve(probe.c_str(), argv, envp);
    _exit(4);
  }
  close(out[1]);
  char buf[512];
  ssize_t n = read(out[0], buf, sizeof buf);
  close(out[0]);
  int status;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  return std::string(buf, n > 0 ? n : 0);
}

TEST_F(TraceFile, SetuidProgramIgnoresTheEnvironment) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to make a setuid binary and drop to nobody";
  const char *srcdir = getenv("TEST_SRCDIR");
  ASSERT_NE(srcdir, nullptr);
  std::string src = std::string(srcdir) + "/movalloc/tests/options_probe";
  std::string probe = dir_ + "/options_probe", trace = dir_ + "/evil.csv";
  ASSERT_EQ(chmod(dir_.c_str(), 0777), 0);  // nobody may create files here: the trace could
  std::string cp = "cp " + src + " " + probe;
  ASSERT_EQ(system(cp.c_str()), 0);
  // Control: not setuid, the variables are read.
  ASSERT_EQ(chmod(probe.c_str(), 0755), 0);
  EXPECT_EQ(RunProbeAsNobody(probe, trace), "stats=1 check=1 trace=" + trace + "\n");
  if (access(trace.c_str(), F_OK) == 0) unlink(trace.c_str());  // the engine opened it
  // setuid root: ignored.
  ASSERT_EQ(chmod(probe.c_str(), 04755), 0);
  EXPECT_EQ(RunProbeAsNobody(probe, trace), "stats=0 check=0 trace=(none)\n");
  EXPECT_NE(access(trace.c_str(), F_OK), 0) << "a setuid program wrote the trace";
}

}  // namespace
