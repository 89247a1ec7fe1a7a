/* Heap-level bookkeeping that the shim and the statistics read. */
#ifndef MV_HEAP_H
#define MV_HEAP_H

#include <stdint.h>

#include "arena/mv_lock.h"

extern mv_lock_t mv_heaps_lock;
extern mv_lock_t mv_samples_lock; /* the heap of sampled blocks (MOVALLOC_PROFILE) */

uint64_t mv_heap_count(void);          /* heaps ever created */
uint64_t mv_heap_bytes_in_use(void);   /* live block bytes (a racy but safe walk) */
void mv_heap_misuse_counts(uint64_t *invalid, uint64_t *double_frees);

/* A heap's owner is away when it has left a full page that other threads
 * freed into unlooked-at for MV_AWAY_NS: then those threads give back the
 * memory of its pages they empty (mv_heap.c, page_reclaim). One that runs
 * looks at its next slow call. */
#define MV_AWAY_NS ((uint64_t)1000 * 1000)

#endif /* MV_HEAP_H */
