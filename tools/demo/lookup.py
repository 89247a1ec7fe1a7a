"""A long-lived in-memory index, the shape of a cache server: build a big dict
of small objects, let the process settle, then time random lookups. Random
lookups over gigabytes of small objects miss the TLB on nearly every hop,
which is what huge pages fix. Prints `phase NAME` when a phase starts (tools/demo/demo.py
reads them) and `time NAME SECONDS` when it ends."""
import random
import sys
import time

entries = int(sys.argv[1]) if len(sys.argv) > 1 else 6_000_000
lookups = int(sys.argv[2]) if len(sys.argv) > 2 else 4_000_000
settle = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0

print("phase build", flush=True)
t = time.monotonic()
rng = random.Random(42)
keys = list(range(entries))
rng.shuffle(keys)  # insertion order unrelated to key order: scattered objects
index = {}
for k in keys:
    index[k] = (k, str(k), [k & 7])
print(f"time build {time.monotonic() - t:.2f}", flush=True)
print("phase settle", flush=True)

time.sleep(settle)  # a server between bursts: the compactor's chance

print("phase lookup", flush=True)
probe = [rng.randrange(entries) for _ in range(lookups)]
t = time.monotonic()
total = 0
for k in probe:
    entry = index[k]
    total += entry[0] + len(entry[1]) + entry[2][0]
print(f"time lookup {time.monotonic() - t:.2f}", flush=True)
print("phase end", flush=True)
print(f"checksum {total}")
