#!/usr/bin/env bash
# gcc -O2 on a generated C file of 2000 functions (cc1, as and ld all run
# preloaded); compares the object's size and digest and the program's output.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init gcc
it_need gcc command -v gcc
it_need binutils command -v size

# gcc runs each compiler pass through this wrapper, whose parent is the driver.
gcc_probe() {
  cat >probe.sh <<'EOF'
#!/bin/sh
if grep -qF "$MOVALLOC_LIB" "/proc/$PPID/maps"; then : >"$IT_MAPPED_FILE"; fi
exec "$@"
EOF
  chmod +x probe.sh
}

workload() {
  awk 'BEGIN {
    n = 2000
    print "#include <stdio.h>\n#include <stdint.h>\n#include <string.h>"
    for (i = 0; i < n; i++) {
      printf "static uint64_t f%d(uint64_t x) {\n  uint64_t a = x * %du + %d;\n", i, 2 * i + 1, i * 7 + 3
      printf "  for (int i = 0; i < %d; i++) { a ^= a << %d; a ^= a >> %d; a += (uint64_t)i * %d; }\n",
        i % 17 + 3, i % 11 + 3, i % 7 + 5, i % 13 + 1
      if (i > 0) printf "  if (a %% %d == 0) a += f%d(a >> 3);\n", i % 29 + 31, i - 1
      if (i % 5 == 0) {
        printf "  switch (a & 7) { case 0: a += %d; break; case 3: a *= 3; break; case 5: a -= %d; break; default: a ^= %d; }\n", i, i * 3, i * 11
        printf "  char buf[64]; memset(buf, (int)(a & 0xff), sizeof buf); a += (uint64_t)buf[%d];\n", i % 64
      }
      print "  return a;\n}"
    }
    print "int main(void) {\n  uint64_t s = 0;"
    for (i = 0; i < n; i++) {
      printf "  s = s * 31 + f%d(s + %d);\n", i, i
      if (i % 250 == 249) printf "  printf(\"after f%d: %%llu\\n\", (unsigned long long)s);\n", i
    }
    print "  return 0;\n}"
  }' >big.c
  gcc_probe
  gcc -O2 -wrapper ./probe.sh -c big.c -o big.o
  gcc -wrapper ./probe.sh big.o -o big
  size big.o
  it_tool sha256sum big.o
  ./big
}

it_compare_runs workload
