/* A printf that never allocates: formats into a caller's or a stack buffer and
 * writes with write(2). Safe in signal handlers, at exit, inside the isolation
 * window and before movalloc is initialised.
 *
 * Conversions: %d %i %u %x %ld %lu %lx %lld %llu %llx %zu %zd %zx %p %s %c %%,
 * with an optional '-' flag, '0' flag and width (e.g. %-12s %08lx). Anything
 * else is printed as is.
 */
#ifndef MV_PRINT_H
#define MV_PRINT_H

#include <stdarg.h>
#include <stddef.h>

/* Like vsnprintf: always NUL-terminates when cap > 0; returns the length written
 * (output that did not fit is dropped, not counted). */
size_t mv_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap);
size_t mv_snprintf(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Formats into a 1 KiB stack buffer and writes it to fd. */
void mv_dprintf(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "movalloc: <message>\n" on stderr. */
void mv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* "movalloc: <message>\n" on stderr, then abort(). */
void mv_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn, cold));

#endif /* MV_PRINT_H */
