#!/usr/bin/env bash
# git: a repository of generated files built by several commits on branches,
# merges, a rename, log/diff/blame/grep, gc, repack, fsck and archive. Names and
# dates are fixed so that every hash is the same in both runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init git
it_need git command -v git

export GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=Tester GIT_AUTHOR_EMAIL=tester@example.invalid
export GIT_COMMITTER_NAME=Tester GIT_COMMITTER_EMAIL=tester@example.invalid

# git_at N ARGS...: git ARGS at the fixed time 1700000000 + N hours.
git_at() {
  local date="@$((1700000000 + $1 * 3600)) +0000"
  GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date git "${@:2}"
}

# gen_files DIR SEED COUNT LINES: COUNT text files of about LINES lines each.
gen_files() {
  mkdir -p "$1"
  it_tool awk -v dir="$1" -v seed="$2" -v count="$3" -v lines="$4" 'BEGIN {
    x = seed
    for (f = 0; f < count; f++) {
      path = sprintf("%s/file%03d.txt", dir, f)
      for (l = 0; l < lines + f % 17; l++) {
        x = (x * 69069 + 1) % 4294967296
        printf "line %d of file %d in %s: value %d %s\n", l, f, dir, x % 100000, substr("abcdefghijklmnopqrstuvwxyz", x % 26 + 1, x % 20 + 1) >path
      }
      close(path)
    }
  }'
}

# commit_all N MSG: commit the whole work tree at time N.
commit_all() {
  git add -A
  git_at "$1" commit -q -m "$2"
}

workload() {
  git init -q -b main repo
  cd repo
  git config gc.auto 0
  # Each commit runs this hook, whose parent is git.
  cat >.git/hooks/post-commit <<'EOF'
#!/bin/sh
if grep -qF "$MOVALLOC_LIB" "/proc/$PPID/maps"; then : >"$IT_MAPPED_FILE"; fi
EOF
  chmod +x .git/hooks/post-commit

  gen_files src 1 200 100
  commit_all 1 "initial import"
  gen_files src 2 120 100
  commit_all 2 "rewrite the first 120 files"

  # Small edits to the same files, so that repack has deltas to find.
  for c in 1 2 3 4 5 6 7 8; do
    it_tool sed -i "s/value $c/value x$c/" src/file0[0-4]*.txt
    commit_all $((2 + c)) "edit round $c"
  done

  git checkout -q -b feature
  gen_files feature 3 150 80
  git mv src/file000.txt src/renamed000.txt
  commit_all 13 "feature: new tree and a rename"
  it_tool sed -i 's/value 1/VALUE 1/' feature/file01*.txt
  commit_all 14 "feature: edits"

  git checkout -q main
  gen_files docs 4 80 60
  rm src/file19*.txt
  commit_all 15 "docs, remove some files"
  git_at 16 merge -q --no-ff -m "merge feature" feature

  git checkout -q -b topic HEAD~1
  gen_files topic 5 60 40
  commit_all 17 "topic"
  git checkout -q main
  git_at 18 merge -q --no-ff -m "merge topic" topic
  git_at 19 tag -a -m "release" v1 HEAD

  git log --graph --format='%H %an %ad %s' --date=iso --all
  git diff --stat main~2 main | it_tool tail -n 3
  git diff main~2 main -- feature/file010.txt | it_tool md5sum
  git blame -s -L 1,5 src/file150.txt
  git grep -c 'VALUE 1' -- 'feature/file01[0-4].txt'
  git rev-list --all --objects | it_tool wc -l
  git gc -q --prune=now
  git repack -q -a -d -f --depth=50 --window=50
  git count-objects -v | it_tool grep -E '^(count|in-pack|packs):'
  git fsck --full --strict --no-progress
  git archive --format=tar v1 | it_tool md5sum
  git ls-tree -r v1 | it_tool md5sum
}

it_compare_runs workload
