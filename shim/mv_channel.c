/* The inspection channel (see mv_channel.h for the layout and who writes what). */
#include "shim/mv_channel.h"

#include <errno.h>
#include <sched.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_prim.h"
#include "compactor/mv_backend_int.h" /* mv_fd_high */
#include "compactor/mv_engine.h"
#include "shim/mv_stats.h"

/* tools/inspect/inspect.py reads these offsets. */
_Static_assert(sizeof(struct mv_channel_arena) == 32, "arena entry layout");
_Static_assert(sizeof(struct mv_channel_event) == 48, "event layout");
_Static_assert(offsetof(struct mv_channel, seq) == 56, "header layout");
_Static_assert(offsetof(struct mv_channel, stats) == 112, "header layout");
_Static_assert(sizeof(struct movalloc_stats) == 664, "stats layout");

#define HEADER_BYTES 4096
#define ARENAS_BYTES ((size_t)MV_CHANNEL_ARENAS * sizeof(struct mv_channel_arena))
#define EVENTS_BYTES ((size_t)MV_CHANNEL_EVENTS * sizeof(struct mv_channel_event))
#define CHANNEL_BYTES (HEADER_BYTES + ARENAS_BYTES + EVENTS_BYTES)

/* The channel of process `pid`: ch maps the memfd at descriptor fd (device
 * dev, inode ino). All of it changes only while `busy` holds this process's
 * pid. ch == NULL: none yet. failed_pid: creating one failed in that process
 * (no memfd: seccomp, EMFILE); it does not try again. */
static struct mv_channel *ch;
static int ch_fd = -1, ch_pid, failed_pid;
static uint64_t ch_dev, ch_ino;
static _Atomic int busy; /* pid of the process whose thread is inside, 0: none */
/* The last snapshot's time and size, for mv_channel_poke's pacing without the
 * lock (ch may be unmapped under it in a child after fork); both zeroed in a
 * fork child, so that its first refresh publishes (a getpid() per check cost
 * a system call for every fresh page). */
static _Atomic uint64_t last_ns;
static _Atomic uint32_t last_arenas; /* arenas handed out at the last snapshot */

/* A value of busy from another process was left by a thread that does not
 * exist here (the parent's, across fork): the child takes over. */
static bool lock_try(int me) {
  int v = atomic_load_explicit(&busy, memory_order_relaxed);
  if (v == me) return false;
  return atomic_compare_exchange_strong_explicit(&busy, &v, me, memory_order_acquire,
                                                 memory_order_relaxed);
}
static void lock_wait(int me) {
  while (!lock_try(me)) sched_yield();
}
static void unlock(void) { atomic_store_explicit(&busy, 0, memory_order_release); }

static bool fd_is_channel(int fd) {
  struct stat st;
  return fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_dev == ch_dev &&
         (uint64_t)st.st_ino == ch_ino;
}

/* The channel of this process, created if needed; NULL if there can be none.
 * Lock held. */
static struct mv_channel *channel(int me) {
  bool ours = fd_is_channel(ch_fd);
  if (ch && ch_pid == me && ours) return ch;
  if (ch) {
    /* Inherited over fork() (the parent's: never written here), or the program
     * closed our descriptor (readers could not find this one any more). */
    mv_os_munmap(ch, CHANNEL_BYTES);
    if (ours) close(ch_fd); /* a number the program reused is left alone */
    ch = NULL;
    ch_fd = -1;
  }
  if (failed_pid == me) return NULL;
  int fd = memfd_create(MV_CHANNEL_NAME, MFD_CLOEXEC);
  if (fd >= 0) fd = mv_fd_high(fd);
  struct stat st;
  void *p = MAP_FAILED;
  if (fd >= 0 && ftruncate(fd, CHANNEL_BYTES) == 0 && fstat(fd, &st) == 0)
    p = mv_os_mmap(NULL, CHANNEL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    if (fd >= 0) close(fd);
    failed_pid = me;
    return NULL;
  }
  struct mv_channel *c = p;
  c->version = MV_CHANNEL_VERSION;
  c->header_size = sizeof *c;
  c->arena_size = sizeof(struct mv_channel_arena);
  c->event_size = sizeof(struct mv_channel_event);
  c->arena_cap = MV_CHANNEL_ARENAS;
  c->event_cap = MV_CHANNEL_EVENTS;
  c->arenas_offset = HEADER_BYTES;
  c->events_offset = HEADER_BYTES + ARENAS_BYTES;
  c->pid = me;
  c->heap_base = mv_heap_base;
  /* Last: a reader that sees the magic sees the rest of the header. */
  __atomic_store_n(&c->magic, MV_CHANNEL_MAGIC, __ATOMIC_RELEASE);
  ch = c;
  ch_fd = fd;
  ch_pid = me;
  ch_dev = (uint64_t)st.st_dev;
  ch_ino = (uint64_t)st.st_ino;
  return ch;
}

static struct mv_channel_arena *arena_entries(struct mv_channel *c) {
  return (struct mv_channel_arena *)((char *)c + HEADER_BYTES);
}

/* Live block bytes inside arena i: a racy but safe walk, as
 * mv_heap_bytes_in_use. A huge object counts in each arena of its span for
 * the part of it that lies there. */
static uint32_t arena_in_use(uint32_t i) {
  mv_arena_t *a = &mv_arenas[i];
  uintptr_t start = mv_heap_base + ((uintptr_t)i << MV_ARENA_SHIFT);
  if (a->huge) {
    mv_page_t *page = a->slice_page[0];
    uintptr_t end = page->start + page->huge_size;
    if (page->kind != MV_PAGE_HUGE || end <= start) return 0;
    return (uint32_t)(end - start < MV_ARENA_SIZE ? end - start : MV_ARENA_SIZE);
  }
  return (uint32_t)mv_arena_pages_in_use(a);
}

void mv_channel_publish(void) {
  if (!mv_arenas) return; /* not started */
  int me = getpid();
  if (!lock_try(me)) return; /* someone publishes right now */
  struct mv_channel *c = channel(me);
  if (c) {
    uint64_t seq = __atomic_load_n(&c->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&c->seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    bool running = mv_compactor_running();
    /* No compactor and no migration yet: the backend is not chosen, and
     * choosing it here would probe the kernel from an allocation. */
    mv_stats_fill(&c->stats, running || c->event_head > 0);
    uint32_t n = mv_arena_frontier();
    uint32_t listed = n < MV_CHANNEL_ARENAS ? n : MV_CHANNEL_ARENAS;
    struct mv_channel_arena *e = arena_entries(c);
    for (uint32_t i = 0; i < listed; i++) {
      mv_arena_t *a = &mv_arenas[i];
      e[i].state = atomic_load_explicit(&a->state, memory_order_relaxed);
      e[i].thp = a->thp;
      e[i].huge = a->huge;
      e[i].committed = a->committed;
      e[i].free_slices = a->free_count;
      e[i].in_use_bytes = e[i].state == MV_ARENA_FREE ? 0 : arena_in_use(i);
    }
    c->arena_count = listed;
    c->arenas_total = n;
    c->compactor = running;
    c->publishes++;
    c->published_ns = mv_os_now_ns();
    __atomic_store_n(&c->seq, seq + 2, __ATOMIC_RELEASE);
    atomic_store_explicit(&last_ns, c->published_ns, memory_order_relaxed);
    atomic_store_explicit(&last_arenas, n, memory_order_relaxed);
  }
  unlock();
}

void mv_channel_refresh(void) {
  uint32_t arenas = mv_arena_frontier();
  if (arenas < MV_CHANNEL_MIN_ARENAS) return;
  /* A new arena always publishes (a program that stops growing has its last
   * arena listed); more pages in the same arenas, at most every PACE. */
  if (arenas == atomic_load_explicit(&last_arenas, memory_order_relaxed) &&
      mv_os_now_ns() - atomic_load_explicit(&last_ns, memory_order_relaxed) < MV_CHANNEL_PACE_NS)
    return;
  mv_channel_publish();
}

void mv_channel_fork_child(void) {
  atomic_store_explicit(&last_ns, 0, memory_order_relaxed);
  atomic_store_explicit(&last_arenas, 0, memory_order_relaxed);
}

void mv_channel_poke(void) {
  if (mv_compactor_running()) return; /* it refreshes every round */
  mv_channel_refresh();
}

void mv_channel_event(const char *backend, uintptr_t arena, int outcome, int rc,
                      uint64_t stall_ns) {
  int me = getpid();
  lock_wait(me);
  struct mv_channel *c = channel(me);
  if (c) {
    uint64_t now = mv_os_now_ns();
    uint64_t n = c->event_head;
    struct mv_channel_event *ev = (struct mv_channel_event *)((char *)c + c->events_offset) +
                                  n % MV_CHANNEL_EVENTS;
    __atomic_store_n(&ev->seq, 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    ev->time_ns = now;
    ev->arena = arena;
    ev->rc = rc;
    ev->stall_us = (uint32_t)(stall_ns / 1000);
    ev->bytes = outcome == 0 ? (uint32_t)MV_ARENA_SIZE : 0;
    ev->outcome = (uint8_t)outcome;
    memset(ev->backend, 0, sizeof ev->backend);
    strncpy(ev->backend, backend, sizeof ev->backend - 1);
    __atomic_store_n(&ev->seq, n + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&c->event_head, n + 1, __ATOMIC_RELEASE);
    uintptr_t off = arena - mv_heap_base;
    if (mv_arenas && arena >= mv_heap_base && (off >> MV_ARENA_SHIFT) < MV_CHANNEL_ARENAS) {
      struct mv_channel_arena *e = &arena_entries(c)[off >> MV_ARENA_SHIFT];
      __atomic_fetch_add(outcome == 0 ? &e->moved : &e->not_moved, 1, __ATOMIC_RELAXED);
      e->last_event_ns = now;
    }
  }
  unlock();
}

int mv_channel_fd(void) {
  int me = getpid();
  lock_wait(me);
  int fd = ch && ch_pid == me && fd_is_channel(ch_fd) ? ch_fd : -1;
  unlock();
  return fd;
}
