// phased: a long-running heap that moves through phases, for huge-page
// coverage over time (bench/phased.py records it every second per allocator).
//
//   grow     allocate small objects (32-512 B) until --heap-mib of them live
//   churn    --churn-s seconds: replace random short-lived objects, read random
//            live ones; a --keep-pct fraction of the slots is long-lived
//   shrink   free 3 in 4 short-lived objects at random (the survivors stay
//            scattered over every arena)
//   steady   --steady-s seconds of churn over what is left
//   regrow   allocate back up to --heap-mib
//   churn2   --churn-s seconds of churn again
//
// stdout, line-buffered, read live by the harness:
//   phase NAME T            a phase starts T seconds after the start
//   tick T PHASE OPS LIVE   one per second, and one as a phase ends: operations since
//                           the tick before (of PHASE only), live MiB
//   sum HEX                 at the end: keeps the reads alive (it depends on
//                           how many operations ran, so it differs run to run)
// An operation is one malloc (grow, regrow), one free (shrink), or one
// free + malloc + 4 dependent reads of random live objects (churn, steady).
#include "bench/wl_common.h"

struct phased {
  void **slot;
  uint64_t n;          // slots in use: [0, n)
  uint64_t cap;
  uint64_t live_bytes;
  uint64_t keep_pct;   // slot i is long-lived when i % 100 < keep_pct
  struct wl_rng rng;
  uint64_t sum;
  // the per-second tick
  uint64_t t0, next_tick, ops;
  const char *phase;
};

static size_t obj_size(uint64_t slot) { return (size_t)(32 + (wl_mix(slot) % 31) * 16); }
static uint64_t obj_tag(const void *p, uint64_t slot) { return wl_mix((uintptr_t)p ^ slot); }
static bool long_lived(const struct phased *w, uint64_t i) { return i % 100 < w->keep_pct; }

static double secs(const struct phased *w) { return (double)(wl_now_ns() - w->t0) / 1e9; }

static void print_tick(struct phased *w, uint64_t now) {
  printf("tick %.1f %s %" PRIu64 " %.0f\n", (double)(now - w->t0) / 1e9, w->phase, w->ops,
         (double)w->live_bytes / 1048576.0);
  fflush(stdout);
  w->ops = 0;
}

static void tick(struct phased *w) {
  if ((++w->ops & 1023) != 0) return;
  uint64_t now = wl_now_ns();
  if (now < w->next_tick) return;
  print_tick(w, now);
  w->next_tick += 1000000000ull;
  if (w->next_tick < now) w->next_tick = now + 1000000000ull;
}

/* The phase before gets a last, shorter tick: every tick counts the operations
 * of one phase, so a phase's rate is its ticks' sum over its duration. */
static void start_phase(struct phased *w, const char *name) {
  if (w->phase && w->ops) print_tick(w, wl_now_ns());
  w->phase = name;
  printf("phase %s %.1f\n", name, secs(w));
  fflush(stdout);
}

static void put(struct phased *w, uint64_t i) {
  size_t size = obj_size(i);
  void *p = wl_xmalloc(size);
  wl_stamp(p, 8, obj_tag(p, i));
  memset((char *)p + 8, (int)i, size - 8);  // touch it all, as a real object's fields
  w->slot[i] = p;
  w->live_bytes += size;
}

static void drop(struct phased *w, uint64_t i) {
  void *p = w->slot[i];
  if (!p) return;
  wl_check(p, 8, obj_tag(p, i));
  w->sum += ((unsigned char *)p)[8];
  free(p);
  w->slot[i] = NULL;
  w->live_bytes -= obj_size(i);
}

static void grow(struct phased *w, uint64_t target) {
  for (uint64_t i = 0; w->live_bytes < target; i++) {
    if (i >= w->n) {
      if (w->n == w->cap) break;
      w->n++;
    }
    if (!w->slot[i]) {
      put(w, i);
      tick(w);
    }
  }
}

static void churn(struct phased *w, double seconds) {
  uint64_t end = wl_now_ns() + (uint64_t)(seconds * 1e9);
  while (wl_now_ns() < end) {
    for (int k = 0; k < 1024; k++) {
      uint64_t i = wl_below(&w->rng, w->n);
      if (long_lived(w, i)) i += w->keep_pct;  // the next short-lived slot
      if (i >= w->n || !w->slot[i]) continue;  // churn replaces, it never grows
      drop(w, i);
      put(w, i);
      for (int r = 0; r < 4; r++) {
        const unsigned char *p = w->slot[wl_below(&w->rng, w->n)];
        if (p) w->sum += p[8 + (w->sum & 7)];
      }
      tick(w);
    }
  }
}

static void shrink(struct phased *w) {
  for (uint64_t i = 0; i < w->n; i++)
    if (!long_lived(w, i) && w->slot[i] && wl_below(&w->rng, 4) != 0) {
      drop(w, i);
      tick(w);
    }
}

int main(int argc, char **argv) {
  uint64_t heap_mib = 2048;
  double churn_s = 15, steady_s = 10;
  struct phased w = {.keep_pct = 25};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--heap-mib") && i + 1 < argc) heap_mib = strtoull(argv[++i], NULL, 10);
    else if (!strcmp(a, "--churn-s") && i + 1 < argc) churn_s = atof(argv[++i]);
    else if (!strcmp(a, "--steady-s") && i + 1 < argc) steady_s = atof(argv[++i]);
    else if (!strcmp(a, "--keep-pct") && i + 1 < argc) w.keep_pct = strtoull(argv[++i], NULL, 10);
    else {
      fprintf(stderr,
              "usage: %s [--heap-mib N (2048)] [--churn-s S (15)] [--steady-s S (10)] "
              "[--keep-pct P (25)]\n",
              argv[0]);
      return 2;
    }
  }
  if (heap_mib == 0 || heap_mib > 4096 || w.keep_pct > 50 || churn_s < 0 || steady_s < 0) {
    fprintf(stderr, "%s: --heap-mib 1..4096, --keep-pct 0..50, durations >= 0\n", argv[0]);
    return 2;
  }
  uint64_t target = heap_mib << 20;
  w.cap = target / 32 + 1024;  // room even if every object were the smallest
  w.slot = wl_xmalloc(w.cap * sizeof *w.slot);
  memset(w.slot, 0, w.cap * sizeof *w.slot);
  w.rng = wl_seed(4);
  w.t0 = wl_now_ns();
  w.next_tick = w.t0 + 1000000000ull;

  start_phase(&w, "grow");
  grow(&w, target);
  start_phase(&w, "churn");
  churn(&w, churn_s);
  start_phase(&w, "shrink");
  shrink(&w);
  start_phase(&w, "steady");
  churn(&w, steady_s);
  start_phase(&w, "regrow");
  grow(&w, target);
  start_phase(&w, "churn2");
  churn(&w, churn_s);
  start_phase(&w, "end");
  for (uint64_t i = 0; i < w.n; i++) drop(&w, i);
  free(w.slot);
  printf("sum %016" PRIx64 "\n", w.sum);
  return 0;
}
