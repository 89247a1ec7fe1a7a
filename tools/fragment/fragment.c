/* fragment: breaks up this machine's free physical memory so that fresh THP
 * faults fall back to 4 KiB pages, holds that state, and undoes it.
 * How: harvest.h (which blocks, and why THP faults), pin.h (why pinned).
 * Usage and exit codes: usage() below and README.md. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harvest.h"
#include "memstat.h"
#include "pin.h"

enum {
	EXIT_USAGE = 2,
	EXIT_MARGIN = 3,
	EXIT_NOT_FRAGMENTED = 4,
	EXIT_EXEC_FAILED = 127, /* as a shell: the command could not be run */
};

#define PROBE_FAULTS 16
#define STATUS_INTERVAL_S 5
#define PROGRESS_INTERVAL_S 2
/* A THP fault that falls back has already been through direct compaction (and
 * reclaim) in the kernel; a few in a row mean no free block is left. */
#define FAILURES_TO_EXHAUST 3
#define VERIFY_ROUNDS 3
/* Above this much MemFree that buddyinfo does not show, say why. */
#define UNLISTED_NOTE_KIB (256L * 1024)

struct options {
	int fill_pct;
	long max_mib;    /* 0: no cap */
	long margin_mib; /* -1: the default */
	unsigned keep_every;
	enum pin_method pin;
	long hold_seconds; /* -1: until a signal */
	bool hold_given;
	bool check;
	bool compact_in_check;
	bool no_compact;
	bool quiet;
	bool json;
	char **command; /* after "--", or NULL */
};

struct snapshot {
	bool taken;
	struct meminfo mem;
	struct buddy_summary buddy;
};

/* Everything the human and JSON reports print. */
struct run_report {
	struct snapshot before, during, after;
	const char *pin_method;
	size_t harvested_blocks;
	size_t pinned_bytes;
	double harvest_seconds;
	const char *stop;
	long moved_by_compaction; /* -1: not checked */
	long probe_thp;           /* -1: not probed */
	long probe_thp_after;     /* -1: not probed */
	long reharvested_blocks;
	long unmapped_after;      /* harvested blocks no process maps a page of, after undo; -1: unknown */
	int child_status;         /* -1: no child */
	int exit_code;
};

static size_t g_block_size;
static unsigned g_block_order;
static bool g_quiet;
static FILE *g_out; /* human report: stderr, so a wrapped command's stdout stays its own */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	if (g_quiet)
		return;
	va_list ap;
	va_start(ap, fmt);
	fputs("fragment: ", g_out);
	vfprintf(g_out, fmt, ap);
	fputc('\n', g_out);
	va_end(ap);
	fflush(g_out);
}

static void complain(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void complain(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("fragment: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long block_kib(void)
{
	return (long)(g_block_size / 1024);
}

static void usage(FILE *f)
{
	fprintf(f,
"usage: fragment [options] [--hold SECONDS | --until-signal]\n"
"       fragment [options] -- CMD [ARGS...]\n"
"       fragment --check [--compact] [--json]\n"
"\n"
"Breaks up free physical memory so that fresh transparent huge page (THP) faults\n"
"fall back to 4 KiB pages, holds that state, then undoes it. Each free 2 MiB\n"
"block is taken as a THP, split, one page in every N pinned with io_uring\n"
"registered buffers (unmovable: compaction cannot undo it), the rest freed.\n"
"Free memory stays high; free 2 MiB blocks drop to about none. Needs root.\n"
"\n"
"  --fill PCT         fragment PCT%% of free memory (MemFree) in 2 MiB blocks;\n"
"                     100 (default) = every block the kernel will hand out.\n"
"                     Anything less leaves THPs available in the rest.\n"
"  --max-mib N        fragment at most N MiB (for small, quick runs)\n"
"  --margin-mib N     never let MemAvailable fall below N MiB\n"
"                     (default: max(1 GiB, 10%% of MemTotal))\n"
"  --keep-every N     pin 1 of every N pages of a block, 2..512 (default 512:\n"
"                     one 4 KiB pin per 2 MiB). Small N pins N-times more memory\n"
"                     and leaves only order < log2(N) free blocks, which starves\n"
"                     the kernel's own multi-page allocations.\n"
"  --pin METHOD       auto (default: iouring, else vmsplice), iouring, vmsplice,\n"
"                     or none (movable fragmentation that compaction may undo)\n"
"  --hold SECONDS     hold the fragmented state this long, then undo\n"
"  --until-signal     hold until SIGINT/SIGTERM/SIGHUP (the default)\n"
"  -- CMD [ARGS...]   fragment, run CMD, undo when it ends\n"
"  --no-compact       skip the check that vm.compact_memory cannot undo it\n"
"  --check            print free 2 MiB blocks and a THP fault probe, then exit\n"
"  --compact          with --check: run vm.compact_memory first\n"
"  --quiet            print nothing but errors (and --json)\n"
"  --json             print one JSON report on stdout at the end\n"
"  --help             this text\n"
"\n"
"While holding, fragment re-takes any 2 MiB block that becomes free (when\n"
"--fill is 100 and --max-mib unset) and prints a status line every %d s.\n"
"\n"
"Exit status:\n"
"  0    done (fragmented, held, undone; or --check)\n"
"  2    bad usage, or not root\n"
"  3    refused or stopped by the safety margin\n"
"  4    could not fragment: no THP to take, pins did not hold, or a THP fault\n"
"       still succeeded after every block was taken\n"
"  128+N  --hold, or the fragmenting itself, cut short by signal N (a signal\n"
"       that ends --until-signal gives 0)\n"
"  With -- CMD: CMD's own exit status (128+N if it died of signal N, 127 if it\n"
"  could not be run); 2-4 from fragment itself happen before CMD starts.\n"
"\n"
"Undo is automatic: pins belong to file descriptors, so the kernel drops them\n"
"when fragment exits in any way, SIGKILL included. No sysctl is changed.\n",
		STATUS_INTERVAL_S);
}

static bool parse_long(const char *text, long min, long max, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || v < min || v > max)
		return false;
	*out = v;
	return true;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("fragment: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputs("\n(fragment --help for usage)\n", stderr);
	va_end(ap);
	return EXIT_USAGE;
}

/* 0 to go on, -1 for --help, else the exit code of a usage error. */
static int parse_options(int argc, char **argv, struct options *o)
{
	enum { OPT_FILL = 256, OPT_MAX_MIB, OPT_MARGIN, OPT_KEEP, OPT_PIN, OPT_HOLD, OPT_UNTIL,
	       OPT_NO_COMPACT, OPT_CHECK, OPT_COMPACT, OPT_QUIET, OPT_JSON, OPT_HELP };
	static const struct option longopts[] = {
		{"fill", required_argument, NULL, OPT_FILL},
		{"max-mib", required_argument, NULL, OPT_MAX_MIB},
		{"margin-mib", required_argument, NULL, OPT_MARGIN},
		{"keep-every", required_argument, NULL, OPT_KEEP},
		{"pin", required_argument, NULL, OPT_PIN},
		{"hold", required_argument, NULL, OPT_HOLD},
		{"until-signal", no_argument, NULL, OPT_UNTIL},
		{"no-compact", no_argument, NULL, OPT_NO_COMPACT},
		{"check", no_argument, NULL, OPT_CHECK},
		{"compact", no_argument, NULL, OPT_COMPACT},
		{"quiet", no_argument, NULL, OPT_QUIET},
		{"json", no_argument, NULL, OPT_JSON},
		{"help", no_argument, NULL, OPT_HELP},
		{NULL, 0, NULL, 0},
	};
	*o = (struct options){.fill_pct = 100, .margin_mib = -1, .keep_every = 512,
			      .pin = PIN_AUTO, .hold_seconds = -1};
	bool until_signal = false;
	long v;
	int opt;
	opterr = 0;
	/* "+": stop at the first non-option, so CMD's own options stay CMD's. */
	while ((opt = getopt_long(argc, argv, "+", longopts, NULL)) != -1) {
		switch (opt) {
		case OPT_FILL:
			if (!parse_long(optarg, 1, 100, &v))
				return usage_error("--fill wants a percentage from 1 to 100, got '%s'", optarg);
			o->fill_pct = (int)v;
			break;
		case OPT_MAX_MIB:
			if (!parse_long(optarg, 1, LONG_MAX / 1024, &v))
				return usage_error("--max-mib wants a positive number of MiB, got '%s'", optarg);
			o->max_mib = v;
			break;
		case OPT_MARGIN:
			if (!parse_long(optarg, 0, LONG_MAX / 1024, &v))
				return usage_error("--margin-mib wants a number of MiB >= 0, got '%s'", optarg);
			o->margin_mib = v;
			break;
		case OPT_KEEP:
			if (!parse_long(optarg, 2, 1L << 20, &v))
				return usage_error("--keep-every wants a number of pages >= 2, got '%s'", optarg);
			o->keep_every = (unsigned)v;
			break;
		case OPT_PIN:
			if (strcmp(optarg, "auto") == 0)
				o->pin = PIN_AUTO;
			else if (strcmp(optarg, "iouring") == 0)
				o->pin = PIN_IOURING;
			else if (strcmp(optarg, "vmsplice") == 0)
				o->pin = PIN_VMSPLICE;
			else if (strcmp(optarg, "none") == 0)
				o->pin = PIN_NONE;
			else
				return usage_error("--pin wants auto, iouring, vmsplice or none, got '%s'", optarg);
			break;
		case OPT_HOLD:
			if (!parse_long(optarg, 0, INT_MAX, &v))
				return usage_error("--hold wants a number of seconds >= 0, got '%s'", optarg);
			o->hold_seconds = v;
			o->hold_given = true;
			break;
		case OPT_UNTIL:
			until_signal = true;
			break;
		case OPT_NO_COMPACT:
			o->no_compact = true;
			break;
		case OPT_CHECK:
			o->check = true;
			break;
		case OPT_COMPACT:
			o->compact_in_check = true;
			break;
		case OPT_QUIET:
			o->quiet = true;
			break;
		case OPT_JSON:
			o->json = true;
			break;
		case OPT_HELP:
			usage(stdout);
			return -1;
		default:
			if (optopt)
				return usage_error("option '%s' needs a value", argv[optind - 1]);
			return usage_error("unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc) {
		if (strcmp(argv[optind - 1], "--") != 0)
			return usage_error("unexpected argument '%s'; put a command to run after '--'",
					   argv[optind]);
		o->command = argv + optind;
	} else if (optind > 0 && strcmp(argv[optind - 1], "--") == 0) {
		return usage_error("'--' must be followed by a command to run");
	}
	if (until_signal && o->hold_given)
		return usage_error("--hold and --until-signal exclude each other");
	if (o->command && (until_signal || o->hold_given))
		return usage_error("with -- CMD, fragment holds until CMD ends; drop --hold/--until-signal");
	if (o->check && (o->command || until_signal || o->hold_given))
		return usage_error("--check only looks; it takes no --hold, --until-signal or command");
	if (o->compact_in_check && !o->check)
		return usage_error("--compact goes with --check (fragmenting compacts unless --no-compact)");
	return 0;
}

/* Stop requests are blocked and collected here, never handled asynchronously,
 * so no step is cut off half way. */
static sigset_t g_stop_signals;

static bool stop_signal_pending(void)
{
	sigset_t pending;
	sigpending(&pending);
	return sigismember(&pending, SIGINT) || sigismember(&pending, SIGTERM) ||
	       sigismember(&pending, SIGHUP);
}

static int take_stop_signal(void)
{
	struct timespec zero = {0, 0};
	int sig = sigtimedwait(&g_stop_signals, NULL, &zero);
	return sig > 0 ? sig : 0;
}

static int take_snapshot(struct snapshot *s)
{
	if (read_meminfo(&s->mem) != 0 || read_buddyinfo(g_block_order, &s->buddy) != 0) {
		complain("cannot read /proc/meminfo or /proc/buddyinfo: %s", strerror(errno));
		return -1;
	}
	s->taken = true;
	return 0;
}

static void describe_zones(const struct buddy_summary *b, char *buf, size_t len)
{
	size_t used = 0;
	buf[0] = '\0';
	for (int i = 0; i < b->nzones && used < len; i++) {
		const struct zone_free *z = &b->zones[i];
		int n = z->node ? snprintf(buf + used, len - used, "%snode%d %s %ld", i ? ", " : "",
					   z->node, z->name, z->free_blocks)
				: snprintf(buf + used, len - used, "%s%s %ld", i ? ", " : "", z->name,
					   z->free_blocks);
		if (n < 0)
			break;
		used += (size_t)n;
	}
}

static void say_snapshot(const char *when, const struct snapshot *s)
{
	char zones[512];
	describe_zones(&s->buddy, zones, sizeof(zones));
	say("%s: free %ld KiB blocks: %ld (%s); MemFree %ld MiB, MemAvailable %ld MiB", when,
	    block_kib(), s->buddy.free_blocks, zones, s->mem.free_kib / 1024, s->mem.available_kib / 1024);
	long page_kib = sysconf(_SC_PAGESIZE) / 1024;
	long unlisted_kib = s->mem.free_kib - s->buddy.free_pages * page_kib;
	if (unlisted_kib > UNLISTED_NOTE_KIB)
		say("%s: %ld MiB of MemFree is not in /proc/buddyinfo: per-cpu page lists, or memory the "
		    "kernel initialises lazily (it joins the buddy lists when allocations need it)",
		    when, unlisted_kib / 1024);
}

static void compact_all_memory(void)
{
	int fd = open("/proc/sys/vm/compact_memory", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "1", 1) != 1)
		complain("cannot write /proc/sys/vm/compact_memory (%s); skipping the compaction check",
			 strerror(errno));
	if (fd >= 0)
		close(fd);
}

enum stop_reason { STOP_TARGET, STOP_EXHAUSTED, STOP_MARGIN, STOP_SIGNAL, STOP_FULL, STOP_ERROR };

static const char *const stop_reason_text[] = {
	[STOP_TARGET] = "target reached",
	[STOP_EXHAUSTED] = "no free block left",
	[STOP_MARGIN] = "safety margin reached",
	[STOP_SIGNAL] = "interrupted by a signal",
	[STOP_FULL] = "every block of MemTotal taken",
	[STOP_ERROR] = "error",
};

static enum stop_reason harvest_round(struct harvester *h, size_t target_blocks, long margin_kib,
				      bool show_progress)
{
	unsigned failures = 0;
	double next_progress = now_seconds() + PROGRESS_INTERVAL_S;
	enum stop_reason reason = STOP_TARGET;
	while (h->nblocks < target_blocks) {
		if (stop_signal_pending()) {
			reason = STOP_SIGNAL;
			break;
		}
		struct meminfo mem;
		if (read_meminfo(&mem) != 0) {
			complain("cannot read /proc/meminfo to watch the safety margin: %s", strerror(errno));
			reason = STOP_ERROR;
			break;
		}
		if (mem.available_kib - block_kib() < margin_kib) {
			reason = STOP_MARGIN;
			break;
		}
		enum harvest_result result = harvest_block(h);
		if (result == HARVEST_OK) {
			failures = 0;
		} else if (result == HARVEST_NO_THP || result == HARVEST_NO_SPLIT) {
			if (++failures == FAILURES_TO_EXHAUST) {
				reason = STOP_EXHAUSTED;
				break;
			}
		} else {
			reason = result == HARVEST_FULL ? STOP_FULL : STOP_ERROR;
			if (result == HARVEST_ERROR)
				complain("harvesting block %zu failed: %s", h->nblocks, strerror(errno));
			break;
		}
		if (show_progress && now_seconds() >= next_progress) {
			say("... %zu blocks (%zu MiB) broken up, %zu MiB pinned", h->nblocks,
			    h->nblocks * (g_block_size >> 20), harvester_pinned_bytes(h) >> 20);
			next_progress += PROGRESS_INTERVAL_S;
		}
	}
	harvester_settle(h);
	return reason;
}

static int exit_code_of_child(int status)
{
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return EXIT_EXEC_FAILED;
}

static pid_t start_command(char **command, const sigset_t *original_mask)
{
	fflush(NULL);
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	sigprocmask(SIG_SETMASK, original_mask, NULL);
	execvp(command[0], command);
	int exec_errno = errno;
	fprintf(stderr, "fragment: cannot run '%s': %s\n", command[0], strerror(exec_errno));
	_exit(exec_errno == ENOENT ? EXIT_EXEC_FAILED : 126);
}

struct hold_plan {
	pid_t child;        /* 0: none */
	long seconds;       /* -1: until a signal (or the child ends) */
	bool reharvest;     /* take blocks that become free again */
	long margin_kib;
};

static void say_hold_status(const struct harvester *h, double held, long reharvested)
{
	struct buddy_summary buddy;
	if (read_buddyinfo(g_block_order, &buddy) != 0)
		return;
	say("holding %.0f s: free %ld KiB blocks %ld, pinned %zu MiB in %zu blocks, re-taken %ld", held,
	    block_kib(), buddy.free_blocks, harvester_pinned_bytes(h) >> 20, h->nblocks, reharvested);
}

/* Takes back blocks freed since the last look (a process exited, compaction
 * made one). Costs one read of buddyinfo while there are no more free blocks
 * than at the last look; that floor includes blocks THP never uses (ZONE_DMA). */
static void reharvest_if_freed(struct harvester *h, const struct hold_plan *plan, long *floor_blocks,
			       long *reharvested)
{
	struct buddy_summary buddy;
	if (!plan->reharvest || read_buddyinfo(g_block_order, &buddy) != 0)
		return;
	if (buddy.free_blocks > *floor_blocks) {
		size_t before = h->nblocks;
		harvest_round(h, SIZE_MAX, plan->margin_kib, false);
		*reharvested += (long)(h->nblocks - before);
		if (read_buddyinfo(g_block_order, &buddy) != 0)
			return;
	}
	*floor_blocks = buddy.free_blocks;
}

/* Returns the exit code: the child's, 0 when the hold ran its course or a
 * signal ended --until-signal, 128+N when signal N cut a --hold short. */
static int hold(struct harvester *h, const struct hold_plan *plan, long *reharvested, int *child_status)
{
	sigset_t waited = g_stop_signals;
	sigaddset(&waited, SIGCHLD);
	struct buddy_summary buddy;
	long floor_blocks = read_buddyinfo(g_block_order, &buddy) == 0 ? buddy.free_blocks : 0;
	double start = now_seconds();
	double next_status = start + STATUS_INTERVAL_S;
	for (;;) {
		double now = now_seconds();
		if (plan->seconds >= 0 && now - start >= (double)plan->seconds)
			return 0;
		double wake = next_status;
		if (plan->seconds >= 0 && start + (double)plan->seconds < wake)
			wake = start + (double)plan->seconds;
		double wait = wake > now ? wake - now : 0;
		struct timespec timeout = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
		siginfo_t info;
		int sig = sigtimedwait(&waited, &info, &timeout);
		if (sig == SIGCHLD) {
			int status;
			if (plan->child && waitpid(plan->child, &status, WNOHANG) == plan->child) {
				*child_status = status;
				return exit_code_of_child(status);
			}
		} else if (sig > 0) {
			if (!plan->child)
				return plan->seconds >= 0 ? 128 + sig : 0;
			/* A terminal's ^C reaches CMD through the process group already;
			 * a signal sent to fragment alone is passed on. */
			if (info.si_code == SI_USER || info.si_code == SI_QUEUE)
				kill(plan->child, sig);
		} else if (now_seconds() >= next_status) {
			reharvest_if_freed(h, plan, &floor_blocks, reharvested);
			say_hold_status(h, now_seconds() - start, *reharvested);
			next_status += STATUS_INTERVAL_S;
		}
	}
}

static void json_snapshot(FILE *f, const char *name, const struct snapshot *s)
{
	if (!s->taken) {
		fprintf(f, "\"%s\":null", name);
		return;
	}
	fprintf(f, "\"%s\":{\"free_blocks\":%ld,\"mem_free_mib\":%ld,\"mem_available_mib\":%ld,\"zones\":[",
		name, s->buddy.free_blocks, s->mem.free_kib / 1024, s->mem.available_kib / 1024);
	for (int i = 0; i < s->buddy.nzones; i++)
		fprintf(f, "%s{\"node\":%d,\"zone\":\"%s\",\"free_blocks\":%ld}", i ? "," : "",
			s->buddy.zones[i].node, s->buddy.zones[i].name, s->buddy.zones[i].free_blocks);
	fputs("]}", f);
}

static void json_report(const struct options *o, const struct run_report *r)
{
	FILE *f = stdout;
	fprintf(f, "{\"mode\":\"%s\",\"block_kib\":%ld,\"probe_faults\":%d,\"probe_thp\":%ld,",
		o->check ? "check" : "fragment", block_kib(), PROBE_FAULTS, r->probe_thp);
	if (o->check) {
		json_snapshot(f, "now", &r->during);
	} else {
		fprintf(f, "\"pin\":\"%s\",\"keep_every\":%u,\"harvested_blocks\":%zu,\"pinned_mib\":%.1f,"
			   "\"harvest_seconds\":%.2f,\"stop\":\"%s\",\"moved_by_compaction\":%ld,"
			   "\"reharvested_blocks\":%ld,\"unmapped_blocks_after\":%ld,\"probe_thp_after\":%ld,",
			r->pin_method, o->keep_every, r->harvested_blocks, (double)r->pinned_bytes / (1 << 20),
			r->harvest_seconds, r->stop ? r->stop : "", r->moved_by_compaction,
			r->reharvested_blocks, r->unmapped_after, r->probe_thp_after);
		json_snapshot(f, "before", &r->before);
		fputc(',', f);
		json_snapshot(f, "during", &r->during);
		fputc(',', f);
		json_snapshot(f, "after", &r->after);
		if (r->child_status >= 0)
			fprintf(f, ",\"child_exit\":%d", exit_code_of_child(r->child_status));
	}
	fprintf(f, ",\"exit\":%d}\n", r->exit_code);
	fflush(f);
}

static int run_check(const struct options *o, struct run_report *r)
{
	if (o->compact_in_check)
		compact_all_memory();
	if (take_snapshot(&r->during) != 0)
		return EXIT_NOT_FRAGMENTED;
	say_snapshot("now", &r->during);
	r->probe_thp = probe_thp_faults(g_block_size, PROBE_FAULTS);
	if (r->probe_thp < 0) {
		complain("THP probe failed: %s", strerror(errno));
		return EXIT_NOT_FRAGMENTED;
	}
	say("probe: %ld of %d fresh MADV_HUGEPAGE faults got a THP", r->probe_thp, PROBE_FAULTS);
	return 0;
}

/* Compaction must not move a pinned page, and once every block is taken no
 * fresh fault may get a THP; blocks that compaction or reclaim free up on
 * the way are taken too. Returns 0 or EXIT_NOT_FRAGMENTED. */
static int verify_fragmented(struct harvester *h, const struct options *o, bool fill_all,
			     long margin_kib, struct run_report *r)
{
	if (!o->no_compact) {
		compact_all_memory();
		r->moved_by_compaction = harvester_count_moved(h);
		say("vm.compact_memory moved %ld of %zu kept pages", r->moved_by_compaction,
		    pin_set_count(h->pins));
	}
	for (int round = 0; round < VERIFY_ROUNDS; round++) {
		if (fill_all)
			harvest_round(h, SIZE_MAX, margin_kib, false);
		r->probe_thp = probe_thp_faults(g_block_size, PROBE_FAULTS);
		if (!fill_all || r->probe_thp == 0)
			break;
	}
	say("probe: %ld of %d fresh MADV_HUGEPAGE faults got a THP", r->probe_thp, PROBE_FAULTS);
	if (pin_set_method(h->pins) != PIN_NONE && r->moved_by_compaction > 0) {
		complain("compaction moved %ld pinned pages: pinning with %s does not make pages unmovable "
			 "on this kernel; try another --pin", r->moved_by_compaction, r->pin_method);
		return EXIT_NOT_FRAGMENTED;
	}
	if (r->probe_thp < 0) {
		complain("THP probe failed: %s", strerror(errno));
		return EXIT_NOT_FRAGMENTED;
	}
	if (fill_all && r->probe_thp > 0) {
		complain("fresh THP faults still succeed after every free block was taken (%ld of %d); "
			 "the kernel keeps making 2 MiB blocks (reclaim, other processes freeing memory)",
			 r->probe_thp, PROBE_FAULTS);
		return EXIT_NOT_FRAGMENTED;
	}
	if (!fill_all && r->probe_thp > 0)
		say("as expected with --fill < 100 or --max-mib: the rest of memory still has 2 MiB blocks");
	return 0;
}

/* Unpins and frees, then reports how far the blocks came back. Not all at
 * once: the unpinned pages go to per-cpu free lists, which buddyinfo does not
 * show, until the kernel drains them (a THP fault that finds no free block
 * does); and while we held the blocks, other processes' small allocations went
 * into their free pages first (the buddy allocator hands out the smallest free
 * blocks first), and stay until freed or compacted. */
static void undo(struct harvester *h, struct run_report *r)
{
	size_t pinned = harvester_pinned_bytes(h);
	size_t nblocks = h->nblocks;
	unsigned pages_per_block = h->pages_per_block;
	harvester_release(h);
	r->unmapped_after = count_unmapped_blocks(h->block_pfns, nblocks, pages_per_block);
	free(h->block_pfns);
	h->block_pfns = NULL;
	if (take_snapshot(&r->after) != 0)
		return;
	say("undone: unpinned %zu MiB, freed everything", pinned >> 20);
	say_snapshot("after", &r->after);
	if (r->unmapped_after >= 0 && nblocks > 0)
		say("after: %ld of the %zu blocks we held have no page mapped by a process; the others "
		    "got pages of other processes while we held them", r->unmapped_after, nblocks);
	r->probe_thp_after = probe_thp_faults(g_block_size, PROBE_FAULTS);
	say("after: probe: %ld of %d fresh MADV_HUGEPAGE faults got a THP (pages we unpinned wait on "
	    "per-cpu lists, unseen by buddyinfo, until such a fault drains them)",
	    r->probe_thp_after, PROBE_FAULTS);
}

static int run_fragment(const struct options *o, const sigset_t *original_mask, struct run_report *r)
{
	if (take_snapshot(&r->before) != 0)
		return EXIT_NOT_FRAGMENTED;
	say_snapshot("before", &r->before);

	const struct meminfo *mem = &r->before.mem;
	long margin_mib = o->margin_mib >= 0 ? o->margin_mib : mem->total_kib / 10 / 1024;
	if (o->margin_mib < 0 && margin_mib < 1024)
		margin_mib = 1024;
	long margin_kib = margin_mib * 1024;
	if (mem->available_kib - block_kib() < margin_kib) {
		complain("refusing to start: MemAvailable is %ld MiB, not above the safety margin of %ld MiB "
			 "(--margin-mib) by one block", mem->available_kib / 1024, margin_mib);
		return EXIT_MARGIN;
	}

	char err[256];
	struct pin_set *pins = pin_set_create(o->pin, err, sizeof(err));
	if (!pins) {
		complain("%s", err);
		return EXIT_NOT_FRAGMENTED;
	}
	r->pin_method = pin_method_name(pin_set_method(pins));
	size_t max_blocks = (size_t)mem->total_kib / (size_t)block_kib() + 64;
	struct harvester h;
	if (harvester_init(&h, g_block_size, o->keep_every, max_blocks, pins) != 0) {
		complain("cannot set up: %s", strerror(errno));
		harvester_release(&h);
		return EXIT_NOT_FRAGMENTED;
	}

	bool fill_all = o->fill_pct == 100 && o->max_mib == 0;
	size_t target = max_blocks;
	if (!fill_all) {
		target = (size_t)(mem->free_kib / 100 * o->fill_pct / block_kib());
		if (o->max_mib && (size_t)(o->max_mib * 1024 / block_kib()) < target)
			target = (size_t)(o->max_mib * 1024 / block_kib());
	}
	say("taking %s free %ld KiB blocks as THPs, pinning 1 of every %u pages with %s, margin %ld MiB",
	    fill_all ? "every" : "up to", block_kib(), o->keep_every, r->pin_method, margin_mib);
	if (!fill_all)
		say("target: %zu blocks (%zu MiB)", target, target * (g_block_size >> 20));

	double t0 = now_seconds();
	enum stop_reason stop = harvest_round(&h, target, margin_kib, true);
	r->harvest_seconds = now_seconds() - t0;
	r->stop = stop_reason_text[stop];
	r->harvested_blocks = h.nblocks;
	r->pinned_bytes = harvester_pinned_bytes(&h);
	say("broke up %zu blocks (%zu MiB) in %.1f s, %zu MiB pinned: %s", h.nblocks,
	    h.nblocks * (g_block_size >> 20), r->harvest_seconds, r->pinned_bytes >> 20, r->stop);

	int code = 0;
	if (stop == STOP_SIGNAL) {
		code = 128 + take_stop_signal();
	} else if (stop == STOP_MARGIN) {
		complain("stopped: MemAvailable reached the safety margin of %ld MiB before the target; "
			 "raise --keep-every (fewer pins) or lower --margin-mib", margin_mib);
		code = EXIT_MARGIN;
	} else if (stop == STOP_ERROR) {
		code = EXIT_NOT_FRAGMENTED;
	} else if (h.nblocks == 0) {
		complain("no THP fault succeeded, so there is nothing to break up; see fragment --check");
		code = EXIT_NOT_FRAGMENTED;
	} else {
		code = verify_fragmented(&h, o, fill_all, margin_kib, r);
	}
	r->harvested_blocks = h.nblocks;
	r->pinned_bytes = harvester_pinned_bytes(&h);
	if (take_snapshot(&r->during) == 0)
		say_snapshot("during", &r->during);
	if (code != 0) {
		undo(&h, r);
		return code;
	}

	struct hold_plan plan = {.seconds = o->command ? -1 : o->hold_seconds, .reharvest = fill_all,
				 .margin_kib = margin_kib};
	if (o->command) {
		say("running: %s", o->command[0]);
		plan.child = start_command(o->command, original_mask);
		if (plan.child < 0) {
			complain("cannot fork to run '%s': %s", o->command[0], strerror(errno));
			undo(&h, r);
			return EXIT_EXEC_FAILED;
		}
	} else if (o->hold_seconds >= 0) {
		say("holding for %ld s", o->hold_seconds);
	} else {
		say("holding until SIGINT/SIGTERM/SIGHUP (pid %d)", (int)getpid());
	}
	code = hold(&h, &plan, &r->reharvested_blocks, &r->child_status);
	if (o->command)
		say("'%s' ended with status %d", o->command[0], code);
	undo(&h, r);
	return code;
}

int main(int argc, char **argv)
{
	struct options o;
	int rc = parse_options(argc, argv, &o);
	if (rc != 0)
		return rc < 0 ? 0 : rc;
	g_quiet = o.quiet;
	g_out = o.check ? stdout : stderr;
	if (o.check && o.json)
		g_out = stderr;

	if (geteuid() != 0) {
		complain("needs root: it reads physical frame numbers (/proc/self/pagemap, /proc/kpageflags), "
			 "pins memory and writes vm.compact_memory; run it with sudo");
		return EXIT_USAGE;
	}
	g_block_size = read_thp_block_size();
	size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
	if (g_block_size < page_size) {
		complain("this kernel has no transparent huge pages "
			 "(/sys/kernel/mm/transparent_hugepage/hpage_pmd_size is missing)");
		return EXIT_NOT_FRAGMENTED;
	}
	unsigned pages_per_block = (unsigned)(g_block_size / page_size);
	while ((1UL << g_block_order) < pages_per_block)
		g_block_order++;
	if (o.keep_every > pages_per_block)
		return usage_error("--keep-every must be at most %u, the pages in one huge page", pages_per_block);

	char enabled[32];
	if (!o.check && read_thp_setting("enabled", enabled, sizeof(enabled)) == 0 &&
	    strcmp(enabled, "never") == 0) {
		complain("THP is off (transparent_hugepage/enabled = never): no fault gets a THP, so there is "
			 "nothing to fragment; echo madvise > /sys/kernel/mm/transparent_hugepage/enabled");
		return EXIT_NOT_FRAGMENTED;
	}

	sigemptyset(&g_stop_signals);
	sigaddset(&g_stop_signals, SIGINT);
	sigaddset(&g_stop_signals, SIGTERM);
	sigaddset(&g_stop_signals, SIGHUP);
	sigset_t blocked = g_stop_signals, original_mask;
	sigaddset(&blocked, SIGCHLD);
	sigprocmask(SIG_BLOCK, &blocked, &original_mask);

	struct run_report report = {.moved_by_compaction = -1, .probe_thp = -1, .probe_thp_after = -1,
				    .unmapped_after = -1,
				    .child_status = -1,
				    .pin_method = pin_method_name(o.pin)};
	report.exit_code = o.check ? run_check(&o, &report) : run_fragment(&o, &original_mask, &report);
	if (o.json)
		json_report(&o, &report);
	return report.exit_code;
}
