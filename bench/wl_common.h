// Shared helpers for the bench/wl_*.c workloads: argument parsing, a fixed-seed
// PRNG, object tagging and the result lines that bench/run.py parses.
//
// Output contract (stdout), one item per line:
//   checksum <16 hex digits>   must be identical under every allocator
//   metric <name> <value>      optional workload-specific numbers (ns/access, RSS)
// A verification failure prints "CORRUPT ..." to stderr and exits with status 3.
#ifndef MOVALLOC_BENCH_WL_COMMON_H_
#define MOVALLOC_BENCH_WL_COMMON_H_

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum wl_flags {
  WL_THREADED = 1 << 0,  // accepts --threads N
  WL_HAS_BIG = 1 << 1,   // accepts --big
  WL_HAS_SETTLE = 1 << 2, // accepts --settle SECONDS
};

struct wl_opts {
  double scale;
  int threads;
  bool big;
  double settle; // seconds between building the heap and using it
};

static void wl_usage(const char *name, unsigned flags) {
  fprintf(stderr, "usage: %s [--scale X]%s%s%s\n", name,
          (flags & WL_THREADED) ? " [--threads N]" : "",
          (flags & WL_HAS_BIG) ? " [--big]" : "",
          (flags & WL_HAS_SETTLE) ? " [--settle SECONDS]" : "");
  exit(2);
}

static struct wl_opts wl_parse(int argc, char **argv, unsigned flags,
                               int default_threads) {
  struct wl_opts o = {.scale = 1.0, .threads = default_threads, .big = false};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--scale") && i + 1 < argc) {
      o.scale = atof(argv[++i]);
      if (!(o.scale > 0)) wl_usage(argv[0], flags);
    } else if (!strcmp(a, "--threads") && i + 1 < argc && (flags & WL_THREADED)) {
      o.threads = atoi(argv[++i]);
      if (o.threads < 1 || o.threads > 256) wl_usage(argv[0], flags);
    } else if (!strcmp(a, "--big") && (flags & WL_HAS_BIG)) {
      o.big = true;
    } else if (!strcmp(a, "--settle") && i + 1 < argc && (flags & WL_HAS_SETTLE)) {
      o.settle = atof(argv[++i]);
      if (!(o.settle >= 0)) wl_usage(argv[0], flags);
    } else {
      wl_usage(argv[0], flags);
    }
  }
  return o;
}

// Scaled iteration count, never zero so tiny --scale values still run.
static uint64_t wl_scaled(uint64_t base, double scale) {
  double v = (double)base * scale;
  return v < 1.0 ? 1 : (uint64_t)v;
}

// splitmix64: one add and a finaliser per draw, plenty for workload shapes.
struct wl_rng {
  uint64_t s;
};

static inline uint64_t wl_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static inline uint64_t wl_next(struct wl_rng *r) {
  r->s += 0x9e3779b97f4a7c15ULL;
  return wl_mix(r->s);
}

static inline struct wl_rng wl_seed(uint64_t seed) {
  return (struct wl_rng){.s = wl_mix(seed ^ 0x6d6f76616c6c6f63ULL)};
}

// Uniform in [0, n): multiply-high avoids the modulo bias and the divide.
static inline uint64_t wl_below(struct wl_rng *r, uint64_t n) {
  return (uint64_t)(((unsigned __int128)wl_next(r) * n) >> 64);
}

static inline uint64_t wl_range(struct wl_rng *r, uint64_t lo, uint64_t hi) {
  return lo + wl_below(r, hi - lo + 1);
}

// Log-uniform in [lo, hi]: sizes spread evenly over the powers of two, as real
// allocation sizes are, instead of piling up near hi.
static inline uint64_t wl_log_range(struct wl_rng *r, uint64_t lo, uint64_t hi) {
  int lo_bits = 63 - __builtin_clzll(lo);
  int hi_bits = hi <= 1 ? 0 : 64 - __builtin_clzll(hi - 1);  // ceil(log2(hi))
  int bits = lo_bits + (int)wl_below(r, (uint64_t)(hi_bits > lo_bits ? hi_bits - lo_bits : 1));
  uint64_t base = 1ULL << bits;
  uint64_t v = base + wl_below(r, base);
  return v < lo ? lo : v > hi ? hi : v;
}

static inline void *wl_xmalloc(size_t n) {
  void *p = malloc(n);
  if (!p) {
    fprintf(stderr, "CORRUPT malloc(%zu) returned NULL\n", n);
    exit(3);
  }
  return p;
}

// Stamp an object (size >= 8) at both ends so a block handed out twice or
// overlapping a neighbour is caught when it is freed.
static inline void wl_stamp(void *p, size_t size, uint64_t tag) {
  memcpy(p, &tag, 8);
  if (size >= 16) {
    uint64_t t2 = ~tag;
    memcpy((char *)p + size - 8, &t2, 8);
  }
}

static inline void wl_check(const void *p, size_t size, uint64_t tag) {
  uint64_t a, b = ~tag;
  memcpy(&a, p, 8);
  if (size >= 16) memcpy(&b, (const char *)p + size - 8, 8);
  if (a != tag || b != ~tag) {
    fprintf(stderr, "CORRUPT object %p size %zu: tag %016" PRIx64 " expected %016" PRIx64 "\n",
            p, size, a, tag);
    exit(3);
  }
}

static inline uint64_t wl_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

// Resident set of this process right now, in bytes (statm field 2).
static inline uint64_t wl_rss_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  unsigned long size = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
    fclose(f);
  }
  return (uint64_t)resident * (uint64_t)sysconf(_SC_PAGESIZE);
}

static inline void wl_checksum(uint64_t sum) {
  printf("checksum %016" PRIx64 "\n", sum);
}

static inline void wl_metric(const char *name, double value) {
  printf("metric %s %.3f\n", name, value);
}

// AnonHugePages as a percentage of the anonymous RSS (Rss_Anon isn't in every
// smaps_rollup: Anonymous is), from /proc/self/smaps_rollup; -1 if unreadable.
static double wl_anon_huge_pct(void) {
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  if (!f) return -1;
  char line[256];
  double anon = 0, huge = 0;
  while (fgets(line, sizeof line, f)) {
    sscanf(line, "Anonymous: %lf", &anon);
    sscanf(line, "AnonHugePages: %lf", &huge);
  }
  fclose(f);
  return anon > 0 ? 100.0 * huge / anon : -1;
}

#endif  // MOVALLOC_BENCH_WL_COMMON_H_
