// Several threads allocate random sizes, fill each block with a pattern derived
// from its address, pass blocks between threads (live ones, and ones that have
// exited), and verify every byte before freeing; also while sparse pages give
// their free 4 KiB pages back.
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_alloc.h"
#include "include/movalloc.h"
#include "shim/mv_options.h"
}

namespace {

struct Block {
  unsigned char *p;
  size_t size;
};

unsigned char PatternAt(const unsigned char *base, size_t i) {
  uintptr_t a = (uintptr_t)(base + i);
  return (unsigned char)((a * 2654435761u) >> 13);
}

void Fill(const Block &b) {
  for (size_t i = 0; i < b.size; i++) b.p[i] = PatternAt(b.p, i);
}

size_t Verify(const Block &b) {
  size_t bad = 0;
  for (size_t i = 0; i < b.size; i++) bad += b.p[i] != PatternAt(b.p, i);
  return bad;
}

uint64_t Next(uint64_t *x) {
  *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
  return *x;
}

size_t RandomSize(uint64_t *x) {
  uint64_t r = Next(x) % 1000;
  if (r < 900) return 1 + Next(x) % 512;           // small
  if (r < 990) return 513 + Next(x) % 60000;       // medium
  if (r < 998) return 65536 + Next(x) % 900000;    // large
  return (1 << 20) + Next(x) % (6 << 20);          // huge
}

struct Tally {
  std::atomic<size_t> bad{0}, verified{0};
};

// Checks every byte of b, counts it, frees it.
void Retire(Block *b, Tally *tally) {
  tally->bad += Verify(*b);
  tally->verified++;
  free(b->p);
  delete b;
}

void RetireMailbox(std::vector<std::atomic<Block *>> *mailbox, Tally *tally) {
  for (auto &slot : *mailbox)
    if (Block *b = slot.load()) Retire(b, tally);
}

TEST(Stress, ThreadsPassBlocksAndVerifyEveryByte) {
  const int threads = 6;
  const int ops = 25000;
  std::vector<std::atomic<Block *>> mailbox(512);
  Tally tally;
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++)
    ts.emplace_back([&, t] {
      uint64_t x = 0x9e3779b97f4a7c15ull * (t + 1);
      std::vector<Block *> mine;
      for (int i = 0; i < ops; i++) {
        Block *b = new Block;
        b->size = RandomSize(&x);
        b->p = (unsigned char *)malloc(b->size);
        ASSERT_NE(b->p, nullptr);
        Fill(*b);
        // Keep some (up to 64, then the oldest random one goes), pass the rest
        // to whichever thread picks that mailbox slot next.
        if (Next(&x) % 4 == 0) {
          mine.push_back(b);
          b = nullptr;
          if (mine.size() > 64) {
            size_t k = Next(&x) % mine.size();
            b = mine[k];
            mine[k] = mine.back();
            mine.pop_back();
          }
        } else {
          b = mailbox[Next(&x) % mailbox.size()].exchange(b);
        }
        if (b) {
          tally.bad += Verify(*b);
          tally.verified++;
          if (Next(&x) % 8 == 0) {  // grow it through realloc, then verify again
            size_t old = b->size;
            const unsigned char *old_base = b->p;  // only its address is used
            b->p = (unsigned char *)realloc(b->p, old * 2 + 1);
            ASSERT_NE(b->p, nullptr);
            for (size_t k = 0; k < old; k++) tally.bad += b->p[k] != PatternAt(old_base, k);
            b->size = old * 2 + 1;
            Fill(*b);
          }
          free(b->p);
          delete b;
        }
      }
      for (Block *m : mine) Retire(m, &tally);
    });
  for (auto &t : ts) t.join();
  RetireMailbox(&mailbox, &tally);
  EXPECT_EQ(tally.bad.load(), 0u);
  EXPECT_GT(tally.verified.load(), (size_t)threads * ops / 2);
}

// Rounds of short-lived threads: each takes blocks that threads of earlier
// rounds allocated and have exited since, verifies every byte and frees them
// (the freeing thread takes such a page over: mv_heap.c, page_claim), and
// leaves blocks of its own for the next rounds.
TEST(Stress, ShortLivedThreadsFreeTheBlocksOfThreadsThatExited) {
  const int rounds = 40, threads = 4, ops = 3000;
  std::vector<std::atomic<Block *>> mailbox(2048);
  Tally tally;
  for (int r = 0; r < rounds; r++) {
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++)
      ts.emplace_back([&, r, t] {
        uint64_t x = 0x9e3779b97f4a7c15ull * (r * threads + t + 1);
        for (int i = 0; i < ops; i++) {
          Block *b = new Block;
          b->size = 1 + Next(&x) % 1024;
          b->p = (unsigned char *)malloc(b->size);
          ASSERT_NE(b->p, nullptr);
          Fill(*b);
          if (Block *old = mailbox[Next(&x) % mailbox.size()].exchange(b)) Retire(old, &tally);
        }
      });
    for (auto &t : ts) t.join();
  }
  RetireMailbox(&mailbox, &tally);
  EXPECT_EQ(tally.bad.load(), 0u);
  EXPECT_GT(tally.verified.load(), (size_t)rounds * threads * ops / 2);
}

// Sparse pages given back under load: each thread runs rounds of sizes that
// shift (as bench/wl_fragment), keeps one block in 16 for later rounds through
// the shared mailbox (so other threads free it), frees the rest in random
// order and verifies every byte. Sweeps come from the heaps' growth
// (MOVALLOC_PURGE=always), from requests and from malloc_trim, with every page
// of blocks up to 8 KiB counting as sparse.
TEST(Stress, SparsePagesGoBackWhileThreadsVerifyEveryByte) {
  auto purge = mv_options.purge;
  unsigned sparse = mv_options.purge_sparse;
  mv_options.purge = MV_PURGE_ALWAYS;
  mv_options.purge_sparse = 100;
  struct movalloc_stats s0, s1;
  movalloc_stats_get(&s0);
  const int threads = 4, rounds = 24, per_round = 4000;
  std::vector<std::atomic<Block *>> mailbox(4096);
  Tally tally;
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++)
    ts.emplace_back([&, t] {
      uint64_t x = 0x9e3779b97f4a7c15ull * (t + 1);
      std::vector<Block *> round;
      for (int r = 0; r < rounds; r++) {
        size_t lo = (size_t)16 << (r % 4), hi = (size_t)512 << (r % 4);
        for (int i = 0; i < per_round; i++) {
          Block *b = new Block;
          b->size = lo + Next(&x) % (hi - lo);
          b->p = (unsigned char *)malloc(b->size);
          ASSERT_NE(b->p, nullptr);
          Fill(*b);
          if (Next(&x) % 16 != 0) round.push_back(b);
          else if (Block *old = mailbox[Next(&x) % mailbox.size()].exchange(b))
            Retire(old, &tally);
        }
        for (size_t i = round.size(); i > 1; i--) std::swap(round[i - 1], round[Next(&x) % i]);
        for (Block *b : round) Retire(b, &tally);
        round.clear();
        if (r % 6 == 5) mv_heap_request_sweep();
        if (r % 8 == 7) malloc_trim(0);
      }
    });
  for (auto &t : ts) t.join();
  RetireMailbox(&mailbox, &tally);
  movalloc_stats_get(&s1);
  mv_options.purge = purge;
  mv_options.purge_sparse = sparse;
  EXPECT_EQ(tally.bad.load(), 0u);
  EXPECT_EQ(tally.verified.load(), (size_t)threads * rounds * per_round);
  EXPECT_GT(s1.purged_bytes, s0.purged_bytes) << "nothing given back: nothing tested";
}

// Owners hand most of what they allocate to other threads and then stay away
// (blocked) for a while, or come back at once: the pages the other threads
// empty meanwhile go back to the kernel (arena/mv_heap.c, page_reclaim), while
// owners that come back mid-way race with that, allocating into the same pages
// and checking the blocks they kept. Every byte is checked before each free.
TEST(Stress, AnAwayOwnersPagesGoBackWhileEveryByteIsVerified) {
  if (mv_options.purge == MV_PURGE_NEVER) GTEST_SKIP() << "MOVALLOC_PURGE=never keeps them";
  struct movalloc_stats s0, s1;
  movalloc_stats_get(&s0);
  const int owners = 2, freers = 2, rounds = 30, per_round = 6000;
  std::mutex lock;
  std::condition_variable more;
  std::vector<std::vector<Block *>> handed;  // batches for the freers
  int owners_left = owners;
  Tally tally;
  std::atomic<size_t> allocated{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < freers; t++)
    ts.emplace_back([&, t] {
      uint64_t x = 0x243f6a8885a308d3ull * (t + 1);
      for (;;) {
        std::vector<Block *> batch;
        {
          std::unique_lock<std::mutex> g(lock);
          more.wait(g, [&] { return !handed.empty() || owners_left == 0; });
          if (handed.empty()) return;
          batch = std::move(handed.back());
          handed.pop_back();
        }
        for (size_t i = batch.size(); i > 1; i--) std::swap(batch[i - 1], batch[Next(&x) % i]);
        for (size_t i = 0; i < batch.size(); i++) {
          // Half, a pause past MV_AWAY_NS, the rest: an away owner's pages
          // empty after it counts as away.
          if (i == batch.size() / 2) std::this_thread::sleep_for(std::chrono::milliseconds(3));
          Retire(batch[i], &tally);
        }
      }
    });
  for (int t = 0; t < owners; t++)
    ts.emplace_back([&, t] {
      uint64_t x = 0x9e3779b97f4a7c15ull * (t + 1);
      std::vector<Block *> kept;  // in classes of their own: handed pages can empty
      auto alloc = [&](size_t lo, size_t hi) {
        Block *b = new Block;
        b->size = lo + Next(&x) % (hi - lo);
        b->p = (unsigned char *)malloc(b->size);
        Fill(*b);
        allocated++;
        return b;
      };
      for (int r = 0; r < rounds; r++) {
        std::vector<Block *> batch;
        for (int i = 0; i < per_round; i++) batch.push_back(alloc(512, 1024));
        for (int i = 0; i < 8; i++) kept.push_back(alloc(1100, 2000));
        {
          std::lock_guard<std::mutex> g(lock);
          handed.push_back(std::move(batch));
        }
        more.notify_one();
        // Away for 0-6 ms: long enough for the freers' pause, or back mid-way.
        std::this_thread::sleep_for(std::chrono::microseconds(Next(&x) % 6000));
        for (size_t i = 0; i < kept.size(); i++)
          if (Next(&x) % 4 == 0) {
            Retire(kept[i], &tally);
            kept[i] = kept.back();
            kept.pop_back();
          }
      }
      for (Block *b : kept) Retire(b, &tally);
      std::lock_guard<std::mutex> g(lock);
      if (--owners_left == 0) more.notify_all();
    });
  for (auto &t : ts) t.join();
  movalloc_stats_get(&s1);
  EXPECT_EQ(tally.bad.load(), 0u);
  EXPECT_EQ(tally.verified.load(), allocated.load());
  EXPECT_GT(s1.away_purged_bytes, s0.away_purged_bytes) << "nothing given back: nothing tested";
}

}  // namespace
