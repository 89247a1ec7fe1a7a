// xthread: producer/consumer. Half the threads (default 2 of 4) malloc batches
// of 8 B-2 KiB objects and hand them through mutex-protected bounded queues to
// the other half, which check and free them, so nearly every free is a remote
// free of memory another thread allocated. Each producer deals its batches
// round-robin over all consumers, so every consumer frees for every producer.
#include <pthread.h>

#include "bench/wl_common.h"

#define BATCH 64
#define QUEUE_CAP 32  // batches in flight per queue; bounds memory and skew

struct batch {
  uint32_t n;
  uint32_t size[BATCH];
  uint64_t tag[BATCH];
  void *p[BATCH];
};

struct queue {
  pthread_mutex_t lock;
  pthread_cond_t not_empty, not_full;
  struct batch *ring[QUEUE_CAP];
  unsigned head, count;
  unsigned producers_left;  // a NULL pop means all producers finished
};

struct worker {
  pthread_t tid;
  unsigned id;
  uint64_t batches;  // producers: how many to make
  struct queue *queues;
  unsigned nqueues;
  uint64_t sum;
};

static void queue_push(struct queue *q, struct batch *b) {
  pthread_mutex_lock(&q->lock);
  while (q->count == QUEUE_CAP) pthread_cond_wait(&q->not_full, &q->lock);
  q->ring[(q->head + q->count) % QUEUE_CAP] = b;
  q->count++;
  pthread_cond_signal(&q->not_empty);
  pthread_mutex_unlock(&q->lock);
}

static void queue_producer_done(struct queue *q) {
  pthread_mutex_lock(&q->lock);
  q->producers_left--;
  pthread_cond_broadcast(&q->not_empty);
  pthread_mutex_unlock(&q->lock);
}

static struct batch *queue_pop(struct queue *q) {
  pthread_mutex_lock(&q->lock);
  while (q->count == 0 && q->producers_left > 0) pthread_cond_wait(&q->not_empty, &q->lock);
  struct batch *b = NULL;
  if (q->count > 0) {
    b = q->ring[q->head];
    q->head = (q->head + 1) % QUEUE_CAP;
    q->count--;
    pthread_cond_signal(&q->not_full);
  }
  pthread_mutex_unlock(&q->lock);
  return b;
}

static void *producer(void *arg) {
  struct worker *w = arg;
  struct wl_rng rng = wl_seed(200 + w->id);
  for (uint64_t i = 0; i < w->batches; i++) {
    struct batch *b = wl_xmalloc(sizeof *b);
    b->n = BATCH;
    for (unsigned k = 0; k < BATCH; k++) {
      // Mostly small, with a tail up to 2 KiB, as messages and requests are.
      b->size[k] = (uint32_t)wl_log_range(&rng, 8, 2048);
      b->tag[k] = wl_mix(((uint64_t)w->id << 40) ^ (i * BATCH + k));
      b->p[k] = wl_xmalloc(b->size[k]);
      wl_stamp(b->p[k], b->size[k], b->tag[k]);
    }
    queue_push(&w->queues[(w->id + i) % w->nqueues], b);
  }
  for (unsigned q = 0; q < w->nqueues; q++) queue_producer_done(&w->queues[q]);
  return NULL;
}

static void *consumer(void *arg) {
  struct worker *w = arg;
  struct queue *q = &w->queues[w->id];
  uint64_t sum = 0;
  struct batch *b;
  while ((b = queue_pop(q))) {
    for (unsigned k = 0; k < b->n; k++) {
      wl_check(b->p[k], b->size[k], b->tag[k]);
      sum += b->tag[k] ^ b->size[k];
      free(b->p[k]);
    }
    free(b);
  }
  w->sum = sum;
  return NULL;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, WL_THREADED, 4);
  if (o.threads < 2) {
    fprintf(stderr, "xthread needs --threads >= 2\n");
    return 2;
  }
  unsigned nprod = (unsigned)o.threads / 2, ncons = (unsigned)o.threads - nprod;
  uint64_t total_batches = wl_scaled(100000, o.scale);

  struct queue *queues = calloc(ncons, sizeof *queues);
  for (unsigned q = 0; q < ncons; q++) {
    pthread_mutex_init(&queues[q].lock, NULL);
    pthread_cond_init(&queues[q].not_empty, NULL);
    pthread_cond_init(&queues[q].not_full, NULL);
    queues[q].producers_left = nprod;
  }
  struct worker *w = calloc(nprod + ncons, sizeof *w);
  for (unsigned t = 0; t < nprod + ncons; t++) {
    bool is_producer = t < nprod;
    w[t].id = is_producer ? t : t - nprod;
    w[t].queues = queues;
    w[t].nqueues = ncons;
    w[t].batches = total_batches / nprod;
    pthread_create(&w[t].tid, NULL, is_producer ? producer : consumer, &w[t]);
  }
  uint64_t sum = 0;
  for (unsigned t = 0; t < nprod + ncons; t++) {
    pthread_join(w[t].tid, NULL);
    sum += w[t].sum;
  }
  free(w);
  free(queues);
  wl_checksum(sum);
  return 0;
}
