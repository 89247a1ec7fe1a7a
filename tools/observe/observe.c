/* observe: runs a command and samples its memory while it runs: RSS, anonymous
 * RSS and AnonHugePages from /proc/PID/smaps_rollup, so huge-page coverage over
 * time can be compared between allocators.
 *
 * usage: observe [-i MS] [-o CSV] [-l LABEL] -- CMD [ARGS...]
 *   -i MS     sampling interval (default 100)
 *   -o CSV    write every sample: t_s,rss_kib,anon_kib,anon_huge_kib,coverage
 *   -l LABEL  first column of the summary line (default: the command name)
 * At the end, on stderr, one line:
 *   observe LABEL wall_s S peak_rss_mib M final_coverage C mean_coverage C exit N
 * coverage = AnonHugePages / anonymous RSS (0..1). Exit status: the command's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct sample {
  long rss_kib, anon_kib, huge_kib;
};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* 0 on success; -1 when the process is gone. */
static int read_rollup(pid_t pid, struct sample *s) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  memset(s, 0, sizeof *s);
  while (fgets(line, sizeof line, f)) {
    sscanf(line, "Rss: %ld kB", &s->rss_kib);
    sscanf(line, "Anonymous: %ld kB", &s->anon_kib);
    sscanf(line, "AnonHugePages: %ld kB", &s->huge_kib);
  }
  fclose(f);
  return s->rss_kib > 0 ? 0 : -1;
}

static double coverage(const struct sample *s) {
  return s->anon_kib > 0 ? (double)s->huge_kib / (double)s->anon_kib : 0.0;
}

static void usage(void) {
  fprintf(stderr, "usage: observe [-i MS] [-o CSV] [-l LABEL] -- CMD [ARGS...]\n");
  exit(2);
}

int main(int argc, char **argv) {
  long interval_ms = 100;
  const char *csv_path = NULL, *label = NULL;
  int opt;
  while ((opt = getopt(argc, argv, "i:o:l:")) != -1) {
    switch (opt) {
      case 'i': interval_ms = strtol(optarg, NULL, 10); break;
      case 'o': csv_path = optarg; break;
      case 'l': label = optarg; break;
      default: usage();
    }
  }
  if (optind >= argc || interval_ms <= 0) usage();
  if (!label) label = argv[optind];
  FILE *csv = NULL;
  if (csv_path && !(csv = fopen(csv_path, "w"))) {
    fprintf(stderr, "observe: cannot write %s: %s\n", csv_path, strerror(errno));
    return 2;
  }
  if (csv) {
    fprintf(csv, "t_s,rss_kib,anon_kib,anon_huge_kib,coverage\n");
    fflush(csv);
  }

  double t0 = now_s();
  pid_t pid = fork();
  if (pid < 0) {
    perror("observe: fork");
    return 2;
  }
  if (pid == 0) {
    execvp(argv[optind], argv + optind);
    fprintf(stderr, "observe: cannot run %s: %s\n", argv[optind], strerror(errno));
    _exit(127);
  }
  long peak_rss = 0, samples = 0;
  double coverage_sum = 0;
  struct sample last = {0, 0, 0};
  int status = 0;
  for (;;) {
    pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    struct sample s;
    if (read_rollup(pid, &s) == 0) {
      last = s;
      if (s.rss_kib > peak_rss) peak_rss = s.rss_kib;
      coverage_sum += coverage(&s);
      samples++;
      if (csv) { /* flushed per sample: `movalloc plot` may read it while this runs */
        fprintf(csv, "%.3f,%ld,%ld,%ld,%.4f\n", now_s() - t0, s.rss_kib, s.anon_kib, s.huge_kib,
                coverage(&s));
        fflush(csv);
      }
    }
    struct timespec ts = {interval_ms / 1000, (interval_ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
  }
  double wall = now_s() - t0;
  if (csv) fclose(csv);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  fprintf(stderr,
          "observe %s wall_s %.2f peak_rss_mib %.1f final_coverage %.3f mean_coverage %.3f "
          "exit %d\n",
          label, wall, (double)peak_rss / 1024.0, coverage(&last),
          samples ? coverage_sum / (double)samples : 0.0, code);
  return code;
}
