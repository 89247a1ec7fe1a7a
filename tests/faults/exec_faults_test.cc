// Faults set up before exec, with a real program (perl) under LD_PRELOAD and
// migration stress (README "Faults: what happens"): userfaultfd refused by a
// seccomp filter, a non-root user without userfaultfd access, THP disabled by
// prctl; and the whole process stopped and continued again and again during
// compaction. The program's output must match its run without movalloc, and
// movalloc's verbose line and exit statistics must say what it chose and why.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "tests/deny_uffd.h"

namespace {

std::string Runfile(const char *path) {
  const char *dir = getenv("TEST_SRCDIR"), *ws = getenv("TEST_WORKSPACE");
  return std::string(dir ? dir : ".") + "/" + (ws ? ws : "movalloc") + "/" + path;
}

std::string ReadFile(const std::string &path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A directory every user can read, holding a copy of the library (the runfiles
// tree under /root is not readable by nobody).
struct Scratch {
  std::string dir, lib;
  Scratch() {
    char tmpl[] = "/tmp/movalloc_faults_XXXXXX";
    dir = mkdtemp(tmpl);
    chmod(dir.c_str(), 0755);
    lib = dir + "/libmovalloc.so";
    std::ifstream src(Runfile("shim/libmovalloc.so"), std::ios::binary);
    std::ofstream dst(lib, std::ios::binary);
    dst << src.rdbuf();
    dst.close();
    chmod(lib.c_str(), 0644);
  }
  ~Scratch() {
    for (const char *f : {"/libmovalloc.so", "/out", "/err"}) unlink((dir + f).c_str());
    rmdir(dir.c_str());
  }
};

struct Result {
  int status = -1;
  std::string out, err;
};

// Runs argv with env in a child that first calls setup (false: exit 120),
// stdout and stderr to files; killed after timeout_s seconds. During the run,
// poll(pid) is called every 10 ms.
Result RunChild(const Scratch &s, const std::vector<std::string> &argv,
           const std::vector<std::string> &env, std::function<bool()> setup,
           int timeout_s = 120, std::function<void(pid_t)> poll = nullptr) {
  std::string out = s.dir + "/out", err = s.dir + "/err";
  unlink(out.c_str());
  unlink(err.c_str());
  std::vector<char *> av, ev;
  for (const std::string &a : argv) av.push_back((char *)a.c_str());
  av.push_back(nullptr);
  for (const std::string &e : env) ev.push_back((char *)e.c_str());
  ev.push_back(nullptr);
  pid_t pid = fork();
  if (pid == 0) {
    int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
    int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0 || chdir(s.dir.c_str()) != 0) _exit(121);
    if (setup && !setup()) _exit(120);
    execve(av[0], av.data(), ev.data());
    _exit(127);
  }
  Result r;
  for (int waited = 0;; waited += 10) {
    pid_t w = waitpid(pid, &r.status, WNOHANG);
    if (w == pid) break;
    if (waited >= timeout_s * 1000) {
      kill(pid, SIGKILL);
      kill(pid, SIGCONT);
      waitpid(pid, &r.status, 0);
      r.err += "[killed after the timeout]\n";
      break;
    }
    if (poll) poll(pid);
    usleep(10 * 1000);
  }
  r.out = ReadFile(out);
  r.err = ReadFile(err) + r.err;
  return r;
}

// The workload: a hash of 300k entries, string churn and a sort, long enough
// for the stressed compactor to move it; prints counts and a digest.
const char kPerl[] = R"(
use Digest::MD5 qw(md5_hex);
my %h;
for my $i (1 .. 300000) { $h{"k$i"} = "v" x ($i % 97) . $i; }
delete $h{"k$_"} for grep { $_ % 3 == 0 } 1 .. 300000;
my $s = join(",", map { "$_=$h{$_}" } sort keys %h);
select(undef, undef, undef, 0.5);
print scalar(keys %h), " ", length($s), " ", md5_hex($s), "\n";
)";

std::vector<std::string> PerlArgv() { return {"/usr/bin/perl", "-e", kPerl}; }

std::vector<std::string> Env(const Scratch &s, bool preload) {
  std::vector<std::string> env = {"PATH=/usr/bin:/bin", "LC_ALL=C"};
  if (preload) {
    env.push_back("LD_PRELOAD=" + s.lib);
    for (const char *e : {"MOVALLOC_VERBOSE=1", "MOVALLOC_STATS=1", "MOVALLOC_COMPACT_STRESS=1"})
      env.push_back(e);
  }
  return env;
}

// What movalloc said: the chosen backend and the arenas migrated.
struct Said {
  std::string backend, line;
  long migrated = -1;
};
Said Parse(const std::string &err) {
  Said s;
  std::smatch m;
  if (std::regex_search(err, m, std::regex("movalloc: migration backend (\\w+): ([^\n]*)")))
    s.backend = m[1], s.line = m[0];
  if (std::regex_search(err, m, std::regex("movalloc: +(\\d+) migrated")))
    s.migrated = std::stol(m[1]);
  return s;
}

class ExecFaults : public testing::Test {
 protected:
  void SetUp() override {
    if (access("/usr/bin/perl", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/perl";
    plain_ = RunChild(scratch_, PerlArgv(), Env(scratch_, false), nullptr);
    ASSERT_TRUE(WIFEXITED(plain_.status) && WEXITSTATUS(plain_.status) == 0) << plain_.err;
    ASSERT_FALSE(plain_.out.empty());
  }
  // The program under movalloc after setup: same output, exit 0, and what
  // movalloc said.
  Said Expect(std::function<bool()> setup) {
    Result r = RunChild(scratch_, PerlArgv(), Env(scratch_, true), setup);
    EXPECT_TRUE(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0)
        << "status " << r.status << "\n" << r.err;
    EXPECT_EQ(r.out, plain_.out) << r.err;
    EXPECT_NE(r.err.find("movalloc: stats at exit"), std::string::npos) << r.err;
    Said s = Parse(r.err);
    EXPECT_FALSE(s.backend.empty()) << "no verbose backend line:\n" << r.err;
    printf("[ info     ] %s; %ld migrated\n", s.line.c_str(), s.migrated);
    return s;
  }
  Scratch scratch_;
  Result plain_;
};

// userfaultfd(2) -> ENOSYS and ioctl(USERFAULTFD_IOC_NEW) -> EPERM, as a
// container's seccomp profile does; inherited over exec.
bool DenyUserfaultfd() { return DenyUffd(true); }

// The program runs; movalloc finds no userfaultfd, says so, and falls back to
// a backend without it (collapse here), which still migrates.
TEST_F(ExecFaults, SeccompRefusesUserfaultfd) {
  Said s = Expect(DenyUserfaultfd);
  EXPECT_NE(s.backend, "move");
  EXPECT_NE(s.backend, "remap");
  EXPECT_NE(s.line.find("no-uffd(errno 38)"), std::string::npos) << s.line;  // ENOSYS
  if (s.backend == "collapse") { EXPECT_GT(s.migrated, 0); }
}

// Non-root with vm.unprivileged_userfaultfd=0 and /dev/userfaultfd not
// theirs: only a user-mode-only userfaultfd is there, which auto avoids (a
// system call writing a held arena would get EFAULT); the program runs, and
// collapse migrates.
TEST_F(ExecFaults, NonRootWithoutUserfaultfd) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to switch to user nobody and set the sysctl";
  const char *knob = "/proc/sys/vm/unprivileged_userfaultfd";
  std::string saved = ReadFile(knob);
  if (saved.empty()) GTEST_SKIP() << "no " << knob << " on this kernel";
  {
    std::ofstream k(knob);
    k << "0\n";
  }
  ASSERT_EQ(ReadFile(knob), "0\n");
  Said s = Expect([] {
    return setgroups(0, nullptr) == 0 && setgid(65534) == 0 && setuid(65534) == 0 &&
           geteuid() == 65534;
  });
  {
    std::ofstream k(knob);
    k << saved;
  }
  EXPECT_EQ(ReadFile(knob), saved) << "the sysctl was not restored";
  EXPECT_NE(s.backend, "move");
  EXPECT_NE(s.backend, "remap");
  EXPECT_TRUE(s.line.find("uffd-user-only") != std::string::npos ||
              s.line.find("no-uffd") != std::string::npos)
      << s.line;
  // Confirmed without PFNs in pagemap (PAGEMAP_SCAN): it really migrates.
  if (s.backend == "collapse") { EXPECT_GT(s.migrated, 0); }
}

// THP disabled for the process (inherited over exec): no huge page can be
// had, so no backend can do anything useful: "off", said why, nothing moved.
TEST_F(ExecFaults, ThpDisabledByPrctl) {
  Said s = Expect([] { return prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0; });
  EXPECT_EQ(s.backend, "off");
  EXPECT_NE(s.line.find("no-thp"), std::string::npos) << s.line;
  EXPECT_EQ(s.migrated, 0);
}

// SIGSTOP/SIGCONT of the whole process, every 50 ms, while the soak moves its
// heap under stress: it finishes (no hang), every byte is right, and it
// migrated meanwhile.
TEST(ExecFaultsSignals, StopContinueDuringCompaction) {
  Scratch scratch;
  std::string soak = Runfile("tests/soak/soak");
  ASSERT_EQ(access(soak.c_str(), X_OK), 0) << soak;
  int stops = 0;
  Result r = RunChild(scratch,
                 {soak, "--seconds", "6", "--threads", "3", "--live", "1500", "--report", "100",
                  "--min-migrations", "1"},
                 {"MOVALLOC_COMPACT_STRESS=1"}, nullptr, 90, [&](pid_t pid) {
                   if (stops++ % 5 == 0) {
                     kill(pid, SIGSTOP);
                     usleep(20 * 1000);
                     kill(pid, SIGCONT);
                   }
                 });
  EXPECT_TRUE(WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0)
      << "status " << r.status << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("mismatches 0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("soak: OK"), std::string::npos) << r.out;
  EXPECT_GT(stops / 5, 20) << "too few stops to mean anything";
  printf("[ info     ] %d stops: %s", stops / 5, r.out.c_str());
}

}  // namespace
