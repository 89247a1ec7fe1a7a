// chase: pointer chasing over a big heap of small objects, the access pattern
// that huge pages speed up. Builds a heap of 16-128 B nodes (512 MiB by
// default, 2.5 GiB with --big), links them into one cycle in random order so
// consecutive hops land on unrelated pages, then times dependent traversals.
// ns_per_access is the TLB- and cache-bound figure; the wall time also counts
// the build, which is mostly page faults and malloc. --settle S: after the
// build, says "chase: built" on stderr and waits S seconds before the walks
// (bench/tlb.sh fragments memory during the build only), then reports the
// share of its anonymous memory on huge pages.
#include "bench/wl_common.h"

struct node {
  struct node *next;
  uint64_t id;
  // the rest of the allocation is padding, as a real object's fields are
};

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, WL_HAS_BIG | WL_HAS_SETTLE, 1);
  uint64_t heap_bytes = wl_scaled(o.big ? (2560ull << 20) : (512ull << 20), o.scale);
  uint64_t steps = wl_scaled(o.big ? 12000000 : 3000000, o.scale);
  struct wl_rng rng = wl_seed(700);

  // Node sizes average 72 B; reserve a little extra for the pointer table.
  size_t cap = heap_bytes / 64 + 16, n = 0;
  struct node **nodes = wl_xmalloc(cap * sizeof *nodes);
  uint64_t t0 = wl_now_ns();
  for (uint64_t bytes = 0; bytes < heap_bytes && n < cap;) {
    size_t size = (size_t)wl_range(&rng, 2, 16) * 8;
    struct node *nd = wl_xmalloc(size);
    nd->id = wl_mix(n);
    nodes[n++] = nd;
    bytes += size;
  }
  for (size_t i = n; i > 1; i--) {
    size_t j = wl_below(&rng, i);
    struct node *t = nodes[i - 1];
    nodes[i - 1] = nodes[j];
    nodes[j] = t;
  }
  for (size_t i = 0; i < n; i++) nodes[i]->next = nodes[(i + 1) % n];
  struct node *start[4];
  for (int k = 0; k < 4; k++) start[k] = nodes[wl_below(&rng, n)];
  free(nodes);  // traversals touch nodes only
  uint64_t built = wl_now_ns();
  if (o.settle > 0) {
    fprintf(stderr, "chase: built\n");
    fflush(stderr);
    struct timespec ts = {(time_t)o.settle, (long)((o.settle - (time_t)o.settle) * 1e9)};
    while (nanosleep(&ts, &ts) != 0) {
    }
    wl_metric("huge_pct", wl_anon_huge_pct());
  }
  uint64_t t1 = wl_now_ns();

  // Four walks from random starts; each hop depends on the last load.
  uint64_t sum = 0;
  for (int k = 0; k < 4; k++) {
    struct node *p = start[k];
    for (uint64_t s = 0; s < steps / 4; s++) {
      sum += p->id;
      p = p->next;
    }
    sum ^= p->id;
  }
  uint64_t t2 = wl_now_ns();

  wl_metric("nodes_million", (double)n / 1e6);
  wl_metric("build_s", (double)(built - t0) / 1e9);
  wl_metric("ns_per_access", (double)(t2 - t1) / (double)(steps / 4 * 4));
  wl_checksum(sum ^ n);
  // Nodes are not freed one by one: exit returns them, as a server's would.
  return 0;
}
