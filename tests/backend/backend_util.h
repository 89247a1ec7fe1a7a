// Shared by the backend tests: aligned regions of 4 KiB pages with an
// address-derived pattern, a writer thread that counts its own increments, the
// engine's call sequence, VMA counting.
#ifndef MV_TESTS_BACKEND_UTIL_H
#define MV_TESTS_BACKEND_UTIL_H

#include <errno.h>
#include <gtest/gtest.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "arena/mv_prim.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"
}
#include "tests/khugepaged.h"

namespace mvtest {

constexpr size_t kArena = MV_ARENA_SIZE;
constexpr size_t kPage = 4096;
constexpr size_t kPages = kArena / kPage;

// Page i of an arena: touched with the pattern unless i % 4 == 3 (a hole).
inline bool IsHole(size_t page) { return page % 4 == 3; }

inline uint64_t Pattern(uintptr_t addr) { return addr * 0x9E3779B97F4A7C15ull ^ 0x5a5a5a5a; }

// Counters the writer increments: a word in four touched pages, and a word in
// every hole (it stays a hole until the writer first writes it).
constexpr size_t kTouchedCounterPages[] = {1, 2, 5, 6};
constexpr size_t kTouchedCounterWord = 8;  // byte offset 64
constexpr size_t kHoleCounterWord = 16;    // byte offset 128

// n arenas, 2 MiB aligned, one VMA, built from 4 KiB pages: MADV_NOHUGEPAGE
// before the pattern is written, then MADV_HUGEPAGE (allowed to become huge).
class Region {
 public:
  explicit Region(size_t n) : n_(n) {
    base_ = static_cast<char *>(mv_thp_map_aligned(n * kArena));
    EXPECT_NE(base_, nullptr);
    EXPECT_EQ(madvise(base_, n * kArena, MADV_NOHUGEPAGE), 0);
    for (size_t a = 0; a < n; a++) Fill(a);
    EXPECT_EQ(madvise(base_, n * kArena, MADV_HUGEPAGE), 0);
  }
  ~Region() {
    if (base_) munmap(base_, n_ * kArena);
  }
  Region(const Region &) = delete;
  Region &operator=(const Region &) = delete;

  char *arena(size_t a) const { return base_ + a * kArena; }
  uintptr_t start(size_t a) const { return reinterpret_cast<uintptr_t>(arena(a)); }
  size_t size() const { return n_; }
  char *base() const { return base_; }

  void Fill(size_t a) {
    for (size_t p = 0; p < kPages; p++) {
      if (IsHole(p)) continue;
      uint64_t *w = reinterpret_cast<uint64_t *>(arena(a) + p * kPage);
      for (size_t i = 0; i < kPage / 8; i++) w[i] = Pattern(reinterpret_cast<uintptr_t>(&w[i]));
    }
    for (size_t k = 0; k < 4; k++) *TouchedCounter(a, k) = 0;
  }

  // Every byte as the pattern says, counters excepted (checked separately).
  // Returns the number of wrong words and describes the first.
  size_t Verify(size_t a, std::string *first = nullptr) const {
    size_t bad = 0;
    for (size_t p = 0; p < kPages; p++) {
      const uint64_t *w = reinterpret_cast<const uint64_t *>(arena(a) + p * kPage);
      bool counter_page = false;
      for (size_t c : kTouchedCounterPages) counter_page |= c == p;
      for (size_t i = 0; i < kPage / 8; i++) {
        uint64_t want;
        if (IsHole(p)) {
          if (i == kHoleCounterWord / 8) continue;
          want = 0;
        } else {
          if (counter_page && i == kTouchedCounterWord / 8) continue;
          want = Pattern(reinterpret_cast<uintptr_t>(&w[i]));
        }
        if (w[i] != want) {
          if (!bad++ && first) {
            char buf[128];
            snprintf(buf, sizeof buf, "arena %zu page %zu word %zu: %#llx, want %#llx", a, p, i,
                     (unsigned long long)w[i], (unsigned long long)want);
            *first = buf;
          }
        }
      }
    }
    return bad;
  }

  volatile uint64_t *TouchedCounter(size_t a, size_t k) const {
    return reinterpret_cast<volatile uint64_t *>(arena(a) + kTouchedCounterPages[k] * kPage +
                                                 kTouchedCounterWord);
  }
  volatile uint64_t *HoleCounter(size_t a, size_t hole) const {
    return reinterpret_cast<volatile uint64_t *>(arena(a) + (4 * hole + 3) * kPage +
                                                 kHoleCounterWord);
  }

 private:
  size_t n_;
  char *base_;
};

// Two threads writing a region. One increments counters in touched pages as
// fast as it can; the other, told by the mover (NextHole), writes a
// never-touched page for the first time, once per command, so that this first
// write can be made to happen inside a hold. Both remember what they wrote:
// any difference afterwards is a lost write.
class Writer {
 public:
  explicit Writer(const Region &r)
      : r_(r), touched_(r.size() * 4), holes_(r.size() * (kPages / 4)) {
    hammer_ = std::thread([this] { Hammer(); });
    hole_writer_ = std::thread([this] { WriteHoles(); });
  }
  ~Writer() { Stop(); }

  void Stop() {
    stop_.store(true);
    if (hammer_.joinable()) hammer_.join();
    if (hole_writer_.joinable()) hole_writer_.join();
  }
  uint64_t iterations() const { return iters_.load(std::memory_order_relaxed); }

  // Has hole h of arena a (0 <= h < 128) written once, and waits until the
  // hole writer is about to: inside a hold, that write is then held.
  // Returns the command's number, for HoleWriteDone().
  uint64_t NextHole(size_t a, size_t h) {
    size_t want = a * (kPages / 4) + h;
    uint64_t n = commands_.load() + 1;
    next_hole_.store(want);
    commands_.store(n);
    for (int i = 0; i < 100000 && taken_.load() != n; i++)
      std::this_thread::sleep_for(std::chrono::microseconds(10));
    EXPECT_EQ(taken_.load(), n) << "the hole writer did not get there";
    return n;
  }
  bool HoleWriteDone(uint64_t n) const { return completed_.load() >= n; }

  // Before the next hold: waits until the last hole write has landed (a write
  // released by one hold must not be caught again by the next).
  void Settle() {
    for (int i = 0; i < 100000 && completed_.load() != commands_.load(); i++)
      std::this_thread::sleep_for(std::chrono::microseconds(10));
    EXPECT_EQ(completed_.load(), commands_.load()) << "a hole write never landed";
  }

  // After Stop(): every counter holds exactly the increments made.
  size_t CountLost(std::string *first = nullptr) const {
    size_t lost = 0;
    for (size_t a = 0; a < r_.size(); a++) {
      for (size_t k = 0; k < 4; k++)
        if (*r_.TouchedCounter(a, k) != touched_[a * 4 + k] && !lost++ && first)
          *first = "touched counter " + std::to_string(k) + " of arena " + std::to_string(a) +
                   ": " + std::to_string(*r_.TouchedCounter(a, k)) + " != " +
                   std::to_string(touched_[a * 4 + k]);
      for (size_t h = 0; h < kPages / 4; h++)
        if (*r_.HoleCounter(a, h) != holes_[a * (kPages / 4) + h] && !lost++ && first)
          *first = "hole counter " + std::to_string(h) + " of arena " + std::to_string(a) +
                   ": " + std::to_string(*r_.HoleCounter(a, h)) + " != " +
                   std::to_string(holes_[a * (kPages / 4) + h]);
    }
    return lost;
  }
  size_t holes_written() const {
    size_t n = 0;
    for (uint64_t v : holes_) n += v != 0;
    return n;
  }

 private:
  void Hammer() {
    for (uint64_t it = 1; !stop_.load(std::memory_order_relaxed); it++) {
      for (size_t a = 0; a < r_.size(); a++)
        for (size_t k = 0; k < 4; k++) {
          *r_.TouchedCounter(a, k) += 1;
          touched_[a * 4 + k]++;
        }
      iters_.store(it, std::memory_order_relaxed);
    }
  }
  void WriteHoles() {
    for (uint64_t done = 0; !stop_.load();) {
      uint64_t n = commands_.load();
      if (n == done) {
        std::this_thread::yield();
        continue;
      }
      size_t h = next_hole_.load();
      taken_.store(n);
      *r_.HoleCounter(h / (kPages / 4), h % (kPages / 4)) += 1;
      holes_[h]++;
      done = n;
      completed_.store(n);
    }
  }

  const Region &r_;
  std::vector<uint64_t> touched_, holes_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> iters_{0}, commands_{0}, taken_{0}, completed_{0};
  std::atomic<size_t> next_hole_{0};
  std::thread hammer_, hole_writer_;
};

// True when the writer makes progress within a second (it is not held).
inline bool WriterRuns(const Writer &w) {
  uint64_t before = w.iterations();
  for (int i = 0; i < 1000; i++) {
    if (w.iterations() != before) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

struct Timing {
  uint64_t n = 0, stage = 0, hold = 0, copy = 0, swap = 0, window = 0;
  void Add(const mv_move &m, uint64_t window_ns) {
    n++, stage += m.stage_ns, hold += m.hold_ns, copy += m.copy_ns, swap += m.swap_ns;
    window += window_ns;
  }
  void Print(const char *what) const {
    if (!n) return;
    printf("[ timing   ] %-28s n=%-4llu stage %6.1f us  hold %6.1f us  copy %6.1f us  swap %6.1f "
           "us  window %7.1f us\n",
           what, (unsigned long long)n, stage / 1e3 / n, hold / 1e3 / n, copy / 1e3 / n,
           swap / 1e3 / n, window / 1e3 / n);
  }
};

// What the engine does for one arena. Returns the first failure (the step's
// -errno) or 0; between_hold_and_move runs while the writers are held.
template <typename F>
int MoveOnce(const mv_backend *b, uintptr_t start, mv_move_step fail_at, Timing *t,
             F between_hold_and_move) {
  mv_move m;
  memset(&m, 0, sizeof m);
  m.start = start;
  m.fail_at = fail_at;
  int rc = b->stage(&m);
  if (rc) {
    EXPECT_EQ(m.staging, nullptr) << "stage failed but left a page";
    return rc;
  }
  uint64_t t0 = mv_os_now_ns();
  rc = b->hold(&m);
  if (rc == 0) {
    EXPECT_TRUE(m.held);
    between_hold_and_move();
    rc = b->move(&m);
    b->release(&m);
    EXPECT_FALSE(m.held);
    if (t && rc == 0) t->Add(m, mv_os_now_ns() - t0);
  }
  b->unstage(&m);
  EXPECT_EQ(m.staging_map, nullptr);
  return rc;
}

inline int MoveOnce(const mv_backend *b, uintptr_t start, mv_move_step fail_at = MV_STEP_NONE,
                    Timing *t = nullptr) {
  return MoveOnce(b, start, fail_at, t, [] {});
}

// -EAGAIN is worth retrying (the engine does, a bounded number of passes, a
// compactor round apart). The pauses grow: under a loaded machine
// MADV_COLLAPSE can refuse (a page in another CPU's LRU batch, no free huge
// page just now) twenty times in a row without one, about 2 s in all with.
inline int MoveRetrying(const mv_backend *b, uintptr_t start, Timing *t = nullptr,
                        int *retries = nullptr) {
  int rc = -EAGAIN;
  for (int i = 0; i < 40 && rc == -EAGAIN; i++) {
    if (i > 0) usleep(2500 * i);
    rc = MoveOnce(b, start, MV_STEP_NONE, t);
    if (rc == -EAGAIN && retries) ++*retries;
  }
  return rc;
}

// What Linux 6.18's UFFDIO_MOVE reports once a step of its PTE path met
// -EAGAIN: later pages move but are not counted, and the call ends with
// EEXIST (nothing counted) or EAGAIN (fewer bytes counted than moved). While
// one of these lives, every UFFDIO_MOVE of more than kMoved pages really moves
// kMoved pages, then reports alternately "EEXIST, 0 bytes" and "EAGAIN, one
// page". The kernel's own answer, when the real move fails, is passed on.
class UncountedMoves {
 public:
  static constexpr size_t kMoved = 3;
  UncountedMoves() {
    faked_ = 0;
    struct mv_prim fake = mv_prim_real;
    fake.ioctl = Ioctl;
    mv_prim_set(&fake);
  }
  ~UncountedMoves() { mv_prim_reset(); }
  UncountedMoves(const UncountedMoves &) = delete;
  UncountedMoves &operator=(const UncountedMoves &) = delete;
  static unsigned faked() { return faked_.load(); }

 private:
  static int Ioctl(int fd, unsigned long request, void *arg) {
    auto *mv = static_cast<uffdio_move *>(arg);
    if (request != UFFDIO_MOVE || mv->len <= kMoved * kPage)
      return mv_prim_real.ioctl(fd, request, arg);
    uffdio_move part = *mv;
    part.len = kMoved * kPage;
    if (mv_prim_real.ioctl(fd, UFFDIO_MOVE, &part) != 0) {
      mv->move = part.move;
      return -1;
    }
    bool eexist = faked_++ % 2 == 0;
    mv->move = eexist ? -EEXIST : (int64_t)kPage;
    errno = eexist ? EEXIST : EAGAIN;
    return -1;
  }
  static inline std::atomic<unsigned> faked_{0};
};

// VMAs of /proc/self/maps that overlap [lo, hi).
inline int CountVmas(uintptr_t lo, uintptr_t hi) {
  FILE *f = fopen("/proc/self/maps", "r");
  if (!f) return -1;
  int n = 0;
  unsigned long s, e;
  char line[512];
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "%lx-%lx", &s, &e) == 2 && s < hi && e > lo) n++;
  fclose(f);
  return n;
}

// "Locked:" (kB) of the VMA holding addr, from /proc/self/smaps; -1 if absent.
inline long LockedKb(uintptr_t addr) {
  FILE *f = fopen("/proc/self/smaps", "r");
  if (!f) return -1;
  char line[512];
  bool inside = false;
  long kb = -1;
  unsigned long s, e;
  char dash;
  while (fgets(line, sizeof line, f)) {
    if (sscanf(line, "%lx%c%lx ", &s, &dash, &e) == 3 && dash == '-')
      inside = s <= addr && addr < e;
    else if (inside && sscanf(line, "Locked: %ld kB", &kb) == 1)
      break;
  }
  fclose(f);
  return kb;
}

// A probe mask that keeps every finding; tests then clear the ones to hide.
inline mv_probe KeepAll() {
  mv_probe m;
  memset(&m, 0, sizeof m);
  m.uffd = m.uffd_user_only = m.uffd_wp = m.uffd_wp_unpopulated = m.uffd_move = m.collapse =
      m.thp = true;
  return m;
}

// The backend `kind` if this kernel runs it, else nullptr.
inline const mv_backend *Runnable(mv_backend_kind kind) {
  const mv_backend *b = mv_backend_select(kind, nullptr, 0);
  return b->kind == kind ? b : nullptr;
}

}  // namespace mvtest

#endif  // MV_TESTS_BACKEND_UTIL_H
