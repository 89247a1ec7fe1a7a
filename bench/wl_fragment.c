// fragment: a long-lived fraction that fragments the heap. Each round
// allocates 48 MiB of objects, keeps every 16th as long-lived and frees the
// rest in random order; a long-lived object is freed 4 rounds later. The size
// range shifts each round (16-512 B up to 128 B-4 KiB), so the holes one round
// leaves fit the next round's objects badly. Reports the peak and final RSS
// (metric lines) against the bytes still live: final RSS well above live_mib is
// memory the allocator could not give back because survivors pin it.
#include "bench/wl_common.h"

#define ROUND_BYTES (48u << 20)
#define KEEP_EVERY 16
#define LIFETIME 4  // rounds a long-lived object survives

struct obj {
  void *p;
  uint32_t size;
  uint64_t tag;
};

struct objvec {
  struct obj *v;
  size_t n, cap;
};

static void objvec_push(struct objvec *ov, struct obj o) {
  if (ov->n == ov->cap) {
    ov->cap = ov->cap ? ov->cap * 2 : 1024;
    ov->v = realloc(ov->v, ov->cap * sizeof *ov->v);
    if (!ov->v) abort();
  }
  ov->v[ov->n++] = o;
}

static uint64_t release(struct obj *o) {
  wl_check(o->p, o->size, o->tag);
  free(o->p);
  return o->tag ^ o->size;
}

static uint64_t release_all(struct objvec *ov) {
  uint64_t sum = 0;
  for (size_t i = 0; i < ov->n; i++) sum += release(&ov->v[i]);
  ov->n = 0;
  return sum;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t rounds = wl_scaled(40, o.scale);
  struct wl_rng rng = wl_seed(600);
  struct objvec round_objs = {0}, kept[LIFETIME] = {{0}};
  uint64_t sum = 0, serial = 0, live_bytes = 0, peak_rss = 0;

  for (uint64_t r = 0; r < rounds; r++) {
    struct objvec *expiring = &kept[r % LIFETIME];
    for (size_t i = 0; i < expiring->n; i++) live_bytes -= expiring->v[i].size;
    sum += release_all(expiring);

    unsigned shift = (unsigned)(r % 4);
    uint64_t lo = 16u << shift, hi = 512u << shift;
    for (uint64_t bytes = 0; bytes < ROUND_BYTES;) {
      struct obj ob = {.size = (uint32_t)wl_range(&rng, lo, hi), .tag = wl_mix(serial)};
      ob.p = wl_xmalloc(ob.size);
      wl_stamp(ob.p, ob.size, ob.tag);
      bytes += ob.size;
      if (serial++ % KEEP_EVERY == 0) {
        objvec_push(expiring, ob);
        live_bytes += ob.size;
      } else {
        objvec_push(&round_objs, ob);
      }
    }
    uint64_t rss = wl_rss_bytes();
    if (rss > peak_rss) peak_rss = rss;

    // Random free order: Fisher-Yates, then release front to back.
    for (size_t i = round_objs.n; i > 1; i--) {
      size_t j = wl_below(&rng, i);
      struct obj t = round_objs.v[i - 1];
      round_objs.v[i - 1] = round_objs.v[j];
      round_objs.v[j] = t;
    }
    sum += release_all(&round_objs);
  }
  double mib = 1024.0 * 1024.0;
  wl_metric("peak_rss_mib", (double)peak_rss / mib);
  wl_metric("final_rss_mib", (double)wl_rss_bytes() / mib);
  wl_metric("live_mib", (double)live_bytes / mib);

  for (int k = 0; k < LIFETIME; k++) {
    sum += release_all(&kept[k]);
    free(kept[k].v);
  }
  free(round_objs.v);
  wl_checksum(sum);
  return 0;
}
