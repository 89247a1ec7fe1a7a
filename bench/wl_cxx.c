// cxx: the allocation pattern of C++ code written with new/delete and the STL,
// in C. Each simulated request builds a std::vector of pointers to 16-128 B
// objects (the vector grows by doubling: new buffer, copy, delete old, as
// std::vector does, never realloc), makes short-lived string temporaries that
// die in LIFO order, moves one object in ten into a long-lived FIFO cache of
// 64 Ki entries, then destroys the rest in reverse order, as destructors run.
#include "bench/wl_common.h"

#define CACHE_SLOTS (64u * 1024)

// The header of every object; objects of 24 B and more also carry a trailer
// word derived from the serial, so a block handed out twice is caught.
struct object {
  uint64_t serial;
  uint32_t size;
};

// sizeof of typical small C++ objects: mostly 16-64 B, a few larger.
static const uint32_t kObjectSizes[] = {16, 24, 24, 32, 32, 32, 40, 48, 48, 56, 64, 64, 80, 96, 128};

static struct object *new_object(struct wl_rng *rng, uint64_t serial) {
  uint32_t size = kObjectSizes[wl_below(rng, sizeof kObjectSizes / sizeof kObjectSizes[0])];
  struct object *ob = wl_xmalloc(size);
  ob->serial = serial;
  ob->size = size;
  if (size >= 24) {
    uint64_t trailer = ~wl_mix(serial);
    memcpy((char *)ob + size - 8, &trailer, 8);
  }
  return ob;
}

static uint64_t delete_object(struct object *ob) {
  uint64_t trailer = ~wl_mix(ob->serial);
  if (ob->size >= 24) memcpy(&trailer, (char *)ob + ob->size - 8, 8);
  if (trailer != ~wl_mix(ob->serial)) {
    fprintf(stderr, "CORRUPT object %" PRIu64 " of %u B\n", ob->serial, ob->size);
    exit(3);
  }
  uint64_t v = wl_mix(ob->serial) ^ ob->size;
  free(ob);
  return v;
}

struct vec {
  struct object **v;
  size_t n, cap;
};

static void vec_push(struct vec *vc, struct object *ob) {
  if (vc->n == vc->cap) {
    size_t cap = vc->cap ? vc->cap * 2 : 1;
    struct object **v = wl_xmalloc(cap * sizeof *v);
    if (vc->n) memcpy(v, vc->v, vc->n * sizeof *v);
    free(vc->v);
    vc->v = v;
    vc->cap = cap;
  }
  vc->v[vc->n++] = ob;
}

// A request's string temporaries: up to 8 nested, freed innermost first.
static uint64_t string_temporaries(struct wl_rng *rng) {
  char *tmp[8];
  unsigned depth = 1 + (unsigned)wl_below(rng, 8);
  uint64_t sum = 0;
  for (unsigned d = 0; d < depth; d++) {
    size_t len = wl_range(rng, 1, 100);
    tmp[d] = wl_xmalloc(len + 1);
    memset(tmp[d], 'a' + (int)d, len);
    tmp[d][len] = 0;
    sum += len;
  }
  while (depth--) {
    sum += (unsigned char)tmp[depth][0];
    free(tmp[depth]);
  }
  return sum;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t requests = wl_scaled(1000000, o.scale);
  struct object **cache = calloc(CACHE_SLOTS, sizeof *cache);
  size_t cache_next = 0;
  struct wl_rng rng = wl_seed(900);
  uint64_t sum = 0, serial = 0;

  for (uint64_t r = 0; r < requests; r++) {
    struct vec vc = {0};
    size_t count = wl_range(&rng, 1, 64);
    for (size_t i = 0; i < count; i++) vec_push(&vc, new_object(&rng, serial++));
    sum += string_temporaries(&rng);
    for (size_t i = 0; i < vc.n; i++) {
      if (wl_below(&rng, 10)) continue;
      struct object **slot = &cache[cache_next++ % CACHE_SLOTS];
      if (*slot) sum += delete_object(*slot);
      *slot = vc.v[i];
      vc.v[i] = NULL;
    }
    for (size_t i = vc.n; i-- > 0;) {
      if (vc.v[i]) sum += delete_object(vc.v[i]);
    }
    free(vc.v);
  }
  for (size_t i = 0; i < CACHE_SLOTS; i++) {
    if (cache[i]) sum += delete_object(cache[i]);
  }
  free(cache);
  wl_checksum(sum);
  return 0;
}
