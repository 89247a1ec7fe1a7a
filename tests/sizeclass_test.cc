// Size classes: coverage, monotonicity, the waste bound, the alignment
// property that aligned allocation relies on, and the fast path's direct slots.
#include <gtest/gtest.h>

#include <vector>

extern "C" {
#include "arena/mv_sizeclass.h"
}

TEST(SizeClass, EverySizeFitsItsBin) {
  for (size_t size = 0; size <= MV_SMALL_MAX; size++) {
    unsigned bin = mv_bin_of(size);
    ASSERT_GE(bin, 1u);
    ASSERT_LT(bin, (unsigned)MV_BINS);
    ASSERT_GE(mv_bin_size(bin), size == 0 ? 1 : size) << size;
    if (bin > 1) ASSERT_LT(mv_bin_size(bin - 1), size) << "not the smallest bin for " << size;
  }
  EXPECT_EQ(mv_bin_size(MV_BINS - 1), MV_SMALL_MAX);
}

TEST(SizeClass, SizesGrowAndAreAligned) {
  for (unsigned bin = 1; bin < MV_BINS; bin++) {
    EXPECT_EQ(mv_bin_size(bin) % MV_ALIGN, 0u) << bin;
    if (bin > 1) EXPECT_GT(mv_bin_size(bin), mv_bin_size(bin - 1));
    EXPECT_EQ(mv_bin_of(mv_bin_size(bin)), bin);
  }
}

TEST(SizeClass, WasteIsBoundedBeyondTheGranule) {
  // Less than 1/8 of the request, or less than the 16-byte granule.
  for (size_t size = 1; size <= MV_SMALL_MAX; size++) {
    size_t waste = mv_bin_size(mv_bin_of(size)) - size;
    ASSERT_TRUE(waste < MV_ALIGN || waste * 8 <= size) << size << " wastes " << waste;
  }
}

TEST(SizeClass, MultiplesOfAnAlignmentLandOnAlignedBins) {
  for (size_t align = 32; align <= MV_SLICE_SIZE; align *= 2)
    for (size_t size = align; size <= MV_SMALL_MAX; size += align)
      ASSERT_EQ(mv_bin_size(mv_bin_of(size)) % align, 0u) << size << " align " << align;
}

TEST(SizeClass, PagesHoldAtLeastEightBlocks) {
  for (unsigned bin = 1; bin < MV_BINS; bin++) {
    size_t page = (size_t)mv_bin_slices(bin) * MV_SLICE_SIZE;
    EXPECT_GE(page / mv_bin_size(bin), 8u) << bin;
    EXPECT_LE(mv_bin_slices(bin), (unsigned)MV_PAGE_MAX_SLICES);
  }
}

// malloc's fast path finds a size's page through its direct slot: each slot up
// to MV_DIRECT_MAX must belong to exactly one bin, the one mv_bin_of gives for
// every size in it.
TEST(SizeClass, EveryDirectSlotBelongsToTheBinOfItsSizes) {
  std::vector<unsigned> owner(MV_DIRECT_SLOTS, 0);
  for (unsigned bin = 1; mv_bin_size(bin) <= MV_DIRECT_MAX; bin++)
    for (size_t s = mv_bin_first_slot(bin); s <= mv_direct_slot(mv_bin_size(bin)); s++) {
      ASSERT_LT(s, (size_t)MV_DIRECT_SLOTS);
      ASSERT_EQ(owner[s], 0u) << "slot " << s << " in bins " << owner[s] << " and " << bin;
      owner[s] = bin;
    }
  for (size_t size = 0; size <= MV_DIRECT_MAX; size++)
    ASSERT_EQ(owner[mv_direct_slot(size)], mv_bin_of(size)) << size;
}
