#define _GNU_SOURCE
#include "harvest.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kernel-page-flags.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_PFN_MASK ((1ULL << 55) - 1)

/* Pagemap and kpageflags, opened once per harvester or probe. */
struct frame_reader {
	int pagemap_fd;
	int kpageflags_fd;
};

static int open_frame_reader(struct frame_reader *r)
{
	r->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	r->kpageflags_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	if (r->pagemap_fd >= 0 && r->kpageflags_fd >= 0)
		return 0;
	int saved = errno;
	if (r->pagemap_fd >= 0)
		close(r->pagemap_fd);
	if (r->kpageflags_fd >= 0)
		close(r->kpageflags_fd);
	errno = saved;
	return -1;
}

static void close_frame_reader(const struct frame_reader *r)
{
	close(r->pagemap_fd);
	close(r->kpageflags_fd);
}

static int read_pagemap(int pagemap_fd, const void *addr, size_t page_size, uint64_t *entries,
			size_t n)
{
	off_t offset = (off_t)((uintptr_t)addr / page_size * sizeof(uint64_t));
	ssize_t want = (ssize_t)(n * sizeof(uint64_t));
	if (pread(pagemap_fd, entries, (size_t)want, offset) != want) {
		if (errno == 0)
			errno = EIO;
		return -1;
	}
	return 0;
}

static uint64_t entry_pfn(uint64_t entry)
{
	return (entry & PAGEMAP_PRESENT) ? (entry & PAGEMAP_PFN_MASK) : 0;
}

static uint64_t page_flags(int kpageflags_fd, uint64_t pfn)
{
	uint64_t flags = 0;
	if (pread(kpageflags_fd, &flags, sizeof(flags), (off_t)(pfn * sizeof(flags))) != sizeof(flags))
		return 0;
	return flags;
}

/* entries: the block's pagemap. One PMD-sized THP: the first and last page are
 * present, physically contiguous over the whole block, block-aligned, and the
 * first is a THP head. Smaller folios (multi-size THP) fail the checks. A
 * frame number of 0 means pagemap hid it: we are not root. */
static int block_is_thp(int kpageflags_fd, const uint64_t *entries, unsigned pages_per_block)
{
	uint64_t first = entry_pfn(entries[0]);
	uint64_t last = entry_pfn(entries[pages_per_block - 1]);
	if (first == 0 || last != first + pages_per_block - 1 || first % pages_per_block != 0)
		return 0;
	uint64_t flags = page_flags(kpageflags_fd, first);
	return (flags & (1ULL << KPF_THP)) && (flags & (1ULL << KPF_COMPOUND_HEAD));
}

/* mmap does not align to 2 MiB; over-reserve by one block and round up. */
static char *map_aligned_blocks(size_t block_size, size_t nblocks, char **mapping, size_t *mapping_len)
{
	*mapping_len = (nblocks + 1) * block_size;
	*mapping = mmap(NULL, *mapping_len, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (*mapping == MAP_FAILED)
		return NULL;
	char *aligned = (char *)(((uintptr_t)*mapping + block_size - 1) & ~(uintptr_t)(block_size - 1));
	if (madvise(aligned, nblocks * block_size, MADV_HUGEPAGE) != 0) {
		int saved = errno;
		munmap(*mapping, *mapping_len);
		errno = saved;
		return NULL;
	}
	return aligned;
}

int harvester_init(struct harvester *h, size_t block_size, unsigned keep_every, size_t max_blocks,
		   struct pin_set *pins)
{
	memset(h, 0, sizeof(*h));
	h->pins = pins;
	h->page_size = (size_t)sysconf(_SC_PAGESIZE);
	h->block_size = block_size;
	h->pages_per_block = (unsigned)(block_size / h->page_size);
	h->keep_every = keep_every;
	h->kept_per_block = (h->pages_per_block + keep_every - 1) / keep_every;
	h->max_blocks = max_blocks;
	h->pagemap_fd = h->kpageflags_fd = -1;

	struct frame_reader reader;
	if (open_frame_reader(&reader) != 0)
		return -1;
	h->pagemap_fd = reader.pagemap_fd;
	h->kpageflags_fd = reader.kpageflags_fd;
	h->pagemap_buf = malloc(h->pages_per_block * sizeof(uint64_t));
	if (!h->pagemap_buf)
		return -1;
	h->blocks = map_aligned_blocks(block_size, max_blocks, &h->mapping, &h->mapping_len);
	if (!h->blocks)
		return -1;
	/* A child we fork for the wrapped command must not get copies of pinned pages. */
	madvise(h->mapping, h->mapping_len, MADV_DONTFORK);
	return 0;
}

static int grow_frames(uint64_t **frames, size_t *cap, size_t need)
{
	if (need <= *cap)
		return 0;
	size_t grown_cap = *cap ? *cap * 2 : 4096;
	while (grown_cap < need)
		grown_cap *= 2;
	uint64_t *grown = realloc(*frames, grown_cap * sizeof(*grown));
	if (!grown)
		return -1;
	*frames = grown;
	*cap = grown_cap;
	return 0;
}

static int record_block(struct harvester *h, uint64_t first_pfn)
{
	if (grow_frames(&h->kept_pfns, &h->kept_pfns_cap, (h->nblocks + 1) * h->kept_per_block) != 0 ||
	    grow_frames(&h->block_pfns, &h->block_pfns_cap, h->nblocks + 1) != 0)
		return -1;
	h->block_pfns[h->nblocks] = first_pfn;
	uint64_t *slot = h->kept_pfns + h->nblocks * h->kept_per_block;
	for (unsigned k = 0; k < h->kept_per_block; k++)
		slot[k] = first_pfn + (uint64_t)k * h->keep_every;
	return 0;
}

/* Frees the pages between the kept ones. */
static void free_unkept_pages(const struct harvester *h, char *block)
{
	for (unsigned k = 0; k < h->kept_per_block; k++) {
		size_t first = (size_t)k * h->keep_every + 1;
		size_t end = first - 1 + h->keep_every;
		if (end > h->pages_per_block)
			end = h->pages_per_block;
		if (end > first)
			madvise(block + first * h->page_size, (end - first) * h->page_size, MADV_DONTNEED);
	}
}

enum harvest_result harvest_block(struct harvester *h)
{
	if (h->nblocks == h->max_blocks)
		return HARVEST_FULL;
	char *block = h->blocks + h->nblocks * h->block_size;
	*(volatile char *)block = 1; /* the fault: a THP if the kernel has a free block */

	if (read_pagemap(h->pagemap_fd, block, h->page_size, h->pagemap_buf, h->pages_per_block) != 0)
		return HARVEST_ERROR;
	if (!block_is_thp(h->kpageflags_fd, h->pagemap_buf, h->pages_per_block)) {
		madvise(block, h->block_size, MADV_DONTNEED);
		return HARVEST_NO_THP;
	}
	uint64_t first_pfn = entry_pfn(h->pagemap_buf[0]);

	/* Splitting maps zero-filled subpages to the shared zero page and frees
	 * them (Linux >= 6.12); a kept page must hold data to stay where it is. */
	for (unsigned k = 0; k < h->kept_per_block; k++)
		*(volatile char *)(block + (size_t)k * h->keep_every * h->page_size) = 1;
	/* MADV_DONTNEED on part of a THP only queues it for a deferred split and
	 * frees nothing; MADV_COLD on part of it splits it on the spot. */
	madvise(block, h->page_size, MADV_COLD);
	if (page_flags(h->kpageflags_fd, first_pfn) & (1ULL << KPF_THP)) {
		madvise(block, h->block_size, MADV_DONTNEED);
		return HARVEST_NO_SPLIT;
	}

	struct iovec kept[h->kept_per_block];
	for (unsigned k = 0; k < h->kept_per_block; k++) {
		kept[k].iov_base = block + (size_t)k * h->keep_every * h->page_size;
		kept[k].iov_len = h->page_size;
	}
	if (record_block(h, first_pfn) != 0 || pin_pages(h->pins, kept, h->kept_per_block) != 0)
		return HARVEST_ERROR;
	free_unkept_pages(h, block);
	h->nblocks++;
	return HARVEST_OK;
}

void harvester_settle(struct harvester *h)
{
	if (h->nblocks == h->settled_blocks)
		return;
	madvise(h->blocks, h->nblocks * h->block_size, MADV_NOHUGEPAGE);
	h->settled_blocks = h->nblocks;
}

long harvester_count_moved(struct harvester *h)
{
	long moved = 0;
	for (size_t b = 0; b < h->nblocks; b++) {
		char *block = h->blocks + b * h->block_size;
		if (read_pagemap(h->pagemap_fd, block, h->page_size, h->pagemap_buf, h->pages_per_block) != 0)
			return -1;
		uint64_t *recorded = h->kept_pfns + b * h->kept_per_block;
		for (unsigned k = 0; k < h->kept_per_block; k++) {
			uint64_t now = entry_pfn(h->pagemap_buf[(size_t)k * h->keep_every]);
			if (now != recorded[k]) {
				moved++;
				recorded[k] = now;
			}
		}
	}
	return moved;
}

size_t harvester_pinned_bytes(const struct harvester *h)
{
	return pin_set_count(h->pins) * h->page_size;
}

void harvester_release(struct harvester *h)
{
	/* Unpin first: a page still pinned outlives its unmapping. */
	pin_set_release(h->pins);
	h->pins = NULL;
	if (h->blocks)
		munmap(h->mapping, h->mapping_len);
	h->blocks = NULL;
	if (h->pagemap_fd >= 0)
		close(h->pagemap_fd);
	if (h->kpageflags_fd >= 0)
		close(h->kpageflags_fd);
	free(h->kept_pfns);
	free(h->pagemap_buf);
	h->kept_pfns = NULL;
	h->pagemap_buf = NULL;
}

long probe_thp_faults(size_t block_size, unsigned nfaults)
{
	size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
	unsigned pages_per_block = (unsigned)(block_size / page_size);
	struct frame_reader reader;
	if (open_frame_reader(&reader) != 0)
		return -1;
	uint64_t *entries = malloc(pages_per_block * sizeof(uint64_t));
	char *mapping;
	size_t mapping_len;
	char *blocks = entries ? map_aligned_blocks(block_size, nfaults, &mapping, &mapping_len) : NULL;
	long thp = -1;
	if (blocks) {
		thp = 0;
		for (unsigned i = 0; i < nfaults; i++) {
			char *block = blocks + (size_t)i * block_size;
			*(volatile char *)block = 1;
			if (read_pagemap(reader.pagemap_fd, block, page_size, entries, pages_per_block) != 0) {
				thp = -1;
				break;
			}
			thp += block_is_thp(reader.kpageflags_fd, entries, pages_per_block);
		}
		int saved = errno;
		munmap(mapping, mapping_len);
		errno = saved;
	}
	free(entries);
	close_frame_reader(&reader);
	return thp;
}

long count_unmapped_blocks(const uint64_t *block_pfns, size_t n, unsigned pages_per_block)
{
	int fd = open("/proc/kpagecount", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	uint64_t *counts = malloc(pages_per_block * sizeof(uint64_t));
	long unmapped = counts ? 0 : -1;
	for (size_t b = 0; counts && b < n; b++) {
		ssize_t want = (ssize_t)(pages_per_block * sizeof(uint64_t));
		if (pread(fd, counts, (size_t)want, (off_t)(block_pfns[b] * sizeof(uint64_t))) != want) {
			unmapped = -1;
			break;
		}
		unsigned mapped = 0;
		for (unsigned i = 0; i < pages_per_block; i++)
			mapped += counts[i] != 0;
		unmapped += mapped == 0;
	}
	int saved = errno;
	free(counts);
	close(fd);
	errno = saved;
	return unmapped;
}
