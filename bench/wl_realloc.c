// realloc: growing buffers, as string builders and vectors grow them. 64 live
// buffers each grow towards a target length drawn log-uniformly from 16 B to
// 8 MiB by appending 1-512 B chunks. Half are vectors (capacity doubles, one
// realloc per doubling), half naive builders (realloc on every append, the
// case where in-place growth and mremap pay off). A finished buffer is checked
// and freed, and a new one starts in its place.
#include "bench/wl_common.h"

#define BUFFERS 64
#define MAX_TARGET (8u << 20)

struct buffer {
  unsigned char *p;
  size_t len, cap, target;
  bool doubling;
  uint64_t serial;
};

// The byte at offset i of buffer serial s: cheap to recompute when checking.
static inline unsigned char byte_at(uint64_t serial, size_t i) {
  return (unsigned char)(serial * 131 + (i >> 6));
}

static void start_buffer(struct buffer *b, struct wl_rng *rng, uint64_t serial) {
  b->target = wl_log_range(rng, 16, MAX_TARGET);
  b->doubling = wl_next(rng) & 1;
  b->serial = serial;
  b->len = 0;
  b->cap = 16;
  b->p = wl_xmalloc(b->cap);
}

static void grow_to(struct buffer *b, size_t need) {
  size_t cap = b->cap;
  if (b->doubling) {
    while (cap < need) cap *= 2;
  } else {
    cap = need;
  }
  if (cap == b->cap) return;
  unsigned char *p = realloc(b->p, cap);
  if (!p) {
    fprintf(stderr, "CORRUPT realloc(%zu) returned NULL\n", cap);
    exit(3);
  }
  b->p = p;
  b->cap = cap;
}

// Spot-check the first, last and a middle byte after each move: a realloc
// that lost the old contents shows at once, at a cost that does not swamp it.
static void spot_check(const struct buffer *b) {
  size_t at[3] = {0, b->len / 2, b->len - 1};
  for (int k = 0; k < 3; k++) {
    if (b->p[at[k]] != byte_at(b->serial, at[k])) {
      fprintf(stderr, "CORRUPT buffer %" PRIu64 " byte %zu after realloc\n", b->serial, at[k]);
      exit(3);
    }
  }
}

static uint64_t finish_buffer(struct buffer *b) {
  uint64_t h = b->serial;
  for (size_t i = 0; i < b->len; i += 4096) {
    if (b->p[i] != byte_at(b->serial, i)) {
      fprintf(stderr, "CORRUPT buffer %" PRIu64 " byte %zu at finish\n", b->serial, i);
      exit(3);
    }
    h = wl_mix(h + b->p[i]);
  }
  free(b->p);
  return h + b->len;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t appends = wl_scaled(2000000, o.scale);
  struct buffer bufs[BUFFERS];
  struct wl_rng rng = wl_seed(400);
  uint64_t serial = 0, sum = 0;

  for (int i = 0; i < BUFFERS; i++) start_buffer(&bufs[i], &rng, serial++);
  for (uint64_t i = 0; i < appends; i++) {
    struct buffer *b = &bufs[wl_below(&rng, BUFFERS)];
    size_t chunk = wl_range(&rng, 1, 512);
    if (b->len + chunk > b->target) chunk = b->target - b->len;
    size_t old_cap = b->cap;
    grow_to(b, b->len + chunk);
    for (size_t k = b->len; k < b->len + chunk; k++) b->p[k] = byte_at(b->serial, k);
    b->len += chunk;
    if (b->cap != old_cap) spot_check(b);
    if (b->len == b->target) {
      sum += finish_buffer(b);
      start_buffer(b, &rng, serial++);
    }
  }
  for (int i = 0; i < BUFFERS; i++) {
    if (bufs[i].len) {
      sum += finish_buffer(&bufs[i]);
    } else {
      free(bufs[i].p);
    }
  }
  wl_checksum(sum);
  return 0;
}
