/* Lifetime classes: routing allocations from long-lived sites (mv_lifetime.h). */
#include "profiler/mv_lifetime.h"

#include <link.h>
#include <string.h>
#include <sys/mman.h>

#include "arena/mv_alloc.h"
#include "arena/mv_prim.h"
#include "arena/mv_print.h"
#include "arena/mv_types.h"
#include "profiler/mv_profile.h"

#define ROUTES 4096u              /* table slots (power of two) */
#define ROUTES_MAX (ROUTES / 2)   /* sites kept */
#define FILE_MAX ((size_t)1 << 20) /* bytes of the file read */
#define UNWIND 12                 /* frames looked at through calloc, new, ... */

bool mv_lifetime_on;
static uintptr_t routes[ROUTES]; /* absolute return addresses; 0: empty. Written
                                    before mv_lifetime_on, read-only after */

static uint32_t route_slot(uintptr_t ra) {
  return (uint32_t)(((uint64_t)ra * 0x9E3779B97F4A7C15ULL) >> 40) & (ROUTES - 1);
}

unsigned mv_lifetime_class(uintptr_t ra) {
  if (mv_in_allocator(ra)) { /* not malloc's direct caller: look further up */
    void *frames[UNWIND];
    int n = mv_prof_backtrace(frames, UNWIND);
    int i = 0;
    while (i < n && !mv_in_allocator((uintptr_t)frames[i])) i++; /* libunwind's own */
    while (i < n && mv_in_allocator((uintptr_t)frames[i])) i++;
    if (i >= n) return MV_LIFE_SHORT;
    ra = (uintptr_t)frames[i];
  }
  for (uint32_t i = route_slot(ra);; i = (i + 1) & (ROUTES - 1)) {
    if (routes[i] == ra) return MV_LIFE_LONG;
    if (routes[i] == 0) return MV_LIFE_SHORT;
  }
}

/* ---- loaded objects ---- */

struct find {
  uintptr_t addr;     /* in: an address; or 0 to look up by name */
  const char *name;   /* in (by name): "[exe]", a path or a file name */
  size_t name_len;
  unsigned index;     /* objects walked so far: the main program comes first */
  bool found;
  uintptr_t bias;
  char *out;          /* out (by address): the object's name */
  unsigned cap;
};

static bool same_object(const char *have, const char *want, size_t want_len) {
  if (strlen(have) == want_len && !memcmp(have, want, want_len)) return true;
  const char *slash = strrchr(have, '/');
  return slash && strlen(slash + 1) == want_len && !memcmp(slash + 1, want, want_len);
}

static int find_cb(struct dl_phdr_info *info, size_t size, void *arg) {
  struct find *f = arg;
  const char *name = f->index++ == 0 ? "[exe]" : info->dlpi_name;
  if (!f->addr) {
    if (!same_object(name, f->name, f->name_len)) return 0;
    f->found = true;
    f->bias = info->dlpi_addr;
    return 1;
  }
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
    if (f->addr >= lo && f->addr < lo + ph->p_memsz) {
      f->found = true;
      f->bias = info->dlpi_addr;
      mv_snprintf(f->out, f->cap, "%s", name);
      return 1;
    }
  }
  return 0;
}

bool mv_lifetime_object_of(uintptr_t addr, uintptr_t *bias, char *name, unsigned cap) {
  struct find f = {.addr = addr, .out = name, .cap = cap};
  dl_iterate_phdr(find_cb, &f);
  if (f.found) *bias = f.bias;
  return f.found;
}

/* ---- the file ---- */

static bool parse_hex(const char *s, const char *end, uintptr_t *out) {
  if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) s += 2;
  if (s >= end) return false;
  uintptr_t v = 0;
  for (; s < end; s++) {
    unsigned d;
    if (*s >= '0' && *s <= '9') d = (unsigned)(*s - '0');
    else if (*s >= 'a' && *s <= 'f') d = (unsigned)(*s - 'a' + 10);
    else if (*s >= 'A' && *s <= 'F') d = (unsigned)(*s - 'A' + 10);
    else return false;
    v = v * 16 + d;
  }
  *out = v;
  return true;
}

void mv_lifetime_start(const char *path) {
  char *buf = mv_os_mmap(NULL, FILE_MAX, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
  if (buf == MAP_FAILED) return;
  long len = mv_os_read_file(path, buf, FILE_MAX);
  if (len < 0) {
    mv_log("MOVALLOC_PROFILE_LONGLIVED=%s: cannot read it (%ld); nothing is routed", path, len);
    mv_os_munmap(buf, FILE_MAX);
    return;
  }
  unsigned sites = 0, unresolved = 0, bad = 0;
  for (char *line = buf, *end; line < buf + len; line = end + 1) {
    end = memchr(line, '\n', (size_t)(buf + len - line));
    if (!end) end = buf + len;
    if (line == end || line[0] == '#') continue;
    /* "<module> <hex offset>[ <comment>]" */
    char *sp = memchr(line, ' ', (size_t)(end - line));
    if (!sp) {
      bad++;
      continue;
    }
    char *off_end = memchr(sp + 1, ' ', (size_t)(end - sp - 1));
    if (!off_end) off_end = end;
    uintptr_t off;
    if (!parse_hex(sp + 1, off_end, &off)) {
      bad++;
      continue;
    }
    struct find f = {.name = line, .name_len = (size_t)(sp - line)};
    dl_iterate_phdr(find_cb, &f);
    if (!f.found) {
      unresolved++;
      continue;
    }
    if (sites >= ROUTES_MAX) break;
    uintptr_t ra = f.bias + off;
    uint32_t i = route_slot(ra);
    while (routes[i] && routes[i] != ra) i = (i + 1) & (ROUTES - 1);
    if (!routes[i]) sites++;
    routes[i] = ra;
  }
  mv_os_munmap(buf, FILE_MAX);
  if (bad || unresolved)
    mv_log("MOVALLOC_PROFILE_LONGLIVED=%s: %u lines not \"module 0xoffset\", %u sites in "
           "objects not loaded; routing the other %u", path, bad, unresolved, sites);
  if (!sites) return;
  mv_prof_load_unwind(); /* for sites reached through calloc, new, ... */
  mv_lifetime_on = true;
  mv_malloc_fast_max = 0; /* every malloc to malloc_hooked (mv_heap.c) */
  mv_malloc_hooked = true;
}
