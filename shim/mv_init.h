/* Start-up, thread exit and fork. The init state machine (jemalloc's idea):
 *   UNINIT -> INITIALISING (one thread, by CAS) -> READY, or -> FAILED
 * Other threads wait for READY; the initialising thread itself never recurses
 * into the allocator before READY (everything before it is system calls), and
 * what runs after READY (pthread_atfork, which may malloc) finds it READY. */
#ifndef MV_INIT_H
#define MV_INIT_H

#include <stdbool.h>

/* True once the allocator can serve; false if it cannot start (no address
 * space), in which case every allocation fails with ENOMEM. */
bool mv_ensure_init(void);

/* Called once per thread when it gets a heap: arranges mv_heap_thread_exit()
 * at thread exit. */
void mv_thread_attach(void);

#endif /* MV_INIT_H */
