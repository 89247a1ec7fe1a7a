/* Backends this build carries: "collapse" (MADV_COLLAPSE: the kernel copies and
 * checks pins) and "off". The probe tries MADV_COLLAPSE on a scratch range. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define PAGES_PER_ARENA (MV_ARENA_SIZE / 4096)

static int nothing(struct mv_move *m) { return 0; }
static void nothing_void(struct mv_move *m) {}
static int refuse(struct mv_move *m) { return -ENOSYS; }

static int collapse_stage(struct mv_move *m) {
  return m->fail_at == MV_STEP_STAGE ? -EAGAIN : 0;
}

static int collapse_move(struct mv_move *m) {
  if (m->fail_at == MV_STEP_SWAP) return -EIO;
  uint64_t t0 = mv_os_now_ns();
  int rc = mv_os_madvise((void *)m->start, MV_ARENA_SIZE, MADV_COLLAPSE);
  m->swap_ns = mv_os_now_ns() - t0;
  if (rc == 0) return mv_thp_is_huge(m->start) == 1 ? 0 : -EAGAIN;
  /* EAGAIN: a transient (locked page, lost race); ENOMEM: no huge page now. */
  if (errno == EAGAIN || errno == ENOMEM) return -EAGAIN;
  return -errno;
}

static const struct mv_backend backends[MV_BACKEND_COUNT] = {
    [MV_BACKEND_OFF] = {MV_BACKEND_OFF, "off", true, true, refuse, nothing, refuse,
                        nothing_void, nothing_void},
    [MV_BACKEND_MPROTECT] = {MV_BACKEND_MPROTECT, "mprotect", false, false, refuse, refuse,
                             refuse, nothing_void, nothing_void},
    [MV_BACKEND_COLLAPSE] = {MV_BACKEND_COLLAPSE, "collapse", true, true, collapse_stage,
                             nothing, collapse_move, nothing_void, nothing_void},
    [MV_BACKEND_REMAP] = {MV_BACKEND_REMAP, "remap", false, true, refuse, refuse, refuse,
                          nothing_void, nothing_void},
    [MV_BACKEND_MOVE] = {MV_BACKEND_MOVE, "move", true, true, refuse, refuse, refuse,
                         nothing_void, nothing_void},
};

static const char *const names[MV_BACKEND_COUNT] = {"off", "mprotect", "collapse", "remap",
                                                     "move"};

const struct mv_backend *mv_backend_get(enum mv_backend_kind kind) { return &backends[kind]; }

const char *mv_backend_name(enum mv_backend_kind kind) {
  return kind == MV_BACKEND_AUTO ? "auto" : names[kind];
}

int mv_backend_parse(const char *name, enum mv_backend_kind *out) {
  if (!strcmp(name, "auto")) return *out = MV_BACKEND_AUTO, 0;
  for (int k = 0; k < MV_BACKEND_COUNT; k++)
    if (!strcmp(name, names[k])) return *out = (enum mv_backend_kind)k, 0;
  return -1;
}

static struct mv_probe probe_result;
static _Atomic int probed;
static struct mv_probe probe_mask = {.collapse = true, .thp = true};
static bool masked;

void mv_backend_mask_probe(const struct mv_probe *mask) {
  probe_mask = *mask;
  masked = true;
}

void mv_backend_forget_probe(void) { probed = 0; }

/* Tries MADV_COLLAPSE on a scratch 2 MiB range of 4 KiB pages. */
static void probe_collapse(struct mv_probe *p) {
  size_t len = 2 * MV_ARENA_SIZE;
  char *map = mv_os_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) return;
  char *range = (char *)(((uintptr_t)map + MV_ARENA_SIZE - 1) & ~(MV_ARENA_SIZE - 1));
  mv_os_madvise(range, MV_ARENA_SIZE, MADV_NOHUGEPAGE);
  for (size_t i = 0; i < MV_ARENA_SIZE; i += 4096) range[i] = 1;
  mv_os_madvise(range, MV_ARENA_SIZE, MADV_HUGEPAGE);
  p->collapse = mv_os_madvise(range, MV_ARENA_SIZE, MADV_COLLAPSE) == 0;
  p->thp = p->collapse && mv_thp_is_huge((uintptr_t)range) == 1;
  mv_os_munmap(map, len);
}

const struct mv_probe *mv_backend_probe(void) {
  if (!probed) {
    struct mv_probe p;
    memset(&p, 0, sizeof p);
    probe_collapse(&p);
    if (masked) {
      p.collapse &= probe_mask.collapse;
      p.thp &= probe_mask.thp;
    }
    mv_snprintf(p.why, sizeof p.why, "MADV_COLLAPSE %s, THP %s",
                p.collapse ? "works" : "refused", p.thp ? "available" : "unavailable");
    probe_result = p;
    probed = 1;
  }
  return &probe_result;
}

const struct mv_backend *mv_backend_select(enum mv_backend_kind requested, char *why,
                                           size_t why_len) {
  const struct mv_probe *p = mv_backend_probe();
  enum mv_backend_kind chosen = p->collapse && p->thp ? MV_BACKEND_COLLAPSE : MV_BACKEND_OFF;
  if (requested == MV_BACKEND_OFF) chosen = MV_BACKEND_OFF;
  if (why) {
    if (requested == MV_BACKEND_AUTO || requested == chosen)
      mv_snprintf(why, why_len, "%s", p->why);
    else
      mv_snprintf(why, why_len, "%s asked for, not in this build; %s", names[requested],
                  p->why);
  }
  return &backends[chosen];
}

void mv_backend_fork_child(void) {}

/* pagemap: bit 63 present, bits 0-54 PFN (root only). kpageflags bit 22: THP. */
int mv_thp_is_huge(uintptr_t addr) {
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pm < 0) return -errno;
  uint64_t entry;
  ssize_t n = pread(pm, &entry, sizeof entry, (off_t)(addr / 4096 * sizeof entry));
  close(pm);
  if (n != sizeof entry) return -EIO;
  if (!(entry >> 63 & 1)) return 0;
  uint64_t pfn = entry & ((1ull << 55) - 1);
  if (pfn == 0) return -EPERM; /* PFNs hidden: not root */
  int kf = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  if (kf < 0) return -errno;
  uint64_t flags;
  n = pread(kf, &flags, sizeof flags, (off_t)(pfn * sizeof flags));
  close(kf);
  if (n != sizeof flags) return -EIO;
  return (flags >> 22 & 1) ? 1 : 0;
}

long mv_thp_resident_pages(uintptr_t addr, size_t len) {
  unsigned char vec[PAGES_PER_ARENA];
  long resident = 0;
  for (size_t off = 0; off < len; off += MV_ARENA_SIZE) {
    size_t chunk = len - off < MV_ARENA_SIZE ? len - off : MV_ARENA_SIZE;
    if (mincore((void *)(addr + off), chunk, vec) != 0) return -errno;
    for (size_t i = 0; i < (chunk + 4095) / 4096; i++) resident += vec[i] & 1;
  }
  return resident;
}
