/* The background compactor's decisions, apart from the thread that acts on
 * them (mv_compactor.c), so that tests can check them exactly: how much CPU it
 * may spend, and when free memory inside arenas goes back to the kernel. */
#ifndef MV_POLICY_H
#define MV_POLICY_H

#include <stdbool.h>
#include <stdint.h>

#include "shim/mv_options.h"

/* ---- CPU budget: a token bucket of the compactor thread's CPU time ----
 * Credit accrues at pct% of the wall time that passes, up to cap_ns (pct% of
 * the window), and every round's measured CPU time is taken off it. So the
 * compactor averages at most pct% of a core over any window, and after a quiet
 * spell it may spend the saved credit at once (a phase change needs a burst of
 * moves; steady state needs almost none).
 * Invariant: credit_ns <= cap_ns; credit_ns < 0 only after a round overspent. */
struct mv_cpu_budget {
  int64_t credit_ns;
  int64_t cap_ns;
  unsigned pct;
};

#define MV_BUDGET_WINDOW_NS (300ull * 1000000000u) /* 6 s of CPU at 2%: about 1500 moves */

/* Starts full: a program's first growth is a phase change too. */
void mv_budget_init(struct mv_cpu_budget *b, unsigned pct, uint64_t window_ns);
void mv_budget_earn(struct mv_cpu_budget *b, uint64_t wall_ns);
void mv_budget_spend(struct mv_cpu_budget *b, uint64_t cpu_ns);

/* How many arenas this round may move: what the credit pays for at
 * cost_per_move_ns each (at least one while there is credit), at most cap.
 * 0 when the credit is spent. */
int mv_budget_moves(const struct mv_cpu_budget *b, uint64_t cost_per_move_ns, int cap);

/* ---- partial release (MOVALLOC_PURGE) ---- */

/* MemAvailable and MemTotal (kB) from the text of /proc/meminfo. False when
 * either is missing. */
bool mv_policy_parse_meminfo(const char *text, uint64_t *avail_kib, uint64_t *total_kib);

/* The pressure signal: MemAvailable below free_pct% of MemTotal. */
bool mv_policy_under_pressure(uint64_t avail_kib, uint64_t total_kib, unsigned free_pct);

/* Whether this round purges, for the mode in force (enum mv_purge_mode); read_pressure is asked
 * only in MV_PURGE_PRESSURE mode (reading /proc/meminfo is not free). */
bool mv_policy_should_purge(int mode, bool (*read_pressure)(void));

#endif /* MV_POLICY_H */
