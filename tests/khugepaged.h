// khugepaged may collapse a test's 4 KiB pages into a huge page at any moment:
// with max_ptes_none at its default it fills the holes too. A test that
// expects an arena to still be made of small pages (nothing moved it) uses a
// KhugepagedWatch started before the arena was built: a huge page is excused
// only when khugepaged collapsed something meanwhile. Its counter
// (khugepaged/pages_collapsed) is system-wide but counts khugepaged alone, not
// MADV_COLLAPSE, so moves by the engine or the collapse backend never excuse.
#ifndef MV_TESTS_KHUGEPAGED_H
#define MV_TESTS_KHUGEPAGED_H

#include <gtest/gtest.h>
#include <stdint.h>
#include <stdio.h>

extern "C" {
#include "compactor/mv_backend.h"
}

namespace mvtest {

// Pages khugepaged has collapsed since boot, or -1 if unreadable.
inline long KhugepagedCollapsed() {
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed", "r");
  long n = -1;
  if (f) {
    if (fscanf(f, "%ld", &n) != 1) n = -1;
    fclose(f);
  }
  return n;
}

class KhugepagedWatch {
 public:
  KhugepagedWatch() : before_(KhugepagedCollapsed()) {}

  // Has khugepaged collapsed anything since the watch began?
  bool Collapsed() const { return before_ >= 0 && KhugepagedCollapsed() > before_; }

  // How many of the n arenas from `start` a compaction should move now: all,
  // but those khugepaged made huge meanwhile (the engine skips a huge arena).
  int ToMove(uintptr_t start, size_t n) const {
    int moves = 0;
    for (size_t i = 0; i < n; i++)
      moves += !(mv_thp_is_huge(start + i * MV_ARENA_SIZE) == 1 && Collapsed());
    return moves;
  }

  // Success if the arena at `start` is of small pages, or huge while
  // khugepaged collapsed something since the watch began.
  testing::AssertionResult Small(uintptr_t start) const {
    int huge = mv_thp_is_huge(start);
    if (huge == 0) return testing::AssertionSuccess();
    if (huge == 1 && Collapsed()) {
      printf("[ info     ] arena %#lx is huge: khugepaged collapsed pages meanwhile\n",
             (unsigned long)start);
      return testing::AssertionSuccess();
    }
    return testing::AssertionFailure()
           << "arena " << (void *)start << ": mv_thp_is_huge " << huge
           << ", and khugepaged collapsed nothing meanwhile";
  }

 private:
  long before_;
};

}  // namespace mvtest

#endif  // MV_TESTS_KHUGEPAGED_H
