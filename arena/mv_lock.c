/* Futex slow paths for mv_lock.h (Drepper's "mutex 2"). */
#include "arena/mv_lock.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

static __thread char lock_token;

void *mv_lock_self(void) { return &lock_token; }

void mv_lock_slow(mv_lock_t *l) {
  int c = 0;
  for (int spin = 0; spin < 100; spin++) {
    c = 0;
    if (atomic_compare_exchange_weak_explicit(&l->state, &c, 1, memory_order_acquire,
                                              memory_order_relaxed))
      return;
    __builtin_ia32_pause();
  }
  if (c != 2) c = atomic_exchange_explicit(&l->state, 2, memory_order_acquire);
  while (c != 0) {
    syscall(SYS_futex, &l->state, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
    c = atomic_exchange_explicit(&l->state, 2, memory_order_acquire);
  }
}

void mv_unlock_slow(mv_lock_t *l) {
  syscall(SYS_futex, &l->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}
