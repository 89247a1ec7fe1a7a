/* The inspection channel: what `movalloc stat`, `top` and `trace` read from a
 * running movalloc process.
 *
 * A memfd named "movalloc" (so /proc/PID/fd/N links to "/memfd:movalloc
 * (deleted)"), created lazily, kept at a high descriptor with O_CLOEXEC and
 * mapped shared. Nobody can open it but through /proc/PID/fd, which the kernel
 * lets only the process's owner (or root) open: the channel is owner-only
 * without any file mode of its own. A child after fork() never writes its
 * parent's channel: every entry point checks the pid, and the child makes its
 * own on first use.
 *
 * The file is this header, then arena_cap arena entries, then event_cap event
 * slots. Every field is little-endian, fixed size, at the offset written here
 * (tools/inspect/inspect.py reads it with the same offsets; version changes
 * when the layout does).
 *
 * Who writes what:
 *   snapshot (stats, arena entries' state .. in_use_bytes, published_ns,
 *   arena_count, compactor): the publisher, under the seqlock `seq` (odd while
 *   writing). A reader copies, then checks seq is even and unchanged.
 *   arena entries' moved/failed and the event ring: the engine, at each
 *   migration, outside the seqlock (relaxed counters; each ring slot carries
 *   its own sequence number).
 *
 * Publishing: the compactor thread refreshes it every round, a process
 * without one when its heap grows: at once when the heap took a new arena,
 * else at most every MV_CHANNEL_PACE_NS (a 1 ms compaction period must not
 * cost a snapshot per millisecond). The snapshot carries its time, so a
 * reader can say how old it is.
 *
 * Only a heap of MV_CHANNEL_MIN_ARENAS or more (or a migration) opens the
 * channel: a small program's descriptors stay exactly its own (test suites
 * compare them: python's test_subprocess checks what a child inherits).
 */
#ifndef MV_CHANNEL_H
#define MV_CHANNEL_H

#include <stdint.h>

#include "include/movalloc.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MV_CHANNEL_NAME "movalloc"
#define MV_CHANNEL_MAGIC 0x314e414843564d4dull /* "MMVCHAN1" little-endian */
#define MV_CHANNEL_VERSION 1
#define MV_CHANNEL_ARENAS 65536 /* 128 GiB of heap; arenas beyond are counted, not listed */
#define MV_CHANNEL_EVENTS 1024  /* the ring keeps the last this many migrations */
#define MV_CHANNEL_PACE_NS (100ull * 1000000u)
#define MV_CHANNEL_MIN_ARENAS 8 /* 16 MiB, where the compactor starts too */

/* One arena. Invariant: entries [0, arena_count) describe arenas 0.. of the
 * heap as of published_ns; later entries are stale or zero. */
struct mv_channel_arena {
  uint8_t state;          /* enum mv_arena_state: 0 free, 1 active, 2 isolated, 3 migrating */
  uint8_t thp;            /* known to sit on a transparent huge page */
  uint8_t huge;           /* part of a huge object's span */
  uint8_t committed;      /* may have resident pages */
  uint8_t free_slices;    /* of 32 */
  uint8_t pad[3];
  uint32_t in_use_bytes;  /* live block bytes */
  uint32_t moved;         /* migrations onto a huge page (engine) */
  uint32_t not_moved;     /* retried, refused or failed migrations (engine) */
  uint32_t pad2;
  uint64_t last_event_ns; /* CLOCK_MONOTONIC of its last migration attempt, 0: none */
};

/* One migration attempt, as in MOVALLOC_TRACE. Invariant: seq == n + 1 for
 * the n-th event (from 0) once the slot is whole; 0 while it is written. */
struct mv_channel_event {
  uint64_t seq;
  uint64_t time_ns;   /* CLOCK_MONOTONIC */
  uint64_t arena;     /* start address */
  int32_t rc;         /* 0, -EAGAIN, -errno */
  uint32_t stall_us;  /* how long writers were held */
  uint32_t bytes;     /* moved */
  uint8_t outcome;    /* 0 moved, 1 retry, 2 refused, 3 failed */
  char backend[11];   /* NUL-terminated */
};

struct mv_channel {
  uint64_t magic;           /* MV_CHANNEL_MAGIC */
  uint32_t version;         /* MV_CHANNEL_VERSION */
  uint32_t header_size;     /* sizeof(struct mv_channel) */
  uint32_t arena_size, event_size;  /* sizeof each entry */
  uint32_t arena_cap, event_cap;    /* MV_CHANNEL_ARENAS, MV_CHANNEL_EVENTS */
  uint64_t arenas_offset, events_offset;
  int32_t pid;              /* the process that writes it */
  uint32_t pad;
  uint64_t seq;             /* snapshot seqlock: odd while the publisher writes */
  uint64_t published_ns;    /* CLOCK_MONOTONIC of the snapshot */
  uint64_t publishes;       /* snapshots so far */
  uint32_t arena_count;     /* entries valid: min(arenas handed out, arena_cap) */
  uint32_t compactor;       /* 1: a compactor thread runs */
  uint64_t arenas_total;    /* arenas handed out, listed or not */
  uint64_t event_head;      /* events written so far (the next event's n) */
  uint64_t heap_base;       /* address of arena 0 */
  struct movalloc_stats stats;
};

/* Publishes a fresh snapshot (creating the channel first if needed). Safe from
 * any thread; a call while another publishes returns at once. Never
 * allocates. */
void mv_channel_publish(void);

/* Publishes if the heap has MV_CHANNEL_MIN_ARENAS and more arenas than in
 * the last snapshot, or that snapshot is older than MV_CHANNEL_PACE_NS. The
 * compactor thread calls it every round. */
void mv_channel_refresh(void);

/* The allocator's heap grew (called after it did): mv_channel_refresh() unless
 * a compactor thread does that. */
void mv_channel_poke(void);

/* fork() child: its first mv_channel_refresh publishes, into a channel of its
 * own (the parent's pacing says nothing about the child's). */
void mv_channel_fork_child(void);

/* The engine's record of one migration attempt (same fields as the trace).
 * Called with the engine lock held (one writer). */
void mv_channel_event(const char *backend, uintptr_t arena, int outcome, int rc,
                      uint64_t stall_ns);

/* The descriptor of this process's channel, or -1 when it has none (tests). */
int mv_channel_fd(void);

#ifdef __cplusplus
}
#endif

#endif /* MV_CHANNEL_H */
