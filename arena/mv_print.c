/* The allocation-free printer (see mv_print.h). */
#include "arena/mv_print.h"

#include <stdint.h>
#include <stdlib.h>

#include "arena/mv_prim.h"

struct out {
  char *buf;
  size_t cap; /* usable bytes, the NUL excluded */
  size_t len;
};

static void put(struct out *o, char c) {
  if (o->len < o->cap) o->buf[o->len++] = c;
}

static void put_padded(struct out *o, const char *s, size_t n, int width, int left,
                       char pad) {
  int fill = width > (int)n ? width - (int)n : 0;
  if (!left) {
    /* Zero padding goes after a sign. */
    if (pad == '0' && n > 0 && s[0] == '-') {
      put(o, '-');
      s++, n--;
    }
    while (fill-- > 0) put(o, pad);
  }
  for (size_t i = 0; i < n; i++) put(o, s[i]);
  if (left)
    while (fill-- > 0) put(o, ' ');
}

static size_t format_unsigned(char *tmp, unsigned long long v, unsigned base) {
  char rev[24];
  size_t n = 0;
  do {
    unsigned d = (unsigned)(v % base);
    rev[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    v /= base;
  } while (v);
  for (size_t i = 0; i < n; i++) tmp[i] = rev[n - 1 - i];
  return n;
}

size_t mv_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap) {
  struct out o = {buf, cap ? cap - 1 : 0, 0};
  for (const char *f = fmt; *f; f++) {
    if (*f != '%') {
      put(&o, *f);
      continue;
    }
    const char *start = f++;
    int left = 0, width = 0, lng = 0;
    char pad = ' ';
    for (; *f == '-' || *f == '0'; f++) {
      if (*f == '-') left = 1;
      else pad = '0';
    }
    while (*f >= '0' && *f <= '9') width = width * 10 + (*f++ - '0');
    if (*f == 'z') lng = 2, f++;
    else
      while (*f == 'l') lng++, f++;
    char tmp[32];
    size_t n;
    switch (*f) {
      case 'd':
      case 'i': {
        long long v = lng >= 2 ? va_arg(ap, long long) : lng == 1 ? va_arg(ap, long) : va_arg(ap, int);
        unsigned long long mag = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
        size_t off = 0;
        if (v < 0) tmp[off++] = '-';
        n = off + format_unsigned(tmp + off, mag, 10);
        put_padded(&o, tmp, n, width, left, pad);
        break;
      }
      case 'u':
      case 'x': {
        unsigned long long v = lng >= 2 ? va_arg(ap, unsigned long long)
                               : lng == 1 ? va_arg(ap, unsigned long)
                                          : va_arg(ap, unsigned);
        n = format_unsigned(tmp, v, *f == 'x' ? 16 : 10);
        put_padded(&o, tmp, n, width, left, pad);
        break;
      }
      case 'p': {
        tmp[0] = '0', tmp[1] = 'x';
        n = 2 + format_unsigned(tmp + 2, (uintptr_t)va_arg(ap, void *), 16);
        put_padded(&o, tmp, n, width, left, pad);
        break;
      }
      case 's': {
        const char *s = va_arg(ap, const char *);
        if (!s) s = "(null)";
        size_t len = 0;
        while (s[len]) len++;
        put_padded(&o, s, len, width, left, ' ');
        break;
      }
      case 'c':
        tmp[0] = (char)va_arg(ap, int);
        put_padded(&o, tmp, 1, width, left, ' ');
        break;
      case '%':
        put(&o, '%');
        break;
      default: /* unknown: print the directive as written */
        if (!*f) f--;
        for (const char *c = start; c <= f; c++) put(&o, *c);
        break;
    }
  }
  if (cap) buf[o.len] = 0;
  return o.len;
}

size_t mv_snprintf(char *buf, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  size_t n = mv_vsnprintf(buf, cap, fmt, ap);
  va_end(ap);
  return n;
}

void mv_dprintf(int fd, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  size_t n = mv_vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  mv_os_write_all(fd, buf, n);
}

static void vlog(const char *fmt, va_list ap) {
  char buf[1024];
  size_t n = mv_snprintf(buf, sizeof buf, "movalloc: ");
  n += mv_vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
  buf[n++] = '\n';
  mv_os_write_all(2, buf, n);
}

void mv_log(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(fmt, ap);
  va_end(ap);
}

void mv_fatal(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(fmt, ap);
  va_end(ap);
  abort();
}
