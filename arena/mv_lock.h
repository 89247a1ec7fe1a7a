/* A futex mutex that never allocates and remembers its owner, so fork handlers
 * can tell a lock the forking thread already holds (fork() from a signal
 * handler that interrupted an allocation) from one it must take.
 *
 * Lock order (fork handlers take them in this order):
 *   mv_engine_lock < mv_engine_choice_lock < mv_samples_lock < mv_heaps_lock < mv_arena_lock
 *   < mv_prof_lock (a leaf)
 */
#ifndef MV_LOCK_H
#define MV_LOCK_H

#include "arena/mv_atomic.h"
#include <stdbool.h>
#include <stddef.h>

typedef struct mv_lock {
  _Atomic(int) state;       /* 0 free, 1 held, 2 held with waiters */
  _Atomic(void *) owner;   /* mv_lock_self() of the holder, NULL when free */
} mv_lock_t;

#define MV_LOCK_INIT {0, NULL}

/* A per-thread token, stable across fork() in the forking thread. */
void *mv_lock_self(void);

void mv_lock_slow(mv_lock_t *l);
void mv_unlock_slow(mv_lock_t *l);

static inline void mv_lock(mv_lock_t *l) {
  int expected = 0;
  if (!atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                               memory_order_relaxed))
    mv_lock_slow(l);
  atomic_store_explicit(&l->owner, mv_lock_self(), memory_order_relaxed);
}

static inline bool mv_lock_try(mv_lock_t *l) {
  int expected = 0;
  if (!atomic_compare_exchange_strong_explicit(&l->state, &expected, 1, memory_order_acquire,
                                               memory_order_relaxed))
    return false;
  atomic_store_explicit(&l->owner, mv_lock_self(), memory_order_relaxed);
  return true;
}

static inline void mv_unlock(mv_lock_t *l) {
  atomic_store_explicit(&l->owner, NULL, memory_order_relaxed);
  if (atomic_exchange_explicit(&l->state, 0, memory_order_release) == 2) mv_unlock_slow(l);
}

static inline bool mv_lock_held_by_me(mv_lock_t *l) {
  return atomic_load_explicit(&l->owner, memory_order_relaxed) == mv_lock_self();
}

/* In a fork child: the lock is free again whoever held it in the parent. */
static inline void mv_lock_reinit(mv_lock_t *l) {
  atomic_store(&l->owner, NULL);
  atomic_store(&l->state, 0);
}

#endif /* MV_LOCK_H */
