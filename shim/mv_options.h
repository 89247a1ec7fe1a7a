/* Options, read once from MOVALLOC_* environment variables (secure_getenv, so a
 * setuid program ignores them) without allocating. A bad value is reported with
 * the option, the value and what it accepts, and the default is used. */
#ifndef MV_OPTIONS_H
#define MV_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum mv_thp_mode {
  MV_THP_COMPACT, /* huge pages come from the compactor (arenas fault 4 KiB pages) */
  MV_THP_FAULT,   /* also ask for huge pages at fault time (MADV_HUGEPAGE) */
  MV_THP_NEVER,   /* MADV_NOHUGEPAGE on the heap, no migration onto huge pages */
};

#define MV_PROF_DEFAULT_RATE ((uint64_t)2 << 20) /* MOVALLOC_PROFILE=on: tcmalloc's 2 MiB */

struct mv_options {
  bool stats;             /* MOVALLOC_STATS: summary on stderr at exit */
  bool check;             /* MOVALLOC_CHECK: full misuse checks, abort on misuse */
  bool verbose;           /* MOVALLOC_VERBOSE: say what was chosen at start-up */
  bool help;              /* MOVALLOC_HELP: list the options on stderr at start-up */
  int migrate;            /* MOVALLOC_MIGRATE: enum mv_backend_kind, or AUTO */
  bool compact;           /* MOVALLOC_COMPACT: background compactor */
  unsigned compact_period_ms; /* MOVALLOC_COMPACT_PERIOD_MS: between compactor rounds */
  unsigned compact_mbps;  /* MOVALLOC_COMPACT_MBPS: bandwidth budget, MB/s of arenas moved */
  bool compact_stress;    /* MOVALLOC_COMPACT_STRESS: move everything, constantly (tests) */
  enum mv_thp_mode thp;   /* MOVALLOC_THP */
  size_t reserve_gib;     /* MOVALLOC_RESERVE_GIB: virtual reservation for the heap */
  unsigned arena_cache;   /* MOVALLOC_ARENA_CACHE: empty arenas kept before release */
  const char *trace;      /* MOVALLOC_TRACE: file that gets a CSV line per migration */
  uint64_t profile;       /* MOVALLOC_PROFILE: mean bytes between samples; 0: off */
  const char *profile_out; /* MOVALLOC_PROFILE_OUT: folded stacks written here at exit */
  const char *profile_longlived_out; /* MOVALLOC_PROFILE_LONGLIVED_OUT: long-lived sites */
  const char *profile_longlived;     /* MOVALLOC_PROFILE_LONGLIVED: route those sites */
};

extern struct mv_options mv_options;

/* Reads the environment into mv_options. envp == NULL: the process environment
 * through secure_getenv; otherwise a NULL-terminated "K=V" array (tests). */
void mv_options_load(char *const *envp);

/* One option per line (name, value, accepted values, meaning) into fd. */
void mv_options_describe(int fd);

#endif /* MV_OPTIONS_H */
