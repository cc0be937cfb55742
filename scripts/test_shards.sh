#!/usr/bin/env bash
# Runs the test files in N `deno test` processes at once (shards), for a machine with many cores: the GPU check
# runs its suites this way. Each shard is its own process, so the tests' native-handle counts stay exact (Deno's
# own --parallel shares one process between files). Files go to shards by size, largest first. Prints every
# shard's log, then one line with the sums; exits non-zero when a shard failed or printed no verdict.
#
#   scripts/test_shards.sh N [test files ...]    # default: the committed tests/*_test.ts
#
# Env: the suite's own (MOERL_TEST_DEVICE, MOERL_TEST_DTYPE, ...); OMP_NUM_THREADS defaults to cores / N.
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: scripts/test_shards.sh N [test files ...]}
shift
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(git ls-files 'tests/*_test.ts' 2>/dev/null || ls tests/*_test.ts)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) / n > 0 ? $(nproc) / n : 1))}

# Largest first, each file to the shard with the fewest bytes so far.
declare -a load shard
for ((s = 0; s < n; s++)); do load[s]=0 shard[s]=""; done
while read -r size file; do
  best=0
  for ((s = 1; s < n; s++)); do [ "${load[s]}" -lt "${load[best]}" ] && best=$s; done
  load[best]=$((load[best] + size))
  shard[best]="${shard[best]} $file"
done < <(wc -c "${files[@]}" | grep -v ' total$' | sort -rn)

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Stopped by a time limit (timeout's TERM): print what the shards wrote so far, so that the log shows which test hung.
trap 'for f in "$logs"/*.log; do echo "==== $f (cut short)"; cat "$f"; done; exit 143' TERM
for ((s = 0; s < n; s++)); do
  [ -z "${shard[s]}" ] && continue
  # shellcheck disable=SC2086 # a list of paths without spaces
  deno test -A --v8-flags=--expose-gc ${shard[s]} >"$logs/$s.log" 2>&1 &
done
wait

# The number before WORD in the shard's verdict line (0 when absent).
count() {
  local v
  v=$(echo "$verdict" | grep -oE "[0-9]+ $1" | head -1 | cut -d' ' -f1)
  echo "${v:-0}"
}
passed=0 failed=0 ignored=0 bad=0
for ((s = 0; s < n; s++)); do
  [ -f "$logs/$s.log" ] || continue
  echo "==== shard $s:${shard[s]}"
  cat "$logs/$s.log"
  verdict=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/$s.log" | grep -E '^(ok|FAILED) \| ' | tail -1)
  if [ -z "$verdict" ]; then
    echo "shard $s printed no verdict (it crashed or did not start)"
    bad=$((bad + 1))
    continue
  fi
  passed=$((passed + $(count passed))) failed=$((failed + $(count failed))) ignored=$((ignored + $(count ignored)))
  [[ $verdict == FAILED* ]] && bad=$((bad + 1))
done
status=ok
[ "$bad" -gt 0 ] && status=FAILED
echo "$status | $passed passed | $failed failed | $ignored ignored ($n shards)"
[ "$bad" -eq 0 ]
