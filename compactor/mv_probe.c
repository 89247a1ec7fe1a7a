/* What the kernel offers, found by trying each mechanism once on scratch memory,
 * and the choice of a backend from it (see mv_backend.h).
 *
 * The probe never trusts a version number or a feature bit alone where it can
 * try the thing: a THP fault must give a THP, the move backend's whole sequence
 * must end on a THP (it does not without PT reclaim), MADV_COLLAPSE must be
 * accepted. Anything refused (seccomp ENOSYS/EPERM, the sysctl,
 * PR_SET_THP_DISABLE, enabled=never) only turns a finding off.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "compactor/mv_backend.h"
#include "compactor/mv_backend_int.h"
#include "compactor/mv_uffd.h"

/* ---- the off backend ---- */

static int off_fail(struct mv_move *m) { return -EOPNOTSUPP; }
static void off_release(struct mv_move *m) { m->held = false; }
static void off_unstage(struct mv_move *m) {}

/* No compaction: every step that could move something says -EOPNOTSUPP. */
const struct mv_backend mv_backend_off_impl = {
    .kind = MV_BACKEND_OFF,
    .name = "off",
    .pin_safe = true,
    .holds_syscalls = true,
    .stage = off_fail,
    .hold = off_fail,
    .move = off_fail,
    .release = off_release,
    .unstage = off_unstage,
};

/* Why this kernel does not run kind (NULL: it does). A user-mode-only
 * userfaultfd is refused unless asked for by name. */
static const char *lacks(const struct mv_probe *p, enum mv_backend_kind kind, bool by_name) {
  switch (kind) {
    case MV_BACKEND_OFF: return NULL;
    case MV_BACKEND_MPROTECT: return p->thp ? NULL : "no THP to stage";
    case MV_BACKEND_COLLAPSE: return p->collapse ? NULL : "no MADV_COLLAPSE";
    case MV_BACKEND_REMAP:
    case MV_BACKEND_MOVE:
      if (!p->uffd) return "no userfaultfd";
      if (!p->uffd_wp) return "no uffd write-protect";
      if (kind == MV_BACKEND_MOVE && !p->uffd_move) return "no UFFDIO_MOVE";
      if (!p->thp) return "no THP to stage";
      if (p->uffd_user_only && !by_name) return "user-mode-only uffd, syscalls get EFAULT";
      return NULL;
    default: return "unknown backend";
  }
}

/* The default: the first of move > collapse > remap > mprotect > off that runs
 * (the fastest pin-safe one first). *skipped and *skip_why: the first one
 * passed over, and why (skip_why NULL when none was). */
static enum mv_backend_kind auto_choice(const struct mv_probe *p, enum mv_backend_kind *skipped,
                                        const char **skip_why) {
  static const enum mv_backend_kind order[] = {MV_BACKEND_MOVE, MV_BACKEND_COLLAPSE,
                                               MV_BACKEND_REMAP, MV_BACKEND_MPROTECT};
  *skip_why = NULL;
  for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
    const char *l = lacks(p, order[i], false);
    if (!l) return order[i];
    if (!*skip_why) *skipped = order[i], *skip_why = l;
  }
  return MV_BACKEND_OFF;
}

/* ---- probing ---- */

/* probe_state: 0 not probed, 1 a thread is probing, 2 probe_result is final
 * (published with release; waiters sleep on the word). */
static struct mv_probe probe_result;
static _Atomic uint32_t probe_state;
static struct mv_probe probe_mask; /* valid while mask_set */
static _Atomic bool mask_set;

void mv_backend_mask_probe(const struct mv_probe *mask) {
  if (mask) probe_mask = *mask;
  atomic_store(&mask_set, mask != NULL);
}

/* Runs the move backend's sequence once with fd on a range of one touched page
 * and 511 holes: register MISSING|WP, write-protect, move everything out,
 * move the staged THP in. *wp: registration and write-protection work.
 * *moved: the range ended on the THP with the page's data moved out intact. */
static void try_uffd(int fd, uint64_t features, struct mv_move *staged, bool *wp, bool *moved) {
  char *a = mv_thp_map_aligned(MV_ARENA_SIZE);
  char *s = mv_thp_map_aligned(MV_ARENA_SIZE);
  if (!a || !s) goto out;
  mv_os_madvise(a, MV_ARENA_SIZE, MADV_NOHUGEPAGE);
  a[MV_PAGE_SIZE] = 0x5a;
  struct uffdio_register reg = {
      .range = {(uintptr_t)a, MV_ARENA_SIZE},
      .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
  };
  struct uffdio_writeprotect wprot = {.range = {(uintptr_t)a, MV_ARENA_SIZE},
                                      .mode = UFFDIO_WRITEPROTECT_MODE_WP};
  if (mv_os_ioctl(fd, UFFDIO_REGISTER, &reg) || mv_os_ioctl(fd, UFFDIO_WRITEPROTECT, &wprot))
    goto out;
  *wp = true;
  if (!(features & UFFD_FEATURE_MOVE) || !staged->staging) goto out;
  if (features & UFFD_FEATURE_WP_UNPOPULATED) {
    wprot.mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    if (mv_os_ioctl(fd, UFFDIO_WRITEPROTECT, &wprot)) goto out;
  }
  reg.range.start = (uintptr_t)s;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (mv_os_ioctl(fd, UFFDIO_REGISTER, &reg)) goto out;
  struct uffdio_move out = {
      .dst = (uintptr_t)s, .src = (uintptr_t)a, .len = MV_ARENA_SIZE,
      .mode = UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES | UFFDIO_MOVE_MODE_DONTWAKE};
  if (mv_os_ioctl(fd, UFFDIO_MOVE, &out) || s[MV_PAGE_SIZE] != 0x5a) goto out;
  mv_os_madvise(a, MV_ARENA_SIZE, MADV_DONTNEED);
  struct uffdio_move in = {
      .dst = (uintptr_t)a, .src = (uintptr_t)staged->staging, .len = MV_ARENA_SIZE,
      .mode = UFFDIO_MOVE_MODE_DONTWAKE};
  if (mv_os_ioctl(fd, UFFDIO_MOVE, &in)) goto out;
  *moved = mv_thp_is_huge((uintptr_t)a) == 1;
out:
  if (a) mv_os_munmap(a, MV_ARENA_SIZE);
  if (s) mv_os_munmap(s, MV_ARENA_SIZE);
}

/* MADV_COLLAPSE of a range with one small page. EAGAIN/ENOMEM: accepted, only
 * busy or short of memory now. */
static bool try_collapse(void) {
  char *b = mv_thp_map_aligned(MV_ARENA_SIZE);
  if (!b) return false;
  mv_os_madvise(b, MV_ARENA_SIZE, MADV_NOHUGEPAGE);
  b[0] = 1;
  mv_os_madvise(b, MV_ARENA_SIZE, MADV_HUGEPAGE);
  int rc = mv_os_madvise(b, MV_ARENA_SIZE, MADV_COLLAPSE);
  int err = errno;
  mv_os_munmap(b, MV_ARENA_SIZE);
  return rc == 0 || err == EAGAIN || err == ENOMEM;
}

static const char *probe_note; /* a finding the flags cannot say, for why */

/* THP is on in this kernel for this process: `enabled` is always or madvise
 * and PR_SET_THP_DISABLE is not set. A THP fault that fails while memory is
 * fragmented says "not now", not "never": staging returns -EAGAIN then, and
 * the engine tries again later. */
static bool thp_configured(void) {
  char buf[128];
  if (mv_os_read_file("/sys/kernel/mm/transparent_hugepage/enabled", buf, sizeof buf) <= 0)
    return false;
  if (!strstr(buf, "[always]") && !strstr(buf, "[madvise]")) return false;
  return prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0;
}

static void run_probe(struct mv_probe *p) {
  memset(p, 0, sizeof *p);
  probe_note = NULL;
  struct mv_move staged = {0};
  bool thp_now = mv_thp_stage(&staged) == 0 || mv_thp_stage(&staged) == 0;
  p->thp = thp_now || thp_configured();

  int fd = mv_uffd_open(false);
  if (fd < 0) {
    p->uffd_errno = -fd;
    fd = mv_uffd_open(true);
    p->uffd_user_only = fd >= 0;
  }
  uint64_t avail = 0;
  if (fd >= 0) {
    int rc = mv_uffd_api(fd, 0, &avail); /* features == 0: tell me all of them */
    if (rc == 0) p->uffd = true;
    else p->uffd_errno = -rc;
    close(fd);
  }
  if (p->uffd && (avail & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
    uint64_t want = avail & (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED |
                             UFFD_FEATURE_MOVE);
    fd = mv_uffd_open(p->uffd_user_only);
    if (fd >= 0 && mv_uffd_api(fd, want, &avail) == 0) {
      bool wp = false, moved = false;
      try_uffd(fd, want, &staged, &wp, &moved);
      p->uffd_wp = wp;
      p->uffd_wp_unpopulated = wp && (want & UFFD_FEATURE_WP_UNPOPULATED);
      /* Without a THP now the sequence cannot be tried: the bit is all there is. */
      p->uffd_move = wp && (want & UFFD_FEATURE_MOVE) && (moved || !thp_now);
      if (wp && (want & UFFD_FEATURE_MOVE) && thp_now && !moved)
        probe_note = "UFFDIO_MOVE did not leave a THP";
    }
    if (fd >= 0) close(fd);
  }
  mv_thp_unstage(&staged);
  p->collapse = try_collapse();

  if (atomic_load(&mask_set)) {
    const struct mv_probe *k = &probe_mask;
    p->uffd &= k->uffd;
    p->uffd_user_only &= k->uffd_user_only && p->uffd;
    p->uffd_wp &= k->uffd_wp && p->uffd;
    p->uffd_wp_unpopulated &= k->uffd_wp_unpopulated && p->uffd_wp;
    p->uffd_move &= k->uffd_move && p->uffd_wp;
    p->collapse &= k->collapse;
    p->thp &= k->thp;
    if (!p->uffd && !p->uffd_errno) p->uffd_errno = ENOSYS;
    probe_note = "masked by a test";
  }
}

static void futex_wait(_Atomic uint32_t *w, uint32_t v) {
  syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}

/* "uffd(wp unpop move) collapse thp", "no-uffd(errno 1) no-collapse thp", ... */
static size_t describe_found(const struct mv_probe *p, char *buf, size_t cap) {
  size_t n;
  if (p->uffd)
    n = mv_snprintf(buf, cap, "uffd%s(%s%s%s)", p->uffd_user_only ? "-user-only" : "",
                    p->uffd_wp ? "wp" : "no-wp", p->uffd_wp_unpopulated ? " unpop" : "",
                    p->uffd_move ? " move" : "");
  else
    n = mv_snprintf(buf, cap, "no-uffd(errno %d)", p->uffd_errno);
  n += mv_snprintf(buf + n, cap - n, " %scollapse %sthp", p->collapse ? "" : "no-",
                   p->thp ? "" : "no-");
  if (probe_note) n += mv_snprintf(buf + n, cap - n, " (%s)", probe_note);
  return n;
}

const struct mv_probe *mv_backend_probe(void) {
  uint32_t s = atomic_load_explicit(&probe_state, memory_order_acquire);
  if (s == 2) return &probe_result;
  uint32_t idle = 0;
  if (atomic_compare_exchange_strong(&probe_state, &idle, 1)) {
    struct mv_probe p;
    run_probe(&p);
    char why[sizeof p.why];
    size_t n = describe_found(&p, why, sizeof why);
    enum mv_backend_kind skipped;
    const char *skip_why;
    /* select() would wait for this very probe: choose from the findings here. */
    mv_snprintf(why + n, sizeof why - n, "; auto: %s",
                mv_backend_name(auto_choice(&p, &skipped, &skip_why)));
    memcpy(p.why, why, sizeof why);
    probe_result = p;
    atomic_store_explicit(&probe_state, 2, memory_order_release);
    syscall(SYS_futex, (uint32_t *)&probe_state, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    return &probe_result;
  }
  while ((s = atomic_load_explicit(&probe_state, memory_order_acquire)) != 2)
    futex_wait(&probe_state, s);
  return &probe_result;
}

void mv_backend_forget_probe(void) {
  mv_uffd_drop(); /* opened with the old findings */
  atomic_store(&probe_state, 0);
}

void mv_backend_fork_child(void) { mv_uffd_drop(); }

/* ---- choosing ---- */

static const char *const names[MV_BACKEND_COUNT] = {"off", "mprotect", "collapse", "remap",
                                                    "move"};

const char *mv_backend_name(enum mv_backend_kind kind) {
  if (kind == MV_BACKEND_AUTO) return "auto";
  if ((int)kind < 0 || kind >= MV_BACKEND_COUNT) return "unknown";
  return names[kind];
}

int mv_backend_parse(const char *name, enum mv_backend_kind *out) {
  if (!name) return -1;
  if (strcmp(name, "auto") == 0) {
    *out = MV_BACKEND_AUTO;
    return 0;
  }
  for (int k = 0; k < MV_BACKEND_COUNT; k++)
    if (strcmp(name, names[k]) == 0) {
      *out = (enum mv_backend_kind)k;
      return 0;
    }
  return -1;
}

static const struct mv_backend *impl(enum mv_backend_kind kind, bool user_only) {
  switch (kind) {
    case MV_BACKEND_MPROTECT: return &mv_backend_mprotect_impl;
    case MV_BACKEND_COLLAPSE: return &mv_backend_collapse_impl;
    case MV_BACKEND_REMAP: return user_only ? &mv_backend_remap_user_only : &mv_backend_remap_impl;
    case MV_BACKEND_MOVE: return user_only ? &mv_backend_move_user_only : &mv_backend_move_impl;
    default: return &mv_backend_off_impl;
  }
}

const struct mv_backend *mv_backend_get(enum mv_backend_kind kind) {
  if ((int)kind < 0 || kind >= MV_BACKEND_COUNT) return mv_backend_select(MV_BACKEND_AUTO, NULL, 0);
  return impl(kind, false);
}

const struct mv_backend *mv_backend_select(enum mv_backend_kind requested, char *why,
                                           size_t why_len) {
  const struct mv_probe *p = mv_backend_probe();
  bool by_name = (int)requested >= 0 && requested < MV_BACKEND_COUNT;
  const char *lack = by_name ? lacks(p, requested, true) : NULL;
  if (by_name && !lack) {
    const struct mv_backend *b = impl(requested, p->uffd_user_only);
    if (why) {
      size_t n = mv_snprintf(why, why_len, "%s as requested (%s%s); found ", b->name,
                             b->pin_safe ? "pin-safe" : "not pin-safe",
                             b->holds_syscalls ? "" : ", syscalls writing a held arena get EFAULT");
      describe_found(p, why + n, why_len - n);
    }
    return b;
  }
  enum mv_backend_kind skipped = MV_BACKEND_OFF;
  const char *skip_why;
  enum mv_backend_kind chosen = auto_choice(p, &skipped, &skip_why);
  const struct mv_backend *b = impl(chosen, false);
  if (why) {
    /* The choice first, then why the better ones were passed over, then what
     * was found: a short buffer loses the end. */
    size_t n;
    if (requested == MV_BACKEND_AUTO)
      n = mv_snprintf(why, why_len, "auto: %s", b->name);
    else if (by_name)
      n = mv_snprintf(why, why_len, "%s unavailable (%s): %s", names[requested], lack, b->name);
    else
      n = mv_snprintf(why, why_len, "unknown backend %d: %s", (int)requested, b->name);
    n += mv_snprintf(why + n, why_len - n, " (%s)", b->pin_safe ? "pin-safe" : "not pin-safe");
    if (skip_why && requested == MV_BACKEND_AUTO)
      n += mv_snprintf(why + n, why_len - n, "; %s: %s", names[skipped], skip_why);
    n += mv_snprintf(why + n, why_len - n, "; found ");
    describe_found(p, why + n, why_len - n);
  }
  return b;
}
