/* The exported malloc family, with glibc's behaviour in the corners: errno on
 * every failure, realloc(p, 0) frees, memalign rounds a non-power-of-two
 * alignment up, posix_memalign leaves *out alone on failure. */
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"

#define PAGE_SIZE_BYTES 4096u

MV_EXPORT MV_ALLOC_ENTRY void *malloc(size_t size) { return mv_malloc(size); }

MV_EXPORT void free(void *p) { mv_free(p); }

MV_EXPORT MV_ALLOC_ENTRY void *calloc(size_t n, size_t size) { return mv_calloc(n, size); }

MV_EXPORT MV_ALLOC_ENTRY void *realloc(void *p, size_t size) { return mv_realloc(p, size); }

MV_EXPORT MV_ALLOC_ENTRY void *reallocarray(void *p, size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return mv_realloc(p, total);
}

static inline bool power_of_two(size_t x) { return x && !(x & (x - 1)); }

MV_EXPORT MV_ALLOC_ENTRY int posix_memalign(void **out, size_t align, size_t size) {
  if (!power_of_two(align) || align % sizeof(void *) != 0) return EINVAL;
  int saved = errno;
  void *p = mv_aligned(align, size);
  if (!p) {
    errno = saved; /* posix_memalign reports through its result only */
    return ENOMEM;
  }
  *out = p;
  return 0;
}

MV_EXPORT MV_ALLOC_ENTRY void *aligned_alloc(size_t align, size_t size) {
  if (align != 0 && !power_of_two(align)) { /* C17, glibc >= 2.38 (2.36 rounds up) */
    errno = EINVAL;
    return NULL;
  }
  return mv_aligned(align, size);
}

MV_EXPORT MV_ALLOC_ENTRY void *memalign(size_t align, size_t size) {
  if (align > SIZE_MAX / 2 + 1) {
    errno = EINVAL;
    return NULL;
  }
  if (!power_of_two(align)) { /* glibc rounds up to the next power of two */
    size_t a = MV_ALIGN;
    while (a < align) a <<= 1;
    align = a;
  }
  return mv_aligned(align, size);
}

MV_EXPORT MV_ALLOC_ENTRY void *valloc(size_t size) { return mv_aligned(PAGE_SIZE_BYTES, size); }

MV_EXPORT MV_ALLOC_ENTRY void *pvalloc(size_t size) {
  if (size > SIZE_MAX - PAGE_SIZE_BYTES) {
    errno = ENOMEM;
    return NULL;
  }
  size_t rounded = (size + PAGE_SIZE_BYTES - 1) & ~(size_t)(PAGE_SIZE_BYTES - 1);
  return mv_aligned(PAGE_SIZE_BYTES, rounded ? rounded : PAGE_SIZE_BYTES);
}

MV_EXPORT size_t malloc_usable_size(void *p) { return mv_usable_size(p); }

MV_EXPORT int malloc_trim(size_t pad) {
  mv_heap_collect_all();
  size_t purged = mv_heap_purge_sparse();
  /* An explicit request: free slices inside arenas go too, unless MOVALLOC_PURGE=never. */
  purged += mv_options.purge != MV_PURGE_NEVER ? mv_arena_purge() : 0;
  return mv_arena_trim() > 0 || purged > 0;
}

MV_EXPORT struct mallinfo2 mallinfo2(void) {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  struct mallinfo2 mi = {0};
  mi.arena = s.committed_bytes;
  mi.ordblks = s.arena_count;
  mi.hblks = s.huge_objects;
  mi.uordblks = s.in_use_bytes;
  mi.fordblks = s.committed_bytes > s.in_use_bytes ? s.committed_bytes - s.in_use_bytes : 0;
  mi.keepcost = s.arenas_cached * MOVALLOC_ARENA_SIZE;
  return mi;
}

MV_EXPORT struct mallinfo mallinfo(void) {
  struct mallinfo2 m2 = mallinfo2();
  struct mallinfo mi = {0};
  mi.arena = (int)m2.arena;
  mi.ordblks = (int)m2.ordblks;
  mi.hblks = (int)m2.hblks;
  mi.uordblks = (int)m2.uordblks;
  mi.fordblks = (int)m2.fordblks;
  mi.keepcost = (int)m2.keepcost;
  return mi;
}

/* glibc's tunables have no meaning here; accept the known ones (1, as glibc
 * does on success), refuse unknown ones (0). */
MV_EXPORT int mallopt(int param, int value) {
  switch (param) {
    case M_TRIM_THRESHOLD: /* bytes; glibc takes -1 as never too */
      mv_arena_set_trim_threshold(value < 0 ? SIZE_MAX : (size_t)value);
      return 1;
    case M_MXFAST:
    case M_TOP_PAD:
    case M_MMAP_THRESHOLD:
    case M_MMAP_MAX:
    case M_CHECK_ACTION:
    case M_PERTURB:
    case M_ARENA_TEST:
    case M_ARENA_MAX:
      return 1;
    default:
      return 0;
  }
}

MV_EXPORT void malloc_stats(void) { movalloc_stats_print(2); }
