#!/bin/bash
# A fresh clone of main, nothing installed by hand: make setup, then make run, timed apart.
# usage: [PRESET=qwen] bench/time_fresh_clone.sh NAME WITH_SHARED(0|1)   (SHARED=/path/to/shared for 1); writes
# /tmp/fresh-NAME. PRESET (default: default) is passed to make run; PRESET=qwen also runs make setup-qwen.
preset=${PRESET:-default}
base=/tmp/fresh-$1; [ -e "$base" ] && { echo "$base exists; remove it or pick another NAME" >&2; exit 2; }; mkdir -p "$base"
git clone -q "${REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}" "$base/main"
[ "$2" = 1 ] && ln -s "${SHARED:?set SHARED to the shared/ folder}" "$base/shared"
cd "$base/main" || exit 1
export RAD_CACHE=$base/cache   # empty model and data cache, as on a new machine
t0=$(date +%s); make setup > "$base/setup.log" 2>&1; rc=$?
[ "$preset" = qwen ] && { make setup-qwen >> "$base/setup.log" 2>&1 || rc=$?; }
t1=$(date +%s)
echo "$1 setup rc=$rc $((t1-t0)) s"
/usr/bin/time -v make run PRESET="$preset" > "$base/run.log" 2>&1; rc=$?; t2=$(date +%s)
echo "$1 run rc=$rc $((t2-t1)) s"
ls "$base/main/runs/$preset/report.md"
