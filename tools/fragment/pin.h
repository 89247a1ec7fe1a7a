/* Making 4 KiB anonymous pages unmovable, so compaction cannot migrate them
 * out of the 2 MiB blocks they break up.
 *
 * Compaction isolates an anonymous page only if its reference count is
 * explained by its mappings; any extra reference makes migration fail. mlock is
 * not such a reference (mlocked pages are migrated unless
 * vm.compact_unevictable_allowed=0). Two user-space ways to hold one:
 *   PIN_IOURING:  io_uring registered buffers, pinned with FOLL_PIN|FOLL_LONGTERM,
 *                 the kernel's own "this page stays put" pin (RDMA, VFIO use it).
 *   PIN_VMSPLICE: vmsplice into a pipe that is never read; the pipe keeps a
 *                 page reference (FOLL_GET) for as long as it is open.
 *   PIN_NONE:     no pin: fragmentation that compaction is free to undo.
 * Either pin is dropped by the kernel when its file is closed, so an exit of
 * any kind, SIGKILL included, leaves nothing pinned behind. */
#ifndef FRAGMENT_PIN_H
#define FRAGMENT_PIN_H

#include <stddef.h>
#include <sys/uio.h>

enum pin_method {
	PIN_AUTO, /* io_uring, or vmsplice where io_uring is unavailable */
	PIN_IOURING,
	PIN_VMSPLICE,
	PIN_NONE,
};

struct pin_set;

const char *pin_method_name(enum pin_method method);

/* Resolves PIN_AUTO. NULL with a message in err (why, and what to do). */
struct pin_set *pin_set_create(enum pin_method method, char *err, size_t errlen);

enum pin_method pin_set_method(const struct pin_set *pins);

/* Pins n pages, each iov one whole page. 0, or -1 with errno; pages this call
 * pinned before failing stay pinned, and counted, until pin_set_release. */
int pin_pages(struct pin_set *pins, const struct iovec *pages, size_t n);

/* Pages pinned so far. */
size_t pin_set_count(const struct pin_set *pins);

/* Unpins every page now (not when the kernel gets round to it) and frees. */
void pin_set_release(struct pin_set *pins);

#endif
