// The probe and the choice of a backend: what this kernel offers, what is
// chosen when features are hidden (masks, a faked OS, seccomp,
// PR_SET_THP_DISABLE), and that nothing crashes or hangs on the way.
#include <fcntl.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/backend/backend_util.h"
#include "tests/deny_uffd.h"

extern "C" {
#include "compactor/mv_uffd.h"
}

namespace mvtest {
namespace {

class Probe : public testing::Test {
 protected:
  void TearDown() override {
    mv_prim_reset();
    mv_backend_mask_probe(nullptr);
    mv_backend_forget_probe();
  }
  static bool HasEverything(const mv_probe *p) {
    return p->uffd && !p->uffd_user_only && p->uffd_wp && p->uffd_wp_unpopulated &&
           p->uffd_move && p->collapse && p->thp;
  }
  static mv_backend_kind Auto(std::string *why = nullptr) {
    char buf[128];
    const mv_backend *b = mv_backend_select(MV_BACKEND_AUTO, buf, sizeof buf);
    if (why) *why = buf;
    return b->kind;
  }
};

TEST_F(Probe, ThisKernel) {
  mv_backend_forget_probe();
  const mv_probe *p = mv_backend_probe();
  printf("[ info     ] probe: %s\n", p->why);
  EXPECT_GT(strlen(p->why), 10u);
  EXPECT_EQ(mv_backend_probe(), p) << "cached";
  if (p->uffd_move || p->uffd_wp_unpopulated) { EXPECT_TRUE(p->uffd_wp); }
  if (p->uffd_wp) { EXPECT_TRUE(p->uffd); }
  if (!p->uffd) { EXPECT_NE(p->uffd_errno, 0); }
  std::string why;
  mv_backend_kind k = Auto(&why);
  printf("[ info     ] select(auto): %s\n", why.c_str());
  EXPECT_NE(why.find(mv_backend_name(k)), std::string::npos);
  if (p->uffd_move && p->thp && !p->uffd_user_only) { EXPECT_EQ(k, MV_BACKEND_MOVE); }
}

// With every feature present, hiding some gives the documented order:
// move > collapse > remap > mprotect > off, pin-safe ones first.
TEST_F(Probe, MasksChooseTheFallback) {
  if (!HasEverything(mv_backend_probe()))
    GTEST_SKIP() << "needs a kernel with every feature to check the order: "
                 << mv_backend_probe()->why;
  struct Case {
    const char *what;
    void (*hide)(mv_probe *);
    mv_backend_kind want;
  } cases[] = {
      {"nothing hidden", [](mv_probe *) {}, MV_BACKEND_MOVE},
      {"no userfaultfd", [](mv_probe *m) { m->uffd = false; }, MV_BACKEND_COLLAPSE},
      {"no UFFDIO_MOVE", [](mv_probe *m) { m->uffd_move = false; }, MV_BACKEND_COLLAPSE},
      {"no write-protect", [](mv_probe *m) { m->uffd_wp = false; }, MV_BACKEND_COLLAPSE},
      {"no MOVE, no collapse",
       [](mv_probe *m) { m->uffd_move = false, m->collapse = false; }, MV_BACKEND_REMAP},
      {"no uffd, no collapse", [](mv_probe *m) { m->uffd = false, m->collapse = false; },
       MV_BACKEND_MPROTECT},
      {"no THP", [](mv_probe *m) { m->thp = false; }, MV_BACKEND_COLLAPSE},
      {"no THP, no collapse", [](mv_probe *m) { m->thp = false, m->collapse = false; },
       MV_BACKEND_OFF},
  };
  for (const Case &c : cases) {
    mv_probe mask = KeepAll();
    c.hide(&mask);
    mv_backend_mask_probe(&mask);
    mv_backend_forget_probe();
    std::string why;
    EXPECT_EQ(Auto(&why), c.want) << c.what << ": " << why;
    printf("[ info     ] %-22s -> %s\n", c.what, why.c_str());
    // Asking by name for one that does not run says so and falls back.
    for (int k = 0; k < MV_BACKEND_COUNT; k++) {
      char buf[128];
      const mv_backend *b = mv_backend_select((mv_backend_kind)k, buf, sizeof buf);
      if (b->kind != k) {
        EXPECT_EQ(b->kind, c.want) << c.what << ", asked for " << mv_backend_name((mv_backend_kind)k);
        EXPECT_NE(strstr(buf, "unavailable"), nullptr) << buf;
      }
    }
  }
}

TEST_F(Probe, NamesRoundTrip) {
  for (int k = MV_BACKEND_AUTO; k < MV_BACKEND_COUNT; k++) {
    mv_backend_kind out;
    ASSERT_EQ(mv_backend_parse(mv_backend_name((mv_backend_kind)k), &out), 0) << k;
    EXPECT_EQ(out, k);
    if (k >= 0) { EXPECT_STREQ(mv_backend_get((mv_backend_kind)k)->name, mv_backend_name(out)); }
  }
  mv_backend_kind out;
  EXPECT_EQ(mv_backend_parse("fast", &out), -1);
  EXPECT_EQ(mv_backend_parse(nullptr, &out), -1);
}

// Threads racing into the first probe all get the one result.
TEST_F(Probe, ConcurrentFirstProbe) {
  mv_backend_forget_probe();
  std::vector<const mv_probe *> got(4);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); i++)
    threads.emplace_back([&got, i] { got[i] = mv_backend_probe(); });
  for (auto &t : threads) t.join();
  for (const mv_probe *p : got) EXPECT_EQ(p, got[0]);
}

// ---- a faked OS ----

int NoUffdSyscall(int flags) {
  errno = ENOSYS;
  return -1;
}
int FullModeRefused(int flags) {
  if (!(flags & UFFD_USER_MODE_ONLY)) {
    errno = EPERM;
    return -1;
  }
  return mv_prim_real.userfaultfd(flags);
}
int NoDevUffd(int fd, unsigned long request, void *arg) {
  if (request == USERFAULTFD_IOC_NEW) {
    errno = EPERM;
    return -1;
  }
  return mv_prim_real.ioctl(fd, request, arg);
}
void *NoMmap(void *, size_t, int, int, int, off_t) {
  errno = ENOMEM;
  return MAP_FAILED;
}

TEST_F(Probe, NoUserfaultfdAtAll) {
  struct mv_prim fake = mv_prim_real;
  fake.userfaultfd = NoUffdSyscall;
  fake.ioctl = NoDevUffd;
  mv_prim_set(&fake);
  mv_backend_forget_probe();
  const mv_probe *p = mv_backend_probe();
  EXPECT_FALSE(p->uffd);
  EXPECT_FALSE(p->uffd_wp || p->uffd_move || p->uffd_user_only);
  EXPECT_EQ(p->uffd_errno, ENOSYS);
  printf("[ info     ] %s\n", p->why);
  EXPECT_NE(Auto(), MV_BACKEND_MOVE);
  EXPECT_NE(Auto(), MV_BACKEND_REMAP);
  // A uffd backend used anyway fails cleanly, with nothing staged or held.
  Region r(1);
  for (const mv_backend *b : {mv_backend_get(MV_BACKEND_MOVE), mv_backend_get(MV_BACKEND_REMAP)}) {
    EXPECT_EQ(MoveOnce(b, r.start(0)), -ENOSYS) << b->name;
  }
  EXPECT_EQ(r.Verify(0), 0u);
}

// Only UFFD_USER_MODE_ONLY works (an unprivileged process): found, but auto
// avoids it, because a system call writing a held arena gets EFAULT. Shown.
TEST_F(Probe, UserModeOnlyIsAvoided) {
  struct mv_prim fake = mv_prim_real;
  fake.userfaultfd = FullModeRefused;
  fake.ioctl = NoDevUffd;
  mv_prim_set(&fake);
  mv_backend_forget_probe();
  const mv_probe *p = mv_backend_probe();
  ASSERT_TRUE(p->uffd) << p->why;
  EXPECT_TRUE(p->uffd_user_only);
  EXPECT_EQ(p->uffd_errno, EPERM);
  std::string why;
  mv_backend_kind k = Auto(&why);
  EXPECT_NE(k, MV_BACKEND_MOVE) << why;
  EXPECT_NE(k, MV_BACKEND_REMAP) << why;
  printf("[ info     ] %s\n[ info     ] %s\n", p->why, why.c_str());
  if (!p->uffd_move || !p->thp) GTEST_SKIP() << "no move backend to show the hazard with";
  const mv_backend *b = mv_backend_select(MV_BACKEND_MOVE, nullptr, 0);
  ASSERT_EQ(b->kind, MV_BACKEND_MOVE) << "asked for by name, it runs";
  EXPECT_FALSE(b->holds_syscalls);

  Region r(1);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "abcd", 4), 4);
  mv_move m;
  memset(&m, 0, sizeof m);
  m.start = r.start(0);
  ASSERT_EQ(b->stage(&m), 0);
  ASSERT_EQ(b->hold(&m), 0);
  errno = 0;
  EXPECT_EQ(read(fds[0], r.arena(0), 4), -1);
  EXPECT_EQ(errno, EFAULT);
  EXPECT_EQ(b->move(&m), 0);
  b->release(&m);
  b->unstage(&m);
  EXPECT_EQ(read(fds[0], r.arena(0), 4), 4) << "the pipe kept the data";
  EXPECT_EQ(memcmp(r.arena(0), "abcd", 4), 0);
  close(fds[0]);
  close(fds[1]);
}

// MADV_HUGEPAGE accepted but the fault gets 4 KiB pages (fragmented memory).
int NoHugeFault(void *addr, size_t len, int advice) {
  if (advice == MADV_HUGEPAGE) return madvise(addr, len, MADV_NOHUGEPAGE);
  return madvise(addr, len, advice);
}

TEST_F(Probe, NoMemoryAtAll) {
  struct mv_prim fake = mv_prim_real;
  fake.mmap = NoMmap;
  mv_prim_set(&fake);
  mv_backend_forget_probe();
  const mv_probe *p = mv_backend_probe();
  // THP stays "configured" (sysfs and prctl say so; a failed fault only means
  // "not now"), but nothing that needed memory to be tried is claimed.
  EXPECT_FALSE(p->collapse);
  EXPECT_FALSE(p->uffd_wp);
  EXPECT_FALSE(p->uffd_move);
  enum mv_backend_kind chosen = Auto();
  EXPECT_TRUE(chosen == MV_BACKEND_MPROTECT || chosen == MV_BACKEND_OFF) << chosen;
  EXPECT_EQ(chosen == MV_BACKEND_MPROTECT, p->thp);
  printf("[ info     ] %s\n", p->why);
}

// A THP fault failing while memory is fragmented is "not now": THP counts as
// available when the kernel has it on, so the best backend is still chosen
// and staging retries later (-EAGAIN), instead of the process settling for a
// worse backend for its whole life.
TEST_F(Probe, ThpFaultFailingNowIsNotNever) {
  char buf[128] = {};
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (!f) GTEST_SKIP() << "no THP in this kernel";
  bool on = fgets(buf, sizeof buf, f) && (strstr(buf, "[always]") || strstr(buf, "[madvise]"));
  fclose(f);
  if (!on) GTEST_SKIP() << "THP is off here: " << buf;
  struct mv_prim fake = mv_prim_real;
  fake.madvise = NoHugeFault;
  mv_prim_set(&fake);
  mv_backend_forget_probe();
  const mv_probe *p = mv_backend_probe();
  EXPECT_TRUE(p->thp);
  mv_prim_reset();
  printf("[ info     ] %s\n", p->why);
}

// ---- the real thing in a child: seccomp, PR_SET_THP_DISABLE ----

struct ChildResult {
  mv_probe probe;
  mv_backend_kind chosen;
};

// Runs setup in a child, then probes there; returns what the child found.
template <typename F>
ChildResult ProbeInChild(F setup) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  if (pid == 0) {
    if (!setup()) _exit(2);
    mv_backend_forget_probe();
    ChildResult r;
    r.probe = *mv_backend_probe();
    r.chosen = mv_backend_select(MV_BACKEND_AUTO, nullptr, 0)->kind;
    _exit(write(fds[1], &r, sizeof r) == sizeof r ? 0 : 3);
  }
  ChildResult r;
  memset(&r, 0, sizeof r);
  EXPECT_EQ(read(fds[0], &r, sizeof r), (ssize_t)sizeof r);
  int status;
  EXPECT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  close(fds[0]);
  close(fds[1]);
  return r;
}

TEST_F(Probe, SeccompDeniesTheSystemCall) {
  ChildResult r = ProbeInChild([] { return DenyUffd(false); });
  printf("[ info     ] seccomp on userfaultfd(2): %s\n", r.probe.why);
  // /dev/userfaultfd is not the system call: where it exists it still works.
  if (access("/dev/userfaultfd", R_OK | W_OK) == 0) {
    EXPECT_TRUE(r.probe.uffd);
  } else {
    EXPECT_FALSE(r.probe.uffd);
    EXPECT_EQ(r.probe.uffd_errno, ENOSYS);
  }
}

TEST_F(Probe, SeccompDeniesBothWays) {
  ChildResult r = ProbeInChild([] { return DenyUffd(true); });
  printf("[ info     ] seccomp on both: %s\n", r.probe.why);
  EXPECT_FALSE(r.probe.uffd);
  EXPECT_EQ(r.probe.uffd_errno, ENOSYS);
  EXPECT_NE(r.chosen, MV_BACKEND_MOVE);
  EXPECT_NE(r.chosen, MV_BACKEND_REMAP);
}

TEST_F(Probe, ThpDisabledByPrctl) {
  ChildResult r = ProbeInChild([] { return prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0; });
  printf("[ info     ] PR_SET_THP_DISABLE: %s\n", r.probe.why);
  EXPECT_FALSE(r.probe.thp);
  EXPECT_FALSE(r.probe.collapse);
  EXPECT_EQ(r.chosen, MV_BACKEND_OFF);
}

}  // namespace
}  // namespace mvtest
