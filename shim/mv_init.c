/* Start-up, thread exit, fork and exit (see mv_init.h). */
#include "shim/mv_init.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_engine.h"
#include "include/movalloc.h"
#include "profiler/mv_lifetime.h"
#include "profiler/mv_profile.h"
#include "shim/mv_channel.h"
#include "shim/mv_options.h"
#include "shim/mv_stats.h"

enum { UNINIT, INITIALISING, READY, FAILED };

static _Atomic int init_state = UNINIT;
static __thread bool initialising_here;
static pthread_key_t exit_key;
static bool exit_key_ok;

static void thread_exit(void *unused) { mv_heap_thread_exit(); }

/* ---- fork: every lock, in the documented order ---- */

static mv_lock_t *const fork_locks[] = {&mv_engine_lock, &mv_engine_choice_lock,
                                        &mv_samples_lock, &mv_heaps_lock, &mv_arena_lock,
                                        &mv_prof_lock};
#define FORK_LOCKS (sizeof fork_locks / sizeof fork_locks[0])
/* Locks the forking thread already held (fork() from a signal handler that
 * interrupted an allocation): not taken again, not released by the handlers. */
static bool held_before_fork[FORK_LOCKS];

static void fork_prepare(void) {
  mv_prof_fork_prepare();
  for (size_t i = 0; i < FORK_LOCKS; i++) {
    held_before_fork[i] = mv_lock_held_by_me(fork_locks[i]);
    if (!held_before_fork[i]) mv_lock(fork_locks[i]);
  }
}

static void fork_parent(void) {
  for (size_t i = FORK_LOCKS; i-- > 0;)
    if (!held_before_fork[i]) mv_unlock(fork_locks[i]);
  mv_prof_fork_done();
}

static void fork_child(void) {
  for (size_t i = FORK_LOCKS; i-- > 0;)
    if (!held_before_fork[i]) mv_lock_reinit(fork_locks[i]);
  mv_arena_fork_child();
  mv_heap_fork_child();
  mv_engine_fork_child();
  mv_channel_fork_child();
  mv_prof_fork_done();
}

/* ---- start-up ---- */

static bool init_core(void) {
  mv_options_load(NULL);
  if (mv_options.help) mv_options_describe(2);
  mv_os_random(mv_keys, sizeof mv_keys);
  /* Every free checked; every malloc is slow too (no heap's direct[] is filled). */
  if (mv_options.check) mv_free_fast_mask = ~(uintptr_t)0;
  /* Check mode arms a canary in every block on its own slow path: the
   * profiler's and routing's hooks on the slow paths stay off then. */
  if (mv_options.check && (mv_options.profile || mv_options.profile_longlived)) {
    mv_log("MOVALLOC_PROFILE and MOVALLOC_PROFILE_LONGLIVED are ignored under MOVALLOC_CHECK=1");
    mv_options.profile = 0;
    mv_options.profile_longlived = NULL;
  }
  if (mv_options.profile) mv_prof_init(mv_options.profile);
  int rc = mv_arena_init();
  if (rc != 0) {
    mv_log("cannot reserve address space for the heap (%d); every allocation will fail "
           "with ENOMEM. Try a smaller MOVALLOC_RESERVE_GIB.", rc);
    return false;
  }
  exit_key_ok = pthread_key_create(&exit_key, thread_exit) == 0;
  return true;
}

bool mv_ensure_init(void) {
  int state = atomic_load_explicit(&init_state, memory_order_acquire);
  if (MV_LIKELY(state == READY)) return true;
  if (state == FAILED || initialising_here) return false;
  int expected = UNINIT;
  if (atomic_compare_exchange_strong(&init_state, &expected, INITIALISING)) {
    initialising_here = true;
    bool ok = init_core();
    atomic_store_explicit(&init_state, ok ? READY : FAILED, memory_order_release);
    if (ok) {
      /* After READY: these may allocate. */
      pthread_atfork(fork_prepare, fork_parent, fork_child);
      mv_engine_start();
    }
    initialising_here = false;
    return ok;
  }
  while ((state = atomic_load_explicit(&init_state, memory_order_acquire)) == INITIALISING)
    sched_yield();
  return state == READY;
}

void mv_thread_attach(void) {
  if (exit_key_ok) pthread_setspecific(exit_key, (void *)1);
}

__attribute__((constructor)) static void movalloc_constructor(void) {
  if (!mv_ensure_init()) return;
  if (mv_prof_rate) mv_prof_start();
  if (mv_options.profile_longlived) mv_lifetime_start(mv_options.profile_longlived);
}

__attribute__((destructor)) static void movalloc_destructor(void) {
  if (atomic_load(&init_state) != READY) return;
  if (mv_options.stats) mv_stats_write(2, "stats at exit");
  if (mv_prof_rate) mv_prof_exit();
}
