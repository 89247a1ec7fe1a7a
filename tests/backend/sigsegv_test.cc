// The mprotect backend's SIGSEGV side: held writers wait and lose nothing, the
// program's own SIGSEGV handler still gets its faults (installed before or
// after movalloc's, with sigaction or signal), SIG_DFL and SIG_IGN mean what
// they meant, the read() family and epoll_wait retry an EFAULT caused by a
// hold, and a hold is refused over an alternate signal stack.
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>

#include "tests/backend/backend_util.h"

extern "C" {
#include "shim/mv_sigsegv.h"
}

namespace mvtest {
namespace {

sigjmp_buf jump;
volatile sig_atomic_t handler_calls;
volatile uintptr_t handler_addr;

void SiginfoHandler(int, siginfo_t *si, void *) {
  handler_calls = handler_calls + 1;
  handler_addr = reinterpret_cast<uintptr_t>(si->si_addr);
  siglongjmp(jump, 1);
}

void PlainHandler(int) {
  handler_calls = handler_calls + 1;
  siglongjmp(jump, 1);
}

void InstallSiginfoHandler() {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = SiginfoHandler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  ASSERT_EQ(sigaction(SIGSEGV, &sa, nullptr), 0);
}

// A write to a PROT_NONE page: true when the program's handler caught it (once).
bool DeliberateFaultCaught() {
  char *p = static_cast<char *>(
      mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  int before = handler_calls;
  handler_addr = 0;
  bool caught = false;
  if (sigsetjmp(jump, 1) == 0) *(volatile char *)p = 1;
  else caught = handler_calls == before + 1;
  bool addr_ok = handler_addr == 0 || handler_addr == reinterpret_cast<uintptr_t>(p);
  munmap(p, kPage);
  return caught && addr_ok;
}

// Moves with the mprotect backend while a writer hammers the region: true when
// every move worked and no increment was lost.
bool MovesUnderWriter(int moves) {
  const mv_backend *b = mv_backend_get(MV_BACKEND_MPROTECT);
  Region r(1);
  Writer w(r);
  for (int i = 0; i < moves; i++) {
    w.Settle();
    int rc = MoveOnce(b, r.start(0), MV_STEP_NONE, nullptr, [&] {
      w.NextHole(0, i);
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    });
    if (rc != 0) return false;
  }
  w.Stop();
  return w.CountLost() == 0 && r.Verify(0) == 0 && mv_thp_is_huge(r.start(0)) == 1;
}

// Runs body in a child; returns its wait status. No core files.
template <typename F>
int InChild(F body) {
  pid_t pid = fork();
  if (pid == 0) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    _exit(body());
  }
  int status = -1;
  waitpid(pid, &status, 0);
  return status;
}

bool ExitedOk(int status) { return WIFEXITED(status) && WEXITSTATUS(status) == 0; }
bool DiedOfSegv(int status) { return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV; }

class Sigsegv : public testing::Test {
 protected:
  void SetUp() override {
    if (mv_backend_select(MV_BACKEND_MPROTECT, nullptr, 0)->kind != MV_BACKEND_MPROTECT)
      GTEST_SKIP() << "mprotect backend cannot stage here: " << mv_backend_probe()->why;
  }
};

TEST_F(Sigsegv, ProgramHandlerInstalledBefore) {
  int status = InChild([] {
    InstallSiginfoHandler();
    if (!MovesUnderWriter(40)) return 1;
    if (handler_calls != 0) return 2;  // held writes never reached the program
    if (!DeliberateFaultCaught()) return 3;
    struct sigaction old;
    if (sigaction(SIGSEGV, nullptr, &old) != 0 || old.sa_sigaction != SiginfoHandler) return 4;
    return 0;
  });
  EXPECT_TRUE(ExitedOk(status)) << "status " << status;
}

TEST_F(Sigsegv, ProgramHandlerInstalledAfter) {
  int status = InChild([] {
    if (!MovesUnderWriter(5)) return 1;
    struct sigaction old;
    if (sigaction(SIGSEGV, nullptr, &old) != 0 || old.sa_handler != SIG_DFL) return 5;
    InstallSiginfoHandler();
    if (!MovesUnderWriter(40)) return 1;
    if (handler_calls != 0) return 2;
    if (!DeliberateFaultCaught()) return 3;
    if (!DeliberateFaultCaught()) return 6;  // and again
    return 0;
  });
  EXPECT_TRUE(ExitedOk(status)) << "status " << status;
}

TEST_F(Sigsegv, ProgramHandlerViaSignal) {
  int status = InChild([] {
    if (signal(SIGSEGV, PlainHandler) != SIG_DFL) return 4;
    if (!MovesUnderWriter(10)) return 1;
    if (!DeliberateFaultCaught()) return 3;
    if (signal(SIGSEGV, SIG_DFL) != PlainHandler) return 5;  // the program's, not ours
    return 0;
  });
  EXPECT_TRUE(ExitedOk(status)) << "status " << status;
}

TEST_F(Sigsegv, DefaultActionStillKills) {
  int status = InChild([] {
    if (!MovesUnderWriter(5)) return 1;
    char *p = static_cast<char *>(
        mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    *(volatile char *)p = 1;
    return 0;
  });
  EXPECT_TRUE(DiedOfSegv(status)) << "status " << status;
  status = InChild([] {
    if (!MovesUnderWriter(5)) return 1;
    raise(SIGSEGV);  // sent, not a fault: re-raised with the default action
    return 0;
  });
  EXPECT_TRUE(DiedOfSegv(status)) << "status " << status;
}

TEST_F(Sigsegv, IgnoredIsIgnoredButAFaultStillKills) {
  int status = InChild([] {
    signal(SIGSEGV, SIG_IGN);
    if (!MovesUnderWriter(5)) return 1;
    raise(SIGSEGV);
    return 0;  // survived: ignored, as asked
  });
  EXPECT_TRUE(ExitedOk(status)) << "status " << status;
  status = InChild([] {
    signal(SIGSEGV, SIG_IGN);
    if (!MovesUnderWriter(5)) return 1;
    char *p = static_cast<char *>(
        mmap(nullptr, kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    *(volatile char *)p = 1;  // the kernel does not let a fault be ignored
    return 0;
  });
  EXPECT_TRUE(DiedOfSegv(status)) << "status " << status;
}

// A thread's alternate signal stack inside a range: holding the range is
// refused (the kernel could not write a signal frame on a read-only stack and
// would kill the process), and allowed again once the stack is disabled.
TEST(SigsegvAltstack, HoldRefusedOverAnAlternateStack) {
  size_t len = 4 * kPage;
  char *m = static_cast<char *>(
      mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(m, MAP_FAILED);
  uintptr_t a = reinterpret_cast<uintptr_t>(m);
  stack_t ss = {}, old = {};
  ss.ss_sp = m + kPage;
  ss.ss_size = 2 * kPage;
  ASSERT_EQ(sigaltstack(&ss, &old), 0);
  EXPECT_EQ(mv_sigsegv_hold(a, len), -EAGAIN);
  EXPECT_EQ(mv_sigsegv_held(), 0u);
  EXPECT_EQ(mv_sigsegv_hold(a + 3 * kPage, kPage), 0) << "a range beside the stack is fine";
  mv_sigsegv_release(a + 3 * kPage);
  stack_t off = {};
  off.ss_flags = SS_DISABLE;
  ASSERT_EQ(sigaltstack(&off, nullptr), 0);
  EXPECT_EQ(mv_sigsegv_hold(a, len), 0);
  mv_sigsegv_release(a);
  munmap(m, len);
}

// ---- the system call wrappers ----

class SyscallRetry : public testing::Test {
 protected:
  void SetUp() override {
    buf_ = static_cast<char *>(
        mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(buf_, MAP_FAILED);
  }
  void TearDown() override { munmap(buf_, 2 * kPage); }

  // Holds buf_ read-only for 30 ms around call(); returns call()'s result and
  // how long it took.
  template <typename F>
  ssize_t DuringHold(F call, double *ms) {
    uintptr_t a = reinterpret_cast<uintptr_t>(buf_);
    EXPECT_EQ(mv_sigsegv_hold(a, 2 * kPage), 0);
    EXPECT_EQ(mprotect(buf_, 2 * kPage, PROT_READ), 0);
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      EXPECT_EQ(mprotect(buf_, 2 * kPage, PROT_READ | PROT_WRITE), 0);
      mv_sigsegv_release(a);
    });
    auto t0 = std::chrono::steady_clock::now();
    ssize_t r = call();
    *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    releaser.join();
    EXPECT_EQ(mv_sigsegv_held(), 0u);
    return r;
  }
  char *buf_ = nullptr;
};

TEST_F(SyscallRetry, ReadWaitsForTheRelease) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "hello", 5), 5);
  double ms;
  EXPECT_EQ(DuringHold([&] { return read(fds[0], buf_ + 100, 5); }, &ms), 5);
  EXPECT_EQ(memcmp(buf_ + 100, "hello", 5), 0);
  EXPECT_GE(ms, 25.0);
  close(fds[0]);
  close(fds[1]);
}

TEST_F(SyscallRetry, PreadAndReadvWait) {
  char path[] = "/var/tmp/mv_pread_XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  unlink(path);
  ASSERT_EQ(write(fd, "0123456789", 10), 10);
  double ms;
  EXPECT_EQ(DuringHold([&] { return pread(fd, buf_ + kPage, 4, 3); }, &ms), 4);
  EXPECT_EQ(memcmp(buf_ + kPage, "3456", 4), 0);
  EXPECT_GE(ms, 25.0);
  ASSERT_EQ(lseek(fd, 0, SEEK_SET), 0);
  struct iovec iov[2] = {{buf_, 3}, {buf_ + kPage + 10, 3}};
  EXPECT_EQ(DuringHold([&] { return readv(fd, iov, 2); }, &ms), 6);
  EXPECT_EQ(memcmp(buf_, "012", 3), 0);
  EXPECT_EQ(memcmp(buf_ + kPage + 10, "345", 3), 0);
  EXPECT_GE(ms, 25.0);
  close(fd);
}

TEST_F(SyscallRetry, RecvAndRecvfromWait) {
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ASSERT_EQ(send(sv[1], "abcdef", 6, 0), 6);
  double ms;
  EXPECT_EQ(DuringHold([&] { return recv(sv[0], buf_, 3, 0); }, &ms), 3);
  EXPECT_EQ(memcmp(buf_, "abc", 3), 0);
  EXPECT_GE(ms, 25.0);
  struct sockaddr_storage from;
  socklen_t len = sizeof from;
  EXPECT_EQ(DuringHold(
                [&] { return recvfrom(sv[0], buf_ + 8, 3, 0, (struct sockaddr *)&from, &len); },
                &ms),
            3);
  EXPECT_EQ(memcmp(buf_ + 8, "def", 3), 0);
  EXPECT_GE(ms, 25.0);
  close(sv[0]);
  close(sv[1]);
}

TEST_F(SyscallRetry, EpollWaitWaitsAndLosesNoEvent) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  epoll_event want = {};
  want.events = EPOLLIN;
  want.data.u64 = 42;
  ASSERT_EQ(epoll_ctl(ep, EPOLL_CTL_ADD, fds[0], &want), 0);
  auto *ev = reinterpret_cast<epoll_event *>(buf_ + 64);
  double ms;
  EXPECT_EQ(DuringHold([&] { return (ssize_t)epoll_wait(ep, ev, 4, 5000); }, &ms), 1);
  EXPECT_EQ(ev[0].data.u64, 42u);
  EXPECT_GE(ms, 25.0);
  close(ep);
  close(fds[0]);
  close(fds[1]);
}

// readdir refills the DIR's own buffer (from malloc, next to the DIR) by a
// getdents64 inside glibc: held, it waits and then returns the next entry
// instead of NULL with EFAULT (python's os.listdir under the mprotect backend).
TEST_F(SyscallRetry, ReaddirWaitsForTheRelease) {
  ASSERT_EQ(mv_sigsegv_install(), 0);  // anything else there that is written waits too
  DIR *d = opendir("/");
  ASSERT_NE(d, nullptr);
  uintptr_t lo = reinterpret_cast<uintptr_t>(d) & ~(kPage - 1);
  size_t len = (reinterpret_cast<uintptr_t>(d) + (32 << 10) + 64 + kPage - 1 - lo) & ~(kPage - 1);
  std::atomic<bool> held{false};  // the DIR and its 32 KiB buffer
  std::thread releaser([&] {  // started before the hold: it allocates nothing after
    while (!held.load()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    EXPECT_EQ(mprotect(reinterpret_cast<void *>(lo), len, PROT_READ | PROT_WRITE), 0);
    mv_sigsegv_release(lo);
  });
  EXPECT_EQ(mv_sigsegv_hold(lo, len), 0);
  int prot = mprotect(reinterpret_cast<void *>(lo), len, PROT_READ);
  held = true;
  ASSERT_EQ(prot, 0) << strerror(errno);  // its message allocates: it waits for the release
  auto t0 = std::chrono::steady_clock::now();
  errno = 0;
  struct dirent *e = readdir(d);
  int err = errno;
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  releaser.join();
  EXPECT_NE(e, nullptr) << strerror(err);
  EXPECT_GE(ms, 25.0);
  closedir(d);
}

// A buffer nobody holds: EFAULT comes back at once, as without movalloc.
TEST_F(SyscallRetry, GenuineEfaultIsReturned) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  ASSERT_EQ(mprotect(buf_, kPage, PROT_READ), 0);
  errno = 0;
  EXPECT_EQ(read(fds[0], buf_, 1), -1);
  EXPECT_EQ(errno, EFAULT);
  close(fds[0]);
  close(fds[1]);
}

// A thread writing a held range waits on the futex, then its write lands.
TEST_F(SyscallRetry, HeldWriterWaits) {
  ASSERT_EQ(mv_sigsegv_install(), 0);
  double ms;
  std::atomic<bool> done{false};
  EXPECT_EQ(DuringHold(
      [&] {
        std::thread t([&] {
          buf_[kPage + 5] = 42;
          done = true;
        });
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        bool early = done.load();
        t.join();
        return early ? (ssize_t)-1 : (ssize_t)0;
      },
      &ms), 0) << "the write went through while held";
  EXPECT_TRUE(done.load());
  EXPECT_EQ(buf_[kPage + 5], 42);
  EXPECT_GE(ms, 25.0);
}

// A thread that blocked every signal (as servers' worker threads and libunwind
// do) and then writes a held range waits like any other writer: once the
// handler is installed, sigprocmask and pthread_sigmask leave SIGSEGV
// unblocked, and block the rest. With SIGSEGV blocked the kernel would kill
// the process on that write.
TEST_F(SyscallRetry, WriterWithEverySignalBlockedWaits) {
  ASSERT_EQ(mv_sigsegv_install(), 0);
  for (bool use_pthread : {false, true}) {
    int status = InChild([&] {
      double ms = 0;
      bool segv_blocked = true, usr1_blocked = false;
      ssize_t r = DuringHold(
          [&] {
            std::thread t([&] {
              sigset_t all, now;
              sigfillset(&all);
              if (use_pthread) pthread_sigmask(SIG_BLOCK, &all, nullptr);
              else sigprocmask(SIG_BLOCK, &all, nullptr);
              pthread_sigmask(SIG_SETMASK, nullptr, &now);
              segv_blocked = sigismember(&now, SIGSEGV);
              usr1_blocked = sigismember(&now, SIGUSR1);
              buf_[kPage + 7] = 43;
            });
            t.join();
            return (ssize_t)0;
          },
          &ms);
      if (segv_blocked || !usr1_blocked) return 2;
      return r == 0 && buf_[kPage + 7] == 43 && ms >= 25.0 ? 0 : 1;
    });
    EXPECT_TRUE(ExitedOk(status))
        << (use_pthread ? "pthread_sigmask" : "sigprocmask") << ": wait status " << status
        << (DiedOfSegv(status) ? ", killed by the held write" : "")
        << " (exit 1: the write did not wait or land, 2: the mask is wrong)";
  }
}

}  // namespace
}  // namespace mvtest
