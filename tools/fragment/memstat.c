#define _GNU_SOURCE
#include "memstat.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THP_SYSFS "/sys/kernel/mm/transparent_hugepage/"

int read_meminfo(struct meminfo *out)
{
	FILE *f = fopen("/proc/meminfo", "re");
	if (!f)
		return -1;
	memset(out, 0, sizeof(*out));
	int found = 0;
	char line[256];
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "MemTotal: %ld kB", &out->total_kib) == 1 ||
		    sscanf(line, "MemFree: %ld kB", &out->free_kib) == 1 ||
		    sscanf(line, "MemAvailable: %ld kB", &out->available_kib) == 1)
			found++;
	}
	fclose(f);
	if (found != 3) {
		errno = EPROTO;
		return -1;
	}
	return 0;
}

/* One line: "Node 0, zone   Normal   1725   1426 ... 132", counts by order. */
static int parse_buddy_line(const char *line, unsigned block_order, struct zone_free *zone)
{
	int consumed = 0;
	if (sscanf(line, "Node %d, zone %15s%n", &zone->node, zone->name, &consumed) != 2)
		return -1;
	zone->free_blocks = 0;
	zone->free_pages = 0;
	const char *p = line + consumed;
	for (unsigned order = 0;; order++) {
		char *end;
		long count = strtol(p, &end, 10);
		if (end == p)
			break;
		p = end;
		zone->free_pages += count << order;
		if (order >= block_order)
			zone->free_blocks += count << (order - block_order);
	}
	return 0;
}

int read_buddyinfo(unsigned block_order, struct buddy_summary *out)
{
	FILE *f = fopen("/proc/buddyinfo", "re");
	if (!f)
		return -1;
	memset(out, 0, sizeof(*out));
	char line[512];
	while (fgets(line, sizeof(line), f) && out->nzones < MEMSTAT_MAX_ZONES) {
		struct zone_free *zone = &out->zones[out->nzones];
		if (parse_buddy_line(line, block_order, zone) != 0)
			continue;
		out->free_blocks += zone->free_blocks;
		out->free_pages += zone->free_pages;
		out->nzones++;
	}
	fclose(f);
	if (out->nzones == 0) {
		errno = EPROTO;
		return -1;
	}
	return 0;
}

size_t read_thp_block_size(void)
{
	FILE *f = fopen(THP_SYSFS "hpage_pmd_size", "re");
	if (!f)
		return 0;
	unsigned long size = 0;
	if (fscanf(f, "%lu", &size) != 1)
		size = 0;
	fclose(f);
	return size;
}

int read_thp_setting(const char *name, char *out, size_t outlen)
{
	char path[256];
	snprintf(path, sizeof(path), THP_SYSFS "%s", name);
	FILE *f = fopen(path, "re");
	if (!f)
		return -1;
	char line[256];
	int rc = -1;
	if (fgets(line, sizeof(line), f)) {
		char *open = strchr(line, '[');
		char *close = open ? strchr(open, ']') : NULL;
		if (close && (size_t)(close - open - 1) < outlen) {
			memcpy(out, open + 1, close - open - 1);
			out[close - open - 1] = '\0';
			rc = 0;
		}
	}
	fclose(f);
	return rc;
}
