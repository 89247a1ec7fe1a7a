#define _GNU_SOURCE
#include "pin.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The kernel's limit on registered buffers per ring (IORING_MAX_REG_BUFFERS). */
#define IOURING_SLOTS 16384
/* vmsplice(2) takes at most UIO_MAXIOV iovecs per call. */
#define VMSPLICE_MAX_IOV 1024

/* One io_uring ring, or one pipe, holding up to capacity page pins. */
struct pin_holder {
	int fd;       /* the ring, or the pipe's write end */
	int read_fd;  /* the pipe's read end, kept open so the pipe lives; -1 for a ring */
	size_t used;
	size_t capacity;
};

struct pin_set {
	enum pin_method method;
	size_t page_size;
	struct pin_holder *holders;
	size_t nholders;
	size_t holders_cap;
	size_t pinned;
};

const char *pin_method_name(enum pin_method method)
{
	switch (method) {
	case PIN_AUTO:
		return "auto";
	case PIN_IOURING:
		return "iouring";
	case PIN_VMSPLICE:
		return "vmsplice";
	case PIN_NONE:
		return "none";
	}
	return "?";
}

static int io_uring_register_call(int fd, unsigned opcode, void *arg, unsigned nr_args)
{
	return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr_args);
}

/* A ring with an empty (sparse) buffer table that pin_pages fills slot by slot. */
static int open_ring(struct pin_holder *holder)
{
	struct io_uring_params params;
	memset(&params, 0, sizeof(params));
	int fd = (int)syscall(__NR_io_uring_setup, 1, &params);
	if (fd < 0)
		return -1;
	struct io_uring_rsrc_register table;
	memset(&table, 0, sizeof(table));
	table.nr = IOURING_SLOTS;
	table.flags = IORING_RSRC_REGISTER_SPARSE;
	if (io_uring_register_call(fd, IORING_REGISTER_BUFFERS2, &table, sizeof(table)) < 0) {
		int saved = errno;
		close(fd);
		errno = saved;
		return -1;
	}
	holder->fd = fd;
	holder->read_fd = -1;
	holder->used = 0;
	holder->capacity = IOURING_SLOTS;
	return 0;
}

static long pipe_max_size(void)
{
	long size = 0;
	FILE *f = fopen("/proc/sys/fs/pipe-max-size", "re");
	if (f) {
		if (fscanf(f, "%ld", &size) != 1)
			size = 0;
		fclose(f);
	}
	return size;
}

/* Each pipe slot holds one spliced page, so a bigger pipe means fewer fds. */
static int open_pipe(struct pin_holder *holder, size_t page_size)
{
	int fds[2];
	if (pipe2(fds, O_CLOEXEC) != 0)
		return -1;
	long max = pipe_max_size();
	if (max > 0)
		fcntl(fds[1], F_SETPIPE_SZ, (int)max); /* keeps the default size on failure */
	int size = fcntl(fds[1], F_GETPIPE_SZ);
	if (size <= 0) {
		int saved = errno;
		close(fds[0]);
		close(fds[1]);
		errno = saved;
		return -1;
	}
	holder->fd = fds[1];
	holder->read_fd = fds[0];
	holder->used = 0;
	holder->capacity = (size_t)size / page_size;
	return 0;
}

static void close_holder(const struct pin_set *pins, struct pin_holder *holder)
{
	if (pins->method == PIN_IOURING)
		io_uring_register_call(holder->fd, IORING_UNREGISTER_BUFFERS, NULL, 0);
	close(holder->fd);
	if (holder->read_fd >= 0)
		close(holder->read_fd);
}

static struct pin_holder *add_holder(struct pin_set *pins)
{
	if (pins->nholders == pins->holders_cap) {
		size_t cap = pins->holders_cap ? pins->holders_cap * 2 : 16;
		struct pin_holder *grown = realloc(pins->holders, cap * sizeof(*grown));
		if (!grown)
			return NULL;
		pins->holders = grown;
		pins->holders_cap = cap;
	}
	struct pin_holder *holder = &pins->holders[pins->nholders];
	int rc = pins->method == PIN_IOURING ? open_ring(holder) : open_pipe(holder, pins->page_size);
	if (rc != 0)
		return NULL;
	pins->nholders++;
	return holder;
}

struct pin_set *pin_set_create(enum pin_method method, char *err, size_t errlen)
{
	struct pin_set *pins = calloc(1, sizeof(*pins));
	if (!pins) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	pins->page_size = (size_t)sysconf(_SC_PAGESIZE);
	pins->method = method == PIN_AUTO ? PIN_IOURING : method;
	if (pins->method == PIN_NONE)
		return pins;

	/* Open the first holder now, so an unusable method fails before any work. */
	if (add_holder(pins))
		return pins;
	if (method == PIN_AUTO) {
		pins->method = PIN_VMSPLICE;
		if (add_holder(pins))
			return pins;
	}
	if (pins->method == PIN_IOURING)
		snprintf(err, errlen,
			 "cannot set up io_uring registered buffers: %s (is kernel.io_uring_disabled set, "
			 "or io_uring blocked by seccomp? try --pin vmsplice)",
			 strerror(errno));
	else
		snprintf(err, errlen, "cannot open a pipe for vmsplice pins: %s", strerror(errno));
	free(pins);
	return NULL;
}

enum pin_method pin_set_method(const struct pin_set *pins)
{
	return pins->method;
}

static int pin_into_ring(struct pin_holder *ring, const struct iovec *pages, size_t n)
{
	struct io_uring_rsrc_update2 update;
	memset(&update, 0, sizeof(update));
	update.offset = (uint32_t)ring->used;
	update.data = (uint64_t)(uintptr_t)pages;
	update.nr = (uint32_t)n;
	int done = io_uring_register_call(ring->fd, IORING_REGISTER_BUFFERS_UPDATE, &update, sizeof(update));
	if (done < 0)
		return -1;
	ring->used += (size_t)done;
	if ((size_t)done != n) {
		errno = EIO;
		return -1;
	}
	return 0;
}

static int pin_into_pipe(struct pin_holder *pipe_holder, const struct iovec *pages, size_t n,
			 size_t page_size)
{
	while (n > 0) {
		size_t batch = n < VMSPLICE_MAX_IOV ? n : VMSPLICE_MAX_IOV;
		/* Non-blocking: a pipe that is fuller than we think must fail, not hang. */
		ssize_t bytes = vmsplice(pipe_holder->fd, pages, batch, SPLICE_F_NONBLOCK);
		if (bytes < 0)
			return -1;
		size_t spliced = (size_t)bytes / page_size;
		if (spliced == 0) {
			errno = EIO;
			return -1;
		}
		pipe_holder->used += spliced;
		pages += spliced;
		n -= spliced;
	}
	return 0;
}

int pin_pages(struct pin_set *pins, const struct iovec *pages, size_t n)
{
	if (pins->method == PIN_NONE) {
		pins->pinned += n;
		return 0;
	}
	while (n > 0) {
		struct pin_holder *holder = pins->nholders ? &pins->holders[pins->nholders - 1] : NULL;
		if (!holder || holder->used == holder->capacity) {
			holder = add_holder(pins);
			if (!holder)
				return -1;
		}
		size_t room = holder->capacity - holder->used;
		size_t batch = n < room ? n : room;
		size_t used_before = holder->used;
		int rc = pins->method == PIN_IOURING ? pin_into_ring(holder, pages, batch)
						     : pin_into_pipe(holder, pages, batch, pins->page_size);
		pins->pinned += holder->used - used_before;
		if (rc != 0)
			return -1;
		pages += batch;
		n -= batch;
	}
	return 0;
}

size_t pin_set_count(const struct pin_set *pins)
{
	return pins->pinned;
}

void pin_set_release(struct pin_set *pins)
{
	if (!pins)
		return;
	for (size_t i = 0; i < pins->nholders; i++)
		close_holder(pins, &pins->holders[i]);
	free(pins->holders);
	free(pins);
}
