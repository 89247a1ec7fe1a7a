// measure: run one command and write its wall time and rusage to a file, for
// bench/run.py.
//
// Why not os.wait4 in the harness itself: ru_maxrss survives exec, so a
// process forked from the Python harness reports at least the harness's own
// RSS (from a 200 MiB Python, /bin/true reports 218 MiB; from a bare harness,
// about 10 MiB, more than several workloads use). Forked from this small
// program, a command's floor is about 1 MiB.
//
// usage: measure [-p PRELOAD] REPORT_FILE PROG [ARGS...]
// -p sets LD_PRELOAD for PROG only: measure itself stays on glibc, so the
// allocator under test neither runs the measurement nor raises its floor.
// REPORT_FILE gets one line:
//   exit <code> signal <signo> wall_s <s> user_s <s> sys_s <s> maxrss_kib <KiB>
// measure exits with the command's status (128 + signal if it was killed).
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double seconds(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec / 1e6; }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  const char *preload = NULL;
  int opt;
  while ((opt = getopt(argc, argv, "+p:")) != -1) {
    if (opt != 'p') break;
    preload = optarg;
  }
  if (opt == '?' || argc - optind < 2) {
    fprintf(stderr, "usage: %s [-p PRELOAD] REPORT_FILE PROG [ARGS...]\n", argv[0]);
    return 2;
  }
  const char *report = argv[optind];
  char **cmd = &argv[optind + 1];
  double start = now_s();
  pid_t pid = fork();
  if (pid < 0) {
    perror("measure: fork");
    return 2;
  }
  if (pid == 0) {
    if (preload) setenv("LD_PRELOAD", preload, 1);
    execvp(cmd[0], cmd);
    fprintf(stderr, "measure: exec %s: %s\n", cmd[0], strerror(errno));
    _exit(127);
  }
  int status;
  struct rusage ru;
  while (wait4(pid, &status, 0, &ru) < 0) {
    if (errno != EINTR) {
      perror("measure: wait4");
      return 2;
    }
  }
  double wall = now_s() - start;

  int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
  FILE *f = fopen(report, "w");
  if (!f) {
    perror("measure: report file");
    return 2;
  }
  fprintf(f, "exit %d signal %d wall_s %.6f user_s %.6f sys_s %.6f maxrss_kib %ld\n", code, sig,
          wall, seconds(ru.ru_utime), seconds(ru.ru_stime), ru.ru_maxrss);
  fclose(f);
  return sig ? 128 + sig : code;
}
