#!/usr/bin/env bash
# redis-server (Debian's, linked against libjemalloc; movalloc must answer its
# mallctl/nallocx/malloc_stats_print calls): a known key set written, a bounded
# redis-benchmark, the key set read back byte for byte, the allocator-facing
# MEMORY/INFO commands, then SHUTDOWN NOSAVE and a clean exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init redis
it_need redis-server command -v redis-server
it_need redis-tools command -v redis-benchmark
it_need python3 test -x /usr/bin/python3

NKEYS=1000

# The value of string key it:I: its number and a slice of the alphabet, of a
# length from a few bytes to 1 MiB (every 100th key) or 64 KiB (every 10th).
gen_values() {
  it_tool awk -v n="$NKEYS" 'BEGIN {
    base = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    while (length(base) < 1100000) base = base base
    for (i = 0; i < n; i++) {
      len = i % 100 == 0 ? 1048576 : i % 10 == 0 ? 65536 : (i * 7919) % 2000 + 1
      print i ":" substr(base, i % 62 + 1, len)
    }
  }'
}

# values.txt as SET commands in the Redis protocol, for redis-cli --pipe, plus
# a list, a hash, a set and a sorted set.
gen_commands() {
  it_tool awk '
    function cmd(a, n,   s, k) {
      s = "*" n "\r\n"
      for (k = 1; k <= n; k++) s = s "$" length(a[k]) "\r\n" a[k] "\r\n"
      printf "%s", s
    }
    { a[1] = "SET"; a[2] = "it:" NR - 1; a[3] = $0; cmd(a, 3) }
    END {
      for (i = 0; i < 5000; i++) { a[1] = "RPUSH"; a[2] = "it:list"; a[3] = "item-" i * 37 % 5003; cmd(a, 3) }
      for (i = 0; i < 3000; i++) { a[1] = "HSET"; a[2] = "it:hash"; a[3] = "f" i; a[4] = sprintf("%0*d", i % 300 + 1, i); cmd(a, 4) }
      for (i = 0; i < 3000; i++) { a[1] = "SADD"; a[2] = "it:set"; a[3] = "m" i * 7 % 3001; cmd(a, 3) }
      for (i = 0; i < 3000; i++) { a[1] = "ZADD"; a[2] = "it:zset"; a[3] = i * 13 % 1000; a[4] = "z" i; cmd(a, 4) }
    }' values.txt
}

# Everything stored, read back in a fixed order.
read_back() {
  local i first
  for ((first = 0; first < NKEYS; first += 100)); do
    local keys=()
    for ((i = first; i < first + 100 && i < NKEYS; i++)); do keys+=("it:$i"); done
    rcli --raw MGET "${keys[@]}"
  done >values.back
  if ! it_tool cmp values.txt values.back >&2; then
    echo "string values read back differ from those written" >&2
    return 1
  fi
  echo "strings: $NKEYS values read back intact, sha256 $(it_tool sha256sum <values.back | it_tool cut -c1-16)"
  echo "list: $(rcli LLEN it:list) $(rcli LRANGE it:list 0 -1 | it_tool sha256sum | it_tool cut -c1-16)"
  echo "hash: $(rcli HLEN it:hash) $(rcli --raw HGETALL it:hash | it_tool paste - - | it_tool sort | it_tool sha256sum | it_tool cut -c1-16)"
  echo "set: $(rcli SCARD it:set) $(rcli SMEMBERS it:set | it_tool sort | it_tool sha256sum | it_tool cut -c1-16)"
  echo "zset: $(rcli ZCARD it:zset) $(rcli ZRANGE it:zset 0 -1 WITHSCORES | it_tool sha256sum | it_tool cut -c1-16)"
}

rcli() { timeout 60 redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

workload() {
  local pid rc=0 out
  PORT=$(it_free_port)
  redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --dir "$PWD" >redis.log &
  pid=$!
  it_wait_for 100 rcli PING || { cat redis.log >&2; return 1; }
  it_require_mapped "$pid"

  gen_values >values.txt
  gen_commands | rcli --pipe >pipe.log
  it_tool grep -q '^errors: 0, replies: 15000$' pipe.log || { cat pipe.log >&2; return 1; }
  read_back

  # Its own database, so that the key set above stays as written.
  timeout 120 redis-benchmark -h 127.0.0.1 -p "$PORT" --dbnum 1 -q -n 20000 -c 20 >bench.log
  echo "benchmark: $(it_tool tr '\r' '\n' <bench.log | it_tool sed -n 's/: [0-9.]* requests per second.*//p' | it_tool paste -sd,)"
  read_back

  # Commands that reach into the allocator; their numbers are its own.
  out=$(rcli INFO memory)
  grep -E '^(allocator_|mem_allocator)' <<<"$out" >&2
  for field in used_memory allocator_allocated allocator_resident; do
    grep -qE "^$field:[0-9]+" <<<"$out" || { echo "INFO memory: no $field" >&2; return 1; }
  done
  echo "INFO memory: $(grep '^mem_allocator:' <<<"$out" | tr -d '\r')"
  rcli MEMORY STATS | grep -qx 'allocator.allocated' || { echo "MEMORY STATS: no allocator.allocated" >&2; return 1; }
  echo "MEMORY STATS: answered"
  out=$(rcli MEMORY MALLOC-STATS)
  [[ ${#out} -gt 100 && $out != ERR* ]] || { echo "MEMORY MALLOC-STATS: '$out'" >&2; return 1; }
  echo "MEMORY MALLOC-STATS: answered"
  rcli MEMORY USAGE it:0 | grep -qE '^[0-9]+$' || { echo "MEMORY USAGE: no number" >&2; return 1; }
  echo "MEMORY USAGE: answered"
  echo "MEMORY PURGE: $(rcli MEMORY PURGE)"
  read_back

  rcli SHUTDOWN NOSAVE
  wait "$pid" || rc=$?
  echo "redis-server exit code $rc"
}

it_compare_runs workload
