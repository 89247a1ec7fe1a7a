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
  MV_THP_AUTO,    /* FAULT beyond the first MV_THP_AUTO_FROM arenas, COMPACT below */
};

/* MOVALLOC_PURGE: when free slices inside arenas go back to the kernel. */
enum mv_purge_mode {
  MV_PURGE_NEVER,    /* they stay resident (huge pages stay whole); whole arenas still go */
  MV_PURGE_PRESSURE, /* when the machine is short of memory, and on malloc_trim */
  MV_PURGE_ALWAYS,   /* every compactor round */
};

/* MOVALLOC_THP=auto: arenas below this index fault 4 KiB pages, so a small
 * program's RSS gets no huge page it half uses; above it the heap is big, and
 * placement fills arenas fullest first, so huge pages at fault time cost little
 * RSS and spare the compactor most moves. */
#define MV_THP_AUTO_FROM 16u

#define MV_RESERVE_GIB_MAX 65536u /* MOVALLOC_RESERVE_GIB: heap offsets stay below 2^46 */
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
  unsigned compact_cpu_pct; /* MOVALLOC_COMPACT_CPU: CPU budget, percent of one core */
  unsigned compact_density; /* MOVALLOC_COMPACT_DENSITY: min % of 4 KiB pages resident to move */
  enum mv_purge_mode purge; /* MOVALLOC_PURGE */
  unsigned purge_free_pct; /* MOVALLOC_PURGE_FREE_PCT: pressure below this % available */
  unsigned purge_sparse;  /* MOVALLOC_PURGE_SPARSE: % in use at most, for 4 KiB purges; 0 off */
  unsigned trim_kib;      /* MOVALLOC_TRIM_KIB: free slices an arena without a huge page keeps
                             resident (mallopt M_TRIM_THRESHOLD sets it, under mv_arena_lock) */
  bool compact_stress;    /* MOVALLOC_COMPACT_STRESS: move everything, constantly (tests) */
  enum mv_thp_mode thp;   /* MOVALLOC_THP */
  size_t reserve_gib;     /* MOVALLOC_RESERVE_GIB: virtual reservation for the heap */
  unsigned arena_cache;   /* MOVALLOC_ARENA_CACHE: empty arenas kept before release */
  const char *trace;      /* MOVALLOC_TRACE: file that gets a CSV line per migration */
  uint64_t profile;       /* MOVALLOC_PROFILE: mean bytes between samples; 0: off */
  const char *profile_out; /* MOVALLOC_PROFILE_OUT: folded stacks written here at exit */
  const char *profile_report; /* MOVALLOC_PROFILE_REPORT: the exit report, instead of stderr */
  const char *profile_longlived_out; /* MOVALLOC_PROFILE_LONGLIVED_OUT: long-lived sites */
  const char *profile_longlived;     /* MOVALLOC_PROFILE_LONGLIVED: route those sites */
};

extern struct mv_options mv_options;

/* MV_OPT_RATE: like MV_OPT_UINT, plus "off" (0) and "on" (MV_PROF_DEFAULT_RATE). */
enum mv_option_type { MV_OPT_BOOL, MV_OPT_UINT, MV_OPT_ENUM, MV_OPT_PATH, MV_OPT_RATE };
/* The option table: one entry per MOVALLOC_* variable, in the order listed. */
struct mv_option {
  const char *name;
  enum mv_option_type type;
  const char *choices; /* MV_OPT_ENUM: "a|b|c", value = index; otherwise NULL */
  uint64_t min, max;   /* MV_OPT_UINT: accepted range, inclusive */
  uint64_t def;        /* the default (MV_OPT_PATH: none) */
  size_t offset;       /* of its field in struct mv_options */
  size_t size;         /* of that field: 1, 4 or 8 bytes */
  const char *help;
};
extern const struct mv_option mv_option_table[];
extern const size_t mv_option_count;

/* What option o accepts, as the message for a bad value says it. */
void mv_option_accepted(const struct mv_option *o, char *buf, size_t cap);

/* Reads the environment into mv_options. envp == NULL: the process environment
 * through secure_getenv; otherwise a NULL-terminated "K=V" array (tests). */
void mv_options_load(char *const *envp);

/* One option per line (name, value, accepted values, meaning) into fd. */
void mv_options_describe(int fd);

#endif /* MV_OPTIONS_H */
