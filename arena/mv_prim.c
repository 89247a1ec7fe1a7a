/* The real OS primitives behind mv_prim.h. */
#include "arena/mv_prim.h"

#include "arena/mv_print.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void *real_mremap(void *old_addr, size_t old_len, size_t new_len, int flags,
                         void *new_addr) {
  return mremap(old_addr, old_len, new_len, flags, new_addr);
}

static int real_ioctl(int fd, unsigned long request, void *arg) {
  return ioctl(fd, request, arg);
}

static int real_userfaultfd(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

#define REAL_PRIMITIVES                                                              \
  {                                                                                  \
    .mmap = mmap, .munmap = munmap, .mprotect = mprotect, .madvise = madvise,        \
    .mremap = real_mremap, .ioctl = real_ioctl, .userfaultfd = real_userfaultfd,     \
  }

const struct mv_prim mv_prim_real = REAL_PRIMITIVES;
struct mv_prim mv_prim = REAL_PRIMITIVES; /* tests swap entries */

void mv_prim_set(const struct mv_prim *fake) { mv_prim = *fake; }
void mv_prim_reset(void) { mv_prim = mv_prim_real; }

/* ---- clocks, straight from the vDSO ----
 * libc's clock_gettime is a thin wrapper around the vDSO's, but it sits in a
 * stretch of libc's code that a program on glibc's malloc does not otherwise
 * run: the first call maps that stretch (the kernel's fault-around, 64 KiB)
 * into every process movalloc is preloaded into. The vDSO's own entry point,
 * found in its symbol table, costs the same per call. */

typedef int (*clock_fn)(clockid_t, struct timespec *);

/* The vDSO's symbol `name`, or NULL (no vDSO, no DT_HASH to size its table). */
static void *vdso_symbol(const char *name) {
  const Elf64_Ehdr *eh = (const Elf64_Ehdr *)getauxval(AT_SYSINFO_EHDR);
  if (!eh) return NULL;
  const Elf64_Phdr *ph = (const Elf64_Phdr *)((const char *)eh + eh->e_phoff);
  uintptr_t bias = 0;
  const Elf64_Dyn *dyn = NULL;
  bool loaded = false;
  for (unsigned i = 0; i < eh->e_phnum; i++) {
    if (ph[i].p_type == PT_LOAD && !loaded) {
      bias = (uintptr_t)eh + ph[i].p_offset - ph[i].p_vaddr;
      loaded = true;
    } else if (ph[i].p_type == PT_DYNAMIC) {
      dyn = (const Elf64_Dyn *)((const char *)eh + ph[i].p_offset);
    }
  }
  if (!loaded || !dyn) return NULL;
  const Elf64_Sym *syms = NULL;
  const char *strs = NULL;
  const Elf64_Word *hash = NULL;
  for (; dyn->d_tag != DT_NULL; dyn++) {
    if (dyn->d_tag == DT_SYMTAB) syms = (const Elf64_Sym *)(bias + dyn->d_un.d_ptr);
    else if (dyn->d_tag == DT_STRTAB) strs = (const char *)(bias + dyn->d_un.d_ptr);
    else if (dyn->d_tag == DT_HASH) hash = (const Elf64_Word *)(bias + dyn->d_un.d_ptr);
  }
  if (!syms || !strs || !hash) return NULL;
  for (Elf64_Word i = 0; i < hash[1]; i++) { /* hash[1]: the number of symbols */
    const Elf64_Sym *sym = &syms[i];
    if (ELF64_ST_TYPE(sym->st_info) == STT_FUNC && sym->st_shndx != SHN_UNDEF &&
        strcmp(strs + sym->st_name, name) == 0)
      return (void *)(bias + sym->st_value);
  }
  return NULL;
}

static _Atomic(clock_fn) vdso_clock; /* NULL: not looked up yet */

/* Racy but idempotent: threads that look it up at once find the same. */
static clock_fn clock_entry(void) {
  clock_fn f = atomic_load_explicit(&vdso_clock, memory_order_relaxed);
  if (!f) {
    f = (clock_fn)vdso_symbol("__vdso_clock_gettime");
    if (!f) f = clock_gettime;
    atomic_store_explicit(&vdso_clock, f, memory_order_relaxed);
  }
  return f;
}

bool mv_os_clock_from_vdso(void) { return clock_entry() != clock_gettime; }

static uint64_t clock_ns(clockid_t id) {
  struct timespec ts;
  clock_entry()(id, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t mv_os_now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
uint64_t mv_os_thread_cpu_ns(void) { return clock_ns(CLOCK_THREAD_CPUTIME_ID); }
int mv_os_gettid(void) { return (int)syscall(SYS_gettid); }

void mv_os_random(void *buf, size_t len) {
  unsigned char *p = buf;
  size_t got = 0;
  while (got < len) {
    ssize_t n = getrandom(p + got, len - got, GRND_NONBLOCK);
    if (n <= 0) break;
    got += (size_t)n;
  }
  if (got == len) return;
  /* No entropy yet (early boot, seccomp): mix what differs between runs. */
  uint64_t x = clock_ns(CLOCK_MONOTONIC) ^ ((uint64_t)(uintptr_t)buf << 17) ^
               ((uint64_t)getpid() << 40);
  for (; got < len; got++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    p[got] = (unsigned char)x;
  }
}

void mv_os_write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    buf += n;
    len -= (size_t)n;
  }
}

long mv_os_read_file(const char *path, char *buf, size_t cap) {
  if (cap == 0) return -EINVAL;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  size_t got = 0;
  while (got + 1 < cap) {
    ssize_t n = read(fd, buf + got, cap - 1 - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      return -e;
    }
    if (n == 0) break;
    got += (size_t)n;
  }
  close(fd);
  buf[got] = 0;
  return (long)got;
}

int mv_os_open_private(const char *path, char *why, size_t cap) {
  /* O_NOFOLLOW: a planted symlink cannot aim our writes at another file;
   * O_NONBLOCK: a FIFO cannot hang start-up (refused below anyway). */
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600);
  if (fd < 0) {
    int e = errno;
    if (e == ELOOP) mv_snprintf(why, cap, "is a symbolic link: refused (give the file itself)");
    else mv_snprintf(why, cap, "cannot open it (errno %d)", e);
    return -1;
  }
  struct stat st;
  const char *bad = NULL;
  if (fstat(fd, &st) != 0) bad = "cannot stat it";
  else if (!S_ISREG(st.st_mode)) bad = "not a regular file";
  else if (st.st_uid != geteuid()) bad = "owned by another user";
  else if (st.st_mode & 077) bad = "open to group or others";
  if (bad) {
    unsigned m = (unsigned)st.st_mode;
    mv_snprintf(why, cap, "%s (owner uid %u, mode %u%u%u): refused; movalloc writes only to a "
                "regular file of its own user with mode 600 (or one it creates)",
                bad, (unsigned)st.st_uid, (m >> 6) & 7, (m >> 3) & 7, m & 7);
    close(fd);
    return -1;
  }
  return fd;
}
