/* movalloc_stats_get / movalloc_stats_print, and the exit summary. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
#include "shim/mv_stats.h"

MV_EXPORT int movalloc_stats_get(struct movalloc_stats *out) {
  if (!out) return -EINVAL;
  mv_stats_fill(out, true);
  return 0;
}

void mv_stats_fill(struct movalloc_stats *out, bool engine) {
  memset(out, 0, sizeof *out);
  if (!mv_arenas) return; /* not started: everything is zero */
  struct mv_arena_counts c;
  mv_arena_counts(&c);
  out->reserved_bytes = mv_arena_reserved_bytes();
  out->committed_bytes = c.committed << MV_ARENA_SHIFT;
  out->in_use_bytes = mv_heap_bytes_in_use();
  out->arena_count = c.active;
  out->arenas_cached = c.cached;
  out->arenas_released = c.released;
  out->huge_objects = c.huge_objects;
  out->heaps = mv_heap_count();
  out->huge_page_bytes = c.thp << MV_ARENA_SHIFT;
  out->coverage_ppm = c.active ? c.thp * 1000000 / c.active : 0;
  out->purged_bytes = c.purged_bytes;
  out->away_purged_bytes = c.page_purged_bytes;
  out->trimmed_bytes = c.trimmed_bytes;
  mv_heap_misuse_counts(&out->invalid_frees, &out->double_frees);
  if (engine) mv_engine_stats(out);
  else mv_snprintf(out->backend_reason, sizeof out->backend_reason, "not chosen yet");
  mv_compactor_stats(out);
}

/* "12.3 MiB" without floating point. */
static const char *human(uint64_t bytes, char *buf, size_t cap) {
  static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  unsigned u = 0;
  uint64_t whole = bytes, tenths = 0;
  while (whole >= 1024 && u < 4) {
    tenths = (whole % 1024) * 10 / 1024;
    whole /= 1024;
    u++;
  }
  if (u == 0) mv_snprintf(buf, cap, "%llu B", (unsigned long long)whole);
  else mv_snprintf(buf, cap, "%llu.%llu %s", (unsigned long long)whole,
                   (unsigned long long)tenths, units[u]);
  return buf;
}

size_t mv_stats_format(char *buf, size_t cap, const char *title) {
  /* Not the backend nothing used: choosing one probes the kernel, which maps
   * and faults in a huge page (MOVALLOC_STATS=1 added 1.6 MiB to the peak RSS
   * of /bin/true) and takes milliseconds, for a line that says so instead. */
  struct movalloc_stats s;
  mv_stats_fill(&s, mv_engine_backend_chosen());
  char a[32], b[32], c[32], d[32];
  size_t n = 0;
  n += mv_snprintf(buf + n, cap - n, "movalloc: %s (pid %d)\n", title, (int)getpid());
  n += mv_snprintf(buf + n, cap - n,
                   "movalloc:   in use      %s in %llu arenas, %llu huge objects, %llu heaps\n",
                   human(s.in_use_bytes, a, sizeof a), (unsigned long long)s.arena_count,
                   (unsigned long long)s.huge_objects, (unsigned long long)s.heaps);
  n += mv_snprintf(buf + n, cap - n,
                   "movalloc:   committed   %s (reserved %s); %llu empty arenas cached, "
                   "%llu released\n",
                   human(s.committed_bytes, a, sizeof a), human(s.reserved_bytes, b, sizeof b),
                   (unsigned long long)s.arenas_cached, (unsigned long long)s.arenas_released);
  n += mv_snprintf(buf + n, cap - n,
                   "movalloc:   huge pages  %s (%llu.%llu%% of arenas in use); %s purged inside "
                   "arenas (%s of away threads' pages, %s trimmed)\n",
                   human(s.huge_page_bytes, a, sizeof a),
                   (unsigned long long)(s.coverage_ppm / 10000),
                   (unsigned long long)(s.coverage_ppm / 1000 % 10),
                   human(s.purged_bytes, b, sizeof b), human(s.away_purged_bytes, c, sizeof c),
                   human(s.trimmed_bytes, d, sizeof d));
  uint64_t wall_s = s.compactor_wall_ns / 1000000000u;
  n += mv_snprintf(buf + n, cap - n,
                   "movalloc:   compactor   %llu rounds (%llu throttled by the CPU budget) in "
                   "%llu s; CPU %llu ms (%llu ms looking); %llu.%02llu migrations/s\n",
                   (unsigned long long)s.compactor_rounds,
                   (unsigned long long)s.compactor_throttled, (unsigned long long)wall_s,
                   (unsigned long long)(s.compactor_thread_ns / 1000000),
                   (unsigned long long)(s.compactor_scan_ns / 1000000),
                   (unsigned long long)(wall_s ? s.migrated / wall_s : 0),
                   (unsigned long long)(wall_s ? s.migrated * 100 / wall_s % 100 : 0));
  n += mv_snprintf(buf + n, cap - n,
                   "movalloc:   migration   backend %s (%s)\n"
                   "movalloc:               %llu migrated (%s), %llu retried, %llu refused, "
                   "%llu failed, %llu without a huge page, %llu VMA-capped, %llu passes\n"
                   "movalloc:               realloc growth moved, not copied: %s\n",
                   s.backend[0] ? s.backend : "-", s.backend_reason, (unsigned long long)s.migrated,
                   human(s.bytes_moved, c, sizeof c), (unsigned long long)s.migrate_retries,
                   (unsigned long long)s.isolate_refused, (unsigned long long)s.migrate_failed,
                   (unsigned long long)s.staging_failed, (unsigned long long)s.vma_capped,
                   (unsigned long long)s.compact_passes, human(s.realloc_moved_bytes, a, sizeof a));
  n += mv_snprintf(buf + n, cap - n, "movalloc:   misuse      %llu invalid frees, %llu double frees\n",
                   (unsigned long long)s.invalid_frees, (unsigned long long)s.double_frees);
  return n;
}

void mv_stats_write(int fd, const char *title) {
  char buf[2048];
  size_t n = mv_stats_format(buf, sizeof buf, title);
  mv_os_write_all(fd, buf, n);
}

MV_EXPORT void movalloc_stats_print(int fd) { mv_stats_write(fd, "stats"); }
