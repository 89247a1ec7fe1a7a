// The OS saying no: allocation fails cleanly with ENOMEM, nothing crashes, and
// the allocator works again once the OS does.
#include <errno.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>

extern "C" {
#include "arena/mv_alloc.h"
#include "arena/mv_prim.h"
}

namespace {

void *Opaque(void *p) {
  asm volatile("" : "+r"(p));
  return p;
}

int FailingMprotect(void *addr, size_t len, int prot) {
  errno = ENOMEM;
  return -1;
}

int FailingMadvise(void *addr, size_t len, int advice) {
  errno = ENOMEM;
  return -1;
}

// Growing the heap needs mprotect: with it failing, a huge block (which needs
// fresh arenas) fails with ENOMEM, and succeeds again afterwards.
TEST(Fault, CommitFailureGivesEnomem) {
  struct mv_prim fake = mv_prim_real;
  fake.mprotect = FailingMprotect;
  mv_prim_set(&fake);
  errno = 0;
  void *p = Opaque(malloc((size_t)900 << 20));
  int err = errno;
  mv_prim_reset();
  EXPECT_EQ(p, nullptr);
  EXPECT_EQ(err, ENOMEM);
  void *q = Opaque(malloc((size_t)900 << 20));
  EXPECT_NE(q, nullptr);
  free(q);
}

// Returning memory to the kernel failing must not lose the arena: it stays
// committed and is reused.
TEST(Fault, ReleaseFailureKeepsArenasUsable) {
  struct mv_prim fake = mv_prim_real;
  fake.madvise = FailingMadvise;
  mv_prim_set(&fake);
  for (int i = 0; i < 20; i++) free(Opaque(malloc((size_t)30 << 20)));
  mv_prim_reset();
  char *p = (char *)Opaque(malloc((size_t)30 << 20));
  ASSERT_NE(p, nullptr);
  p[0] = 1;
  p[(30 << 20) - 1] = 1;
  free(p);
}

}  // namespace
