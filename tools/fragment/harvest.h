/* Harvesting free THP-sized blocks of physical memory and breaking each one up.
 *
 * Filling memory with 4 KiB pages and freeing every other one does not reach
 * every free 2 MiB block: the buddy allocator hands out the smallest free
 * blocks first, so once holes exist, new 4 KiB faults refill the holes and the
 * intact blocks left over stay intact. Faulting *THPs* instead takes only
 * intact blocks (the kernel compacts, reclaims and, on kernels that initialise
 * memory lazily, grows the zone to make them), so one pass reaches all of them:
 *   fault a 2 MiB MADV_HUGEPAGE block -> check it really is one THP ->
 *   split it (MADV_COLD on one page splits an exclusively mapped THP now) ->
 *   pin 1 of every keep_every pages -> MADV_DONTNEED the rest.
 * The freed pages go back to the buddy allocator as blocks of order < 9 around
 * the pins, so the block cannot merge back into a 2 MiB page until unpinned.
 * Only the pins stay allocated: 4 KiB per 2 MiB with keep_every = 512. */
#ifndef FRAGMENT_HARVEST_H
#define FRAGMENT_HARVEST_H

#include <stddef.h>
#include <stdint.h>

#include "pin.h"

struct harvester {
	size_t page_size;
	size_t block_size;
	unsigned pages_per_block;
	unsigned keep_every;     /* pages kept at offsets 0, keep_every, 2*keep_every, ... */
	unsigned kept_per_block;
	char *mapping;           /* the raw reservation, for munmap */
	size_t mapping_len;
	char *blocks;            /* block-aligned start of the reservation */
	size_t max_blocks;
	size_t nblocks;          /* harvested: blocks[0, nblocks) */
	size_t settled_blocks;   /* blocks already marked MADV_NOHUGEPAGE */
	uint64_t *kept_pfns;     /* nblocks * kept_per_block, to see whether compaction moved any */
	size_t kept_pfns_cap;
	uint64_t *block_pfns;    /* first frame of each harvested block */
	size_t block_pfns_cap;
	uint64_t *pagemap_buf;   /* one block's pagemap entries */
	int pagemap_fd;
	int kpageflags_fd;
	struct pin_set *pins;
};

enum harvest_result {
	HARVEST_OK,
	HARVEST_NO_THP,      /* the fault fell back to small pages; block given back */
	HARVEST_NO_SPLIT,    /* got a THP but could not split it; block given back */
	HARVEST_FULL,        /* the reservation is used up */
	HARVEST_ERROR,       /* errno set */
};

/* Reserves address space for max_blocks blocks. Takes ownership of pins.
 * 0, or -1 with errno. */
int harvester_init(struct harvester *h, size_t block_size, unsigned keep_every, size_t max_blocks,
		   struct pin_set *pins);

enum harvest_result harvest_block(struct harvester *h);

/* Marks the harvested blocks MADV_NOHUGEPAGE so khugepaged does not waste free
 * blocks trying to collapse them (it would fail on the pins anyway). */
void harvester_settle(struct harvester *h);

/* How many kept pages no longer sit at the frame they were pinned at; the
 * recorded frames are updated. -1 with errno if pagemap cannot be read. */
long harvester_count_moved(struct harvester *h);

size_t harvester_pinned_bytes(const struct harvester *h);

/* Unpins, frees every page and the reservation. block_pfns stays, for
 * count_unmapped_blocks; free() it when done. */
void harvester_release(struct harvester *h);

/* Of n blocks (first frames), how many have no page mapped by any process
 * (every /proc/kpagecount entry 0). Pages the kernel uses unmapped (slab,
 * page tables) do not count, so this is an upper bound on whole free blocks.
 * -1 with errno. */
long count_unmapped_blocks(const uint64_t *block_pfns, size_t n, unsigned pages_per_block);

/* Faults nfaults fresh MADV_HUGEPAGE blocks, counts how many came back as one
 * PMD-sized THP, frees them all. Needs root (pagemap frames, kpageflags).
 * Returns the count, or -1 with errno. */
long probe_thp_faults(size_t block_size, unsigned nfaults);

#endif
