/* Readers for the kernel's free-memory views: /proc/meminfo, /proc/buddyinfo
 * and the THP settings in sysfs. No state; every call reads the file anew. */
#ifndef FRAGMENT_MEMSTAT_H
#define FRAGMENT_MEMSTAT_H

#include <stddef.h>

struct meminfo {
	long total_kib;
	long free_kib;
	long available_kib;
};

#define MEMSTAT_MAX_ZONES 32

struct zone_free {
	int node;
	char name[16];
	long free_blocks; /* free THP-sized blocks; an order-10 block counts as two */
	long free_pages;  /* every free page this zone's buddy lists hold */
};

struct buddy_summary {
	int nzones;
	struct zone_free zones[MEMSTAT_MAX_ZONES];
	long free_blocks;
	long free_pages;
};

/* 0 on success, -1 with errno set. */
int read_meminfo(struct meminfo *out);

/* block_order: log2(THP size / page size), 9 on x86-64. 0 or -1 with errno. */
int read_buddyinfo(unsigned block_order, struct buddy_summary *out);

/* Size of a PMD-mapped THP in bytes, or 0 if the kernel has no THP. */
size_t read_thp_block_size(void);

/* The bracketed choice of a THP sysfs setting, e.g. "madvise" from
 * "always [madvise] never". 0 or -1 if the file is missing or unparsable. */
int read_thp_setting(const char *name, char *out, size_t outlen);

#endif
