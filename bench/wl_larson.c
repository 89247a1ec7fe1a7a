// larson: a server-like mix of lifetimes, after Larson & Krishnan's benchmark.
// A shared array of objects (10-1000 B) is cut into one block per thread
// (default 4). A thread replaces random slots of its block, freeing what was
// there, then hands the block to a fresh successor thread and exits, as a
// server hands a connection's state from worker to worker. Objects therefore
// live for a random time and are freed by a thread other than the one that
// allocated it, often one that has already exited. Each block carries its own
// PRNG, so the operations, and the checksum, do not depend on scheduling.
#include <pthread.h>

#include "bench/wl_common.h"

#define BLOCK_SLOTS 4096
#define OPS_PER_GENERATION 20000

struct slot {
  void *p;
  uint32_t size;
  uint64_t tag;
};

struct block {
  unsigned id;
  struct slot slots[BLOCK_SLOTS];
  struct wl_rng rng;
  uint64_t serial;       // objects created in this block, for unique tags
  uint64_t generations;  // successor threads still to run on this block
  uint64_t sum;
};

static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;
static unsigned chains_running;

static void fill_slot(struct block *b, struct slot *s) {
  s->size = (uint32_t)wl_range(&b->rng, 10, 1000);
  s->tag = wl_mix(((uint64_t)b->id << 48) ^ b->serial++);
  s->p = wl_xmalloc(s->size);
  wl_stamp(s->p, s->size, s->tag);
}

static uint64_t retire_slot(struct slot *s) {
  wl_check(s->p, s->size, s->tag);
  uint64_t v = s->tag ^ s->size;
  free(s->p);
  s->p = NULL;
  return v;
}

static void *generation_thread(void *arg) {
  struct block *b = arg;
  for (unsigned k = 0; k < OPS_PER_GENERATION; k++) {
    struct slot *s = &b->slots[wl_below(&b->rng, BLOCK_SLOTS)];
    b->sum += retire_slot(s);
    fill_slot(b, s);
  }
  if (--b->generations > 0) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t next;
    if (pthread_create(&next, &attr, generation_thread, b)) {
      fprintf(stderr, "larson: pthread_create failed\n");
      exit(1);
    }
    pthread_attr_destroy(&attr);
    return NULL;
  }
  pthread_mutex_lock(&done_lock);
  chains_running--;
  pthread_cond_signal(&done_cond);
  pthread_mutex_unlock(&done_lock);
  return NULL;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, WL_THREADED, 4);
  unsigned nblocks = (unsigned)o.threads;
  // Total work is fixed; more threads means shorter chains.
  uint64_t generations = wl_scaled(1600, o.scale) / nblocks;
  if (generations == 0) generations = 1;

  struct block *blocks = calloc(nblocks, sizeof *blocks);
  for (unsigned i = 0; i < nblocks; i++) {
    struct block *b = &blocks[i];
    b->id = i;
    b->rng = wl_seed(300 + i);
    b->generations = generations;
    for (unsigned k = 0; k < BLOCK_SLOTS; k++) fill_slot(b, &b->slots[k]);
  }
  chains_running = nblocks;
  for (unsigned i = 0; i < nblocks; i++) {
    pthread_t t;
    pthread_create(&t, NULL, generation_thread, &blocks[i]);
    pthread_detach(t);
  }
  pthread_mutex_lock(&done_lock);
  while (chains_running > 0) pthread_cond_wait(&done_cond, &done_lock);
  pthread_mutex_unlock(&done_lock);

  uint64_t sum = 0;
  for (unsigned i = 0; i < nblocks; i++) {
    sum += blocks[i].sum;
    for (unsigned k = 0; k < BLOCK_SLOTS; k++) sum += retire_slot(&blocks[i].slots[k]);
  }
  free(blocks);
  wl_checksum(sum);
  return 0;
}
