// threads: N threads (default 4) each churn their own small objects: a private
// slot table of 8 Ki objects of 8-256 B, hit at random, an occupied slot freed
// and usually refilled. No object crosses threads, so this measures per-thread
// caches and whatever global locking the allocator still does.
#include <pthread.h>

#include "bench/wl_common.h"

#define SLOTS (8 * 1024)

struct slot {
  void *p;
  uint32_t size;
  uint64_t tag;
};

struct worker {
  pthread_t tid;
  unsigned id;
  uint64_t ops;
  uint64_t sum;
};

static void *churn_thread(void *arg) {
  struct worker *w = arg;
  struct slot *slots = calloc(SLOTS, sizeof *slots);
  struct wl_rng rng = wl_seed(100 + w->id);
  uint64_t sum = 0;

  for (uint64_t i = 0; i < w->ops; i++) {
    uint64_t r = wl_next(&rng);
    struct slot *s = &slots[r % SLOTS];
    if (s->p) {
      wl_check(s->p, s->size, s->tag);
      sum += s->tag ^ s->size;
      free(s->p);
      s->p = NULL;
    }
    if ((r >> 32) & 3) {
      s->size = (uint32_t)wl_range(&rng, 8, 256);
      s->tag = wl_mix(((uint64_t)w->id << 48) ^ i);
      s->p = wl_xmalloc(s->size);
      wl_stamp(s->p, s->size, s->tag);
    }
  }
  for (size_t i = 0; i < SLOTS; i++) {
    if (!slots[i].p) continue;
    wl_check(slots[i].p, slots[i].size, slots[i].tag);
    sum += slots[i].tag ^ slots[i].size;
    free(slots[i].p);
  }
  free(slots);
  w->sum = sum;
  return NULL;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, WL_THREADED, 4);
  // Total work is fixed, split over the threads, so --threads changes only
  // the concurrency and not the amount of allocation.
  uint64_t total = wl_scaled(60000000, o.scale);
  struct worker *w = calloc((size_t)o.threads, sizeof *w);
  for (int t = 0; t < o.threads; t++) {
    w[t].id = (unsigned)t;
    w[t].ops = total / (uint64_t)o.threads;
    pthread_create(&w[t].tid, NULL, churn_thread, &w[t]);
  }
  uint64_t sum = 0;
  for (int t = 0; t < o.threads; t++) {
    pthread_join(w[t].tid, NULL);
    sum += w[t].sum;
  }
  free(w);
  wl_checksum(sum);
  return 0;
}
