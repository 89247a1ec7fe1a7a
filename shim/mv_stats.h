/* The human-readable summary (no allocation: a caller's buffer). */
#ifndef MV_STATS_H
#define MV_STATS_H

#include <stdbool.h>
#include <stddef.h>

#include "include/movalloc.h"

/* movalloc_stats_get without the NULL check. engine: also the migration
 * counters and backend, which chooses the backend (probing the kernel) if
 * that was not done yet; false leaves them zero and says "not chosen yet". */
void mv_stats_fill(struct movalloc_stats *out, bool engine);

/* Formats the summary with a title line; returns its length. */
size_t mv_stats_format(char *buf, size_t cap, const char *title);
/* Formats into a stack buffer and writes it to fd. */
void mv_stats_write(int fd, const char *title);

#endif /* MV_STATS_H */
