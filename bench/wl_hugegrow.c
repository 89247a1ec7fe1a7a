// hugegrow: huge objects that grow where they cannot grow in place. 8 objects
// grow by half at each step (realloc) from 4 MiB up to 64 MiB, then start
// over; between two growths a fence object of 2-6 MiB is allocated, so the
// space after a growing object is usually taken. Each page holds a word that
// is checked after every move. The time goes to how realloc moves a huge
// object: a copy (and the faults of the new pages), mremap (glibc), or
// movalloc's UFFDIO_MOVE. Not in bench/run.py's default set (--only hugegrow).
#include "bench/wl_common.h"

#define OBJECTS 8
#define FENCES 8
#define PAGE 4096
#define MIN_SIZE (4u << 20)
#define MAX_SIZE (64u << 20)

struct object {
  unsigned char *p;
  size_t size;
  uint64_t tag;
};

// Writes the word of every page whose word did not fit in the first `from`
// bytes (those were written before the object grew).
static void stamp_pages(struct object *o, size_t from) {
  for (size_t at = from < 8 ? 0 : ((from - 8) / PAGE + 1) * PAGE; at + 8 <= o->size; at += PAGE) {
    uint64_t w = wl_mix(o->tag + at);
    memcpy(o->p + at, &w, 8);
  }
}

static uint64_t check_pages(const struct object *o, size_t limit) {
  uint64_t sum = 0;
  for (size_t at = 0; at + 8 <= limit; at += PAGE) {
    uint64_t w;
    memcpy(&w, o->p + at, 8);
    if (w != wl_mix(o->tag + at)) {
      fprintf(stderr, "CORRUPT object of %zu B: word at %zu\n", o->size, at);
      exit(3);
    }
    sum += w;
  }
  return sum;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t steps = wl_scaled(400, o.scale);
  struct object objects[OBJECTS] = {{0}};
  void *fences[FENCES] = {0};
  struct wl_rng rng = wl_seed(77);
  uint64_t sum = 0;

  for (uint64_t i = 0; i < steps; i++) {
    struct object *b = &objects[wl_below(&rng, OBJECTS)];
    if (!b->p || b->size >= MAX_SIZE) {
      if (b->p) {
        sum += check_pages(b, b->size);
        free(b->p);
      }
      b->size = wl_range(&rng, MIN_SIZE, 2 * MIN_SIZE);
      b->tag = wl_mix(i);
      b->p = wl_xmalloc(b->size);
      stamp_pages(b, 0);
    } else {
      size_t old = b->size;
      b->size = old + old / 2;
      unsigned char *p = realloc(b->p, b->size);
      if (!p) {
        fprintf(stderr, "CORRUPT realloc(%zu) returned NULL\n", b->size);
        exit(3);
      }
      b->p = p;
      sum += check_pages(b, old);
      stamp_pages(b, old);
    }
    void **f = &fences[wl_below(&rng, FENCES)];
    free(*f);
    size_t fence = wl_range(&rng, MIN_SIZE / 2, 3 * MIN_SIZE / 2);
    *f = wl_xmalloc(fence);
    memset(*f, 1, PAGE);
  }
  for (int k = 0; k < OBJECTS; k++) {
    if (!objects[k].p) continue;
    sum += check_pages(&objects[k], objects[k].size);
    free(objects[k].p);
  }
  for (int k = 0; k < FENCES; k++) free(fences[k]);
  wl_checksum(sum);
  return 0;
}
