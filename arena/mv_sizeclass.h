/* Size classes. Bins 1..8 are 16..128 bytes in steps of 16; above that, eight
 * bins per doubling, so a block wastes less than 1/8 of its size (plus the
 * 16-byte granule): (2^b, 2^(b+1)] is split in steps of 2^(b-3). Every bin size
 * is a multiple of 16, and a multiple of any power of two a <= size / 8, which
 * is what lets aligned allocation use the same bins (mv_alloc.c). */
#ifndef MV_SIZECLASS_H
#define MV_SIZECLASS_H

#include <stddef.h>
#include <stdint.h>

#include "arena/mv_types.h"

/* Bin for 1 <= size <= MV_SMALL_MAX. */
static inline unsigned mv_bin_of(size_t size) {
  if (size <= 128) return (unsigned)((size + 15) >> 4) + (size == 0);
  size_t w = size - 1;
  unsigned b = 63u - (unsigned)__builtin_clzl(w); /* 2^b <= w < 2^(b+1), b >= 7 */
  return 9 + (b - 7) * 8 + (unsigned)((w >> (b - 3)) & 7);
}

/* The fast path's slot for a size up to MV_DIRECT_MAX: one per 16 bytes, each
 * holding its bin's serving page (mv_heap_t.direct), so that malloc finds the
 * page without mv_bin_of's branch, which random sizes mispredict. Size 0 has
 * slot 0, served by bin 1 as mv_bin_of says. */
static inline size_t mv_direct_slot(size_t size) { return (size + 15) >> 4; }

/* Block size of a bin (1 <= bin < MV_BINS). */
static inline size_t mv_bin_size(unsigned bin) {
  if (bin <= 8) return (size_t)bin << 4;
  unsigned k = (bin - 9) / 8, j = (bin - 9) % 8, b = 7 + k;
  return ((size_t)1 << b) + (size_t)(j + 1) * ((size_t)1 << (b - 3));
}

/* The direct slots of a bin up to MV_DIRECT_MAX are mv_bin_first_slot(bin) to
 * mv_direct_slot(mv_bin_size(bin)): the slots of the sizes it serves. */
static inline size_t mv_bin_first_slot(unsigned bin) {
  return bin == 1 ? 0 : mv_direct_slot(mv_bin_size(bin - 1) + 1);
}

/* Slices in a page of this bin: at least 8 blocks per page, one slice for
 * blocks up to 8 KiB. */
static inline unsigned mv_bin_slices(unsigned bin) {
  size_t want = mv_bin_size(bin) * 8;
  size_t slices = (want + MV_SLICE_SIZE - 1) / MV_SLICE_SIZE;
  return slices > MV_PAGE_MAX_SLICES ? MV_PAGE_MAX_SLICES : (unsigned)slices;
}

#endif /* MV_SIZECLASS_H */
