/* MOVALLOC_* options: one table, parsed without allocating. */
#include "shim/mv_options.h"

#include <stdlib.h>
#include <string.h>

#include "arena/mv_print.h"
#include "compactor/mv_backend.h"

struct mv_options mv_options;

#define FIELD(f) offsetof(struct mv_options, f), sizeof(((struct mv_options *)0)->f)

/* MOVALLOC_MIGRATE's choices are in enum mv_backend_kind order, "auto" last. */
const struct mv_option mv_option_table[] = {
    {"MOVALLOC_STATS", MV_OPT_BOOL, NULL, 0, 1, 0, FIELD(stats),
     "print a summary of the heap on stderr at exit"},
    {"MOVALLOC_CHECK", MV_OPT_BOOL, NULL, 0, 1, 0, FIELD(check),
     "check every free, a canary after every block; abort with a message on misuse"},
    {"MOVALLOC_VERBOSE", MV_OPT_BOOL, NULL, 0, 1, 0, FIELD(verbose),
     "say at start-up which backend was chosen and why"},
    {"MOVALLOC_HELP", MV_OPT_BOOL, NULL, 0, 1, 0, FIELD(help),
     "list these options on stderr at start-up"},
    {"MOVALLOC_MIGRATE", MV_OPT_ENUM, "off|mprotect|collapse|remap|move|auto", 0, 0, 5,
     FIELD(migrate), "migration backend"},
    {"MOVALLOC_COMPACT", MV_OPT_BOOL, NULL, 0, 1, 1, FIELD(compact),
     "run the background compactor"},
    {"MOVALLOC_COMPACT_PERIOD_MS", MV_OPT_UINT, NULL, 1, 3600000, 1000, FIELD(compact_period_ms),
     "milliseconds between background compaction rounds"},
    {"MOVALLOC_COMPACT_MBPS", MV_OPT_UINT, NULL, 1, 100000, 512, FIELD(compact_mbps),
     "background compaction budget: MB of arenas moved per second"},
    {"MOVALLOC_COMPACT_CPU", MV_OPT_UINT, NULL, 1, 100, 2, FIELD(compact_cpu_pct),
     "background compaction budget: percent of one core, averaged over five minutes"},
    {"MOVALLOC_COMPACT_DENSITY", MV_OPT_UINT, NULL, 1, 100, 88, FIELD(compact_density),
     "an arena moves onto a huge page only with at least this percent of its 4 KiB pages "
     "resident (so a huge page adds at most the rest to RSS)"},
    {"MOVALLOC_PURGE", MV_OPT_ENUM, "never|pressure|always", 0, 0, 1, FIELD(purge),
     "return free slices inside arenas, and sparse pages' free 4 KiB pages, to the kernel "
     "(breaks their huge pages): never, under memory pressure or on malloc_trim, or every "
     "compactor round (and sparse pages as heaps grow); but never, also the free slices past "
     "MOVALLOC_TRIM_KIB, and the pages of a thread that is away once other threads freed "
     "all their blocks"},
    {"MOVALLOC_PURGE_FREE_PCT", MV_OPT_UINT, NULL, 1, 99, 5, FIELD(purge_free_pct),
     "memory pressure: MemAvailable below this percent of MemTotal"},
    {"MOVALLOC_PURGE_SPARSE", MV_OPT_UINT, NULL, 0, 100, 25, FIELD(purge_sparse),
     "pages with at most this percent of their bytes in use give their wholly free 4 KiB "
     "pages back to the kernel when MOVALLOC_PURGE says (breaks huge pages); 0: never"},
    {"MOVALLOC_TRIM_KIB", MV_OPT_UINT, NULL, 0, 2048, 1024, FIELD(trim_kib),
     "glibc's trim threshold: an arena no huge page is meant for (below the MOVALLOC_THP=auto "
     "line, any under compact or never, unless moved onto one) keeps at most this many KiB "
     "of free slices resident; the free that passes it gives them back, unless the arena "
     "handed out slices in the last 100 ms (mallopt M_TRIM_THRESHOLD sets it; not under "
     "MOVALLOC_PURGE=never); 2048: never"},
    {"MOVALLOC_COMPACT_STRESS", MV_OPT_BOOL, NULL, 0, 1, 0, FIELD(compact_stress),
     "move every arena as often as possible (a torture mode for tests)"},
    {"MOVALLOC_THP", MV_OPT_ENUM, "compact|fault|never|auto", 0, 0, 3, FIELD(thp),
     "where huge pages come from: the compactor, also page faults, nowhere, or page faults "
     "once the heap passes 32 MiB and the compactor for the rest"},
    {"MOVALLOC_RESERVE_GIB", MV_OPT_UINT, NULL, 1, MV_RESERVE_GIB_MAX, 1024, FIELD(reserve_gib),
     "virtual address space reserved for the heap, in GiB"},
    {"MOVALLOC_TRACE", MV_OPT_PATH, NULL, 0, 0, 0, FIELD(trace),
     "append a CSV line per migration to this file (mode 0600, its owner's only)"},
    {"MOVALLOC_ARENA_CACHE", MV_OPT_UINT, NULL, 0, 64, 2, FIELD(arena_cache),
     "empty 2 MiB arenas kept for reuse before returning them to the kernel"},
    {"MOVALLOC_PROFILE", MV_OPT_RATE, NULL, 1, (uint64_t)1 << 40, 0, FIELD(profile),
     "allocation-site profiler: sample one allocation per this many bytes on average "
     "(on: 2097152); report at exit"},
    {"MOVALLOC_PROFILE_REPORT", MV_OPT_PATH, NULL, 0, 0, 0, FIELD(profile_report),
     "with MOVALLOC_PROFILE: append the exit report to this file instead of stderr (mode 0600)"},
    {"MOVALLOC_PROFILE_OUT", MV_OPT_PATH, NULL, 0, 0, 0, FIELD(profile_out),
     "with MOVALLOC_PROFILE: write live bytes per site as folded stacks here at exit (mode 0600)"},
    {"MOVALLOC_PROFILE_LONGLIVED_OUT", MV_OPT_PATH, NULL, 0, 0, 0, FIELD(profile_longlived_out),
     "with MOVALLOC_PROFILE: write the sites whose samples are mostly still live at exit, or "
     "lived 10 s or more, here at exit (mode 0600), for MOVALLOC_PROFILE_LONGLIVED"},
    {"MOVALLOC_PROFILE_LONGLIVED", MV_OPT_PATH, NULL, 0, 0, 0, FIELD(profile_longlived),
     "route allocations from the sites listed in this file (MOVALLOC_PROFILE_LONGLIVED_OUT of "
     "an earlier run) into arenas of their own"},
};
const size_t mv_option_count = sizeof mv_option_table / sizeof mv_option_table[0];

static void store(const struct mv_option *o, uint64_t v) {
  char *field = (char *)&mv_options + o->offset;
  switch (o->size) {
    case 1: *(uint8_t *)field = (uint8_t)v; break;
    case 4: *(uint32_t *)field = (uint32_t)v; break;
    default: *(uint64_t *)field = v; break;
  }
}

static bool parse_uint(const char *s, uint64_t *out) {
  if (!*s) return false;
  uint64_t v = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9' || v > (UINT64_MAX - 9) / 10) return false;
    v = v * 10 + (uint64_t)(*s - '0');
  }
  *out = v;
  return true;
}

/* Index of value among the '|'-separated choices, or -1. */
static int choice_index(const char *choices, const char *value) {
  size_t vlen = strlen(value);
  int index = 0;
  for (const char *c = choices; *c; index++) {
    const char *end = strchr(c, '|');
    size_t len = end ? (size_t)(end - c) : strlen(c);
    if (len == vlen && strncmp(c, value, len) == 0) return index;
    if (!end) break;
    c = end + 1;
  }
  return -1;
}

static bool parse(const struct mv_option *o, const char *value, uint64_t *out) {
  switch (o->type) {
    case MV_OPT_BOOL:
      if (!strcmp(value, "1") || !strcmp(value, "true") || !strcmp(value, "yes") ||
          !strcmp(value, "on"))
        return *out = 1, true;
      if (!strcmp(value, "0") || !strcmp(value, "false") || !strcmp(value, "no") ||
          !strcmp(value, "off"))
        return *out = 0, true;
      return false;
    case MV_OPT_UINT:
      return parse_uint(value, out) && *out >= o->min && *out <= o->max;
    case MV_OPT_ENUM: {
      int i = choice_index(o->choices, value);
      if (i < 0) return false;
      *out = (uint64_t)i;
      return true;
    }
    case MV_OPT_RATE:
      if (!strcmp(value, "off")) return *out = 0, true;
      if (!strcmp(value, "on")) return *out = MV_PROF_DEFAULT_RATE, true;
      if (!strcmp(value, "0")) return *out = 0, true;
      return parse_uint(value, out) && *out >= o->min && *out <= o->max;
    case MV_OPT_PATH: /* the environment's own string: nothing to copy */
      if (value[0] != '/') return false;
      *out = (uint64_t)(uintptr_t)value;
      return true;
  }
  return false;
}

void mv_option_accepted(const struct mv_option *o, char *buf, size_t cap) {
  switch (o->type) {
    case MV_OPT_BOOL: mv_snprintf(buf, cap, "1|0 (or true|false, yes|no, on|off)"); break;
    case MV_OPT_UINT: mv_snprintf(buf, cap, "a whole number from %llu to %llu",
                               (unsigned long long)o->min, (unsigned long long)o->max); break;
    case MV_OPT_ENUM: mv_snprintf(buf, cap, "one of %s", o->choices); break;
    case MV_OPT_PATH: mv_snprintf(buf, cap, "an absolute path"); break;
    case MV_OPT_RATE: mv_snprintf(buf, cap, "off, 0, on (= %llu) or bytes from %llu to %llu",
                                  (unsigned long long)MV_PROF_DEFAULT_RATE,
                                  (unsigned long long)o->min, (unsigned long long)o->max); break;
  }
}

static const char *lookup(char *const *envp, const char *name) {
  if (!envp) return secure_getenv(name);
  size_t n = strlen(name);
  for (; *envp; envp++)
    if (!strncmp(*envp, name, n) && (*envp)[n] == '=') return *envp + n + 1;
  return NULL;
}

void mv_options_load(char *const *envp) {
  for (size_t i = 0; i < mv_option_count; i++) {
    const struct mv_option *o = &mv_option_table[i];
    uint64_t v = o->def;
    const char *value = lookup(envp, o->name);
    if (value && !parse(o, value, &v)) {
      char what[96];
      mv_option_accepted(o, what, sizeof what);
      mv_log("%s=%s is not valid: expected %s; using the default", o->name, value, what);
      v = o->def;
    }
    store(o, v);
  }
  /* MOVALLOC_MIGRATE's table order puts "auto" last. */
  if (mv_options.migrate == MV_BACKEND_COUNT) mv_options.migrate = MV_BACKEND_AUTO;
}

void mv_options_describe(int fd) {
  for (size_t i = 0; i < mv_option_count; i++) {
    const struct mv_option *o = &mv_option_table[i];
    char what[96];
    mv_option_accepted(o, what, sizeof what);
    mv_dprintf(fd, "%-22s %s; default %llu\n    %s\n", o->name, what,
               (unsigned long long)o->def, o->help);
  }
}
