/* Soak: threads allocate blocks of random sizes, fill every byte with a pattern
 * derived from its address, pass blocks to one another, grow and shrink them
 * with realloc, and check every byte before each free, while the compactor
 * moves the heap underneath (run it with MOVALLOC_COMPACT_STRESS=1). Prints a
 * progress line every --report seconds and a closing line with allocations,
 * migrations (movalloc_stats_get) and mismatches.
 *
 * Exit status: 0, 1 on any mismatch, 2 when fewer than --min-migrations arenas
 * were migrated (a soak that moved nothing proves nothing), 3 on bad arguments
 * or an allocation failure.
 *
 * Usage: soak [--seconds N] [--threads N] [--live N] [--report N]
 *             [--min-migrations N] [--seed N] [--flip-at N]
 * --flip-at N: after N seconds, change one byte of a live block behind the
 * checker's back, to show that a lost or misplaced write is caught (exit 1).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "include/movalloc.h"

#define MAX_THREADS 64
#define MAILBOX 256
#define MAX_REPORTED_MISMATCHES 10

struct block {
  unsigned char *p;
  size_t n;
  uint64_t seed;
};

/* Blocks handed to a thread by the others; it checks them and keeps or frees
 * them. */
struct mailbox {
  pthread_mutex_t mu;
  struct block q[MAILBOX];
  unsigned head, count;
};

static struct {
  unsigned seconds, threads, live, report;
  uint64_t min_migrations, seed, flip_at;
} opt = {60, 4, 3000, 10, 1, 1, 0};

static struct mailbox boxes[MAX_THREADS];
static atomic_bool stop, flip;
static atomic_uint_fast64_t n_alloc, n_free, n_realloc, n_passed, n_verified_bytes, n_mismatch,
    n_alloc_failed;

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}

/* The byte every address of a block must hold: a function of the address and
 * the block's seed, so a byte copied to the wrong place, a stale page or a
 * lost write all show. Whole words where aligned, single bytes elsewhere. */
static uint64_t word_at(uintptr_t a, uint64_t seed) { return mix(a ^ seed); }
static unsigned char byte_at(uintptr_t a, uint64_t seed) {
  return (unsigned char)(word_at(a & ~(uintptr_t)7, seed) >> (8 * (a & 7)));
}

static void fill(unsigned char *p, size_t n, uint64_t seed) {
  size_t i = 0;
  for (; i < n && ((uintptr_t)(p + i) & 7); i++) p[i] = byte_at((uintptr_t)(p + i), seed);
  for (; i + 8 <= n; i += 8) *(uint64_t *)(p + i) = word_at((uintptr_t)(p + i), seed);
  for (; i < n; i++) p[i] = byte_at((uintptr_t)(p + i), seed);
}

static void mismatch(const char *what, const unsigned char *p, size_t n, size_t at,
                     unsigned char want) {
  uint64_t k = atomic_fetch_add(&n_mismatch, 1);
  if (k < MAX_REPORTED_MISMATCHES)
    fprintf(stderr, "soak: MISMATCH (%s) block %p size %zu at offset %zu: %#x, want %#x\n", what,
            (const void *)p, n, at, p[at], want);
}

/* Checks the first n bytes of p against the pattern the block had at base
 * (realloc moves a block: its prefix must hold what the old address held).
 * Returns whether all were right. */
static bool verify_as(const unsigned char *p, size_t n, uintptr_t base, uint64_t seed,
                      const char *what) {
  size_t i = 0;
  uintptr_t delta = base - (uintptr_t)p;
  if (((uintptr_t)p & 7) == (base & 7)) {
    for (; i < n && ((base + i) & 7); i++)
      if (p[i] != byte_at(base + i, seed)) goto bad;
    for (; i + 8 <= n; i += 8)
      if (*(const uint64_t *)(p + i) != word_at((uintptr_t)(p + i) + delta, seed)) break;
  }
  for (; i < n; i++)
    if (p[i] != byte_at(base + i, seed)) goto bad;
  atomic_fetch_add_explicit(&n_verified_bytes, n, memory_order_relaxed);
  return true;
bad:
  mismatch(what, p, n, i, byte_at(base + i, seed));
  return false;
}

static bool verify(const struct block *b, const char *what) {
  return verify_as(b->p, b->n, (uintptr_t)b->p, b->seed, what);
}

struct rng {
  uint64_t s;
};
static uint64_t next(struct rng *r) {
  r->s ^= r->s << 13;
  r->s ^= r->s >> 7;
  r->s ^= r->s << 17;
  return r->s;
}
static size_t between(struct rng *r, size_t lo, size_t hi) { return lo + next(r) % (hi - lo + 1); }

/* Mostly small blocks, some of a few pages, a few large ones (their own
 * slices) and rare huge ones (their own arenas). */
static size_t random_size(struct rng *r) {
  unsigned k = (unsigned)(next(r) % 1000);
  if (k < 700) return between(r, 1, 512);
  if (k < 950) return between(r, 513, 16384);
  if (k < 996) return between(r, 16385, 256 << 10);
  return between(r, (256 << 10) + 1, 3 << 20);
}

static bool new_block(struct rng *r, struct block *b) {
  b->n = random_size(r);
  b->p = malloc(b->n);
  if (!b->p) {
    atomic_fetch_add(&n_alloc_failed, 1);
    return false;
  }
  b->seed = next(r);
  fill(b->p, b->n, b->seed);
  atomic_fetch_add_explicit(&n_alloc, 1, memory_order_relaxed);
  return true;
}

static void free_block(struct block *b, const char *what) {
  verify(b, what);
  free(b->p);
  b->p = NULL;
  atomic_fetch_add_explicit(&n_free, 1, memory_order_relaxed);
}

/* realloc to a random size: the common prefix must come across intact, then
 * the block gets the pattern of its new address. */
static void resize_block(struct rng *r, struct block *b) {
  if (!verify(b, "before realloc")) return;
  uintptr_t old = (uintptr_t)b->p;
  size_t n = random_size(r);
  unsigned char *p = realloc(b->p, n);
  if (!p) {
    atomic_fetch_add(&n_alloc_failed, 1);
    return;
  }
  verify_as(p, n < b->n ? n : b->n, old, b->seed, "realloc copy");
  b->p = p;
  b->n = n;
  b->seed = next(r);
  fill(p, n, b->seed);
  atomic_fetch_add_explicit(&n_realloc, 1, memory_order_relaxed);
}

static bool post(unsigned to, struct block b) {
  struct mailbox *m = &boxes[to];
  pthread_mutex_lock(&m->mu);
  bool ok = m->count < MAILBOX;
  if (ok) m->q[(m->head + m->count++) % MAILBOX] = b;
  pthread_mutex_unlock(&m->mu);
  return ok;
}

static bool take(unsigned me, struct block *b) {
  struct mailbox *m = &boxes[me];
  pthread_mutex_lock(&m->mu);
  bool ok = m->count > 0;
  if (ok) {
    *b = m->q[m->head];
    m->head = (m->head + 1) % MAILBOX;
    m->count--;
  }
  pthread_mutex_unlock(&m->mu);
  return ok;
}

static void *worker(void *arg) {
  unsigned me = (unsigned)(uintptr_t)arg;
  struct rng r = {mix(opt.seed * 1000003 + me + 1) | 1};
  struct block *live = calloc(opt.live, sizeof *live);
  if (!live) {
    atomic_fetch_add(&n_alloc_failed, 1);
    return NULL;
  }
  size_t count = 0;
  while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
    struct block got;
    /* Blocks from other threads: checked, then kept or freed here. */
    while (take(me, &got)) {
      if (count < opt.live && next(&r) % 2) {
        if (verify(&got, "received")) live[count++] = got;
      } else {
        free_block(&got, "received, freed");
      }
    }
    if (count && atomic_exchange_explicit(&flip, false, memory_order_relaxed))
      live[0].p[live[0].n / 2] ^= 0x10;
    unsigned op = (unsigned)(next(&r) % 100);
    size_t i = count ? next(&r) % count : 0;
    if (op < 50 || count == 0) {
      if (count == opt.live) {
        free_block(&live[i], "free to make room");
        live[i] = live[--count];
      }
      if (new_block(&r, &live[count])) count++;
    } else if (op < 80) {
      free_block(&live[i], "free");
      live[i] = live[--count];
    } else if (op < 88) {
      resize_block(&r, &live[i]);
    } else if (op < 95 && opt.threads > 1) {
      unsigned to = (unsigned)((me + 1 + next(&r) % (opt.threads - 1)) % opt.threads);
      if (post(to, live[i])) {
        atomic_fetch_add_explicit(&n_passed, 1, memory_order_relaxed);
        live[i] = live[--count];
      }
    } else {
      verify(&live[i], "in place");
    }
  }
  for (size_t k = 0; k < count; k++) free_block(&live[k], "at the end");
  free(live);
  return NULL;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void report(const char *what, double elapsed) {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  printf("soak: %s %.0f s, %u threads: allocations %llu, frees %llu, reallocs %llu, "
         "passed between threads %llu, MB verified %llu, migrations %llu (retries %llu, "
         "refused %llu, failed %llu, staging failed %llu), backend %s, mismatches %llu\n",
         what, elapsed, opt.threads, (unsigned long long)n_alloc, (unsigned long long)n_free,
         (unsigned long long)n_realloc, (unsigned long long)n_passed,
         (unsigned long long)(n_verified_bytes >> 20), (unsigned long long)s.migrated,
         (unsigned long long)s.migrate_retries, (unsigned long long)s.isolate_refused,
         (unsigned long long)s.migrate_failed, (unsigned long long)s.staging_failed, s.backend,
         (unsigned long long)n_mismatch);
  fflush(stdout);
}

static bool parse(int argc, char **argv) {
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(argv[i + 1], &end, 10);
    if (errno || *end || end == argv[i + 1]) return false;
    if (!strcmp(argv[i], "--seconds")) opt.seconds = (unsigned)v;
    else if (!strcmp(argv[i], "--threads") && v >= 1 && v <= MAX_THREADS) opt.threads = (unsigned)v;
    else if (!strcmp(argv[i], "--live") && v >= 1) opt.live = (unsigned)v;
    else if (!strcmp(argv[i], "--report") && v >= 1) opt.report = (unsigned)v;
    else if (!strcmp(argv[i], "--min-migrations")) opt.min_migrations = v;
    else if (!strcmp(argv[i], "--seed")) opt.seed = v;
    else if (!strcmp(argv[i], "--flip-at") && v >= 1) opt.flip_at = v;
    else return false;
  }
  return true;
}

int main(int argc, char **argv) {
  if (!parse(argc, argv)) {
    fprintf(stderr,
            "usage: soak [--seconds N] [--threads 1..%d] [--live N] [--report N]\n"
            "            [--min-migrations N] [--seed N] [--flip-at N]\n",
            MAX_THREADS);
    return 3;
  }
  for (unsigned t = 0; t < opt.threads; t++) pthread_mutex_init(&boxes[t].mu, NULL);
  pthread_t tids[MAX_THREADS];
  for (unsigned t = 0; t < opt.threads; t++)
    if (pthread_create(&tids[t], NULL, worker, (void *)(uintptr_t)t) != 0) {
      fprintf(stderr, "soak: pthread_create failed\n");
      return 3;
    }
  double t0 = now_s(), next_report = opt.report;
  bool flipped = false;
  for (double e = 0; e < opt.seconds; e = now_s() - t0) {
    usleep(100 * 1000);
    if (opt.flip_at && !flipped && e >= opt.flip_at) atomic_store(&flip, flipped = true);
    if (e >= next_report) {
      report("after", e);
      next_report += opt.report;
    }
  }
  atomic_store(&stop, true);
  for (unsigned t = 0; t < opt.threads; t++) pthread_join(tids[t], NULL);
  /* What was still in flight between threads. */
  for (unsigned t = 0; t < opt.threads; t++) {
    struct block b;
    while (take(t, &b)) free_block(&b, "in flight at the end");
  }
  report("done:", now_s() - t0);
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  if (n_mismatch) {
    printf("soak: FAILED: %llu mismatches\n", (unsigned long long)n_mismatch);
    return 1;
  }
  if (n_alloc_failed) {
    printf("soak: FAILED: %llu allocations failed\n", (unsigned long long)n_alloc_failed);
    return 3;
  }
  if (s.migrated < opt.min_migrations) {
    printf("soak: FAILED: %llu migrations, fewer than %llu\n", (unsigned long long)s.migrated,
           (unsigned long long)opt.min_migrations);
    return 2;
  }
  printf("soak: OK\n");
  return 0;
}
