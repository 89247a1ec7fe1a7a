/* The allocation-site profiler (see mv_profile.h). */
#include "profiler/mv_profile.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libunwind.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "include/movalloc.h"
#include "profiler/mv_lifetime.h"
#include "shim/mv_options.h"
#include "shim/mv_sigsegv.h"

#define CAPTURE 64                         /* frames unwound per sample */
#define DEPTH MOVALLOC_PROFILE_DEPTH       /* frames kept per site */
#define SITES 8192u                        /* site table slots (power of two) */
#define SITES_MAX (SITES / 8 * 7)          /* sites kept; later ones are dropped */
#define OBJECTS MV_PROF_OBJECTS            /* sampled-object table slots */
#define OBJECTS_MAX (OBJECTS / 4 * 3)      /* live samples kept; later ones are dropped */
#define LIFE MOVALLOC_LIFETIME_BUCKETS
#define LONG_BUCKET 5                     /* freed samples that lived >= 10 s (buckets from
                                             here on) are long-lived, as are live ones */

/* One allocation site. Invariants (mv_prof_lock): hash == 0 <=> unused slot;
 * live_samples == samples - freed samples; live_bytes == sum of the weights of
 * its objects in the object table. */
/* An object's weight in allocations is fractional (a 16 KiB block sampled at
 * one per 64 KiB stands for 4.52): kept in 1/256ths, since rounding each
 * sample's to a whole number biased the sums (by +11% there). */
#define OBJ_UNIT 256u

typedef struct site {
  uint64_t hash;
  uint32_t depth;
  uint64_t samples, live_samples;
  uint64_t alloc_bytes, allocs;      /* estimates: sums of sample weights (objects
                                        in OBJ_UNITs) */
  uint64_t live_bytes, live_objects; /* same, over samples not freed */
  uint64_t lifetime[LIFE];
  uintptr_t frames[DEPTH];           /* return addresses, innermost first */
} site_t;

/* One live sampled object. addr == 0 <=> empty slot (linear probing, deletion
 * by backward shift: no tombstones). */
typedef struct object {
  uintptr_t addr;
  uint32_t site;
  uint32_t arena;          /* index of the arena its unsampled neighbours go to */
  uint64_t bytes, objects; /* its weight: the bytes and allocations (OBJ_UNITs) it
                              stands for */
  uint64_t born_ns;
} object_t;

uint64_t mv_prof_rate;
__thread int64_t mv_prof_left __attribute__((tls_model("initial-exec")));
mv_lock_t mv_prof_lock = MV_LOCK_INIT;

static site_t *sites;          /* SITES slots, mmap'd */
static object_t *objects;      /* OBJECTS slots, mmap'd */
_Atomic(uint16_t) *mv_prof_filter; /* after the object table (mv_profile.h) */
static uint32_t site_count;    /* mv_prof_lock */
static uint32_t object_count;  /* mv_prof_lock */
static uint64_t dropped;       /* mv_prof_lock: samples lost to full tables */

/* libunwind, loaded by mv_prof_start with RTLD_LOCAL: linked in,
 * libunwind.so.8 would interpose its own backtrace() and _Unwind_Backtrace()
 * on every program movalloc is preloaded into, and load (with liblzma) even
 * when profiling is off. The types are checked against the header. Written
 * once before `backtrace` is published (release); read after it (acquire). */
typedef __typeof__(unw_backtrace) *backtrace_fn;
static struct {
  __typeof__(unw_tdep_getcontext) *getcontext;
  __typeof__(unw_init_local) *init_local;
  __typeof__(unw_step) *step;
  __typeof__(unw_get_reg) *get_reg;
} stepper;                              /* all set, or getcontext NULL */
static _Atomic(backtrace_fn) unwind_backtrace;
static _Atomic bool started;   /* mv_prof_start ran: samples are taken */

/* fork() while another thread is inside libunwind (or the loader's lock it
 * takes) would leave the child a lock nobody releases: fork waits for the
 * unwinds in flight, and none start until it is over. */
static _Atomic uint32_t unwinding; /* unwinds in flight */
static _Atomic bool forking;

static __thread bool in_profiler __attribute__((tls_model("initial-exec")));
static __thread uint64_t rng __attribute__((tls_model("initial-exec"))); /* 0: unseeded */
static uint64_t rng_seed;           /* from the OS once; threads derive theirs */
static _Atomic uint64_t rng_threads; /* threads seeded so far */
/* This thread is inside libunwind for a sample: a fork from a signal handler
 * that interrupted it must not wait for itself, and a pipe libunwind makes
 * meanwhile is its own (shim/mv_unwind_fds.c). */
__thread bool mv_prof_unwinding __attribute__((tls_model("initial-exec")));
/* A thread's first samples are unwound frame by frame: unw_backtrace's first
 * call on a thread maps and fills a 256 KiB frame cache (16384 slots, about
 * 170 us here, unmapped at thread exit), which a short-lived thread never
 * earns back; a stepped sample costs about 6 us (docs/RESULTS.md, section 9). */
#define STEPPED_SAMPLES 16
static __thread uint8_t stepped_here __attribute__((tls_model("initial-exec")));

/* A table page's first touch must be a write: a read maps the shared zero
 * page, and the write that follows copies it and flushes the TLB of every CPU
 * running the process, an interprocessor interrupt per page (larson spent 0.9%
 * of its time there when samples probed their slots with reads first). */
static inline void touch_for_write(void *p) {
  __atomic_fetch_or((unsigned char *)p, 0, __ATOMIC_RELAXED);
}

bool mv_prof_init(uint64_t rate) {
  size_t slen = SITES * sizeof(site_t);
  size_t olen = OBJECTS * (sizeof(object_t) + sizeof(uint16_t)); /* objects, then filter */
  void *s = mv_os_mmap(NULL, slen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void *o = mv_os_mmap(NULL, olen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (s == MAP_FAILED || o == MAP_FAILED) {
    if (s != MAP_FAILED) mv_os_munmap(s, slen);
    if (o != MAP_FAILED) mv_os_munmap(o, olen);
    mv_log("MOVALLOC_PROFILE: cannot map the profile tables; profiling is off");
    return false;
  }
  sites = s;
  objects = o;
  mv_prof_filter = (_Atomic(uint16_t) *)(objects + OBJECTS);
  /* Every free in a tagged page reads the filter: its pages are written now. */
  for (size_t off = 0; off < OBJECTS * sizeof(uint16_t); off += 4096)
    touch_for_write((char *)mv_prof_filter + off);
  mv_os_random(&rng_seed, sizeof rng_seed);
  mv_prof_rate = rate;
  mv_malloc_hooked = true;
  return true;
}

void mv_prof_load_unwind(void) {
  static bool tried; /* the constructor runs on one thread */
  if (tried) return;
  tried = true;
  bool was = in_profiler;
  in_profiler = true; /* dlopen allocates: served, not sampled */
  /* ... and apart from the program's blocks: its few KB would otherwise shift
   * where the program's large blocks go, and which callocs find reused memory
   * to clear (+4% of the instructions of bench/wl_large). */
  size_t fast_max = mv_malloc_fast_max;
  bool hooked = mv_malloc_hooked; /* not yet when only routing */
  mv_malloc_fast_max = 0;
  mv_malloc_hooked = true;
  mv_malloc_apart = true;
  void *h = dlopen("libunwind.so.8", RTLD_NOW | RTLD_LOCAL);
  backtrace_fn fn = h ? (backtrace_fn)dlsym(h, "unw_backtrace") : NULL;
  if (!fn)
    mv_log("cannot load unw_backtrace from libunwind.so.8 (%s): profile samples have no "
           "stacks, and sites are not found through calloc or new. Install libunwind8.",
           h ? "no such symbol" : dlerror());
  if (fn) {
#define LOAD(field, name) stepper.field = (__typeof__(stepper.field))dlsym(h, name)
    LOAD(getcontext, "_Ux86_64_getcontext");
    LOAD(init_local, "_ULx86_64_init_local");
    LOAD(step, "_ULx86_64_step");
    LOAD(get_reg, "_ULx86_64_get_reg");
#undef LOAD
    if (!stepper.init_local || !stepper.step || !stepper.get_reg) stepper.getcontext = NULL;
  }
  mv_malloc_apart = false;
  mv_malloc_hooked = hooked;
  mv_malloc_fast_max = fast_max;
  atomic_store_explicit(&unwind_backtrace, fn, memory_order_release);
  in_profiler = was;
}

/* unw_init_local and unw_step: what unw_backtrace does, without its cache.
 * Stops at DEPTH frames past the allocator's: every step costs. */
static int step_frames(void **frames, int max) {
  unw_context_t context;
  unw_cursor_t cursor;
  if (stepper.getcontext(&context) < 0 || stepper.init_local(&cursor, &context) < 0) return 0;
  int n = 0, program = 0;
  unw_word_t ip;
  do {
    if (stepper.get_reg(&cursor, UNW_REG_IP, &ip) < 0 || !ip) break;
    frames[n++] = (void *)ip;
    if (program || !mv_in_allocator(ip)) program++;
  } while (n < max && program < DEPTH && stepper.step(&cursor) > 0);
  return n;
}

/* This thread's stack unless a fork is under way (0 frames then). */
static int unwind(backtrace_fn fn, void **frames, int max) {
  atomic_fetch_add(&unwinding, 1);
  mv_prof_unwinding = true;
  int n = 0;
  if (!atomic_load(&forking)) {
    if (stepper.getcontext && stepped_here < STEPPED_SAMPLES) {
      stepped_here++;
      /* libunwind blocks signals around each frame it steps (so that a
       * handler on this thread cannot unwind into its held cache lock): two
       * system calls a frame, most of a stepped sample's cost. Blocked once
       * here instead, its own calls change nothing (mv_signals_held). */
      sigset_t all, saved;
      sigfillset(&all);
      pthread_sigmask(SIG_SETMASK, &all, &saved);
      mv_signals_held = true;
      n = step_frames(frames, max);
      mv_signals_held = false;
      pthread_sigmask(SIG_SETMASK, &saved, NULL);
    } else {
      n = fn(frames, max);
    }
  }
  mv_prof_unwinding = false;
  atomic_fetch_sub(&unwinding, 1);
  return n;
}

int mv_prof_backtrace(void **frames, int max) {
  backtrace_fn fn = atomic_load_explicit(&unwind_backtrace, memory_order_acquire);
  if (!fn || in_profiler) return 0; /* in_profiler: libunwind allocating */
  in_profiler = true;
  int n = unwind(fn, frames, max);
  in_profiler = false;
  return n;
}

void mv_prof_fork_prepare(void) {
  atomic_store(&forking, true);
  while (atomic_load(&unwinding) > (mv_prof_unwinding ? 1u : 0u)) sched_yield();
}

void mv_prof_fork_done(void) { atomic_store(&forking, false); }

void mv_prof_start(void) {
  mv_prof_load_unwind();
  atomic_store(&started, true);
}

/* ---- sampling ---- */

static uint64_t next_random(void) { /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return rng * 0x2545F4914F6CDD1DULL;
}

/* The two pieces of libm the sampler needs (mv_profile.h), written out. */

/* x = m 2^e with m in
 * [sqrt(1/2), sqrt(2)), ln(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <
 * 0.172, whose odd series is summed to s^17 (the next term is below 1e-16). */
double mv_ln(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  int e = (int)(bits >> 52 & 0x7ff) - 1023;
  bits = (bits & ((UINT64_C(1) << 52) - 1)) | UINT64_C(1023) << 52;
  double m;
  memcpy(&m, &bits, sizeof m);
  if (m > 1.4142135623730951) {
    m *= 0.5;
    e++;
  }
  double s = (m - 1.0) / (m + 1.0), s2 = s * s, t = 1.0 / 17;
  for (int k = 15; k >= 3; k -= 2) t = 1.0 / k + s2 * t;
  return e * 0.6931471805599453 + 2.0 * s * (1.0 + s2 * t);
}

/* Below 0.5 the series y - y^2/2! + y^3/3! - ... to y^20 (the rest is below 1e-25), else
 * 1 - 2^-k e^-r with y = k ln2 + r, |r| <= ln2 / 2. */
double mv_one_minus_exp_neg(double y) {
  double term = y, sum = y;
  if (y < 0.5) {
    for (int k = 2; k <= 20; k++) sum += (term *= -y / k);
    return sum;
  }
  if (y > 700.0) return 1.0;
  int64_t k = (int64_t)(y / 0.6931471805599453 + 0.5); /* y > 0: truncation rounds */
  double r = y - (double)k * 0.6931471805599453, er = 1.0; /* e^-r */
  term = 1.0;
  for (int i = 1; i <= 14; i++) er += (term *= -r / i);
  uint64_t bits = (uint64_t)(1023 - k) << 52; /* 2^-k, normal for k <= 1010 */
  double scale;
  memcpy(&scale, &bits, sizeof scale);
  return 1.0 - er * scale;
}

/* Bytes to the next sample: exponential with mean mv_prof_rate. */
static int64_t next_interval(void) {
  double u = ((double)(next_random() >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
  double x = -mv_ln(u) * (double)mv_prof_rate;
  if (x > (double)mv_prof_rate * 64) x = (double)mv_prof_rate * 64;
  return (int64_t)x + 1;
}

static uint64_t hash_frames(const uintptr_t *f, unsigned n) {
  uint64_t h = 0xcbf29ce484222325ULL ^ n;
  for (unsigned i = 0; i < n; i++) h = (h ^ f[i]) * 0x100000001b3ULL;
  return h ? h : 1;
}

/* The slot of the site with this stack, inserted if new; SITES when full. */
static uint32_t site_find(uint64_t hash, const uintptr_t *f, unsigned n) {
  touch_for_write(&sites[(uint32_t)hash & (SITES - 1)]);
  for (uint32_t i = (uint32_t)hash & (SITES - 1);; i = (i + 1) & (SITES - 1)) {
    site_t *s = &sites[i];
    if (s->hash == hash && s->depth == n && !memcmp(s->frames, f, n * sizeof *f)) return i;
    if (s->hash == 0) {
      if (site_count >= SITES_MAX) return SITES;
      s->hash = hash;
      s->depth = n;
      memcpy(s->frames, f, n * sizeof *f);
      site_count++;
      return i;
    }
  }
}

/* Sets or clears MV_HEAP_SAMPLED on a small page (profile lock held; the owner
 * never changes while the page has live blocks). */
static void page_tag(mv_page_t *page, bool sampled) {
  if (page->kind != MV_PAGE_SMALL) return; /* large and huge frees are slow anyway */
  mv_heap_t *h = atomic_load_explicit(&page->heap, memory_order_relaxed);
  mv_heap_t *want;
  do want = (mv_heap_t *)(sampled ? (uintptr_t)h | MV_HEAP_SAMPLED
                                  : (uintptr_t)h & ~MV_HEAP_SAMPLED);
  while (!atomic_compare_exchange_weak(&page->heap, &h, want));
}

bool mv_prof_cross(void) {
  bool first = rng == 0;
  if (MV_UNLIKELY(first)) { /* splitmix64 of the seed and the thread's number: no system call */
    uint64_t z = rng_seed + (atomic_fetch_add(&rng_threads, 1) + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ z >> 27) * 0x94D049BB133111EBULL;
    rng = (z ^ z >> 31) | 1;
  }
  mv_prof_left = next_interval();
  return !first;
}

MV_ALLOC_ENTRY void *mv_prof_sample(void *p, size_t size, size_t unit, uintptr_t near) {
  if (in_profiler || !atomic_load_explicit(&started, memory_order_acquire))
    return p; /* libunwind allocating inside the sampler, or before start-up */
  in_profiler = true;

  void *raw[CAPTURE];
  backtrace_fn backtrace = atomic_load_explicit(&unwind_backtrace, memory_order_acquire);
  int n = backtrace ? unwind(backtrace, raw, CAPTURE) : 0;
  /* Drop libunwind's frames, then the allocator's: keep the program's. */
  int first = 0;
  while (first < n && !mv_in_allocator((uintptr_t)raw[first])) first++;
  if (first == n) first = 0;
  while (first < n && mv_in_allocator((uintptr_t)raw[first])) first++;
  unsigned depth = (unsigned)(n - first) < DEPTH ? (unsigned)(n - first) : DEPTH;
  uintptr_t frames[DEPTH];
  for (unsigned i = 0; i < depth; i++) frames[i] = (uintptr_t)raw[first + i];

  double s = size ? (double)size : 1.0;
  double weight = s / mv_one_minus_exp_neg((double)unit / (double)mv_prof_rate); /* s / P(sampled) */
  uint64_t now = mv_os_now_ns();
  uint64_t hash = hash_frames(frames, depth);
  mv_page_t *page = mv_page_of(p);

  mv_lock(&mv_prof_lock);
  uint32_t si = site_find(hash, frames, depth);
  if (si == SITES || object_count >= OBJECTS_MAX || !page) {
    dropped++;
  } else {
    site_t *st = &sites[si];
    object_t o = {(uintptr_t)p, si, (uint32_t)((near - mv_heap_base) >> MV_ARENA_SHIFT),
                  (uint64_t)weight, (uint64_t)(weight / s * OBJ_UNIT + 0.5), now};
    st->samples++;
    st->live_samples++;
    st->alloc_bytes += o.bytes;
    st->allocs += o.objects;
    st->live_bytes += o.bytes;
    st->live_objects += o.objects;
    uint32_t i = mv_prof_slot(o.addr);
    touch_for_write(&objects[i]);
    while (objects[i].addr) i = (i + 1) & (OBJECTS - 1);
    objects[i] = o;
    object_count++;
    atomic_fetch_add_explicit(&mv_prof_filter[mv_prof_slot(o.addr)], 1, memory_order_release);
    bool first = atomic_fetch_add_explicit(&page->sampled, 1, memory_order_relaxed) == 0;
    /* Before the tag, and before p is handed out: every free that can see p sees this. */
    atomic_store_explicit(&page->sampled_block, first ? o.addr : MV_SAMPLED_MANY,
                          memory_order_release);
    if (first) page_tag(page, true);
  }
  mv_unlock(&mv_prof_lock);
  in_profiler = false;
  return p;
}

static unsigned lifetime_bucket(uint64_t ns) {
  unsigned b = 0;
  for (uint64_t limit = 1000000; b + 1 < LIFE && ns >= limit; limit *= 10) b++;
  return b;
}

void mv_prof_freed(void *p, mv_page_t *page) {
  uint32_t i = mv_prof_slot((uintptr_t)p);
  uint64_t now = mv_os_now_ns();
  mv_lock(&mv_prof_lock);
  while (objects[i].addr && objects[i].addr != (uintptr_t)p) i = (i + 1) & (OBJECTS - 1);
  if (objects[i].addr) {
    object_t *o = &objects[i];
    site_t *st = &sites[o->site];
    st->live_samples--;
    st->live_bytes -= o->bytes;
    st->live_objects -= o->objects;
    st->lifetime[lifetime_bucket(now - o->born_ns)]++;
    object_count--;
    atomic_fetch_sub_explicit(&mv_prof_filter[mv_prof_slot((uintptr_t)p)], 1, memory_order_relaxed);
    if (atomic_fetch_sub_explicit(&page->sampled, 1, memory_order_relaxed) == 1) {
      page_tag(page, false);
      atomic_store_explicit(&page->sampled_block, 0, memory_order_relaxed);
    }
    /* Backward shift: pull later entries of the probe run into the hole. */
    uint32_t hole = i;
    for (uint32_t j = (i + 1) & (OBJECTS - 1); objects[j].addr; j = (j + 1) & (OBJECTS - 1)) {
      uint32_t home = mv_prof_slot(objects[j].addr);
      /* j's entry may move to hole unless its home lies cyclically in (hole, j]. */
      bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
      if (stays) continue;
      objects[hole] = objects[j];
      hole = j;
    }
    objects[hole].addr = 0;
  }
  mv_unlock(&mv_prof_lock);
}

/* ---- reports ---- */

/* What an arena's descriptor says about it: whether it is sparse, and not
 * backed by a huge page. */
static void classify(const mv_arena_t *a, bool *sparse, bool *small_pages) {
  *small_pages = !a->thp;
  if (a->huge) { /* a huge object owns its arenas whole */
    *sparse = false;
    return;
  }
  *sparse = mv_arena_pages_in_use(a) < MV_ARENA_SIZE / 2;
}

/* A snapshot of every site, taken under the lock so that symbolizing (dladdr
 * takes the loader's lock, which a thread inside dlopen holds while it
 * allocates) happens without it. mmap'd; free with snap_free. */
typedef struct snap {
  size_t len, count;
  uint64_t dropped, samples;
  struct movalloc_profile_site site[];
} snap_t;

static void snap_free(snap_t *sn) { mv_os_munmap(sn, sn->len); }

static void sort_by_live(struct movalloc_profile_site *s, size_t n) { /* shell sort */
  static const size_t gaps[] = {701, 301, 132, 57, 23, 10, 4, 1};
  for (size_t g = 0; g < sizeof gaps / sizeof gaps[0]; g++) {
    size_t gap = gaps[g];
    for (size_t i = gap; i < n; i++) {
      struct movalloc_profile_site t = s[i];
      size_t j = i;
      for (; j >= gap && s[j - gap].live_bytes < t.live_bytes; j -= gap) s[j] = s[j - gap];
      s[j] = t;
    }
  }
}

static snap_t *snap_take(void) {
  /* Sized for every slot; untouched pages cost nothing. */
  size_t len = sizeof(snap_t) + (size_t)SITES * sizeof(struct movalloc_profile_site) +
               SITES * sizeof(uint32_t);
  len = (len + 4095) & ~(size_t)4095;
  snap_t *sn = mv_os_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (sn == MAP_FAILED) return NULL;
  sn->len = len;
  uint32_t *index = (uint32_t *)&sn->site[SITES]; /* site slot -> snapshot entry */
  mv_lock(&mv_prof_lock);
  /* The loops stop at the last entry in use (the counts say which; tested at
   * entries only, so a free slot costs what it did): at exit the object table
   * is often empty, and a scan of its 64 Ki slots would be most of the
   * report's cost. */
  for (uint32_t i = 0; i < SITES; i++) {
    const site_t *st = &sites[i];
    if (!st->hash) continue;
    struct movalloc_profile_site *o = &sn->site[sn->count];
    index[i] = (uint32_t)sn->count++;
    o->live_bytes = st->live_bytes;
    o->live_objects = (st->live_objects + OBJ_UNIT / 2) / OBJ_UNIT;
    o->alloc_bytes = st->alloc_bytes;
    o->allocs = (st->allocs + OBJ_UNIT / 2) / OBJ_UNIT;
    o->samples = st->samples;
    o->live_samples = st->live_samples;
    memcpy(o->lifetime, st->lifetime, sizeof o->lifetime);
    o->depth = st->depth;
    for (unsigned f = 0; f < st->depth; f++) o->frames[f] = (void *)st->frames[f];
    sn->samples += st->samples;
    if (sn->count == site_count) break;
  }
  for (uint32_t i = 0, seen = 0; i < SITES; i++) {
    if (!sites[i].hash) continue;
    for (unsigned b = LONG_BUCKET; b < LIFE; b++)
      sn->site[index[i]].long_lived_samples += sites[i].lifetime[b];
    if (++seen == site_count) break;
  }
  for (uint32_t i = 0, seen = 0; i < OBJECTS && object_count; i++) {
    const object_t *ob = &objects[i];
    if (!ob->addr) continue;
    bool sparse, small_pages;
    classify(&mv_arenas[ob->arena], &sparse, &small_pages);
    struct movalloc_profile_site *o = &sn->site[index[ob->site]];
    if (sparse) o->sparse_bytes += ob->bytes;
    if (small_pages) o->small_page_bytes += ob->bytes;
    o->long_lived_samples++;
    if (++seen == object_count) break;
  }
  sn->dropped = dropped;
  mv_unlock(&mv_prof_lock);
  sort_by_live(sn->site, sn->count);
  return sn;
}

int movalloc_profile_sites(struct movalloc_profile_site *out, size_t max) {
  if (!mv_prof_rate) return -ENOSYS;
  snap_t *sn = snap_take();
  if (!sn) return -ENOMEM;
  size_t n = sn->count < max ? sn->count : max;
  memcpy(out, sn->site, n * sizeof *out);
  int count = (int)sn->count;
  snap_free(sn);
  return count;
}

/* "symbol+0xoff" or "module+0xoff" for a return address (the call is at ip - 1). */
static void frame_name(void *ip, char *buf, size_t cap) {
  Dl_info info;
  uintptr_t pc = (uintptr_t)ip - 1;
  if (dladdr((void *)pc, &info) && info.dli_sname && info.dli_saddr) {
    mv_snprintf(buf, cap, "%s+0x%lx", info.dli_sname, (unsigned long)(pc - (uintptr_t)info.dli_saddr));
  } else if (info.dli_fname && info.dli_fbase) {
    const char *base = strrchr(info.dli_fname, '/');
    mv_snprintf(buf, cap, "%s+0x%lx", base ? base + 1 : info.dli_fname,
                (unsigned long)(pc - (uintptr_t)info.dli_fbase));
  } else {
    mv_snprintf(buf, cap, "0x%lx", (unsigned long)pc);
  }
}

static unsigned percent(uint64_t part, uint64_t whole) {
  return whole ? (unsigned)(part * 100 / whole) : 0;
}

int movalloc_profile_report(int fd, unsigned top) {
  if (!mv_prof_rate) return -ENOSYS;
  bool was = in_profiler;
  in_profiler = true; /* whatever dladdr allocates is not sampled */
  snap_t *sn = snap_take();
  if (!sn) {
    in_profiler = was;
    return -ENOMEM;
  }
  uint64_t live = 0;
  for (size_t i = 0; i < sn->count; i++) live += sn->site[i].live_bytes;
  mv_dprintf(fd, "movalloc profile (pid %d): one sample per %llu bytes on average; %llu samples, "
             "%zu sites, %llu dropped (tables full); estimated live %llu bytes\n", (int)getpid(),
             (unsigned long long)mv_prof_rate, (unsigned long long)sn->samples, sn->count,
             (unsigned long long)sn->dropped, (unsigned long long)live);
  for (size_t i = 0; i < sn->count && i < top; i++) {
    const struct movalloc_profile_site *s = &sn->site[i];
    if (!s->live_bytes) break;
    mv_dprintf(fd, "#%zu live %llu bytes (%u%%) in ~%llu objects; allocated %llu bytes in ~%llu "
               "allocations; %u%% in sparse arenas, %u%% not on huge pages\n",
               i + 1, (unsigned long long)s->live_bytes, percent(s->live_bytes, live),
               (unsigned long long)s->live_objects, (unsigned long long)s->alloc_bytes,
               (unsigned long long)s->allocs, percent(s->sparse_bytes, s->live_bytes),
               percent(s->small_page_bytes, s->live_bytes));
    mv_dprintf(fd, "    freed samples by lifetime: <1ms %llu, <10ms %llu, <100ms %llu, <1s %llu, "
               "<10s %llu, <100s %llu, more %llu\n",
               (unsigned long long)s->lifetime[0], (unsigned long long)s->lifetime[1],
               (unsigned long long)s->lifetime[2], (unsigned long long)s->lifetime[3],
               (unsigned long long)s->lifetime[4], (unsigned long long)s->lifetime[5],
               (unsigned long long)s->lifetime[6]);
    for (unsigned f = 0; f < s->depth; f++) {
      char name[256];
      frame_name(s->frames[f], name, sizeof name);
      mv_dprintf(fd, "    %s\n", name);
    }
  }
  snap_free(sn);
  in_profiler = was;
  return 0;
}

/* Buffered writes to an fd, through a stack buffer. */
struct out {
  int fd;
  size_t n;
  char buf[4096];
};

static void out_put(struct out *o, const char *s, size_t len) {
  if (o->n + len > sizeof o->buf) {
    mv_os_write_all(o->fd, o->buf, o->n);
    o->n = 0;
  }
  if (len > sizeof o->buf) {
    mv_os_write_all(o->fd, s, len);
    return;
  }
  memcpy(o->buf + o->n, s, len);
  o->n += len;
}

/* One of the profile's files being written: opened as MOVALLOC_TRACE's are
 * (only a regular file of the user's own, closed to others: what movalloc
 * writes must not land in anyone else's file), emptied, with a snapshot of the
 * sites taken while the profiler's own allocations are not sampled. */
struct output {
  struct out o;
  snap_t *sn;
  bool was;
};

/* 0, or -errno with nothing open (a refused file is named in a log line). */
static int output_begin(const char *path, struct output *w) {
  char why[160];
  int fd = mv_os_open_private(path, why, sizeof why);
  if (fd < 0) {
    mv_log("%s: %s", path, why);
    return -EACCES;
  }
  if (ftruncate(fd, 0) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  w->was = in_profiler;
  in_profiler = true;
  w->sn = snap_take();
  if (!w->sn) {
    close(fd);
    in_profiler = w->was;
    return -ENOMEM;
  }
  w->o.fd = fd;
  w->o.n = 0;
  return 0;
}

static int output_end(struct output *w) {
  mv_os_write_all(w->o.fd, w->o.buf, w->o.n);
  snap_free(w->sn);
  in_profiler = w->was;
  return close(w->o.fd) == 0 ? 0 : -errno;
}

int movalloc_profile_dump(const char *path) {
  if (!mv_prof_rate) return -ENOSYS;
  if (!path) return -EINVAL;
  struct output w;
  int rc = output_begin(path, &w);
  if (rc) return rc;
  struct out *o = &w.o;
  const snap_t *sn = w.sn;
  for (size_t i = 0; i < sn->count; i++) {
    const struct movalloc_profile_site *s = &sn->site[i];
    if (!s->live_bytes) break;
    if (!s->depth) out_put(o, "[unknown]", 9);
    for (unsigned f = s->depth; f-- > 0;) { /* outermost caller first */
      char name[256];
      frame_name(s->frames[f], name, sizeof name);
      for (char *c = name; *c; c++)
        if (*c == ';' || *c == ' ') *c = '_'; /* the format's separators */
      out_put(o, name, strlen(name));
      if (f) out_put(o, ";", 1);
    }
    char num[32];
    size_t len = mv_snprintf(num, sizeof num, " %llu\n", (unsigned long long)s->live_bytes);
    out_put(o, num, len);
  }
  return output_end(&w);
}

/* The sites whose samples are mostly still live, or lived 10 s or more, as
 * "module 0xoffset symbol"
 * lines (mv_lifetime.h reads them): the return address into malloc's caller,
 * relative to its object, so that it survives address space randomisation. */
static int write_longlived(const char *path) {
  struct output w;
  int rc = output_begin(path, &w);
  if (rc) return rc;
  struct out *o = &w.o;
  const snap_t *sn = w.sn;
  char line[512];
  size_t len = mv_snprintf(line, sizeof line, "# movalloc long-lived allocation sites "
                           "(samples live or that lived >= 10 s / samples): module offset symbol\n");
  out_put(o, line, len);
  for (size_t i = 0; i < sn->count; i++) {
    const struct movalloc_profile_site *s = &sn->site[i];
    if (!s->depth || s->samples < 2 || s->long_lived_samples * 2 < s->samples) continue;
    uintptr_t ip = (uintptr_t)s->frames[0], bias;
    char module[256], name[256];
    if (!mv_lifetime_object_of(ip - 1, &bias, module, sizeof module)) continue;
    frame_name(s->frames[0], name, sizeof name);
    len = mv_snprintf(line, sizeof line, "%s 0x%lx %s %llu/%llu\n", module,
                      (unsigned long)(ip - bias), name,
                      (unsigned long long)s->long_lived_samples, (unsigned long long)s->samples);
    out_put(o, line, len);
  }
  return output_end(&w);
}

/* The exit report: to stderr, or appended to MOVALLOC_PROFILE_REPORT's file
 * (stderr may be the program's own output, compared or parsed). */
static void report_at_exit(void) {
  const char *path = mv_options.profile_report;
  if (!path) {
    movalloc_profile_report(2, 10);
    return;
  }
  char why[160];
  int fd = mv_os_open_private(path, why, sizeof why);
  if (fd < 0) {
    mv_log("MOVALLOC_PROFILE_REPORT=%s: %s", path, why);
    return;
  }
  movalloc_profile_report(fd, 10);
  close(fd);
}

void mv_prof_exit(void) {
  report_at_exit();
  if (mv_options.profile_out) {
    int rc = movalloc_profile_dump(mv_options.profile_out);
    if (rc) mv_log("MOVALLOC_PROFILE_OUT=%s: cannot write it (%d)", mv_options.profile_out, rc);
  }
  if (mv_options.profile_longlived_out) {
    int rc = write_longlived(mv_options.profile_longlived_out);
    if (rc)
      mv_log("MOVALLOC_PROFILE_LONGLIVED_OUT=%s: cannot write it (%d)",
             mv_options.profile_longlived_out, rc);
  }
}
