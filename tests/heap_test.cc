// Thread heaps: threads, cross-thread frees, page counts, sparse pages' purge,
// thread exit, fork (also from a signal handler that interrupted an
// allocation), dlopen/dlclose, signals.
#include <dlfcn.h>
#include <malloc.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_arena.h"
#include "arena/mv_heap.h"
#include "arena/mv_prim.h"
#include "arena/mv_sizeclass.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
}

namespace {

uint64_t InUse() {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  return s.in_use_bytes;
}

TEST(Heap, EachThreadGetsItsOwnHeap) {
  mv_heap_t *main_heap = mv_heap_get();
  mv_heap_t *other = nullptr;
  std::thread([&] { other = mv_heap_get(); }).join();
  EXPECT_NE(main_heap, other);
  EXPECT_NE(other, &mv_heap_empty);
}

TEST(Heap, ExitedThreadsHeapIsAdopted) {
  mv_heap_t *first = nullptr, *second = nullptr;
  std::thread([&] { first = mv_heap_get(); free(malloc(10)); }).join();
  std::thread([&] { second = mv_heap_get(); free(malloc(10)); }).join();
  EXPECT_EQ(first, second);  // the second thread adopted the abandoned heap
}

TEST(Heap, CrossThreadFreesComeBack) {
  // One thread allocates, another frees; the allocating thread then reuses.
  const int n = 20000;
  std::vector<void *> blocks(n);
  std::thread producer([&] {
    for (int i = 0; i < n; i++) blocks[i] = malloc(48);
  });
  producer.join();
  uint64_t before = InUse();
  std::thread consumer([&] {
    for (void *p : blocks) free(p);
  });
  consumer.join();
  // The producer's heap was abandoned: its pages are collected when memory is
  // needed; malloc_trim collects everything now.
  malloc_trim(0);
  EXPECT_LE(InUse() + n * 48, before + 4096);
}

// A free into a page of a live thread's heap leaves the page where it is; once
// that thread has exited, the next free into it takes the page over, and its
// blocks serve the freeing thread's own mallocs.
TEST(Heap, AFreeIntoAnExitedThreadsPageTakesThePageOver) {
  free(malloc(48));  // this thread has a heap: a claim needs somewhere to go
  const int n = 3000;
  std::vector<void *> blocks(n);
  mv_heap_t *theirs = nullptr;
  std::atomic<int> step{0};
  std::thread owner([&] {
    for (int i = 0; i < n; i++) blocks[i] = malloc(48);
    theirs = mv_heap_get();
    step = 1;
    while (step != 2) sched_yield();
  });
  while (step != 1) sched_yield();
  free(blocks[0]);
  EXPECT_EQ(mv_page_owner(mv_page_of(blocks[1])), theirs) << "taken while its thread lived";
  step = 2;
  owner.join();
  mv_page_t *page = mv_page_of(blocks[1]);
  free(blocks[1]);
  EXPECT_EQ(mv_page_owner(page), mv_heap_get());
  // The freed block comes back to this thread before the page's other free
  // blocks run out.
  std::vector<void *> mine;
  bool reused = false;
  for (uint32_t i = 0; i <= page->reserved && !reused; i++) {
    mine.push_back(malloc(48));
    reused = mine.back() == blocks[1];
  }
  EXPECT_TRUE(reused);
  for (void *p : mine) free(p);
  for (int i = 2; i < n; i++) free(blocks[i]);
}

// A block comes out of malloc with its free-list link cleared: freed again
// without having been written, it does not look freed (which would send its
// free down the slow path to walk the page's lists), and the program never
// sees an encoded link.
TEST(Heap, AHandedOutBlockCarriesNoFreeListLink) {
  std::vector<void *> first;
  for (int i = 0; i < 64; i++) first.push_back(malloc(40));
  for (void *p : first) free(p);  // each now holds a link to the next free block
  std::vector<void *> again;
  for (int i = 0; i < 64; i++) again.push_back(malloc(40));
  for (void *p : again) {
    EXPECT_EQ(*(uintptr_t *)p, 0u);
    EXPECT_FALSE(mv_looks_freed((mv_block_t *)p));
  }
  for (void *p : again) free(p);
}

uint32_t ListLength(const mv_block_t *b) {
  uint32_t n = 0;
  for (; b; b = mv_ptr_decode(b->next_enc)) n++;
  return n;
}

// The page's counts against its lists, and the blocks in use (or freed by
// other threads and not yet collected) that the test expects.
void ExpectCountsAgree(const mv_page_t *page, uint32_t in_use, const char *when) {
  EXPECT_EQ(page->local_count, ListLength(page->local_free)) << when;
  uint32_t on_free = ListLength(page->free) + ListLength(page->sample_rest);
  EXPECT_EQ(page->capacity - page->taken - page->aside, on_free) << when;
  EXPECT_EQ(mv_page_in_use(page), in_use) << when;
}

// A page's counts say what its lists hold without walking them: local_count is
// local_free's length, capacity - taken - aside is what free holds, and
// mv_page_in_use counts the blocks in use and those other threads freed.
TEST(Heap, PageCountsAgreeWithItsLists) {
  std::thread([] {
    const size_t size = 2816;  // a class no other test uses
    std::vector<void *> mine;
    for (int i = 0; i < 12; i++) mine.push_back(malloc(size));
    mv_page_t *page = mv_page_of(mine[0]);
    for (void *p : mine) ASSERT_EQ(mv_page_of(p), page);
    ExpectCountsAgree(page, 12, "after the mallocs");
    for (int i = 0; i < 4; i++) free(mine[i]);  // the owner's: local_free
    ExpectCountsAgree(page, 8, "after the owner's frees");
    std::thread([&] {
      for (int i = 4; i < 7; i++) free(mine[i]);  // another thread's: xthread_free
    }).join();
    ExpectCountsAgree(page, 8, "after another thread's frees (they count until collected)");
    while (page->free) mine.push_back(malloc(size));  // the carved blocks run out
    uint32_t in_use = mv_page_in_use(page);
    mine.push_back(malloc(size));  // collects the other thread's frees
    ASSERT_EQ(mv_page_of(mine.back()), page);
    EXPECT_EQ(atomic_load(&page->xthread_free), 0u);
    EXPECT_EQ(page->local_count, 4u) << "the owner's frees wait until the others' run out";
    ExpectCountsAgree(page, in_use - 3 + 1, "after the page collected the other thread's frees");
    for (int i = 0; i < 2; i++) mine.push_back(malloc(size));
    EXPECT_EQ(page->free, nullptr);
    mine.push_back(malloc(size));  // collects the owner's frees
    ASSERT_EQ(mv_page_of(mine.back()), page);
    EXPECT_EQ(page->local_free, nullptr);
    ExpectCountsAgree(page, in_use + 1, "after the page collected the owner's frees");
    for (size_t i = 7; i < mine.size(); i++) free(mine[i]);
  }).join();
}

// malloc's fast path reads a size's page from the heap's direct slot for it:
// through pages filling, going full, emptying and being retired, every slot
// must hold the serving page of the bin of its sizes, so that no size is
// served from another bin's page.
TEST(Heap, EveryDirectSlotHoldsItsBinsServingPage) {
  std::thread([] {
    mv_heap_t *h = mv_heap_get();
    auto expect_slots_agree = [h](const char *when) {
      for (size_t s = 0; s < MV_DIRECT_SLOTS; s++) {
        unsigned bin = mv_bin_of(s * 16);
        mv_page_t *first = h->queues[MV_LIFE_SHORT][bin].first;
        // MOVALLOC_CHECK=1 keeps every slot empty: each malloc arms a canary.
        mv_page_t *serving = first && !mv_options.check ? first : &mv_page_empty;
        ASSERT_EQ(h->direct[s], serving) << "slot " << s << " " << when;
      }
    };
    expect_slots_agree("before any malloc");
    std::vector<void *> mine;
    for (int round = 0; round < 300; round++)
      for (size_t size = 0; size <= MV_DIRECT_MAX; size += 8) {
        void *p = malloc(size);
        if (!mv_options.check)  // which adds room for the canary
          ASSERT_EQ(mv_page_of(p)->block_size, mv_bin_size(mv_bin_of(size))) << size;
        mine.push_back(p);
      }
    expect_slots_agree("after pages filled up");
    for (size_t i = 0; i < mine.size(); i += 2) free(mine[i]);
    expect_slots_agree("after every other block was freed");
    for (size_t i = 1; i < mine.size(); i += 2) free(mine[i]);
    expect_slots_agree("after every block was freed");
  }).join();
}

// Other threads' frees come with their count, so that the owner takes them
// without walking them onto an empty free list. Onto a page with free blocks
// left (here at malloc_trim), it walks them; either way the counts agree.
TEST(Heap, OtherThreadsFreesAreTakenWithTheirCount) {
  std::thread([] {
    const size_t size = 1152;  // a class no other test uses
    std::vector<void *> mine;
    for (int i = 0; i < 6; i++) mine.push_back(malloc(size));
    mv_page_t *page = mv_page_of(mine[0]);
    ASSERT_NE(page->free, nullptr) << "the page has carved blocks left";
    std::thread([&] {
      for (int i = 0; i < 3; i++) free(mine[i]);
    }).join();
    uintptr_t word = atomic_load(&page->xthread_free);
    EXPECT_EQ(mv_xfree_count(word), 3u);
    EXPECT_EQ(mv_xfree_head(word), mine[2]) << "the last freed heads the list";
    malloc_trim(0);  // collects this thread's pages: onto free, past its blocks
    EXPECT_EQ(atomic_load(&page->xthread_free), 0u);
    ExpectCountsAgree(page, 3, "after the other thread's frees were taken");
    for (int i = 3; i < 6; i++) free(mine[i]);
  }).join();
}

// More frees from other threads than the page has blocks in use is a double
// free that got past the checks at free: the owner stops rather than hand the
// same block out twice.
void ForgeOtherThreadsFreesAndCollect() {
  const size_t size = 1280;  // a class no other test uses
  void *a = malloc(size), *b = malloc(size);
  mv_page_t *page = mv_page_of(a);
  std::thread([&] { free(a); }).join();
  uintptr_t word = atomic_load(&page->xthread_free);
  atomic_store(&page->xthread_free, mv_xfree_word(mv_xfree_head(word), 5));
  std::vector<void *> mine{b};
  while (page->free) mine.push_back(malloc(size));
  mine.push_back(malloc(size));  // collects the forged list
  for (void *p : mine) free(p);
}

TEST(HeapDeathTest, MoreFreesFromOtherThreadsThanBlocksInUseAreCaught) {
  EXPECT_DEATH(ForgeOtherThreadsFreesAndCollect(),
               "got more frees from other threads than it handed out");
}

// A page in an isolated arena (the engine is moving it) hands out nothing new
// once its free list runs out: its freed blocks wait, and a page elsewhere
// serves. Back to ACTIVE, it serves again.
TEST(Heap, APageInAnIsolatedArenaWaitsUntilPutback) {
  std::thread([] {
    const size_t size = 2304;  // a class no other test uses
    std::vector<void *> mine{malloc(size)};
    mv_page_t *page = mv_page_of(mine[0]);
    while (page->free) mine.push_back(malloc(size));
    free(mine.back());  // the page's one free block: on its local_free
    mine.pop_back();
    mv_arena_t *arena = mv_arena_of(page->start);
    ASSERT_TRUE(mv_arena_isolate(arena));
    void *elsewhere = malloc(size);
    EXPECT_NE(mv_page_of(elsewhere), page) << "an isolated arena's page handed out a block";
    mv_arena_unisolate(arena, false);
    free(elsewhere);  // its page empties and goes: the isolated one serves again
    void *again = malloc(size);
    EXPECT_EQ(mv_page_of(again), page);
    mine.push_back(again);
    for (void *p : mine) free(p);
  }).join();
}

// A thread that fills pages of one size class, all but the last of which go
// full, then waits (away) until come_back(), when it runs `back` on itself.
class AwayOwner {
 public:
  AwayOwner(size_t size, unsigned full_pages, std::function<void(AwayOwner &)> back)
      : size_(size), thread_([this, full_pages, back] {
          while (pages.size() < full_pages + 1) {
            void *p = malloc(size_);
            memset(p, 0x5a, size_);
            mv_page_t *page = mv_page_of(p);
            if (pages.empty() || pages.back() != page) {
              pages.push_back(page);
              blocks.emplace_back();
            }
            blocks.back().push_back(p);
          }
          filled_.set_value();
          back_.get_future().wait();
          back(*this);
        }) {
    filled_.get_future().wait();
  }
  ~AwayOwner() {
    if (thread_.joinable()) ComeBack();
  }
  void ComeBack() {
    back_.set_value();
    thread_.join();
  }
  // The other threads' part: frees of the first block of each full page (its
  // owner hears of each), then, after `pause`, of all their other blocks.
  void FreeFullPages(std::chrono::nanoseconds pause) {
    for (size_t i = 0; i + 1 < pages.size(); i++) free(blocks[i][0]);
    std::this_thread::sleep_for(pause);
    for (size_t i = 0; i + 1 < pages.size(); i++)
      for (size_t k = 1; k < blocks[i].size(); k++) free(blocks[i][k]);
  }
  bool Resident(const mv_page_t *page) const {
    size_t len = (size_t)page->slice_count << MV_SLICE_SHIFT, resident = 0;
    std::vector<unsigned char> v(len / 4096);
    EXPECT_EQ(mincore((void *)page->start, len, v.data()), 0);
    for (unsigned char c : v) resident += c & 1;
    EXPECT_TRUE(resident == 0 || resident == v.size()) << resident << " of " << v.size();
    return resident != 0;
  }

  size_t size_;
  std::vector<mv_page_t *> pages;          // in the order filled; the last is not full
  std::vector<std::vector<void *>> blocks;  // each page's

 private:
  std::promise<void> filled_, back_;
  std::thread thread_;
};

struct movalloc_stats Stats() {
  struct movalloc_stats s;
  movalloc_stats_get(&s);
  return s;
}

// Other threads free every block of the full pages of an owner that is away
// (it blocks): the frees that empty them give their memory back, which the
// owner would otherwise keep for as long as it is away, even when it has only
// two full pages (a thread about to exit). Back, the owner carves those pages
// anew, without a page more.
TEST(Heap, AnAwayOwnersPagesThatOthersEmptyGoBackToTheKernel) {
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  const size_t size = 3584;  // a class no other test uses
  struct movalloc_stats before = Stats();
  AwayOwner owner(size, 2, [](AwayOwner &o) {
    std::vector<void *> again;
    for (size_t i = 0; i + 1 < o.pages.size(); i++)
      for (size_t k = 0; k < o.blocks[i].size(); k++) again.push_back(malloc(o.size_));
    for (size_t n = 0; n < again.size(); n++) memset(again[n], (int)(n % 251), o.size_);
    std::vector<uint32_t> in_use(o.pages.size(), 0);
    for (void *p : again) {
      auto at = std::find(o.pages.begin(), o.pages.end(), mv_page_of(p));
      ASSERT_NE(at, o.pages.end()) << "a block outside the pages given back";
      in_use[at - o.pages.begin()]++;
    }
    in_use.back() += (uint32_t)o.blocks.back().size();
    for (size_t i = 0; i < o.pages.size(); i++) {
      EXPECT_EQ(atomic_load(&o.pages[i]->xthread_free), 0u) << "page " << i;
      ExpectCountsAgree(o.pages[i], in_use[i], "carved anew");
    }
    for (size_t n = 0; n < again.size(); n++)
      for (size_t k = 0; k < o.size_; k++)
        ASSERT_EQ(((unsigned char *)again[n])[k], n % 251) << "block " << n << " byte " << k;
    for (void *p : again) free(p);
    for (void *p : o.blocks.back()) free(p);
  });
  size_t bytes = 0;
  for (size_t i = 0; i + 1 < owner.pages.size(); i++) {
    const mv_page_t *page = owner.pages[i];
    ASSERT_TRUE(atomic_load(&page->in_full)) << "page " << i;
    ASSERT_EQ(owner.blocks[i].size(), page->reserved) << "page " << i << " is wholly carved";
    ASSERT_TRUE(owner.Resident(page));
    bytes += (size_t)page->slice_count << MV_SLICE_SHIFT;
  }
  owner.FreeFullPages(std::chrono::nanoseconds(2 * MV_AWAY_NS));
  // The first frees told the owner of its pages; those after the pause that
  // empty them find the owner away.
  for (size_t i = 0; i + 1 < owner.pages.size(); i++) {
    const mv_page_t *page = owner.pages[i];
    EXPECT_EQ(atomic_load(&page->xthread_free),
              mv_xfree_mark_word(MV_XFREE_RECLAIMED, page->reserved))
        << "page " << i;
    EXPECT_FALSE(owner.Resident(page)) << "page " << i;
  }
  EXPECT_GE(Stats().purged_bytes - before.purged_bytes, bytes);
  EXPECT_GE(Stats().away_purged_bytes - before.away_purged_bytes, bytes);
  owner.ComeBack();
}

// A second free of a block whose page went back is caught at free (the page's
// mark says every block is free), and changes nothing: the owner, back,
// carves the page anew as if it had not happened.
TEST(Heap, ASecondFreeIntoAPageGivenBackIsCaught) {
  if (mv_options.check) GTEST_SKIP() << "MOVALLOC_CHECK=1 aborts on it (misuse tests)";
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  AwayOwner owner(6144, 2, [](AwayOwner &o) {  // a class no other test uses
    std::vector<void *> again;
    for (size_t i = 0; i < o.blocks[0].size(); i++) again.push_back(malloc(o.size_));
    for (void *p : again) memset(p, 0x33, o.size_);
    for (void *p : again) free(p);
    for (void *p : o.blocks.back()) free(p);
  });
  owner.FreeFullPages(std::chrono::nanoseconds(2 * MV_AWAY_NS));
  const mv_page_t *page = owner.pages[0];
  uintptr_t mark = mv_xfree_mark_word(MV_XFREE_RECLAIMED, page->reserved);
  ASSERT_EQ(atomic_load(&page->xthread_free), mark);
  uint64_t invalid, doubles, doubles_after;
  mv_heap_misuse_counts(&invalid, &doubles);
  free(owner.blocks[0][0]);
  mv_heap_misuse_counts(&invalid, &doubles_after);
  EXPECT_EQ(doubles_after, doubles + 1);
  EXPECT_EQ(atomic_load(&page->xthread_free), mark);
  owner.ComeBack();
}

// An owner that looks at the pages it was told about (at any slow call: here,
// to a new page of another class) is not away: the frees that then empty
// them, while it still runs, leave their memory alone.
TEST(Heap, AnOwnerThatLooksAtItsPagesKeepsTheirMemory) {
  const size_t size = 3072;  // a class no other test uses
  uint64_t away_before = Stats().away_purged_bytes;
  std::promise<void> looked, freed;
  AwayOwner owner(size, 2, [&](AwayOwner &o) {
    std::vector<void *> other{malloc(4608)};  // a class no other test uses
    while (mv_page_of(other.back()) == mv_page_of(other[0])) other.push_back(malloc(4608));
    looked.set_value();
    freed.get_future().wait();
    for (void *p : other) free(p);
    for (void *p : o.blocks.back()) free(p);
  });
  for (size_t i = 0; i + 1 < owner.pages.size(); i++) free(owner.blocks[i][0]);
  std::this_thread::sleep_for(std::chrono::nanoseconds(2 * MV_AWAY_NS));
  std::thread comes_back([&] { owner.ComeBack(); });
  looked.get_future().wait();
  for (size_t i = 0; i + 1 < owner.pages.size(); i++)
    for (size_t k = 1; k < owner.blocks[i].size(); k++) free(owner.blocks[i][k]);
  for (size_t i = 0; i + 1 < owner.pages.size(); i++) {
    const mv_page_t *page = owner.pages[i];
    EXPECT_EQ(mv_xfree_count(atomic_load(&page->xthread_free)), page->reserved) << "page " << i;
    EXPECT_FALSE(mv_xfree_is_mark(atomic_load(&page->xthread_free))) << "page " << i;
    EXPECT_TRUE(owner.Resident(page)) << "page " << i;
  }
  EXPECT_EQ(Stats().away_purged_bytes, away_before);
  freed.set_value();
  comes_back.join();
}

// The counts travel with a page that changes hands: a page of an exited
// thread, taken over by another thread's free, still says what its lists hold.
TEST(Heap, AClaimedPageKeepsItsCounts) {
  free(malloc(48));  // this thread has a heap: a claim needs somewhere to go
  const size_t size = 2560;  // a class no other test uses
  std::vector<void *> theirs;
  std::thread([&] {
    for (int i = 0; i < 12; i++) theirs.push_back(malloc(size));
    for (int i = 0; i < 4; i++) free(theirs[i]);  // its owner's frees
  }).join();
  mv_page_t *page = mv_page_of(theirs[4]);
  for (int i = 5; i < 12; i++) ASSERT_EQ(mv_page_of(theirs[i]), page);
  free(theirs[4]);  // takes the page over
  ASSERT_EQ(mv_page_owner(page), mv_heap_get());
  ExpectCountsAgree(page, 7, "after the claim");
  for (int i = 5; i < 12; i++) free(theirs[i]);
  ASSERT_EQ(mv_page_owner(page), mv_heap_get()) << "kept: its class's only page here";
  ExpectCountsAgree(page, 0, "after the new owner freed the rest");
}

// A page's free blocks serve before the front page carves new ones: carving
// first would touch fresh memory while freed blocks wait, and each size class
// would hold the pages of its own peak (bench/wl_churn: 0.6 MiB more).
TEST(Heap, AFreedBlockIsReusedBeforeNewBlocksAreCarved) {
  std::thread([] {
    const size_t size = 3328;  // a class no other test uses: this heap has no page of it
    std::vector<void *> mine{malloc(size)};
    mv_page_t *first = mv_page_of(mine[0]);
    while (mv_page_of(mine.back()) == first) mine.push_back(malloc(size));
    mv_page_t *second = mv_page_of(mine.back());
    ASSERT_EQ(first->capacity, first->reserved);
    void *freed = mine[0];
    free(freed);
    mine[0] = nullptr;
    while (second->free) mine.push_back(malloc(size));  // its carved blocks, handed out
    ASSERT_LT(second->capacity, second->reserved);
    uint32_t carved = second->capacity;
    void *next = malloc(size);
    EXPECT_EQ(next, freed) << "a new block was carved while a freed one waited";
    EXPECT_EQ(second->capacity, carved);
    free(next);
    for (void *p : mine) free(p);
  }).join();
}

// ---- sparse pages (MOVALLOC_PURGE_SPARSE, default 25%) ----

// Fills one page of a class (sizes here: blocks of 1536 B, 42 to a 64 KiB page,
// most of them across two 4 KiB pages), stamps every block, and frees all but
// the first and the last: 4 KiB pages 1..14 hold freed blocks only.
struct SparsePage {
  size_t size;
  std::vector<void *> blocks;
  mv_page_t *page;

  explicit SparsePage(size_t size_) : size(size_) {
    blocks.push_back(malloc(size));
    page = mv_page_of(blocks[0]);
    while (blocks.size() < page->reserved) blocks.push_back(malloc(size));
    for (size_t i = 0; i < blocks.size(); i++) {
      EXPECT_EQ(mv_page_of(blocks[i]), page);
      memset(blocks[i], (int)(i + 1), size);
    }
    for (size_t i = 1; i + 1 < blocks.size(); i++) free(blocks[i]);
  }
  bool Resident(unsigned os_page) const {
    unsigned char v = 0;
    EXPECT_EQ(mincore((void *)(page->start + ((uintptr_t)os_page << 12)), 4096, &v), 0);
    return v & 1;
  }
  void ExpectSurvivorsIntact() const {
    for (size_t i : {(size_t)0, blocks.size() - 1})
      for (size_t j = 0; j < size; j++)
        ASSERT_EQ(((unsigned char *)blocks[i])[j], (unsigned char)(i + 1)) << i << " " << j;
  }
  // Mallocs until the page has handed out every block again: each comes back
  // once, none from a 4 KiB page still given back.
  void ExpectEveryBlockComesBack() {
    std::vector<void *> again;
    while (mv_page_in_use(page) < page->reserved) {
      void *p = malloc(size);
      if (mv_page_of(p) == page) again.push_back(p);
      else free(p);
      ASSERT_LT(again.size(), page->reserved);
    }
    std::sort(again.begin(), again.end());
    EXPECT_EQ(std::unique(again.begin(), again.end()), again.end()) << "a block handed out twice";
    EXPECT_EQ(again.size(), page->reserved - 2u);
    EXPECT_EQ(page->purged, 0u);
    EXPECT_EQ(page->aside, 0u);
    for (void *p : again) memset(p, 0x5a, size);
    ExpectSurvivorsIntact();
    for (void *p : again) free(p);
  }
  // The 4 KiB pages overlapped by freed blocks only (with 1536-byte blocks,
  // pages 1..14), and how many blocks overlap them (blocks 2..39).
  uint16_t WhollyFree() const {
    uint16_t mask = 0;
    for (unsigned g = 0; g < 16; g++) {
      size_t first = g * 4096 / page->block_size, last = (g * 4096 + 4095) / page->block_size;
      if (first > 0 && last < page->reserved - 1u) mask |= (uint16_t)(1u << g);
    }
    return mask;
  }
  uint32_t BlocksOn(uint16_t mask) const {
    uint32_t n = 0;
    for (uint32_t i = 0; i < page->reserved; i++) {
      size_t g0 = (size_t)i * page->block_size / 4096;
      size_t g1 = ((size_t)i * page->block_size + page->block_size - 1) / 4096;
      bool on = false;
      for (size_t g = g0; g <= g1; g++) on |= (mask >> g) & 1;
      n += on;
    }
    return n;
  }
  // Trims until the wholly free pages are given back: a move of the arena by
  // the compactor at that moment refuses the madvise, those pages come back at
  // once, and the next trim tries again.
  void Trim() const {
    for (int i = 0; i < 20 && page->purged != WhollyFree(); i++) malloc_trim(0);
  }
  ~SparsePage() {
    free(blocks[0]);
    free(blocks.back());
  }
};

// malloc_trim gives back the 4 KiB pages that hold only freed blocks of a page
// mostly free; the blocks on them are set aside, the rest stay free, the
// survivors keep every byte, and every block serves again afterwards.
TEST(Heap, ASparsePageGivesBackItsWhollyFreeOsPages) {
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  std::thread([] {
    SparsePage sp(1536);  // a class no other test uses
    uint16_t wholly_free = sp.WhollyFree();
    ASSERT_NE(wholly_free, 0);
    sp.Trim();
    ASSERT_EQ(sp.page->purged, wholly_free);
    EXPECT_EQ(sp.page->aside, sp.BlocksOn(wholly_free));
    for (unsigned g = 0; g < 16; g++)
      EXPECT_EQ(sp.Resident(g), !((wholly_free >> g) & 1)) << "4 KiB page " << g;
    ExpectCountsAgree(sp.page, 2, "after the purge");
    sp.ExpectSurvivorsIntact();
    sp.ExpectEveryBlockComesBack();
  }).join();
}

// A block set aside reads as zeros, which no freed block's link does: the page
// says which they are, so a second free of one is caught, by another thread
// or by the owner (whose zero-link frees in such a page go the checked way),
// and changes nothing.
TEST(Heap, ASecondFreeOfABlockSetAsideIsCaught) {
  if (mv_options.check) GTEST_SKIP() << "MOVALLOC_CHECK=1 aborts on it (misuse tests)";
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  std::thread([] {
    SparsePage sp(1664);  // a class no other test uses
    sp.Trim();
    ASSERT_EQ(sp.page->purged, sp.WhollyFree());
    uint64_t invalid, doubles, doubles_after;
    mv_heap_misuse_counts(&invalid, &doubles);
    std::thread([&] { free(sp.blocks[sp.blocks.size() / 2]); }).join();
    mv_heap_misuse_counts(&invalid, &doubles_after);
    EXPECT_EQ(doubles_after, doubles + 1) << "another thread's";
    EXPECT_EQ(atomic_load(&sp.page->xthread_free), 0u);
    free(sp.blocks[sp.blocks.size() / 2 + 1]);
    mv_heap_misuse_counts(&invalid, &doubles_after);
    EXPECT_EQ(doubles_after, doubles + 2) << "the owner's";
    ExpectCountsAgree(sp.page, 2, "after the second frees");
    sp.ExpectEveryBlockComesBack();
  }).join();
}

uintptr_t refused_page;
int RefusingMadvise(void *addr, size_t len, int advice) {
  if (((uintptr_t)addr & ~(uintptr_t)0xffff) == refused_page) {
    errno = EAGAIN;
    return -1;
  }
  return mv_prim_real.madvise(addr, len, advice);
}

// 4 KiB pages the kernel refuses to take back stay in use: their blocks go
// back on the free list at once.
TEST(Heap, OsPagesTheKernelRefusesStayInUse) {
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  std::thread([] {
    SparsePage sp(1408);  // a class no other test uses
    struct mv_prim fake = mv_prim_real;
    fake.madvise = RefusingMadvise;
    refused_page = sp.page->start;
    mv_prim_set(&fake);
    malloc_trim(0);
    mv_prim_reset();
    EXPECT_EQ(sp.page->purged, 0u);
    EXPECT_EQ(sp.page->aside, 0u);
    ExpectCountsAgree(sp.page, 2, "after the refusal");
    sp.ExpectEveryBlockComesBack();
  }).join();
}

// Under MOVALLOC_PURGE=always, a heap that takes new pages sweeps its sparse
// ones, without malloc_trim.
TEST(Heap, UnderPurgeAlwaysAGrowingHeapGivesBackItsSparsePages) {
  auto purge = mv_options.purge;
  mv_options.purge = MV_PURGE_ALWAYS;
  std::thread([] {
    SparsePage sp(1920);  // a class no other test uses
    std::vector<void *> growth;
    for (int i = 0; i < 2048 && sp.page->purged == 0; i++) growth.push_back(malloc(3712));
    EXPECT_EQ(sp.page->purged, sp.WhollyFree()) << "4 MiB of new pages and no sweep";
    for (void *p : growth) free(p);
    sp.ExpectSurvivorsIntact();
    sp.ExpectEveryBlockComesBack();
  }).join();
  mv_options.purge = purge;
}

// By default a heap sweeps when the purge rule fires (memory pressure): the
// compactor asks, and each thread sweeps at its next slow call.
TEST(Heap, ASweepRequestReachesTheThreadAtItsNextSlowCall) {
  auto purge = mv_options.purge;
  mv_options.purge = MV_PURGE_PRESSURE;  // the default, whatever the environment says
  std::thread([] {
    SparsePage sp(1792);  // a class no other test uses
    free(malloc(3712));
    std::vector<void *> blocks;
    for (int i = 0; i < 64; i++) blocks.push_back(malloc(3712));  // slow calls, no request
    EXPECT_EQ(sp.page->purged, 0) << "a sweep nobody asked for";
    mv_heap_request_sweep();
    for (int i = 0; i < 64; i++) blocks.push_back(malloc(3712));  // a page used up: slow
    EXPECT_EQ(sp.page->purged, sp.WhollyFree()) << "the request was not heard";
    for (void *p : blocks) free(p);
    sp.ExpectEveryBlockComesBack();
  }).join();
  mv_options.purge = purge;
}

// A full page that got another thread's free but whose notification was lost
// is found anyway by the owner's housekeeping, a few full pages at a time, and
// serves again.
TEST(Heap, HousekeepingFindsAFullPageWhoseNotificationWasLost) {
  const size_t size = 1024;
  void *first = malloc(size);
  mv_page_t *page = mv_page_of(first);
  ASSERT_NE(page, nullptr);
  std::vector<void *> mine{first};
  while (mv_page_of(mine.back()) == page) mine.push_back(malloc(size));
  // The page is used up; the next slow call puts it on the full list.
  for (int i = 0; i < 64 && !atomic_load(&page->in_full); i++) mine.push_back(malloc(size));
  ASSERT_TRUE(atomic_load(&page->in_full));
  atomic_store(&page->notify, 1);  // as if it sat on a stack already: no notification
  std::thread([&] { free(first); }).join();
  mine[0] = nullptr;
  atomic_store(&page->notify, 0);
  ASSERT_NE(atomic_load(&page->xthread_free), 0u);
  // Enough slow calls (a page used up each) for housekeeping to come round.
  bool reused = false;
  for (int i = 0; i < 200000 && !reused; i++) {
    void *p = malloc(size);
    mine.push_back(p);
    reused = p == first;
  }
  EXPECT_TRUE(reused) << "the lost free was never handed out again";
  for (void *p : mine) free(p);
}

TEST(Heap, ThreadExitReturnsMemory) {
  uint64_t before = InUse();
  std::thread([] {
    std::vector<void *> blocks;
    for (int i = 0; i < 10000; i++) blocks.push_back(malloc(200));
    for (void *p : blocks) free(p);
  }).join();
  EXPECT_LE(InUse(), before + 4096);
}

TEST(Heap, ManyThreadsAllocateAndFreeEachOthers) {
  const int threads = 8, per = 20000;
  std::vector<std::atomic<void *>> slots(1024);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++)
    ts.emplace_back([&, t] {
      uint64_t x = t + 1;
      for (int i = 0; i < per; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t size = 8 + x % 2000;
        unsigned char *p = (unsigned char *)malloc(size);
        memset(p, (unsigned char)size, size);
        p[0] = (unsigned char)(size & 0xff);
        *(uint16_t *)(p + 1) = (uint16_t)size;
        void *old = slots[x % slots.size()].exchange(p);
        if (old) {
          unsigned char *o = (unsigned char *)old;
          uint16_t osize = *(uint16_t *)(o + 1);
          for (size_t k = 3; k < osize; k++) ASSERT_EQ(o[k], (unsigned char)osize);
          free(old);
        }
      }
    });
  for (auto &t : ts) t.join();
  for (auto &s : slots) free(s.load());
}

TEST(Heap, ForkInThreadedProgram) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  for (int t = 0; t < 3; t++)
    ts.emplace_back([&] {
      while (!stop) {
        void *p = malloc(100);
        void *q = malloc(5000);
        free(p);
        free(q);
      }
    });
  for (int i = 0; i < 20; i++) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      // The child allocates freely, also from a new thread.
      std::vector<void *> blocks;
      for (int k = 0; k < 1000; k++) blocks.push_back(malloc(k * 10 + 1));
      for (void *p : blocks) free(p);
      std::thread([] { free(malloc(123)); }).join();
      _exit(0);
    }
    int status;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  stop = true;
  for (auto &t : ts) t.join();
}

std::atomic<int> forks_from_handler{0};

void ForkingHandler(int) {
  pid_t pid = fork();
  if (pid == 0) _exit(0);
  if (pid > 0) {
    int status;
    waitpid(pid, &status, 0);
    forks_from_handler++;
  }
}

TEST(Heap, ForkFromSignalHandlerThatInterruptedAnAllocation) {
  struct sigaction sa = {};
  sa.sa_handler = ForkingHandler;
  sa.sa_flags = SA_RESTART;
  ASSERT_EQ(sigaction(SIGALRM, &sa, nullptr), 0);
  // Every 2 ms (a fork takes about a millisecond here): the loop below spends
  // most of its time in malloc and free, so most signals land inside them.
  struct itimerval every = {{0, 2000}, {0, 2000}};
  setitimer(ITIMER_REAL, &every, nullptr);
  uint64_t deadline = mv_os_now_ns() + 3000000000ull;
  while (forks_from_handler < 50 && mv_os_now_ns() < deadline) {
    void *big = malloc((size_t)3 << 20);  // slow path: takes the arena lock
    void *small = malloc(64);
    free(big);
    free(small);
  }
  struct itimerval off = {};
  setitimer(ITIMER_REAL, &off, nullptr);
  signal(SIGALRM, SIG_DFL);
  EXPECT_GE(forks_from_handler.load(), 50);
}

TEST(Heap, DlopenDlcloseOfAllocatingLibrary) {
  std::string path = std::string(getenv("TEST_SRCDIR") ? getenv("TEST_SRCDIR") : ".") +
                     "/movalloc/tests/libdlopen_victim.so";
  for (int round = 0; round < 5; round++) {
    void *lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(lib, nullptr) << dlerror();
    auto dup = (char *(*)(const char *))dlsym(lib, "victim_strdup");
    auto sum = (int (*)(void))dlsym(lib, "victim_sum");
    ASSERT_NE(dup, nullptr);
    char *s = dup("hello from a dlopened library");
    EXPECT_TRUE(mv_owns(s));
    EXPECT_STREQ(s, "hello from a dlopened library");
    EXPECT_EQ(sum(), 700000);
    ASSERT_EQ(dlclose(lib), 0);
    free(s);  // outlives the library that allocated it
  }
}

std::atomic<long> handler_allocs{0};

void AllocatingHandler(int) {
  // Not async-signal-safe by POSIX, but real programs do it; it must work when
  // the signal did not interrupt an allocation in this thread.
  handler_allocs++;
}

TEST(Heap, SignalsDuringAllocationDoNotCorrupt) {
  struct sigaction sa = {};
  sa.sa_handler = AllocatingHandler;
  sa.sa_flags = SA_RESTART;
  ASSERT_EQ(sigaction(SIGUSR1, &sa, nullptr), 0);
  std::atomic<bool> stop{false};
  pthread_t target = pthread_self();
  std::thread signaller([&] {
    while (!stop) {
      pthread_kill(target, SIGUSR1);
      usleep(50);
    }
  });
  std::vector<void *> blocks;
  // At least 200,000 allocations, and on until 100 signals have landed among them.
  auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  auto more = [&] { return handler_allocs < 100 && std::chrono::steady_clock::now() < give_up; };
  for (int i = 0; i < 200000 || more(); i++) {
    blocks.push_back(malloc(i % 500 + 1));
    if (blocks.size() > 1000) {
      for (void *p : blocks) free(p);
      blocks.clear();
    }
  }
  stop = true;
  signaller.join();
  for (void *p : blocks) free(p);
  signal(SIGUSR1, SIG_DFL);
  EXPECT_GE(handler_allocs.load(), 100);
}

}  // namespace
