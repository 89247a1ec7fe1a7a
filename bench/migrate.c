/* bench/migrate: what moving a heap onto transparent huge pages costs, per
 * migration backend, against plain MADV_COLLAPSE. See bench/migrate.md.
 *
 * Subjects: the backends move, remap, collapse and mprotect that this kernel
 * runs, and "raw-collapse", madvise(MADV_COLLAPSE) over the same arenas with no
 * engine. For each, three child processes each build a fresh heap of N dense
 * arenas of 4 KiB pages and run one pass of migration over all of it:
 *   throughput  the pass alone: GB/s with and without staging
 *   writer      a thread storing into every arena: how long its stores stall
 *   fault       a thread mapping, faulting and unmapping unrelated memory,
 *               first with no migration, then beside a thread that only
 *               copies memory (the control: what any copy in this process
 *               costs it), then during the pass
 * A child per phase, because a migrated heap is no longer made of 4 KiB pages
 * (collapsing a huge page again costs nothing) and the remap backend leaves
 * VMAs behind that would change what the next subject measures.
 *
 * The engine runs each backend through a forwarding copy of it that timestamps
 * stage/hold/release/unstage: that gives the staging time and every isolation
 * window (hold to release, including any pre-copy) exactly.
 *
 * On a shared machine preemption dwarfs what migration costs, so every latency
 * is also reported less the time the threads involved sat runnable without a
 * CPU (run_delay in /proc/thread-self/schedstat).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "compactor/mv_backend.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"

#ifndef MADV_COLLAPSE /* Linux 6.1; older glibc headers lack it */
#define MADV_COLLAPSE 25
#endif

#define BLOCK_SIZE 256
#define BLOCKS_PER_ARENA (MV_ARENA_SIZE / BLOCK_SIZE)
#define STALL_NS 2000u            /* a gap between two stores longer than this is a stall */
#define WRITER_SLOTS 16           /* stores per arena, spread over its 2 MiB */
#define MAX_STALLS (1u << 16)
#define FAULT_MAP_SIZE (64u << 10)
#define MAX_FAULT_SAMPLES (1u << 18)
#define COPY_CHUNK (256u << 10)   /* the control's memcpy: the move backend's batch */
#define SETTLE_NS 20000000ull     /* writer running before and after the pass */
#define WRITER_LOST_S 2           /* a writer not back this long after the pass was never woken */
#define CHILD_TIMEOUT_MS 300000   /* a child that takes longer is stuck: killed */
#define DEFAULT_REPS 3
#define MAX_REPS 15

/* Targets (the issue): writer stall of move and remap, fault latency ratio,
 * throughput per core with staging excluded. */
#define TARGET_STALL_P99_US 300.0
#define TARGET_STALL_MAX_US 1000.0
#define TARGET_FAULT_RATIO 1.2
#define TARGET_GBPS_EXCL 4.0

enum phase { PHASE_THROUGHPUT, PHASE_WRITER, PHASE_FAULT, PHASE_COUNT };
static const char *const phase_names[PHASE_COUNT] = {"throughput", "writer", "fault"};

struct subject {
  const char *name;
  enum mv_backend_kind kind;
  bool raw; /* madvise(MADV_COLLAPSE) by hand, no engine */
};

static const struct subject subjects[] = {
    {"move", MV_BACKEND_MOVE, false},         {"remap", MV_BACKEND_REMAP, false},
    {"collapse", MV_BACKEND_COLLAPSE, false}, {"mprotect", MV_BACKEND_MPROTECT, false},
    {"raw-collapse", MV_BACKEND_COLLAPSE, true},
};
#define SUBJECTS (sizeof subjects / sizeof subjects[0])

struct dist { /* ns */
  uint64_t n, p50, p99, max;
};

/* A latency as measured (raw), and less CPU wait (net). */
struct lat {
  struct dist raw, net;
};

/* What a child sends back through a pipe: the same binary on both ends. */
struct phase_result {
  char error[160];            /* empty when the phase ran */
  uint64_t heap_arenas;       /* arenas holding the benchmark's blocks */
  uint64_t arena_count;       /* every arena in the heap (stats) */
  uint64_t migrated, bytes_moved;
  uint64_t wall_ns;           /* the whole pass */
  uint64_t stage_ns;          /* in stage() and unstage() */
  uint64_t cpu_wait_ns;       /* the compacting thread runnable without a CPU, whole pass */
  uint64_t stage_cpu_wait_ns; /* the same, inside stage() and unstage() */
  uint64_t window_sum_ns;     /* isolation windows, summed */
  uint64_t cpu_ns;            /* the engine's compactor_cpu_ns */
  struct lat window;          /* isolation window per arena */
  uint64_t stall_hist[MOVALLOC_STALL_BUCKETS];
  uint64_t thp_kb_before, thp_kb_after;
  struct dist writer_stall;     /* stalls overlapping an isolation window, as measured */
  struct dist writer_held;      /* per window the writer ran in, less CPU wait */
  uint64_t writer_stalls_other; /* during the pass, but outside every window */
  uint64_t writer_stores;
  uint64_t writer_lost;         /* 1: still held long after the pass: a lost wake-up */
  struct lat fault_with, fault_without;
  struct lat fault_copying; /* beside a thread of this process that only copies */
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns) {
  struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
  while (nanosleep(&ts, &ts) != 0) {
  }
}

/* Benchmark bookkeeping lives in mmap'd memory, not on the heap being moved. */
static void *map_populated(size_t len) {
  void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                 -1, 0);
  if (p == MAP_FAILED) {
    perror("migrate: mmap");
    exit(2);
  }
  return p;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Nearest-rank percentiles; sorts v. */
static struct dist dist_of(uint64_t *v, size_t n) {
  struct dist d = {.n = n};
  if (n == 0) return d;
  qsort(v, n, sizeof *v, cmp_u64);
  d.p50 = v[(n + 1) / 2 - 1];
  d.p99 = v[(n * 99 + 99) / 100 - 1];
  d.max = v[n - 1];
  return d;
}

/* AnonHugePages of the whole process, kB. */
static uint64_t thp_kb(void) {
  char buf[4096];
  int fd = open("/proc/self/smaps_rollup", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  const char *line = strstr(buf, "AnonHugePages:");
  return line ? strtoull(line + 14, NULL, 10) : 0;
}

/* The calling thread's schedstat: open it on the thread it is about. */
static int open_run_delay(void) {
  return open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
}

/* Time that thread has spent runnable but waiting for a CPU, ns (schedstat's
 * second field); 0 if unknown. */
static uint64_t run_delay_ns(int fd) {
  char buf[96];
  ssize_t n = fd < 0 ? -1 : pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return 0;
  buf[n] = 0;
  const char *field = strchr(buf, ' ');
  return field ? strtoull(field + 1, NULL, 10) : 0;
}

/* [start, end), and how much of it some thread spent waiting for a CPU. */
struct span {
  uint64_t start, end, cpu_wait;
};

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

static struct lat lat_of(const struct span *v, size_t n) {
  size_t bytes = n * sizeof(uint64_t) + 8;
  uint64_t *raw = map_populated(bytes), *net = map_populated(bytes);
  for (size_t i = 0; i < n; i++) {
    raw[i] = v[i].end - v[i].start;
    net[i] = raw[i] - min_u64(v[i].cpu_wait, raw[i]);
  }
  struct lat l = {dist_of(raw, n), dist_of(net, n)};
  munmap(raw, bytes);
  munmap(net, bytes);
  return l;
}

/* ---- isolation windows: the timing copy of a backend ---- */

/* The engine calls the backend from the one compacting thread (the child's
 * main thread), one arena at a time. */
static struct span *windows; /* cpu_wait: the compacting thread's */
static size_t window_count, window_cap;
static const struct mv_backend *real_backend;
static struct mv_backend timed_backend;
static int compactor_schedstat = -1;
static uint64_t stage_sum_ns, stage_wait_sum_ns;
static uint64_t hold_start_ns, hold_start_wait_ns;

static void log_window(uint64_t start, uint64_t end, uint64_t cpu_wait) {
  if (window_count < window_cap) windows[window_count++] = (struct span){start, end, cpu_wait};
}

/* The schedstat reads sit inside the timed interval: their cost is staging's. */
static int timed_stage(struct mv_move *m) {
  uint64_t t0 = now_ns(), wait0 = run_delay_ns(compactor_schedstat);
  int rc = real_backend->stage(m);
  stage_wait_sum_ns += run_delay_ns(compactor_schedstat) - wait0;
  stage_sum_ns += now_ns() - t0;
  return rc;
}

static void timed_unstage(struct mv_move *m) {
  uint64_t t0 = now_ns(), wait0 = run_delay_ns(compactor_schedstat);
  real_backend->unstage(m);
  stage_wait_sum_ns += run_delay_ns(compactor_schedstat) - wait0;
  stage_sum_ns += now_ns() - t0;
}

/* The window starts with hold(), not when writers begin to wait after a
 * pre-copy: a writer stalled by anything the backend does (a write served
 * during the pre-copy, a page moved out by the move backend) counts. */
static int timed_hold(struct mv_move *m) {
  hold_start_wait_ns = run_delay_ns(compactor_schedstat);
  hold_start_ns = now_ns();
  return real_backend->hold(m);
}

/* The engine releases only after a hold that succeeded: one window each. */
static void timed_release(struct mv_move *m) {
  real_backend->release(m);
  uint64_t end = now_ns();
  log_window(hold_start_ns, end, run_delay_ns(compactor_schedstat) - hold_start_wait_ns);
}

/* ---- the heap ---- */

struct heap {
  uintptr_t *arena_base; /* sorted */
  size_t arenas;
  void **blocks;
  size_t block_count;
};

/* Dense arenas of 4 KiB pages: BLOCK_SIZE blocks, every byte written, until a
 * block lands in arena want + 1 (that block is freed again). */
static void build_heap(struct heap *h, size_t want) {
  size_t cap = (want + 1) * BLOCKS_PER_ARENA;
  h->blocks = map_populated(cap * sizeof(void *));
  h->block_count = 0;
  uintptr_t last = 0;
  size_t seen = 0;
  while (h->block_count < cap) {
    char *p = malloc(BLOCK_SIZE);
    if (!p) {
      perror("migrate: malloc");
      exit(2);
    }
    uintptr_t base = (uintptr_t)p & ~(MV_ARENA_SIZE - 1);
    if (base != last && ++seen > want) {
      free(p);
      break;
    }
    last = base;
    memset(p, (int)h->block_count, BLOCK_SIZE);
    h->blocks[h->block_count++] = p;
  }
  /* The exact set, should the allocator have gone back to an earlier arena. */
  h->arena_base = map_populated((want + 1) * sizeof(uintptr_t));
  uintptr_t *bases = map_populated(h->block_count * sizeof(uintptr_t) + 8);
  for (size_t i = 0; i < h->block_count; i++)
    bases[i] = (uintptr_t)h->blocks[i] & ~(MV_ARENA_SIZE - 1);
  qsort(bases, h->block_count, sizeof *bases, cmp_u64);
  h->arenas = 0;
  for (size_t i = 0; i < h->block_count; i++)
    if (i == 0 || bases[i] != bases[i - 1]) h->arena_base[h->arenas++] = bases[i];
  munmap(bases, h->block_count * sizeof(uintptr_t) + 8);
}

static size_t arena_index(const struct heap *h, uintptr_t addr) {
  uintptr_t base = addr & ~(MV_ARENA_SIZE - 1);
  size_t lo = 0, hi = h->arenas;
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (h->arena_base[mid] <= base) lo = mid;
    else hi = mid;
  }
  return lo;
}

/* Guest memory here may be given back to the host when free (virtio-balloon
 * free page reporting, order >= 9): the first touch of such a page then costs
 * the host's fault, ~20x a warm zeroing. So a child faults one huge page per
 * arena first, while the memory the previous child freed is still warm, keeps
 * them while it builds its heap (whose 4 KiB pages would take them) and frees
 * them just before the pass: staging and MADV_COLLAPSE then get warm pages. */
struct warm_pages {
  void *start;
  size_t len;
};

static struct warm_pages fault_warm_huge_pages(size_t arenas) {
  struct warm_pages w = {NULL, (arenas + 8) * MV_ARENA_SIZE};
  char *p = mmap(NULL, w.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return w; /* only the staging times suffer */
  madvise(p, w.len, MADV_HUGEPAGE);
  for (size_t off = 0; off < w.len; off += 4096) p[off] = 1;
  w.start = p;
  return w;
}

static void free_warm_huge_pages(struct warm_pages w) {
  if (w.start) munmap(w.start, w.len);
}

/* ---- one pass of migration over the heap ---- */

struct pass {
  uint64_t start_ns, end_ns;
};

static void run_pass(const struct subject *s, const struct heap *h, struct phase_result *r,
                     struct pass *pass) {
  struct movalloc_stats before, after;
  movalloc_stats_get(&before);
  r->arena_count = before.arena_count;
  r->thp_kb_before = thp_kb();
  uint64_t wait0 = run_delay_ns(compactor_schedstat);
  pass->start_ns = now_ns();
  if (s->raw) {
    int first_errno = 0;
    for (size_t i = 0; i < h->arenas; i++) {
      uint64_t arena_wait0 = run_delay_ns(compactor_schedstat), t0 = now_ns();
      int rc = madvise((void *)h->arena_base[i], MV_ARENA_SIZE, MADV_COLLAPSE);
      if (rc != 0 && !first_errno) first_errno = errno;
      uint64_t t1 = now_ns();
      log_window(t0, t1, run_delay_ns(compactor_schedstat) - arena_wait0);
      r->migrated += rc == 0;
    }
    if (first_errno && r->migrated == 0)
      snprintf(r->error, sizeof r->error, "MADV_COLLAPSE: %s", strerror(first_errno));
    r->bytes_moved = r->migrated * MV_ARENA_SIZE;
  } else {
    int rc = movalloc_compact(MOVALLOC_COMPACT_ALL);
    if (rc < 0) snprintf(r->error, sizeof r->error, "movalloc_compact: %s", strerror(-rc));
  }
  pass->end_ns = now_ns();
  r->cpu_wait_ns = run_delay_ns(compactor_schedstat) - wait0;
  movalloc_stats_get(&after);
  r->thp_kb_after = thp_kb();
  r->wall_ns = pass->end_ns - pass->start_ns;
  if (!s->raw) {
    r->migrated = after.migrated - before.migrated;
    r->bytes_moved = after.bytes_moved - before.bytes_moved;
    r->cpu_ns = after.compactor_cpu_ns - before.compactor_cpu_ns;
    for (int i = 0; i < MOVALLOC_STALL_BUCKETS; i++)
      r->stall_hist[i] = after.stall_hist[i] - before.stall_hist[i];
  }
  r->stage_ns = stage_sum_ns;
  r->stage_cpu_wait_ns = stage_wait_sum_ns;
  for (size_t i = 0; i < window_count; i++) r->window_sum_ns += windows[i].end - windows[i].start;
  r->window = lat_of(windows, window_count);
}

/* ---- the writer ---- */

struct writer {
  uint64_t **targets; /* slot-major: one store per arena, then the next slot */
  size_t target_count;
  struct span *stalls; /* cpu_wait: the writer's */
  _Atomic size_t stall_count;
  _Atomic uint64_t last_store_ns;
  uint64_t stores;
  atomic_bool stop;
};

/* For every arena, WRITER_SLOTS blocks, one in each 1/WRITER_SLOTS of it (or
 * any of its blocks where it has none there). */
static void pick_targets(const struct heap *h, struct writer *w) {
  w->target_count = h->arenas * WRITER_SLOTS;
  w->targets = map_populated(w->target_count * sizeof(uint64_t *));
  uint64_t **any = map_populated(h->arenas * sizeof(uint64_t *));
  for (size_t i = 0; i < h->block_count; i++) {
    uintptr_t p = (uintptr_t)h->blocks[i];
    size_t a = arena_index(h, p);
    size_t slot = (p - h->arena_base[a]) * WRITER_SLOTS / MV_ARENA_SIZE;
    if (!w->targets[slot * h->arenas + a]) w->targets[slot * h->arenas + a] = (uint64_t *)p;
    if (!any[a]) any[a] = (uint64_t *)p;
  }
  for (size_t j = 0; j < w->target_count; j++)
    if (!w->targets[j]) w->targets[j] = any[j % h->arenas];
  munmap(any, h->arenas * sizeof(uint64_t *));
}

/* Stores round-robin over every arena (a store reaches each arena every
 * `arenas` stores, a few microseconds), so a held arena stops the writer almost
 * as soon as the hold begins. A gap longer than STALL_NS is a stall. */
static void *writer_main(void *arg) {
  struct writer *w = arg;
  int schedstat = open_run_delay();
  uint64_t waited = run_delay_ns(schedstat), prev = now_ns();
  while (!atomic_load_explicit(&w->stop, memory_order_relaxed)) {
    for (size_t j = 0; j < w->target_count; j++) {
      ++*(volatile uint64_t *)w->targets[j];
      uint64_t t = now_ns();
      size_t n = atomic_load_explicit(&w->stall_count, memory_order_relaxed);
      if (t - prev > STALL_NS && n < MAX_STALLS) {
        uint64_t waited_now = run_delay_ns(schedstat);
        w->stalls[n] = (struct span){prev, t, waited_now - waited};
        atomic_store_explicit(&w->stall_count, n + 1, memory_order_release);
        waited = waited_now;
        t = now_ns(); /* reading schedstat is not a stall */
      }
      atomic_store_explicit(&w->last_store_ns, t, memory_order_relaxed);
      prev = t;
    }
    w->stores += w->target_count;
  }
  if (schedstat >= 0) close(schedstat);
  return NULL;
}

/* Two views of the writer's stalls (both lists are in time order):
 * - every stall that overlaps an isolation window, as measured; the other
 *   stalls during the pass (preemption, interrupts, the machine's other work)
 *   are only counted;
 * - per window the writer ran in, its longest stall there less CPU wait: its
 *   own, and the compacting thread's in proportion to the overlap (the writer
 *   was held that much longer because the compactor had no CPU). A window that
 *   one stall covers whole saw no store: on a busy machine the writer often
 *   waits for a CPU through whole windows, and those say nothing. */
static void classify_stalls(struct writer *w, const struct pass *pass, struct phase_result *r) {
  size_t count = atomic_load_explicit(&w->stall_count, memory_order_acquire);
  size_t bytes = count * sizeof(uint64_t) + 8;
  uint64_t *lengths = map_populated(bytes), *net = map_populated(bytes);
  size_t n = 0, k = 0;
  for (size_t i = 0; i < count; i++) {
    const struct span *s = &w->stalls[i];
    while (k < window_count && windows[k].end <= s->start) k++;
    uint64_t length = s->end - s->start, wait = s->cpu_wait;
    for (size_t j = k; j < window_count && windows[j].start < s->end; j++) {
      const struct span *win = &windows[j];
      uint64_t overlap = min_u64(s->end, win->end) - max_u64(s->start, win->start);
      wait += (uint64_t)((double)win->cpu_wait * overlap / (win->end - win->start));
    }
    net[i] = length - min_u64(wait, length);
    if (k < window_count && windows[k].start < s->end) lengths[n++] = length;
    else if (s->start < pass->end_ns && s->end > pass->start_ns) r->writer_stalls_other++;
  }
  r->writer_stall = dist_of(lengths, n);
  r->writer_stores = w->stores;

  size_t held_bytes = window_count * sizeof(uint64_t) + 8, ran = 0, first = 0;
  uint64_t *held = map_populated(held_bytes);
  for (size_t j = 0; j < window_count; j++) {
    const struct span *win = &windows[j];
    while (first < count && w->stalls[first].end <= win->start) first++;
    uint64_t longest = 0;
    bool ran_in = true;
    for (size_t i = first; i < count && w->stalls[i].start < win->end; i++) {
      ran_in &= !(w->stalls[i].start <= win->start && w->stalls[i].end >= win->end);
      longest = max_u64(longest, net[i]);
    }
    if (ran_in) held[ran++] = longest;
  }
  r->writer_held = dist_of(held, ran);
  munmap(held, held_bytes);
  munmap(lengths, bytes);
  munmap(net, bytes);
}

/* ---- the faulter ---- */

struct faulter {
  struct span *samples; /* cpu_wait: the faulter's */
  size_t sample_count;
  int error;
  atomic_bool stop;
};

/* One sample: mmap 64 KiB of fresh anonymous memory, fault every page, munmap.
 * mmap and munmap take the mmap lock for write, a fault its VMA's lock:
 * whatever a migration holds that another thread needs shows up here. */
static void *faulter_main(void *arg) {
  struct faulter *f = arg;
  int schedstat = open_run_delay();
  uint64_t waited = run_delay_ns(schedstat);
  while (!atomic_load_explicit(&f->stop, memory_order_relaxed) &&
         f->sample_count < MAX_FAULT_SAMPLES) {
    uint64_t t0 = now_ns();
    char *p = mmap(NULL, FAULT_MAP_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
      f->error = errno;
      break;
    }
    for (size_t off = 0; off < FAULT_MAP_SIZE; off += 4096) ((volatile char *)p)[off] = 1;
    munmap(p, FAULT_MAP_SIZE);
    uint64_t t1 = now_ns(), waited_now = run_delay_ns(schedstat);
    f->samples[f->sample_count++] = (struct span){t0, t1, waited_now - waited};
    waited = waited_now;
  }
  if (schedstat >= 0) close(schedstat);
  return NULL;
}

/* The fault phase's control: copies memory the way a migration does (256 KiB
 * at a time, 2 MiB per round) and nothing else, with no lock, system call or
 * page fault. A munmap must flush the TLB of every CPU running this process,
 * so whatever delays the copier's CPU in taking that interrupt shows up here
 * as well as under a migration. */
struct copier {
  atomic_bool stop;
};

static void *copier_main(void *arg) {
  struct copier *c = arg;
  char *from = map_populated(MV_ARENA_SIZE), *to = map_populated(MV_ARENA_SIZE);
  memset(from, 0x5a, MV_ARENA_SIZE);
  while (!atomic_load_explicit(&c->stop, memory_order_relaxed))
    for (size_t off = 0; off < MV_ARENA_SIZE; off += COPY_CHUNK)
      memcpy(to + off, from + off, COPY_CHUNK);
  munmap(from, MV_ARENA_SIZE);
  munmap(to, MV_ARENA_SIZE);
  return NULL;
}

/* Latencies of the samples that overlap [start, end). */
static struct lat fault_lat(const struct faulter *f, uint64_t start, uint64_t end) {
  size_t bytes = f->sample_count * sizeof(struct span) + 8;
  struct span *overlapping = map_populated(bytes);
  size_t n = 0;
  for (size_t i = 0; i < f->sample_count; i++)
    if (f->samples[i].start < end && f->samples[i].end > start) overlapping[n++] = f->samples[i];
  struct lat l = lat_of(overlapping, n);
  munmap(overlapping, bytes);
  return l;
}

/* ---- a child: one subject, one phase ---- */

static void start_thread(pthread_t *t, void *(*fn)(void *), void *arg) {
  int rc = pthread_create(t, NULL, fn, arg);
  if (rc) {
    fprintf(stderr, "migrate: pthread_create: %s\n", strerror(rc));
    exit(2);
  }
}

static void run_phase(const struct subject *s, enum phase phase, size_t arenas,
                      uint64_t baseline_ns, struct phase_result *r) {
  if (!s->raw) {
    char why[160];
    real_backend = mv_backend_select(s->kind, why, sizeof why);
    if (real_backend->kind != s->kind) {
      snprintf(r->error, sizeof r->error, "%s", why);
      return;
    }
    timed_backend = *real_backend;
    timed_backend.stage = timed_stage;
    timed_backend.hold = timed_hold;
    timed_backend.release = timed_release;
    timed_backend.unstage = timed_unstage;
    mv_engine_use_backend(&timed_backend, MV_STEP_NONE);
  }
  compactor_schedstat = open_run_delay();
  struct warm_pages warm = fault_warm_huge_pages(arenas);
  struct heap h;
  build_heap(&h, arenas);
  r->heap_arenas = h.arenas;
  free_warm_huge_pages(warm);
  /* The engine makes up to 3 passes over every arena of the heap. */
  window_cap = 4 * (h.arenas + 64);
  windows = map_populated(window_cap * sizeof *windows);

  struct pass pass;
  pthread_t thread;
  if (phase == PHASE_THROUGHPUT) {
    run_pass(s, &h, r, &pass);
  } else if (phase == PHASE_WRITER) {
    static struct writer w;
    pick_targets(&h, &w);
    w.stalls = map_populated(MAX_STALLS * sizeof *w.stalls);
    start_thread(&thread, writer_main, &w);
    sleep_ns(SETTLE_NS);
    run_pass(s, &h, r, &pass);
    sleep_ns(SETTLE_NS);
    atomic_store(&w.stop, true);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += WRITER_LOST_S;
    if (pthread_timedjoin_np(thread, NULL, &deadline) != 0) {
      /* Its stall is not a latency: it would never end. The process exits
       * with the writer still held. */
      r->writer_lost = 1;
      fprintf(stderr, "migrate: %s: the writer is still held %d s after the pass, since "
                      "%.1f ms into it: a lost wake-up\n",
              s->name, WRITER_LOST_S,
              ((double)atomic_load(&w.last_store_ns) - (double)pass.start_ns) / 1e6);
    }
    classify_stalls(&w, &pass, r);
  } else {
    static struct faulter f;
    f.samples = map_populated(MAX_FAULT_SAMPLES * sizeof *f.samples);
    start_thread(&thread, faulter_main, &f);
    uint64_t quiet_start = now_ns();
    sleep_ns(baseline_ns);
    uint64_t quiet_end = now_ns();
    static struct copier c;
    pthread_t copier;
    start_thread(&copier, copier_main, &c);
    uint64_t copy_start = now_ns();
    sleep_ns(baseline_ns);
    uint64_t copy_end = now_ns();
    atomic_store(&c.stop, true);
    pthread_join(copier, NULL);
    run_pass(s, &h, r, &pass);
    atomic_store(&f.stop, true);
    pthread_join(thread, NULL);
    if (f.error)
      snprintf(r->error, sizeof r->error, "faulter mmap: %s", strerror(f.error));
    r->fault_without = fault_lat(&f, quiet_start, quiet_end);
    r->fault_with = fault_lat(&f, pass.start_ns, pass.end_ns);
    r->fault_copying = fault_lat(&f, copy_start, copy_end);
  }
}

static int child_main(int argc, char **argv) {
  /* --child SUBJECT PHASE ARENAS BASELINE_NS RESULT_FD */
  if (argc != 7) return 2;
  const struct subject *s = NULL;
  for (size_t i = 0; i < SUBJECTS; i++)
    if (strcmp(argv[2], subjects[i].name) == 0) s = &subjects[i];
  int phase = -1;
  for (int p = 0; p < PHASE_COUNT; p++)
    if (strcmp(argv[3], phase_names[p]) == 0) phase = p;
  if (!s || phase < 0) return 2;
  static struct phase_result r;
  run_phase(s, (enum phase)phase, strtoull(argv[4], NULL, 10), strtoull(argv[5], NULL, 10), &r);
  int fd = atoi(argv[6]);
  return write(fd, &r, sizeof r) == (ssize_t)sizeof r ? 0 : 2;
}

/* ---- the parent: runs the children ---- */

/* A fresh process on this binary with the background compactor off (it would
 * move arenas while the heap is built) and arenas on 4 KiB pages. Returns 0,
 * or -1 with r->error saying why. */
static int run_child(const struct subject *s, enum phase phase, size_t arenas,
                     uint64_t baseline_ns, struct phase_result *r) {
  memset(r, 0, sizeof *r);
  int fds[2];
  if (pipe(fds) != 0) {
    perror("migrate: pipe");
    exit(2);
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    perror("migrate: fork");
    exit(2);
  }
  if (pid == 0) {
    close(fds[0]);
    char arenas_s[32], baseline_s[32], fd_s[16];
    snprintf(arenas_s, sizeof arenas_s, "%zu", arenas);
    snprintf(baseline_s, sizeof baseline_s, "%" PRIu64, baseline_ns);
    snprintf(fd_s, sizeof fd_s, "%d", fds[1]);
    setenv("MOVALLOC_COMPACT", "0", 1);
    setenv("MOVALLOC_THP", "compact", 1);
    execl("/proc/self/exe", "migrate", "--child", s->name, phase_names[phase], arenas_s,
          baseline_s, fd_s, (char *)NULL);
    _exit(127);
  }
  close(fds[1]);
  size_t got = 0;
  uint64_t deadline = now_ns() + CHILD_TIMEOUT_MS * 1000000ull;
  bool timed_out = false;
  while (got < sizeof *r) {
    struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
    uint64_t now = now_ns();
    if (now >= deadline || poll(&pfd, 1, (int)((deadline - now) / 1000000 + 1)) == 0) {
      timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    ssize_t n = read(fds[0], (char *)r + got, sizeof *r - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fds[0]);
  int status;
  waitpid(pid, &status, 0);
  if (got == sizeof *r && WIFEXITED(status) && WEXITSTATUS(status) == 0)
    return r->error[0] ? -1 : 0;
  memset(r, 0, sizeof *r);
  if (timed_out)
    snprintf(r->error, sizeof r->error, "%s phase stuck for %d s: killed", phase_names[phase],
             CHILD_TIMEOUT_MS / 1000);
  else if (WIFSIGNALED(status))
    snprintf(r->error, sizeof r->error, "%s phase killed by signal %d", phase_names[phase],
             WTERMSIG(status));
  else
    snprintf(r->error, sizeof r->error, "%s phase exited with status %d", phase_names[phase],
             WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return -1;
}

/* ---- the parent: metrics over repetitions ---- */

struct outcome {
  bool ran;
  struct phase_result phase[PHASE_COUNT];
};

enum metric_id {
  M_GBPS_INCL, M_GBPS_EXCL, M_GBPS_INCL_NET, M_GBPS_EXCL_NET,
  M_WALL_MS, M_STAGING_MS, M_CPU_WAIT_MS, M_WINDOWS_MS, M_ENGINE_CPU_MS,
  M_WINDOWS, M_WINDOW_P50, M_WINDOW_P99, M_WINDOW_MAX,
  M_WINDOW_NET_P50, M_WINDOW_NET_P99, M_WINDOW_NET_MAX,
  M_MIGRATED, M_ARENAS, M_HEAP_ARENAS, M_THP_MIB_BEFORE, M_THP_MIB_AFTER,
  M_MIGRATED_WRITER, M_MIGRATED_FAULT,
  M_STALL_N, M_STALL_P50, M_STALL_P99, M_STALL_MAX, M_STALLS_OUTSIDE, M_WRITER_STORES,
  M_HELD_N, M_HELD_P50, M_HELD_P99, M_HELD_MAX,
  M_WITH_P50, M_WITH_P99, M_WITH_MAX, M_WITHOUT_P50, M_WITHOUT_P99, M_WITHOUT_MAX,
  M_WITH_NET_P50, M_WITH_NET_P99, M_WITH_NET_MAX,
  M_WITHOUT_NET_P50, M_WITHOUT_NET_P99, M_WITHOUT_NET_MAX,
  M_FAULT_RATIO, M_FAULT_RATIO_NET,
  M_COPYING_P50, M_COPYING_P99, M_COPYING_MAX, M_COPY_RATIO,
  M_COUNT
};

/* A number per outcome: a uint64_t field of one phase's result times scale,
 * or what get() derives. */
struct metric {
  const char *key;
  enum phase phase;
  size_t offset;
  double scale;
  double (*get)(const struct outcome *o);
};

static double field(const struct outcome *o, const struct metric *m) {
  uint64_t v;
  memcpy(&v, (const char *)&o->phase[m->phase] + m->offset, sizeof v);
  return v * m->scale;
}

/* GB/s (1e9 B/s) over wall time less `less_ns`. */
static double gbps(const struct outcome *o, double less_ns) {
  const struct phase_result *t = &o->phase[PHASE_THROUGHPUT];
  double ns = (double)t->wall_ns - less_ns;
  return ns > 0 ? t->bytes_moved / ns : 0;
}
static double gbps_incl(const struct outcome *o) { return gbps(o, 0); }
/* Staging excluded: less the time in stage() and unstage(). The collapse
 * backend and raw-collapse have none: the kernel allocates inside MADV_COLLAPSE. */
static double gbps_excl(const struct outcome *o) {
  return gbps(o, o->phase[PHASE_THROUGHPUT].stage_ns);
}
static double gbps_incl_net(const struct outcome *o) {
  return gbps(o, o->phase[PHASE_THROUGHPUT].cpu_wait_ns);
}
/* Less staging, and less the CPU wait outside staging (inside it, staging
 * already took it out). */
static double gbps_excl_net(const struct outcome *o) {
  const struct phase_result *t = &o->phase[PHASE_THROUGHPUT];
  return gbps(o, (double)t->stage_ns + (double)t->cpu_wait_ns - (double)t->stage_cpu_wait_ns);
}

static double p99_ratio(const struct dist *with, const struct dist *without) {
  return without->p99 ? (double)with->p99 / without->p99 : 0;
}
static double fault_ratio(const struct outcome *o) {
  const struct phase_result *f = &o->phase[PHASE_FAULT];
  return p99_ratio(&f->fault_with.raw, &f->fault_without.raw);
}
static double fault_ratio_net(const struct outcome *o) {
  const struct phase_result *f = &o->phase[PHASE_FAULT];
  return p99_ratio(&f->fault_with.net, &f->fault_without.net);
}
/* Against the control: what the migration costs beyond a plain copy. */
static double copy_ratio(const struct outcome *o) {
  const struct phase_result *f = &o->phase[PHASE_FAULT];
  return p99_ratio(&f->fault_with.raw, &f->fault_copying.raw);
}

#define AT(ph, member, scale) ph, offsetof(struct phase_result, member), scale, NULL
#define US(ph, member) AT(ph, member, 1e-3)
#define T PHASE_THROUGHPUT
#define W PHASE_WRITER
#define F PHASE_FAULT
static const struct metric metrics[M_COUNT] = {
    [M_GBPS_INCL] = {"gbps_incl_staging", .get = gbps_incl},
    [M_GBPS_EXCL] = {"gbps_excl_staging", .get = gbps_excl},
    [M_GBPS_INCL_NET] = {"gbps_incl_staging_less_cpu_wait", .get = gbps_incl_net},
    [M_GBPS_EXCL_NET] = {"gbps_excl_staging_less_cpu_wait", .get = gbps_excl_net},
    [M_WALL_MS] = {"wall_ms", AT(T, wall_ns, 1e-6)},
    [M_STAGING_MS] = {"staging_ms", AT(T, stage_ns, 1e-6)},
    [M_CPU_WAIT_MS] = {"compactor_cpu_wait_ms", AT(T, cpu_wait_ns, 1e-6)},
    [M_WINDOWS_MS] = {"windows_ms", AT(T, window_sum_ns, 1e-6)},
    [M_ENGINE_CPU_MS] = {"engine_cpu_ms", AT(T, cpu_ns, 1e-6)},
    [M_WINDOWS] = {"windows", AT(T, window.raw.n, 1)},
    [M_WINDOW_P50] = {"window_p50_us", US(T, window.raw.p50)},
    [M_WINDOW_P99] = {"window_p99_us", US(T, window.raw.p99)},
    [M_WINDOW_MAX] = {"window_max_us", US(T, window.raw.max)},
    [M_WINDOW_NET_P50] = {"window_less_cpu_wait_p50_us", US(T, window.net.p50)},
    [M_WINDOW_NET_P99] = {"window_less_cpu_wait_p99_us", US(T, window.net.p99)},
    [M_WINDOW_NET_MAX] = {"window_less_cpu_wait_max_us", US(T, window.net.max)},
    [M_MIGRATED] = {"migrated", AT(T, migrated, 1)},
    [M_ARENAS] = {"arenas_in_heap", AT(T, arena_count, 1)},
    [M_HEAP_ARENAS] = {"arenas_of_blocks", AT(T, heap_arenas, 1)},
    [M_THP_MIB_BEFORE] = {"thp_mib_before", AT(T, thp_kb_before, 1 / 1024.0)},
    [M_THP_MIB_AFTER] = {"thp_mib_after", AT(T, thp_kb_after, 1 / 1024.0)},
    [M_MIGRATED_WRITER] = {"migrated_writer_pass", AT(W, migrated, 1)},
    [M_MIGRATED_FAULT] = {"migrated_fault_pass", AT(F, migrated, 1)},
    [M_STALL_N] = {"writer_stalls", AT(W, writer_stall.n, 1)},
    [M_STALL_P50] = {"writer_stall_p50_us", US(W, writer_stall.p50)},
    [M_STALL_P99] = {"writer_stall_p99_us", US(W, writer_stall.p99)},
    [M_STALL_MAX] = {"writer_stall_max_us", US(W, writer_stall.max)},
    [M_STALLS_OUTSIDE] = {"writer_stalls_outside_windows", AT(W, writer_stalls_other, 1)},
    [M_WRITER_STORES] = {"writer_stores", AT(W, writer_stores, 1)},
    [M_HELD_N] = {"writer_windows_run", AT(W, writer_held.n, 1)},
    [M_HELD_P50] = {"writer_held_per_window_less_cpu_wait_p50_us", US(W, writer_held.p50)},
    [M_HELD_P99] = {"writer_held_per_window_less_cpu_wait_p99_us", US(W, writer_held.p99)},
    [M_HELD_MAX] = {"writer_held_per_window_less_cpu_wait_max_us", US(W, writer_held.max)},
    [M_WITH_P50] = {"fault_with_p50_us", US(F, fault_with.raw.p50)},
    [M_WITH_P99] = {"fault_with_p99_us", US(F, fault_with.raw.p99)},
    [M_WITH_MAX] = {"fault_with_max_us", US(F, fault_with.raw.max)},
    [M_WITHOUT_P50] = {"fault_without_p50_us", US(F, fault_without.raw.p50)},
    [M_WITHOUT_P99] = {"fault_without_p99_us", US(F, fault_without.raw.p99)},
    [M_WITHOUT_MAX] = {"fault_without_max_us", US(F, fault_without.raw.max)},
    [M_WITH_NET_P50] = {"fault_with_less_cpu_wait_p50_us", US(F, fault_with.net.p50)},
    [M_WITH_NET_P99] = {"fault_with_less_cpu_wait_p99_us", US(F, fault_with.net.p99)},
    [M_WITH_NET_MAX] = {"fault_with_less_cpu_wait_max_us", US(F, fault_with.net.max)},
    [M_WITHOUT_NET_P50] = {"fault_without_less_cpu_wait_p50_us", US(F, fault_without.net.p50)},
    [M_WITHOUT_NET_P99] = {"fault_without_less_cpu_wait_p99_us", US(F, fault_without.net.p99)},
    [M_WITHOUT_NET_MAX] = {"fault_without_less_cpu_wait_max_us", US(F, fault_without.net.max)},
    [M_FAULT_RATIO] = {"fault_p99_ratio", .get = fault_ratio},
    [M_FAULT_RATIO_NET] = {"fault_p99_ratio_less_cpu_wait", .get = fault_ratio_net},
    [M_COPYING_P50] = {"fault_beside_plain_copy_p50_us", US(F, fault_copying.raw.p50)},
    [M_COPYING_P99] = {"fault_beside_plain_copy_p99_us", US(F, fault_copying.raw.p99)},
    [M_COPYING_MAX] = {"fault_beside_plain_copy_max_us", US(F, fault_copying.raw.max)},
    [M_COPY_RATIO] = {"fault_p99_ratio_to_plain_copy", .get = copy_ratio},
};
#undef AT
#undef US
#undef T
#undef W
#undef F

/* Median, min and max of every metric over the repetitions a subject ran in. */
struct summary {
  int reps;
  int writer_lost_reps; /* repetitions whose writer was never released */
  char failed[160];     /* why it did not run, or why its last failed repetition failed */
  double median[M_COUNT], min[M_COUNT], max[M_COUNT];
};

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void summarize(const struct outcome *runs, int reps, struct summary *out) {
  const struct outcome *ran[MAX_REPS];
  int n = 0;
  for (int r = 0; r < reps; r++)
    if (runs[r].ran) ran[n++] = &runs[r];
  out->reps = n;
  for (int k = 0; k < n; k++) out->writer_lost_reps += ran[k]->phase[PHASE_WRITER].writer_lost != 0;
  for (int m = 0; m < M_COUNT && n > 0; m++) {
    double v[MAX_REPS];
    for (int k = 0; k < n; k++)
      v[k] = metrics[m].get ? metrics[m].get(ran[k]) : field(ran[k], &metrics[m]);
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    out->median[m] = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    out->min[m] = v[0];
    out->max[m] = v[n - 1];
  }
}

/* ---- the parent: the report ---- */

static bool stall_target_applies(const struct subject *s) {
  return !s->raw && (s->kind == MV_BACKEND_MOVE || s->kind == MV_BACKEND_REMAP);
}
/* net: on the per-window view; a writer never released misses either way. */
static bool stall_met(const struct summary *s, bool net) {
  return s->median[net ? M_HELD_N : M_STALL_N] > 0 && s->writer_lost_reps == 0 &&
         s->median[net ? M_HELD_P99 : M_STALL_P99] <= TARGET_STALL_P99_US &&
         s->median[net ? M_HELD_MAX : M_STALL_MAX] <= TARGET_STALL_MAX_US;
}
static bool fault_met(const struct summary *s, bool net) {
  double r = s->median[net ? M_FAULT_RATIO_NET : M_FAULT_RATIO];
  return r > 0 && r <= TARGET_FAULT_RATIO;
}
static bool gbps_met(const struct summary *s, bool net) {
  return s->median[net ? M_GBPS_EXCL_NET : M_GBPS_EXCL] >= TARGET_GBPS_EXCL;
}
static const char *verdict(bool met) { return met ? "met" : "MISSED"; }

static void format3(char *buf, size_t len, const struct summary *s, enum metric_id first) {
  snprintf(buf, len, "%.0f/%.0f/%.0f", s->median[first], s->median[first + 1],
           s->median[first + 2]);
}

/* A row as measured, then one less CPU wait. */
static void print_rows(const struct subject *subj, const struct summary *s) {
  char stall[48], with[40], without[40], fault[96];
  format3(stall, sizeof stall, s, M_STALL_P50);
  snprintf(stall + strlen(stall), sizeof stall - strlen(stall), " (%.0f)", s->median[M_STALL_N]);
  format3(with, sizeof with, s, M_WITH_P50);
  format3(without, sizeof without, s, M_WITHOUT_P50);
  snprintf(fault, sizeof fault, "%s | %s", with, without);
  printf("%-15s %8.2f %8.2f  %-22s  %-34s %.0f/%.0f\n", subj->name, s->median[M_GBPS_INCL],
         s->median[M_GBPS_EXCL], stall, fault, s->median[M_MIGRATED], s->median[M_ARENAS]);
  format3(stall, sizeof stall, s, M_HELD_P50);
  snprintf(stall + strlen(stall), sizeof stall - strlen(stall), " (%.0f/%.0f)",
           s->median[M_HELD_N], s->median[M_WINDOWS]);
  format3(with, sizeof with, s, M_WITH_NET_P50);
  format3(without, sizeof without, s, M_WITHOUT_NET_P50);
  snprintf(fault, sizeof fault, "%s | %s", with, without);
  printf("%-15s %8.2f %8.2f  %-22s  %s\n", "  less CPU wait", s->median[M_GBPS_INCL_NET],
         s->median[M_GBPS_EXCL_NET], stall, fault);
  if (s->writer_lost_reps)
    printf("  ! the writer was never released after the pass in %d of %d repetitions "
           "(a lost wake-up)\n", s->writer_lost_reps, s->reps);
}

static void print_spread(const struct summary *sum) {
  printf("\nspread, min-max over the repetitions (less CPU wait in parentheses)\n");
  printf("%-13s %-22s %-24s %-24s %s\n", "backend", "GB/s excl. staging", "writer stall p99, us",
         "writer stall max, us", "fault p99 ratio");
  for (size_t i = 0; i < SUBJECTS; i++) {
    const struct summary *s = &sum[i];
    if (s->reps == 0) continue;
    char gb[40], p99[40], max[40], ratio[40];
    snprintf(gb, sizeof gb, "%.2f-%.2f (%.2f-%.2f)", s->min[M_GBPS_EXCL], s->max[M_GBPS_EXCL],
             s->min[M_GBPS_EXCL_NET], s->max[M_GBPS_EXCL_NET]);
    snprintf(p99, sizeof p99, "%.0f-%.0f (%.0f-%.0f)", s->min[M_STALL_P99], s->max[M_STALL_P99],
             s->min[M_HELD_P99], s->max[M_HELD_P99]);
    snprintf(max, sizeof max, "%.0f-%.0f (%.0f-%.0f)", s->min[M_STALL_MAX], s->max[M_STALL_MAX],
             s->min[M_HELD_MAX], s->max[M_HELD_MAX]);
    snprintf(ratio, sizeof ratio, "%.2f-%.2f (%.2f-%.2f)", s->min[M_FAULT_RATIO],
             s->max[M_FAULT_RATIO], s->min[M_FAULT_RATIO_NET], s->max[M_FAULT_RATIO_NET]);
    printf("%-13s %-22s %-24s %-24s %s\n", subjects[i].name, gb, p99, max, ratio);
  }
}

static void print_targets(const struct summary *sum) {
  printf("\ntargets, on the medians: as measured; less CPU wait\n");
  for (size_t i = 0; i < SUBJECTS; i++) {
    const struct summary *s = &sum[i];
    const char *name = subjects[i].name;
    if (s->reps == 0 || subjects[i].raw) continue;
    if (stall_target_applies(&subjects[i]))
      printf("  %-9s writer stall p99 <= 300 us, max <= 1 ms  %s (%.0f/%.0f us); "
             "%s (%.0f/%.0f)%s\n",
             name, verdict(stall_met(s, false)), s->median[M_STALL_P99], s->median[M_STALL_MAX],
             verdict(stall_met(s, true)), s->median[M_HELD_P99], s->median[M_HELD_MAX],
             s->writer_lost_reps ? ", writer never released" : "");
    printf("  %-9s fault p99 <= 1.2x no migration           %s (%.2fx); %s (%.2fx)\n", name,
           verdict(fault_met(s, false)), s->median[M_FAULT_RATIO], verdict(fault_met(s, true)),
           s->median[M_FAULT_RATIO_NET]);
    double without = s->median[M_WITHOUT_P99];
    printf("  %-9s   control, beside a plain copy: p99 %.0f us, %.2fx no migration; "
           "the pass is %.2fx that\n",
           name, s->median[M_COPYING_P99], without ? s->median[M_COPYING_P99] / without : 0,
           s->median[M_COPY_RATIO]);
    printf("  %-9s >= 4 GB/s per core, staging excluded     %s (%.2f); %s (%.2f)\n", name,
           verdict(gbps_met(s, false)), s->median[M_GBPS_EXCL], verdict(gbps_met(s, true)),
           s->median[M_GBPS_EXCL_NET]);
  }
}

static void print_report(const struct summary *sum, int reps) {
  printf("\nmedians of %d repetition%s\n", reps, reps == 1 ? "" : "s");
  printf("%-15s %8s %8s  %-22s  %-34s %s\n", "backend", "GB/s", "GB/s", "writer stall, us",
         "map+fault+unmap 64 KiB, us", "migrated");
  printf("%-15s %8s %8s  %-22s  %-34s %s\n", "", "incl.", "excl.", "p50/p99/max (n)",
         "p50/p99/max: with | without", "arenas");
  printf("%-15s %8s %8s  %s\n", "", "staging", "staging", "(2nd row: per window)");
  for (size_t i = 0; i < SUBJECTS; i++) {
    if (sum[i].reps == 0) printf("%-15s skipped: %s\n", subjects[i].name, sum[i].failed);
    else print_rows(&subjects[i], &sum[i]);
  }
  if (reps > 1) print_spread(sum);
  print_targets(sum);
}

static void json_values(FILE *f, const char *name, const double *v) {
  fprintf(f, "\"%s\": {", name);
  for (int m = 0; m < M_COUNT; m++)
    fprintf(f, "%s\"%s\": %.3f", m ? ", " : "", metrics[m].key, v[m]);
  fprintf(f, "}");
}

static const char *json_bool(bool b) { return b ? "true" : "false"; }

/* Strings written here are ours or the probe's reason text: no quote or
 * backslash to escape. runs[r][i]: repetition r of subject i. */
static void write_json(const char *path, const struct summary *sum,
                       const struct outcome (*runs)[SUBJECTS], int reps, size_t arenas,
                       const char *kernel, const char *load_before, const char *load_after) {
  FILE *f = fopen(path, "w");
  if (!f) {
    perror(path);
    exit(2);
  }
  fprintf(f, "{\"arenas_requested\": %zu, \"reps\": %d, \"kernel\": \"%s\", "
             "\"loadavg_before\": \"%s\", \"loadavg_after\": \"%s\",\n \"units\": \"GB/s = 1e9 "
             "B/s; _us in microseconds, _ms in milliseconds\",\n \"results\": [\n",
          arenas, reps, kernel, load_before, load_after);
  for (size_t i = 0; i < SUBJECTS; i++) {
    const struct summary *s = &sum[i];
    fprintf(f, "  {\"backend\": \"%s\", \"reps\": %d, \"writer_lost_wakeups\": %d",
            subjects[i].name, s->reps, s->writer_lost_reps);
    if (s->failed[0]) fprintf(f, ", \"%s\": \"%s\"", s->reps ? "failure" : "skipped", s->failed);
    if (s->reps > 0) {
      fprintf(f, ",\n   ");
      json_values(f, "median", s->median);
      fprintf(f, ",\n   ");
      json_values(f, "min", s->min);
      fprintf(f, ",\n   ");
      json_values(f, "max", s->max);
      /* Counts add up over the repetitions. */
      fprintf(f, ",\n   \"stall_hist\": [");
      for (int b = 0; b < MOVALLOC_STALL_BUCKETS; b++) {
        uint64_t count = 0;
        for (int r = 0; r < reps; r++)
          if (runs[r][i].ran) count += runs[r][i].phase[PHASE_THROUGHPUT].stall_hist[b];
        fprintf(f, "%s%" PRIu64, b ? ", " : "", count);
      }
      fprintf(f, "]");
      if (!subjects[i].raw) {
        fprintf(f, ",\n   \"targets\": {");
        if (stall_target_applies(&subjects[i]))
          fprintf(f, "\"writer_stall\": %s, \"writer_stall_less_cpu_wait\": %s, ",
                  json_bool(stall_met(s, false)), json_bool(stall_met(s, true)));
        fprintf(f, "\"fault_ratio\": %s, \"fault_ratio_less_cpu_wait\": %s, "
                   "\"gbps_excl\": %s, \"gbps_excl_less_cpu_wait\": %s}",
                json_bool(fault_met(s, false)), json_bool(fault_met(s, true)),
                json_bool(gbps_met(s, false)), json_bool(gbps_met(s, true)));
      }
    }
    fprintf(f, "}%s\n", i + 1 < SUBJECTS ? "," : "");
  }
  fprintf(f, "]}\n");
  fclose(f);
}

/* The first line of a small file, without its newline ("?" if unreadable). */
static void read_line(const char *path, char *buf, size_t len) {
  snprintf(buf, len, "?");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ssize_t n = read(fd, buf, len - 1);
  close(fd);
  buf[n > 0 ? n : 0] = 0;
  buf[strcspn(buf, "\n")] = 0;
}

/* The 1, 5 and 15 minute load averages. */
static void read_loadavg(char *buf, size_t len) {
  read_line("/proc/loadavg", buf, len);
  char *runnable = strchr(buf, '/');
  while (runnable && runnable > buf && *runnable != ' ') runnable--;
  if (runnable) *runnable = 0;
}

static void usage(void) {
  fprintf(stderr, "usage: migrate [--arenas N] [--reps R] [--json FILE]\n"
                  "  N arenas of 2 MiB per subject and phase (default 256 = 512 MiB)\n"
                  "  R repetitions, reported as medians (default %d, at most %d)\n",
          DEFAULT_REPS, MAX_REPS);
  exit(2);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--child") == 0) return child_main(argc, argv);
  size_t arenas = 256;
  int reps = DEFAULT_REPS;
  const char *json = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--arenas") == 0 && i + 1 < argc) arenas = strtoull(argv[++i], NULL, 10);
    else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
    else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) json = argv[++i];
    else usage();
  }
  if (arenas == 0 || reps < 1 || reps > MAX_REPS) usage();

  struct utsname u;
  uname(&u);
  char thp[128], load_before[64], load_after[64];
  read_line("/sys/kernel/mm/transparent_hugepage/enabled", thp, sizeof thp);
  read_loadavg(load_before, sizeof load_before);
  printf("migrate: %zu arenas (%zu MiB) of %d B blocks on 4 KiB pages; kernel %s; THP %s\n",
         arenas, arenas * 2, BLOCK_SIZE, u.release, thp);

  static struct summary sum[SUBJECTS];
  bool available[SUBJECTS];
  for (size_t i = 0; i < SUBJECTS; i++) {
    const struct subject *s = &subjects[i];
    char why[160];
    available[i] = s->raw ? mv_backend_probe()->collapse
                          : mv_backend_select(s->kind, why, sizeof why)->kind == s->kind;
    if (!available[i])
      snprintf(sum[i].failed, sizeof sum[i].failed, "%s",
               s->raw ? "MADV_COLLAPSE is not accepted here" : why);
  }

  /* The first child finds warm memory too (see fault_warm_huge_pages). */
  free_warm_huge_pages(fault_warm_huge_pages(2 * arenas));
  /* Subjects take turns within each repetition, so that a burst of the
   * machine's other work does not land on one of them only. */
  static struct outcome runs[MAX_REPS][SUBJECTS];
  for (int r = 0; r < reps; r++)
    for (size_t i = 0; i < SUBJECTS; i++) {
      struct outcome *o = &runs[r][i];
      o->ran = available[i];
      for (int p = 0; p < PHASE_COUNT && o->ran; p++) {
        fprintf(stderr, "migrate: %d/%d %s %s\n", r + 1, reps, subjects[i].name, phase_names[p]);
        /* The no-migration fault baseline lasts as long as the pass did. */
        uint64_t baseline_ns = o->phase[PHASE_THROUGHPUT].wall_ns;
        if (run_child(&subjects[i], (enum phase)p, arenas, baseline_ns, &o->phase[p]) != 0) {
          o->ran = false;
          snprintf(sum[i].failed, sizeof sum[i].failed, "%s", o->phase[p].error);
          fprintf(stderr, "migrate: %s failed: %s\n", subjects[i].name, sum[i].failed);
        }
      }
    }
  static struct outcome by_subject[SUBJECTS][MAX_REPS];
  for (size_t i = 0; i < SUBJECTS; i++) {
    for (int r = 0; r < reps; r++) by_subject[i][r] = runs[r][i];
    summarize(by_subject[i], reps, &sum[i]);
  }
  read_loadavg(load_after, sizeof load_after);
  print_report(sum, reps);
  printf("\nGB = 1e9 B; one thread compacts, so GB/s is per core. \"less CPU wait\": less the "
         "time the threads\ninvolved sat runnable without a CPU (schedstat run_delay). Writer "
         "stall, 1st row: every gap\n> 2 us between its stores that overlaps an isolation window "
         "(count); 2nd row: per window\nthe writer ran in, its longest stall there (windows it ran "
         "in / all). Load average\n%s -> %s, %ld CPUs.\n",
         load_before, load_after, sysconf(_SC_NPROCESSORS_ONLN));
  if (json) write_json(json, sum, runs, reps, arenas, u.release, load_before, load_after);
  return 0;
}
