# shellcheck shell=bash
# Shared harness for tests/integration/prog_*.sh; sourced, never run.
#
# A script calls it_init NAME, it_need for what it uses, defines a workload
# function, and ends with it_compare_runs WORKLOAD. The workload
# runs twice in fresh directories, plain (glibc) and with
# LD_PRELOAD=$MOVALLOC_LIB MOVALLOC_STATS=1 $MOVALLOC_TEST_ENV; stdout and exit
# codes must match. Each run has its own process group and a deadline, so a
# hang or a server left behind is killed with the whole group.
#
# Inside the workload: cwd is the run directory, HOME and TMPDIR point into it,
# IT_MAPPED_FILE is a file to create when a process of the workload is seen to
# have MOVALLOC_LIB mapped (in /proc/PID/maps).

IT_NAME=
IT_START=$SECONDS
IT_TMP=
IT_GROUPS=()
IT_TEST_ENV=()
# Deadline of one run of the workload, in seconds.
IT_TIMEOUT=${MOVALLOC_IT_TIMEOUT:-300}
# MOVALLOC_IT_KEEP=1 keeps the runs' directories and outputs for a post-mortem.

# The verdict line carries each run's wall time and their ratio, which
# tools/test-matrix collects.
it_pass() {
  local plain shim
  plain=$(<"$IT_TMP/plain.time") shim=$(<"$IT_TMP/shim.time")
  echo "PASS $IT_NAME ($((SECONDS - IT_START))s; glibc ${plain}s, movalloc ${shim}s, ratio $(awk -v a="$shim" -v b="$plain" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'))"
  exit 0
}
it_fail() { echo "FAIL $IT_NAME: $*"; exit 1; }
it_skip() { echo "SKIP $IT_NAME: $*"; exit 77; }

it_cleanup() {
  local g
  for g in "${IT_GROUPS[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  [[ -n $IT_TMP ]] || return 0
  if [[ -n ${MOVALLOC_IT_KEEP:-} ]]; then
    echo "$IT_NAME: kept $IT_TMP" >&2
  else
    rm -rf "$IT_TMP"
  fi
}

it_init() {
  IT_NAME=$1
  [[ -n ${MOVALLOC_LIB:-} ]] || it_fail "MOVALLOC_LIB is not set"
  [[ $MOVALLOC_LIB == /* && -r $MOVALLOC_LIB ]] \
    || it_fail "MOVALLOC_LIB=$MOVALLOC_LIB is not a readable absolute path"
  # The workloads' own probes look for it in /proc/PID/maps.
  export MOVALLOC_LIB
  read -ra IT_TEST_ENV <<<"${MOVALLOC_TEST_ENV:-}"
  local w
  for w in "${IT_TEST_ENV[@]}"; do
    [[ $w =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || it_fail "MOVALLOC_TEST_ENV word '$w' is not K=V"
  done
  IT_TMP=$(mktemp -d)
  trap it_cleanup EXIT
  # So that run_all.sh's timeout or ^C still reaches it_cleanup.
  trap 'exit 143' TERM
  trap 'exit 130' INT
}

# it_need PKG CHECK...: install Debian package PKG unless CHECK succeeds.
it_need() {
  local pkg=$1
  shift
  "$@" >/dev/null 2>&1 && return 0
  [[ $(id -u) == 0 ]] || it_skip "$pkg is not installed and we are not root"
  echo "$IT_NAME: installing $pkg" >&2
  { apt-get install -y -qq "$pkg" || { apt-get update -qq && apt-get install -y -qq "$pkg"; }; } \
    </dev/null >&2 || it_skip "apt-get cannot install $pkg"
  "$@" >/dev/null 2>&1 || it_skip "$pkg installed but '$*' still fails"
}

# it_free_port: print a TCP port on 127.0.0.1 that nothing listens on now.
it_free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# it_require_mapped PID: in the preloaded run, fail unless PID has MOVALLOC_LIB
# mapped (a server must really run on it, whatever the library is).
it_require_mapped() {
  [[ -n ${LD_PRELOAD:-} ]] || return 0
  grep -qF "$MOVALLOC_LIB" "/proc/$1/maps" || { echo "pid $1 ($(cat "/proc/$1/comm")) has no $MOVALLOC_LIB mapped" >&2; return 1; }
  : >"$IT_MAPPED_FILE"
}

# it_wait_for TRIES CMD...: retry CMD every 0.1 s, TRIES times at most.
it_wait_for() {
  local n=$1
  shift
  until "$@" >/dev/null 2>&1; do
    ((--n > 0)) || return 1
    sleep 0.1
  done
}

# it_tool CMD ARGS: a helper the workload uses to check or prepare data
# (sha256sum, md5sum, sed), run without movalloc: only the program under test
# is preloaded, so that a tool's own trouble under a backend (mprotect cannot
# hold the reads glibc's stdio makes internally) is not taken for the program's.
it_tool() { env -u LD_PRELOAD -u MOVALLOC_STATS "$@"; }

# it_run MODE WORKLOAD: run WORKLOAD in $IT_TMP/MODE (plain or shim); leaves
# MODE.out, MODE.err, MODE.rc, MODE.time (wall seconds) and, on a timeout,
# MODE.timeout beside it.
it_run() {
  local mode=$1 fn=$2 dir=$IT_TMP/$1 pid rc=0
  local deadline=$((SECONDS + IT_TIMEOUT)) t0
  mkdir -p "$dir/tmp"
  t0=$(date +%s.%N)
  # set -m gives the job its own process group, so it can be killed whole.
  set -m
  (
    cd "$dir" || exit
    unset LD_PRELOAD
    export HOME=$dir TMPDIR=$dir/tmp LC_ALL=C TZ=UTC IT_MAPPED_FILE=$dir/.mapped
    if [[ $mode == shim ]]; then
      export LD_PRELOAD=$MOVALLOC_LIB MOVALLOC_STATS=1
      ((${#IT_TEST_ENV[@]} == 0)) || export "${IT_TEST_ENV[@]}"
    fi
    "$fn"
  ) </dev/null >"$dir.out" 2>"$dir.err" &
  pid=$!
  set +m
  IT_GROUPS+=("$pid")
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      : >"$dir.timeout"
      kill -KILL -- "-$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  wait "$pid" 2>/dev/null || rc=$?
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }' >"$dir.time"
  # Whatever the workload left running (a server after a failure) goes too.
  kill -KILL -- "-$pid" 2>/dev/null || true
  echo "$rc" >"$dir.rc"
}

# it_describe_rc RC: "exit code N" or "killed by SIGxxx".
it_describe_rc() {
  if (($1 > 128)); then echo "killed by SIG$(kill -l "$(($1 - 128))" 2>/dev/null || echo "$(($1 - 128))")"
  else echo "exit code $1"; fi
}

# it_show_tail FILE LABEL: the end of FILE on stderr, less movalloc's statistics,
# indented so that no line of it reads as a verdict ("FAIL: test_x" from unittest).
it_show_tail() {
  echo "--- $IT_NAME: last lines of $2 ---" >&2
  grep -v -e '^movalloc: stats at exit' -e '^movalloc:   ' "$1" | tail -n 40 | sed 's/^/  /' >&2 || true
}

# it_compare_runs WORKLOAD: both runs, the comparisons, the verdict. Each run's
# stdout is compared with its directory's path replaced by <DIR>.
it_compare_runs() {
  local fn=$1 mode rc_plain rc_shim
  for mode in plain shim; do
    it_run "$mode" "$fn"
    if [[ -e $IT_TMP/$mode.timeout ]]; then
      it_show_tail "$IT_TMP/$mode.err" "stderr ($mode run)"
      it_fail "$mode run timed out after ${IT_TIMEOUT}s"
    fi
    sed "s|$IT_TMP/$mode|<DIR>|g" "$IT_TMP/$mode.out" >"$IT_TMP/$mode.cmp"
  done
  rc_plain=$(<"$IT_TMP/plain.rc")
  rc_shim=$(<"$IT_TMP/shim.rc")
  if ((rc_plain != 0)); then
    it_show_tail "$IT_TMP/plain.err" "stderr (plain run)"
    it_fail "plain run without preload failed ($(it_describe_rc "$rc_plain")): test environment problem"
  fi
  [[ ! -e $IT_TMP/plain/.mapped ]] || it_fail "plain run has $MOVALLOC_LIB mapped: LD_PRELOAD leaked in"
  if ((rc_shim != 0)); then
    it_show_tail "$IT_TMP/shim.err" "stderr (preloaded run)"
    it_fail "preloaded run $(it_describe_rc "$rc_shim"), plain run exit code 0"
  fi
  if ! cmp -s "$IT_TMP/plain.cmp" "$IT_TMP/shim.cmp"; then
    echo "--- $IT_NAME: stdout diff, plain vs preloaded ---" >&2
    diff "$IT_TMP/plain.cmp" "$IT_TMP/shim.cmp" | head -n 40 | sed 's/^/  /' >&2 || true
    it_show_tail "$IT_TMP/shim.err" "stderr (preloaded run)"
    it_fail "stdout differs between plain and preloaded runs"
  fi
  it_check_shim_used
  it_pass
}

# The preloaded run must really have used MOVALLOC_LIB: movalloc says so in its
# exit statistics; for another library, a process seen with it mapped will do.
it_check_shim_used() {
  local err=$IT_TMP/shim.err
  if [[ $(basename "$MOVALLOC_LIB") == libmovalloc.so ]]; then
    if ! grep -q '^movalloc: stats at exit' "$err" || ! grep -q '^movalloc:   in use' "$err"; then
      it_fail "no 'movalloc: stats at exit' block with an 'in use' line on stderr of the preloaded run"
    fi
  elif [[ -e $IT_TMP/shim/.mapped ]]; then
    :
  else
    echo "NOTE $IT_NAME: no process was seen with $MOVALLOC_LIB mapped; shim-use check skipped" >&2
  fi
}
