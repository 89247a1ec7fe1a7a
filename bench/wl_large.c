// large: large and huge blocks, 64 KiB-64 MiB (log-uniform), in 12 slots. Each
// step replaces a slot: free the old block, then malloc or calloc a new one
// and touch every page, or realloc the old one up or down and touch the new
// tail. Page faults and the allocator's choice between caching freed memory
// and returning it to the kernel dominate; calloc must still return zeroes.
#include "bench/wl_common.h"

#define SLOTS 12
#define PAGE 4096
#define MIN_SIZE (64u << 10)
#define MAX_SIZE (64u << 20)

struct block {
  unsigned char *p;
  size_t size;
  uint64_t tag;
};

static inline uint64_t page_word(uint64_t tag, size_t page) {
  return wl_mix(tag + page);
}

// Pages of a `size`-byte block whose first word fits inside it.
static inline size_t word_pages(size_t size) {
  return size < 8 ? 0 : (size - 8) / PAGE + 1;
}

// Write one word per page from page `from` on: faults every new page in.
static void touch_pages(struct block *b, size_t from) {
  for (size_t pg = from; pg < word_pages(b->size); pg++) {
    uint64_t w = page_word(b->tag, pg);
    memcpy(b->p + pg * PAGE, &w, 8);
  }
}

// Sum the page words within the first `limit` bytes, checking each: a block
// that lost or mixed pages on free, reuse or realloc fails here.
static uint64_t check_pages(const struct block *b, size_t limit) {
  uint64_t sum = 0;
  for (size_t pg = 0; pg < word_pages(limit); pg++) {
    uint64_t w;
    memcpy(&w, b->p + pg * PAGE, 8);
    if (w != page_word(b->tag, pg)) {
      fprintf(stderr, "CORRUPT block of %zu B: page %zu\n", b->size, pg);
      exit(3);
    }
    sum += w;
  }
  return sum;
}

static void check_zeroed(const unsigned char *p, size_t size, struct wl_rng *rng) {
  for (int k = 0; k < 16; k++) {
    size_t at = wl_below(rng, size);
    if (p[at]) {
      fprintf(stderr, "CORRUPT calloc(%zu) byte %zu not zero\n", size, at);
      exit(3);
    }
  }
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t steps = wl_scaled(600, o.scale);
  struct block slots[SLOTS] = {{0}};
  struct wl_rng rng = wl_seed(500);
  uint64_t sum = 0;

  for (uint64_t i = 0; i < steps; i++) {
    struct block *b = &slots[wl_below(&rng, SLOTS)];
    size_t size = wl_log_range(&rng, MIN_SIZE, MAX_SIZE);
    unsigned kind = (unsigned)wl_below(&rng, 4);
    if (b->p && kind == 0) {
      // realloc keeps the old tag, so the surviving pages still check.
      size_t keep = size < b->size ? size : b->size;
      unsigned char *p = realloc(b->p, size);
      if (!p) {
        fprintf(stderr, "CORRUPT realloc(%zu) returned NULL\n", size);
        exit(3);
      }
      b->p = p;
      b->size = size;
      sum += check_pages(b, keep);
      touch_pages(b, word_pages(keep));
      continue;
    }
    if (b->p) {
      sum += check_pages(b, b->size);
      free(b->p);
    }
    b->size = size;
    b->tag = wl_mix(i);
    if (kind == 1) {
      b->p = calloc(1, size);
      if (!b->p) {
        fprintf(stderr, "CORRUPT calloc(%zu) returned NULL\n", size);
        exit(3);
      }
      check_zeroed(b->p, size, &rng);
    } else {
      b->p = wl_xmalloc(size);
    }
    touch_pages(b, 0);
  }
  for (int i = 0; i < SLOTS; i++) {
    if (!slots[i].p) continue;
    sum += check_pages(&slots[i], slots[i].size);
    free(slots[i].p);
  }
  wl_checksum(sum);
  return 0;
}
