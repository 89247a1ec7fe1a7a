#!/usr/bin/env bash
# memcached: values of many slab classes written, overwritten, appended to,
# counted and deleted by a socket client, all read back and checked, then
# SIGTERM and a clean exit.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init memcached
it_need memcached command -v memcached
it_need python3 test -x /usr/bin/python3

# mc_client PORT PREFIX: writes keys PREFIX:*, reads them back and prints a
# digest, exits 1 on any mismatch; PREFIX "stats" prints the server's counters.
mc_client() {
  timeout 120 /usr/bin/python3 - "$@" <<'EOF'
import hashlib, socket, sys

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
# Without it, delayed ACKs cost 40 ms for each request that takes two segments.
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = sock.makefile("rwb")
prefix = sys.argv[2]

def call(line, data=None):
    f.write(line.encode() + b"\r\n" + (b"" if data is None else data + b"\r\n"))
    f.flush()
    return f.readline().rstrip(b"\r\n").decode()

def expect(got, want, what):
    if got != want:
        sys.exit(f"{what}: got {got!r}, want {want!r}")

def get_many(keys):
    f.write(("get " + " ".join(keys) + "\r\n").encode())
    f.flush()
    found = {}
    while True:
        head = f.readline().rstrip(b"\r\n").decode().split()
        if head == ["END"]:
            return found
        expect(head[0], "VALUE", "get header")
        data = f.read(int(head[3]) + 2)
        found[head[1]] = data[:-2]

if prefix == "stats":
    f.write(b"stats\r\n")
    f.flush()
    stats = {}
    while (line := f.readline().rstrip(b"\r\n").decode()) != "END":
        _, name, val = line.split(" ", 2)
        stats[name] = val
    for name in ("curr_items", "total_items", "cmd_get", "get_hits", "get_misses", "evictions"):
        print(name, stats[name])
    sys.exit()

# Sizes from a few bytes to 900 KiB, so that most slab classes get items.
def value(i, gen):
    size = 900 * 1024 if i % 250 == 0 else (i * 7919 + gen * 13) % (1 << (i % 17 + 1)) + 1
    unit = f"{prefix}{i}.{gen}:".encode()
    return (unit * (size // len(unit) + 1))[:size]

N = 3000
key = [f"{prefix}:{i}" for i in range(N)]
want = {}
for gen in range(3):
    for i in range(gen, N, gen + 1):
        want[key[i]] = value(i, gen)
        expect(call(f"set {key[i]} {i % 65536} 0 {len(want[key[i]])}", want[key[i]]), "STORED", "set " + key[i])
for i in range(0, N, 7):
    tail = b"+" * (i % 100)
    expect(call(f"append {key[i]} 0 0 {len(tail)}", tail), "STORED", "append " + key[i])
    want[key[i]] += tail
for i in range(0, N, 11):
    expect(call(f"delete {key[i]}"), "DELETED", "delete " + key[i])
    del want[key[i]]
counter = prefix + ":counter"
expect(call(f"set {counter} 0 0 1", b"0"), "STORED", "set " + counter)
for i in range(1000):
    call(f"incr {counter} {i}")
want[counter] = str(sum(range(1000))).encode()

got = {}
keys = sorted(want)
for k in range(0, len(keys), 100):
    got.update(get_many(keys[k:k + 100]))
missing = [k for k in keys if k not in got]
wrong = [k for k in keys if k in got and got[k] != want[k]]
if missing or wrong:
    sys.exit(f"{len(missing)} keys missing, {len(wrong)} wrong, e.g. {(missing + wrong)[:5]}")
digest = hashlib.sha256(b"".join(k.encode() + got[k] for k in keys)).hexdigest()[:16]
print(f"{prefix}: read back {len(got)} items, {sum(map(len, got.values()))} bytes, sha256 {digest}")
print(f"{prefix}: deleted keys found:", len(get_many(key[0:200:11])))
EOF
}

workload() {
  local pid rc=0 port user=()
  port=$(it_free_port)
  # memcached refuses to run as root unless told which user to be.
  [[ $(id -u) != 0 ]] || user=(-u root)
  memcached "${user[@]}" -l 127.0.0.1 -p "$port" -U 0 -t 2 -m 256 -I 2m -c 64 &
  pid=$!
  it_wait_for 100 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" || { echo "memcached did not listen" >&2; return 1; }
  it_require_mapped "$pid"
  # Two clients at once, on both worker threads, then a third that
  # overwrites the first one's items (freed and reused memory).
  mc_client "$port" a >a.txt &
  mc_client "$port" b >b.txt
  wait "$!"
  cat a.txt b.txt
  mc_client "$port" a
  mc_client "$port" stats
  kill -TERM "$pid"
  wait "$pid" || rc=$?
  echo "memcached exit code $rc"
}

it_compare_runs workload
