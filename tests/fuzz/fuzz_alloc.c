/* libFuzzer target: the input is a program of allocator calls, run against a
 * reference model. Every live block has a known size, alignment and content
 * (a pattern from its seed); every byte is verified before the block is freed
 * or reallocated, and every new block is checked for alignment, usable size
 * and overlap with the other live blocks. movalloc_compact(MOVALLOC_COMPACT_ALL)
 * moves the arenas under the live blocks in the middle of it all, and a second
 * thread frees and reallocates some blocks (cross-thread frees). Any mismatch
 * aborts, which libFuzzer reports as a crash. Built by tests/fuzz/run.sh with
 * clang from the repository's sources; movalloc is the process's malloc. */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "include/movalloc.h"
#include "shim/mv_options.h"

/* C++ operator new[] and delete[] (mv_cxx.c), reached from C by their names. */
void *_Znam(size_t size);
void _ZdaPv(void *p);

#define SLOTS 64
#define LIVE_BUDGET ((size_t)96 << 20) /* bytes live at once: keeps RSS bounded */

enum how { BY_MALLOC, BY_NEW }; /* which free goes with the block */

struct slot {
  unsigned char *p; /* NULL: empty */
  size_t size;
  size_t align;     /* promised alignment */
  uint64_t seed;
  enum how how;
};

static struct slot slots[SLOTS];
static size_t live_bytes;

static void fail(const char *what, const struct slot *s, size_t at) {
  fprintf(stderr, "fuzz_alloc: %s (block %p, size %zu, align %zu, byte %zu)\n", what,
          s ? (void *)s->p : NULL, s ? s->size : 0, s ? s->align : 0, at);
  abort();
}

/* The pattern: 8-byte words seed ^ (index * odd constant), so a block copied to
 * the wrong offset, or another block's bytes, never match. */
static inline uint64_t word(uint64_t seed, size_t i) { return seed ^ (i * 0x9e3779b97f4a7c15u); }

static void fill(struct slot *s) {
  size_t words = s->size / 8;
  for (size_t i = 0; i < words; i++) {
    uint64_t w = word(s->seed, i);
    memcpy(s->p + i * 8, &w, 8);
  }
  uint64_t w = word(s->seed, words);
  memcpy(s->p + words * 8, &w, s->size % 8);
}

/* Verifies the first n bytes of s's content. */
static void verify(const struct slot *s, size_t n) {
  size_t words = n / 8;
  for (size_t i = 0; i < words; i++) {
    uint64_t w = word(s->seed, i), got;
    memcpy(&got, s->p + i * 8, 8);
    if (got != w) fail("content changed", s, i * 8);
  }
  uint64_t w = word(s->seed, words);
  if (memcmp(s->p + words * 8, &w, n % 8) != 0) fail("content changed (tail)", s, words * 8);
}

/* A new block for s (size, align set): alignment, usable size, no overlap. */
static void check_new(struct slot *s) {
  size_t a = s->align < 16 ? 16 : s->align;
  if ((uintptr_t)s->p & (a - 1)) fail("misaligned", s, 0);
  size_t usable = malloc_usable_size(s->p);
  if (mv_options.check ? usable != s->size : usable < s->size)
    fail("malloc_usable_size is wrong", s, usable);
  for (int i = 0; i < SLOTS; i++) {
    const struct slot *o = &slots[i];
    if (o == s || !o->p) continue;
    if (s->p < o->p + (o->size ? o->size : 1) && o->p < s->p + (s->size ? s->size : 1))
      fail("overlaps another live block", s, (size_t)(o->p - s->p));
  }
}

struct input {
  const uint8_t *d;
  size_t n;
};

static uint64_t take(struct input *in, unsigned bytes) {
  uint64_t v = 0;
  for (unsigned i = 0; i < bytes && in->n; i++, in->n--) v = v << 8 | *in->d++;
  return v;
}

/* A size: mostly small, some large and huge, rarely absurd. */
static size_t take_size(struct input *in) {
  unsigned sel = (unsigned)take(in, 1);
  uint64_t v = take(in, 3);
  switch (sel & 15) {
    case 0: return v % 17;
    case 1: case 2: case 3: case 4: case 5: return v % 1025;
    case 6: case 7: case 8: return v % 8193;
    case 9: case 10: return v % 65537;
    case 11: case 12: return v % ((1 << 20) + 1);
    case 13: return v % (3u << 20);
    case 14: return (1 << 20) + (v % 64) - 32; /* the large/huge edge */
    default: {
      static const size_t absurd[] = {SIZE_MAX, SIZE_MAX - 4096, (size_t)PTRDIFF_MAX + 1,
                                      PTRDIFF_MAX};
      return absurd[v % 4];
    }
  }
}

static int absurd(size_t size) { return size >= ((size_t)1 << 40); }

/* The other thread: runs one call at a time for the fuzzing thread, which
 * waits for it (the model stays sequential). */
static struct {
  pthread_t thread;
  sem_t go, done;
  void *p;
  size_t size; /* 0: free(p); otherwise p = realloc(p, size) */
} other;

static void *other_main(void *unused) {
  for (;;) {
    while (sem_wait(&other.go) != 0) continue;
    if (other.size) other.p = realloc(other.p, other.size);
    else free(other.p);
    sem_post(&other.done);
  }
  return NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  sem_init(&other.go, 0, 0);
  sem_init(&other.done, 0, 0);
  if (pthread_create(&other.thread, NULL, other_main, NULL) != 0) fail("no second thread", NULL, 0);
  return 0;
}

static void *on_other_thread(void *p, size_t size) {
  other.p = p;
  other.size = size;
  sem_post(&other.go);
  while (sem_wait(&other.done) != 0) continue;
  return other.p;
}

/* Frees s after verifying it. */
static void release(struct slot *s) {
  verify(s, s->size);
  if (s->how == BY_NEW) _ZdaPv(s->p);
  else free(s->p);
  live_bytes -= s->size;
  s->p = NULL;
}

/* A block of size by one of the allocation calls, into the empty slot s. */
static void allocate(struct slot *s, unsigned kind, size_t size, size_t align_log,
                     uint64_t seed) {
  if (!absurd(size) && live_bytes + size > LIVE_BUDGET) return;
  size_t align = (size_t)1 << align_log; /* up to 4 MiB */
  void *p = NULL;
  int rc = 0;
  errno = 0;
  s->align = 16;
  s->how = BY_MALLOC;
  switch (kind % 7) {
    case 0: p = malloc(size); break;
    case 1: p = calloc(1, size); break;
    case 2: p = memalign(align, size); s->align = align; break;
    case 3:
      rc = posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size);
      s->align = align;
      break;
    case 4: p = aligned_alloc(align, size); s->align = align; break;
    case 5: p = realloc(NULL, size); break;
    default:
      if (absurd(size)) return; /* throwing new: not from C */
      p = _Znam(size);
      s->how = BY_NEW;
      break;
  }
  if (absurd(size)) {
    if (p) fail("an absurd size was allocated", s, size);
    if (kind % 7 == 3 ? rc != ENOMEM : errno != ENOMEM) fail("absurd size: not ENOMEM", s, size);
    return;
  }
  if (!p) fail("allocation failed", s, size);
  s->p = p;
  s->size = size;
  s->seed = seed;
  if (kind % 7 == 1)
    for (size_t i = 0; i < size; i++)
      if (s->p[i]) fail("calloc block not zeroed", s, i);
  check_new(s);
  fill(s);
  live_bytes += size;
}

static void resize(struct slot *s, size_t size, int by_array) {
  verify(s, s->size);
  if (s->how == BY_NEW) return; /* not realloc's to resize */
  if (!absurd(size) && live_bytes + size > LIVE_BUDGET) return;
  errno = 0;
  void *q = by_array ? reallocarray(s->p, size ? 1 : 0, size) : realloc(s->p, size);
  if (absurd(size)) {
    if (q || errno != ENOMEM) fail("absurd realloc: not NULL with ENOMEM", s, size);
    verify(s, s->size); /* the block is untouched */
    return;
  }
  if (size == 0) { /* glibc: realloc(p, 0) frees p */
    if (q) fail("realloc(p, 0) returned a block", s, 0);
    live_bytes -= s->size;
    s->p = NULL;
    return;
  }
  if (!q) fail("realloc failed", s, size);
  size_t old = s->size;
  s->p = q;
  s->size = size;
  s->align = 16; /* realloc keeps only the default alignment */
  verify(s, old < size ? old : size);
  check_new(s);
  fill(s);
  live_bytes += size;
  live_bytes -= old;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
  struct input in = {data, n};
  int compacted = 0;
  while (in.n) {
    unsigned op = (unsigned)take(&in, 1);
    struct slot *s = &slots[take(&in, 1) % SLOTS];
    switch (op % 8) {
      case 0: case 1: case 2: { /* allocate, or free what the slot holds */
        if (s->p) {
          release(s);
          break;
        }
        unsigned kind = (unsigned)take(&in, 1);
        size_t size = take_size(&in);
        allocate(s, kind, size, kind / 7 % 23, take(&in, 8) | 1);
        break;
      }
      case 3: case 4:
        if (s->p) resize(s, take_size(&in), op & 8);
        break;
      case 5: /* free or resize from the other thread */
        if (s->p && s->how == BY_MALLOC) {
          verify(s, s->size);
          size_t size = op & 8 ? take_size(&in) % ((1 << 20) + 1) : 0;
          if (size && live_bytes + size > LIVE_BUDGET) break;
          void *q = on_other_thread(s->p, size);
          if (!size) {
            live_bytes -= s->size;
            s->p = NULL;
            break;
          }
          if (!q) fail("realloc on the other thread failed", s, size);
          size_t old = s->size;
          s->p = q;
          s->size = size;
          s->align = 16;
          verify(s, old < size ? old : size);
          check_new(s);
          fill(s);
          live_bytes += size - old;
        } else if (s->p) {
          release(s);
        }
        break;
      case 6: /* rewrite: new content, same block */
        if (s->p) {
          verify(s, s->size);
          s->seed = take(&in, 8) | 1;
          fill(s);
        }
        break;
      default: /* move every arena under the live blocks (once per input: slow) */
        if (!compacted++) movalloc_compact(MOVALLOC_COMPACT_ALL);
        for (int i = 0; i < SLOTS; i++)
          if (slots[i].p) verify(&slots[i], slots[i].size);
        break;
    }
  }
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].p) release(&slots[i]);
  return 0;
}
