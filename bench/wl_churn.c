// churn: single-thread small-object churn. A slot table of 32 Ki objects of
// 8-512 B (a working set of a few MiB) is hit at random: an occupied slot is
// freed, and three times in four a new object takes its place. This is the
// allocator's fast path under a cache-unfriendly, size-mixed free order.
#include "bench/wl_common.h"

#define SLOTS (32 * 1024)

struct slot {
  void *p;
  uint32_t size;
  uint64_t tag;
};

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t ops = wl_scaled(25000000, o.scale);
  struct slot *slots = calloc(SLOTS, sizeof *slots);
  struct wl_rng rng = wl_seed(1);
  uint64_t sum = 0;

  for (uint64_t i = 0; i < ops; i++) {
    uint64_t r = wl_next(&rng);
    struct slot *s = &slots[r % SLOTS];
    if (s->p) {
      wl_check(s->p, s->size, s->tag);
      sum += s->tag ^ s->size;
      free(s->p);
      s->p = NULL;
    }
    if ((r >> 32) & 3) {
      s->size = (uint32_t)wl_range(&rng, 8, 512);
      s->tag = wl_mix(i);
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
  wl_checksum(sum);
  return 0;
}
