/* What programs linked against jemalloc call besides the malloc family
 * (Debian's redis-server: mallctl, nallocx, malloc_stats_print), so that with
 * movalloc preloaded no block is allocated by one allocator and freed by the
 * other. mallctl answers the names such programs read and ENOENT for the rest. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
#include "shim/mv_stats.h"

static _Atomic uint64_t epoch = 1;

/* Copies a value out and takes none in, as jemalloc's read-only names do. */
static int read_only(void *oldp, size_t *oldlenp, const void *newp, const void *value,
                     size_t len) {
  if (newp) return EPERM;
  if (oldp && oldlenp) {
    if (*oldlenp != len) return EINVAL;
    memcpy(oldp, value, len);
  }
  return 0;
}

static bool ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && strcmp(s + n - m, suffix) == 0;
}

MV_EXPORT int mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp,
                      size_t newlen) {
  if (!name) return EINVAL;
  if (!strcmp(name, "epoch")) { /* writing refreshes statistics: ours are live */
    if (newp && newlen != sizeof(uint64_t)) return EINVAL;
    uint64_t e = newp ? atomic_fetch_add(&epoch, 1) + 1 : atomic_load(&epoch);
    if (oldp && oldlenp) {
      if (*oldlenp != sizeof e) return EINVAL;
      memcpy(oldp, &e, sizeof e);
    }
    return 0;
  }
  if (!strcmp(name, "version")) {
    static const char *const version = "movalloc";
    return read_only(oldp, oldlenp, newp, &version, sizeof version);
  }
  if (!strcmp(name, "config.stats")) {
    bool yes = true;
    return read_only(oldp, oldlenp, newp, &yes, sizeof yes);
  }
  if (!strcmp(name, "arenas.narenas")) {
    unsigned one = 1;
    return read_only(oldp, oldlenp, newp, &one, sizeof one);
  }
  if (!strcmp(name, "arenas.page") || !strcmp(name, "arenas.quantum")) {
    size_t v = name[7] == 'p' ? 4096 : MV_ALIGN;
    return read_only(oldp, oldlenp, newp, &v, sizeof v);
  }
  if (!strcmp(name, "thread.tcache.flush")) return 0; /* no separate cache to flush */
  if (!strncmp(name, "arena.", 6) && ends_with(name, ".purge")) {
    mv_heap_collect_all();
    mv_arena_trim();
    return 0;
  }
  if (!strncmp(name, "stats.", 6)) {
    struct movalloc_stats s;
    movalloc_stats_get(&s);
    const char *what = name + 6;
    size_t v;
    if (!strcmp(what, "allocated")) v = s.in_use_bytes;
    else if (!strcmp(what, "active") || !strcmp(what, "resident") || !strcmp(what, "mapped"))
      v = s.committed_bytes;
    else if (!strcmp(what, "retained")) v = s.reserved_bytes - s.committed_bytes;
    else if (!strcmp(what, "metadata")) v = s.heaps * sizeof(mv_heap_t) +
                                           (s.committed_bytes >> MV_ARENA_SHIFT) * sizeof(mv_arena_t);
    else return ENOENT;
    return read_only(oldp, oldlenp, newp, &v, sizeof v);
  }
  return ENOENT;
}

/* jemalloc's MALLOCX_LG_ALIGN(la) puts log2(alignment) in the low six bits. */
MV_EXPORT size_t nallocx(size_t size, int flags) {
  size_t align = (flags & 63) ? (size_t)1 << (flags & 63) : 0;
  if (size > PTRDIFF_MAX) return 0;
  /* What malloc_usable_size will say: under MOVALLOC_CHECK the size asked for
   * (beyond it is canary, which a program writing up to nallocx would hit). */
  if (MV_UNLIKELY(mv_options.check)) return size ? size : 1;
  if (align > MV_ALIGN && align <= MV_SLICE_SIZE) {
    size_t rounded = ((size ? size : 1) + align - 1) & ~(align - 1);
    return mv_good_size(rounded);
  }
  if (align > MV_SLICE_SIZE) {
    size_t unit = align > MV_ARENA_SIZE ? align : MV_ARENA_SIZE;
    return (size + unit - 1) & ~(unit - 1);
  }
  return mv_good_size(size ? size : 1);
}

MV_EXPORT void malloc_stats_print(void (*write_cb)(void *, const char *), void *cbopaque,
                                  const char *opts) {
  char buf[2048];
  mv_stats_format(buf, sizeof buf, "stats");
  if (write_cb) write_cb(cbopaque, buf);
  else mv_stats_write(2, "stats");
}
