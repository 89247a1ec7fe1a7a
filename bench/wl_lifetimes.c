// lifetimes: a load phase that builds long-lived data amid temporaries from
// another call site, the case lifetime classes (MOVALLOC_PROFILE_LONGLIVED) are
// for. Each step allocates one long-lived object (keep_object, kept to the end)
// and seven temporaries (temp_object), all 32-256 B; the temporaries live until
// the load phase ends (parse buffers, tokens; a few seconds here), so without lifetime classes every
// page ends up holding an eighth long-lived survivors once they are freed. Then
// the program waits 3 s (compactor rounds, cached arenas decaying) and reads the
// long-lived objects in random order. Metrics: rss_mib and anon_huge_mib
// (/proc/self/smaps_rollup) after the wait, live_mib, and ns_per_access.
#include "bench/wl_common.h"

#define SHORT_PER_LONG 7
#define SETTLE_S 3

struct obj {
  void *p;
  uint32_t size;
  uint64_t tag;
};

// Two call sites, kept apart so a profiler can tell them by return address.
// noipa: identical bodies, which GCC would otherwise fold into one function.
__attribute__((noipa)) static void *keep_object(size_t n) { return wl_xmalloc(n); }
__attribute__((noipa)) static void *temp_object(size_t n) { return wl_xmalloc(n); }

static uint64_t release(struct obj *o) {
  wl_check(o->p, o->size, o->tag);
  uint64_t s = o->tag ^ o->size;
  free(o->p);
  o->p = NULL;
  return s;
}

// AnonHugePages of the whole process, in bytes.
static uint64_t anon_huge_bytes(void) {
  FILE *f = fopen("/proc/self/smaps_rollup", "r");
  char line[256];
  unsigned long kb = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "AnonHugePages: %lu kB", &kb) == 1) break;
  fclose(f);
  return (uint64_t)kb << 10;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t nlong = wl_scaled(256 * 1024, o.scale); // ~36 MiB long-lived
  uint64_t ntemp = nlong * SHORT_PER_LONG;          // ~252 MiB of temporaries
  struct obj *keep = calloc(nlong, sizeof *keep);
  struct obj *temp = calloc(ntemp, sizeof *temp);
  if (!keep || !temp) abort();
  struct wl_rng rng = wl_seed(7);
  uint64_t sum = 0, live = 0;

  for (uint64_t i = 0; i < nlong; i++) {
    struct obj *k = &keep[i];
    k->size = (uint32_t)wl_range(&rng, 32, 256);
    k->tag = wl_mix(i);
    k->p = keep_object(k->size);
    wl_stamp(k->p, k->size, k->tag);
    live += k->size;
    for (int s = 0; s < SHORT_PER_LONG; s++) {
      struct obj *t = &temp[i * SHORT_PER_LONG + (uint64_t)s];
      t->size = (uint32_t)wl_range(&rng, 32, 256);
      t->tag = wl_mix(~(i * SHORT_PER_LONG + (uint64_t)s));
      t->p = temp_object(t->size);
      wl_stamp(t->p, t->size, t->tag);
    }
  }
  for (uint64_t t = 0; t < ntemp; t++) sum += release(&temp[t]);
  free(temp);

  sleep(SETTLE_S);
  double mib = 1024.0 * 1024.0;
  wl_metric("rss_mib", (double)wl_rss_bytes() / mib);
  wl_metric("anon_huge_mib", (double)anon_huge_bytes() / mib);
  wl_metric("live_mib", (double)live / mib);

  uint64_t reads = wl_scaled(20000000, o.scale), t0 = wl_now_ns();
  for (uint64_t r = 0; r < reads; r++) {
    const struct obj *k = &keep[wl_below(&rng, nlong)];
    uint64_t tag;
    memcpy(&tag, k->p, 8);
    sum += tag;
  }
  wl_metric("ns_per_access", (double)(wl_now_ns() - t0) / (double)reads);

  // Checked, not freed: long-lived data lives until exit, which is what a
  // profile of this run (MOVALLOC_PROFILE_LONGLIVED_OUT) sees.
  for (uint64_t i = 0; i < nlong; i++) {
    wl_check(keep[i].p, keep[i].size, keep[i].tag);
    sum += keep[i].tag ^ keep[i].size;
  }
  wl_checksum(sum);
  return 0;
}
