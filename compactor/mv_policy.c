/* The compactor's CPU budget and purge rule (see mv_policy.h). Pure arithmetic
 * and parsing: no system calls, no allocation. */
#include "compactor/mv_policy.h"

#include <string.h>

void mv_budget_init(struct mv_cpu_budget *b, unsigned pct, uint64_t window_ns) {
  b->pct = pct;
  b->cap_ns = (int64_t)(window_ns / 100 * pct);
  b->credit_ns = b->cap_ns;
}

void mv_budget_earn(struct mv_cpu_budget *b, uint64_t wall_ns) {
  int64_t earned = (int64_t)(wall_ns / 100 * b->pct);
  b->credit_ns = earned > b->cap_ns - b->credit_ns ? b->cap_ns : b->credit_ns + earned;
}

void mv_budget_spend(struct mv_cpu_budget *b, uint64_t cpu_ns) {
  b->credit_ns -= (int64_t)cpu_ns;
}

int mv_budget_moves(const struct mv_cpu_budget *b, uint64_t cost_per_move_ns, int cap) {
  if (b->credit_ns <= 0 || cap <= 0) return 0;
  uint64_t n = cost_per_move_ns ? (uint64_t)b->credit_ns / cost_per_move_ns : (uint64_t)cap;
  if (n == 0) n = 1;
  return n < (uint64_t)cap ? (int)n : cap;
}

/* The number after "Name:" in meminfo text, or false. */
static bool field_kib(const char *text, const char *name, uint64_t *out) {
  size_t len = strlen(name);
  for (const char *line = text; line && *line;) {
    if (strncmp(line, name, len) == 0 && line[len] == ':') {
      const char *p = line + len + 1;
      while (*p == ' ') p++;
      if (*p < '0' || *p > '9') return false;
      uint64_t v = 0;
      for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (uint64_t)(*p - '0');
      *out = v;
      return true;
    }
    line = strchr(line, '\n');
    if (line) line++;
  }
  return false;
}

bool mv_policy_parse_meminfo(const char *text, uint64_t *avail_kib, uint64_t *total_kib) {
  return field_kib(text, "MemAvailable", avail_kib) && field_kib(text, "MemTotal", total_kib);
}

bool mv_policy_under_pressure(uint64_t avail_kib, uint64_t total_kib, unsigned free_pct) {
  return avail_kib < total_kib / 100 * free_pct;
}

bool mv_policy_should_purge(int mode, bool (*read_pressure)(void)) {
  switch (mode) {
    case MV_PURGE_ALWAYS: return true;
    case MV_PURGE_PRESSURE: return read_pressure();
    default: return false;
  }
}
