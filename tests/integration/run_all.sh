#!/usr/bin/env bash
# Runs every prog_*.sh here, or those named (python3 or prog_python3.sh), with
# the caller's environment (MOVALLOC_LIB, MOVALLOC_TEST_ENV, ...); prints each
# result line and a closing "N passed, N failed[, N skipped]"; exits 1 if any failed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

scripts=()
if (($# == 0)); then
  scripts=("$here"/prog_*.sh)
else
  for name in "$@"; do
    name=${name#prog_}
    name=${name%.sh}
    [[ -f $here/prog_$name.sh ]] || { echo "no such test: $here/prog_$name.sh" >&2; exit 2; }
    scripts+=("$here/prog_$name.sh")
  done
fi

passed=0 failed=0 skipped=0
for script in "${scripts[@]}"; do
  name=$(basename "$script" .sh)
  name=${name#prog_}
  rc=0
  # A script bounds its own runs; this bounds the rest (installs included).
  out=$(timeout -k 10 900 bash "$script") || rc=$?
  line=$(tail -n 1 <<<"$out")
  case $rc in
    0) passed=$((passed + 1)) ;;
    77) skipped=$((skipped + 1)) ;;
    *)
      failed=$((failed + 1))
      [[ $line == FAIL* ]] || line="FAIL $name: script ended with exit code $rc and no verdict"
      ;;
  esac
  echo "$line"
done

summary="$passed passed, $failed failed"
((skipped == 0)) || summary+=", $skipped skipped"
echo "$summary"
((failed == 0))
