/* The human-readable summary (no allocation: a caller's buffer). */
#ifndef MV_STATS_H
#define MV_STATS_H

#include <stddef.h>

/* Formats the summary with a title line; returns its length. */
size_t mv_stats_format(char *buf, size_t cap, const char *title);
/* Formats into a stack buffer and writes it to fd. */
void mv_stats_write(int fd, const char *title);

#endif /* MV_STATS_H */
