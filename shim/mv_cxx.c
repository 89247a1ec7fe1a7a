/* C++ operator new and delete, so C++ programs reach movalloc without going
 * through libstdc++'s own operators. Mangled names for x86-64 (size_t is
 * unsigned long, "m"). A failed throwing new hands over to libstdc++'s own
 * operator new, which runs the new-handler loop and throws std::bad_alloc. */
#include <dlfcn.h>
#include <stddef.h>

#include "arena/mv_alloc.h"

typedef void *(*new_fn)(size_t);
typedef void *(*new_aligned_fn)(size_t, size_t);

/* Resolved only on failure: dlsym may allocate, which is fine then. */
static MV_COLD void *new_failed(const char *name, size_t size) {
  new_fn next = (new_fn)dlsym(RTLD_NEXT, name);
  if (!next) __builtin_trap(); /* no libstdc++: nothing can throw bad_alloc */
  return next(size);
}

static MV_COLD void *new_aligned_failed(const char *name, size_t size, size_t align) {
  new_aligned_fn next = (new_aligned_fn)dlsym(RTLD_NEXT, name);
  if (!next) __builtin_trap();
  return next(size, align);
}

static inline void *new_or_throw(size_t size, const char *name) {
  void *p = mv_malloc(size);
  return MV_LIKELY(p != NULL) ? p : new_failed(name, size);
}

static inline void *new_aligned_or_throw(size_t size, size_t align, const char *name) {
  void *p = mv_aligned(align, size);
  return MV_LIKELY(p != NULL) ? p : new_aligned_failed(name, size, align);
}

/* operator new(size_t), new[](size_t) */
MV_EXPORT MV_ALLOC_ENTRY void *_Znwm(size_t size) { return new_or_throw(size, "_Znwm"); }
MV_EXPORT MV_ALLOC_ENTRY void *_Znam(size_t size) { return new_or_throw(size, "_Znam"); }
/* nothrow */
MV_EXPORT MV_ALLOC_ENTRY void *_ZnwmRKSt9nothrow_t(size_t size, const void *tag) { return mv_malloc(size); }
MV_EXPORT MV_ALLOC_ENTRY void *_ZnamRKSt9nothrow_t(size_t size, const void *tag) { return mv_malloc(size); }
/* aligned (C++17) */
MV_EXPORT MV_ALLOC_ENTRY void *_ZnwmSt11align_val_t(size_t size, size_t align) {
  return new_aligned_or_throw(size, align, "_ZnwmSt11align_val_t");
}
MV_EXPORT MV_ALLOC_ENTRY void *_ZnamSt11align_val_t(size_t size, size_t align) {
  return new_aligned_or_throw(size, align, "_ZnamSt11align_val_t");
}
MV_EXPORT MV_ALLOC_ENTRY void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t size, size_t align, const void *tag) {
  return mv_aligned(align, size);
}
MV_EXPORT MV_ALLOC_ENTRY void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t size, size_t align, const void *tag) {
  return mv_aligned(align, size);
}

/* delete: plain, sized, nothrow, aligned, sized aligned, aligned nothrow */
MV_EXPORT void _ZdlPv(void *p) { mv_free(p); }
MV_EXPORT void _ZdaPv(void *p) { mv_free(p); }
MV_EXPORT void _ZdlPvm(void *p, size_t size) { mv_free(p); }
MV_EXPORT void _ZdaPvm(void *p, size_t size) { mv_free(p); }
MV_EXPORT void _ZdlPvRKSt9nothrow_t(void *p, const void *tag) { mv_free(p); }
MV_EXPORT void _ZdaPvRKSt9nothrow_t(void *p, const void *tag) { mv_free(p); }
MV_EXPORT void _ZdlPvSt11align_val_t(void *p, size_t align) { mv_free(p); }
MV_EXPORT void _ZdaPvSt11align_val_t(void *p, size_t align) { mv_free(p); }
MV_EXPORT void _ZdlPvmSt11align_val_t(void *p, size_t size, size_t align) { mv_free(p); }
MV_EXPORT void _ZdaPvmSt11align_val_t(void *p, size_t size, size_t align) { mv_free(p); }
MV_EXPORT void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t align, const void *tag) {
  mv_free(p);
}
MV_EXPORT void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t align, const void *tag) {
  mv_free(p);
}
