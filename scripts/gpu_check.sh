#!/usr/bin/env bash
# The GPU check: one run on a machine with a CUDA GPU and a Python torch 2.x, no network needed. It builds
# the shim against that libtorch with CUDA, then runs, most valuable first, each within the time left:
# the CUDA test suite (float32), decode tokens/s at Huihui shapes (eager against CUDA graphs, batches 16 to
# 512, with MBU), the default RL update (eager against graph decode), the same update at Phi-tiny shapes over
# a 4-bit base (its peak memory), the NCCL group's cost per update, a default-sized update against TRL's
# GRPOTrainer, the Gloo and torchrun tests, training-step memory variants, fused against eager attention, the
# LM head with and without the entropy, the bfloat16 suite, LoRA adapter casts held against cast per step, a
# decode step's seeded draw against multinomial, the CPU suite, and the native-binding report. A summary is
# printed last.
#
#   scripts/gpu_pack.sh                        # here, with network: fills .gpu/ (carry it)
#   OUT=/tmp/moerl-gpu scripts/gpu_check.sh    # there
#
# Logs are written to $LOGS (default /tmp/moerl-gpu-logs); after every step $OUT gets a fresh summary.txt and
# logs.tar.gz with all of them, so $OUT holds three files however far the check got (a machine that hands
# back only a few files from $OUT, or one stopped at a time limit, still returns everything).
#
# Env: MOERL_GPU_BUDGET_S (default 520): seconds for the whole check. A step that cannot get its minimum in
# what is left is skipped (and says so), and each runs under `timeout` with at most what is left. (Where a
# machine is lent for 15 minutes in all and a call may take 600 s, a 520 s run leaves about four minutes to
# rerun skipped steps while the machine is still warm: have that command ready.)
# MOERL_GPU_REHEARSAL=1: the same steps on this machine's CPU at toy sizes, to try the script and .gpu/
# (offline: unshare -n sh -c 'ip link set lo up; MOERL_GPU_REHEARSAL=1 scripts/gpu_check.sh').
# MOERL_GPU_TESTS_ONLY=1: build and test suites only. MOERL_GPU_STEPS=a,b: only those steps (and the build),
# e.g. the ones a first run had no time for.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moerl-gpu}
LOGS=${LOGS:-/tmp/moerl-gpu-logs}
rm -rf "$LOGS" # a rerun on a warm machine: only this run's logs
mkdir -p "$OUT" "$LOGS"
: >"$LOGS/summary.txt"
# Copies the summary and every log so far into $OUT.
publish() {
  cp "$LOGS/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
export DENO_NO_UPDATE_CHECK=1
BUDGET=${MOERL_GPU_BUDGET_S:-520}
START=$SECONDS

# Offline: Deno, its npm cache, gloo's headers and TRL's wheels from .gpu/ (scripts/gpu_pack.sh).
PY=${MOERL_BENCH_PYTHON:-python3}
# .xz without the xz program, which an image may lack: Python's lzma reads it.
unxz_to() { if command -v xz >/dev/null; then xz -dc "$1"; else "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; fi; }
untar_xz() { unxz_to "$1" | tar xf - -C "$2"; }
if [ -f .gpu/deno.xz ]; then # the packed Deno, the one its cache was filled by
  mkdir -p /tmp/deno-bin && unxz_to .gpu/deno.xz >/tmp/deno-bin/deno && chmod +x /tmp/deno-bin/deno &&
    export PATH=/tmp/deno-bin:$PATH
fi
if [ -f .gpu/deno_dir.tar.xz ]; then
  untar_xz .gpu/deno_dir.tar.xz /tmp && export DENO_DIR=/tmp/deno_dir
fi
if [ ! -f /usr/include/gloo/algorithm.h ] && [ -f .gpu/gloo-include.tar.xz ]; then
  mkdir -p /tmp/gloo-include && untar_xz .gpu/gloo-include.tar.xz /tmp/gloo-include &&
    export GLOO_INCLUDE=/tmp/gloo-include
fi
if ! command -v deno >/dev/null; then
  echo "no deno: .gpu/deno.xz missing or not unpacked" | tee -a "$LOGS/summary.txt"
  publish
  exit 1
fi
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${MOERL_GPU_REHEARSAL:-0}" = 1 ]; then # toy sizes on the CPU: does every step start and finish?
  DEV=cpu DT=float32 HUIHUI=bench/shapes/bench-small.json PHI=bench/shapes/bench-small.json
  BATCHES=2,4 PROMPT=16 NEW=8 RL="--prompts 4 --k 2 --new 8 --micro 2" DP="--prompts 4 --k 2 --new 8 --micro 2"
  MEM="--batch 2 --seq 64" ATT="--batch 2 --prompt 16 --new 8 --layers 2"
  UPDATE="--set train.gradAccum=1 --set rollout.maxNewTokens=8 --prompt-len 16"
  HEAD="--tokens 64 --hidden 64 --vocab 1000 --chunk 16 --runs 2" CASTS="--batch 2 --prompt 16 --new 8"
  SAMPLING="--rows 4 --vocab 1000 --runs 2"
else
  DEV=cuda DT=bfloat16 HUIHUI=bench/shapes/huihui-moe-1b-a0.6b.json PHI=bench/shapes/phi-tiny-moe.json
  BATCHES=16,64,256,512 PROMPT=128 NEW=128 RL="--prompts 128 --k 4 --new 256 --micro 32 --prompt-len 152"
  DP="--prompts 32 --k 4 --new 128 --micro 8" MEM="--batch 8 --seq 512" ATT="--batch 16 --prompt 512 --new 64"
  UPDATE="" HEAD="--tokens 16384 --runs 5" CASTS="--batch 64 --prompt 128 --new 32"
  SAMPLING="--rows 512 --runs 5"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  "$PY" -c 'import transformers, peft, trl; print("transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)'
  "$PY" -c 'import datasets, pyarrow; print("datasets", datasets.__version__, "pyarrow", pyarrow.__version__)'
  deno --version | head -1
  echo "budget ${BUDGET}s, device $DEV $DT"
} 2>&1 | tee "$LOGS/machine.txt"
cp "$LOGS/machine.txt" "$OUT/machine.txt"

# step NAME MIN CAP COMMAND...: runs COMMAND with at most CAP seconds (and never past the budget), its log
# in $LOGS/NAME.log; skipped when less than MIN seconds are left. Prints a verdict line into the summary.
step() {
  local name=$1 min=$2 cap=$3
  shift 3
  if [ -n "${MOERL_GPU_STEPS:-}" ] && [ "$name" != build ] && [[ ",$MOERL_GPU_STEPS," != *",$name,"* ]]; then
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$min" ]; then
    printf '%-18s skipped: %ds left, needs %ds\n' "$name" "$left" "$min" | tee -a "$LOGS/summary.txt"
    publish
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  # 35 s after TERM before KILL: torchrun's workers (their own session) stop on the 30 s collective timeout.
  timeout --kill-after=35 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict
  verdict=$(grep -E '(passed|failed)' "$LOGS/$name.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g')
  [ "$rc" = 124 ] && verdict="TIMED OUT after ${cap}s; $verdict"
  [ "$rc" = 137 ] && verdict="KILLED (after the ${cap}s limit, or out of memory); $verdict"
  printf '%-18s rc=%d %4ds  %s\n' "$name" "$rc" $((SECONDS - t0)) "$verdict" | tee -a "$LOGS/summary.txt"
  publish
  return $rc
}

# Committed test files only: listed in .gpu/tests.txt when the copy has no git metadata, else asked of git.
LIST=$(cat .gpu/tests.txt 2>/dev/null || git ls-files 'tests/*_test.ts' 2>/dev/null || ls tests/*_test.ts)
# A test file added since .gpu/ was packed would be left out: say so.
if [ -f .gpu/tests.txt ]; then
  for f in tests/*_test.ts; do
    [[ " $(echo $LIST) " == *" $f "* ]] || echo "not in .gpu/tests.txt (repack): $f" | tee -a "$LOGS/summary.txt"
  done
fi
TDEV=$DEV SHARDS=6 # test processes at once (scripts/test_shards.sh): 16 cores, one GPU they share
[ "${MOERL_GPU_REHEARSAL:-0}" = 1 ] && LIST="tests/graph_test.ts tests/decode_static_test.ts tests/cuda_test.ts" SHARDS=2
# The command line of the suite on device $1 in dtype $2 (paths without spaces: word splitting is fine).
suite() { echo env MOERL_TEST_DEVICE="$1" MOERL_TEST_DTYPE="$2" bash scripts/test_shards.sh $SHARDS $LIST; }

step build 30 300 deno task build || {
  tail -30 "$LOGS/build.log"
  exit 1
}
# What was built: a build without CUDA headers or NCCL still succeeds, so the summary says which.
{
  grep -E "^building|^  without" "$LOGS/build.log"
  ldd ffi/build/libmoerl-*.so 2>/dev/null | grep "not found"
} | tee -a "$LOGS/summary.txt"
# shellcheck disable=SC2046
step test-$TDEV-f32 60 150 $(suite "$TDEV" float32)
if [ "${MOERL_GPU_TESTS_ONLY:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  step decode-huihui 60 150 deno run -A bench/generate_shapes.ts --shapes $HUIHUI --device $DEV --dtype $DT \
    --dispatch dense --decode eager,graph --batch $BATCHES --prompt $PROMPT --new $NEW
  # The default update (configs/default.yaml: 128 prompts × K 4 × 256 tokens), eager against graph decode.
  # shellcheck disable=SC2086
  step update-huihui 60 180 deno run -A bench/update.ts --shapes $HUIHUI --device $DEV --dtype $DT \
    --decode eager,graph $UPDATE
  # The same update at Phi-tiny shapes as configs/phi-tiny-moe.yaml runs it (4-bit base, passes of 2 prompts,
  # gradient checkpointing): its peak memory against the 24 GB target. The KV cache is as wide as an update's
  # longest prompt: 275 tokens, GSM8K train's longest in Phi's chat template with the default instruction
  # (an update's longest is 186 at the median, 222 at p95; every epoch has an update with it).
  # shellcheck disable=SC2086
  step update-phi-4bit 60 150 deno run -A bench/update.ts --config configs/phi-tiny-moe.yaml --shapes $PHI \
    --device $DEV --dtype $DT --decode graph --prompt-len 275 $UPDATE
  # shellcheck disable=SC2086
  step dp-nccl-huihui 30 90 deno run -A bench/data_parallel.ts --device $DEV --dtype $DT --shapes $HUIHUI \
    --procs 1 $DP
  # A default-sized update against TRL's GRPOTrainer in the same run (LoRA on q/k/v/o on both sides).
  # shellcheck disable=SC2086
  step rl-huihui 120 300 deno run -A bench/rl.ts --shapes $HUIHUI --device $DEV --dtype $DT $RL \
    --decode graph --variants token_value --pairs 1 --updates 1
  step dp-gloo-tests 30 90 deno test -A tests/dist_test.ts tests/data_parallel_test.ts tests/torchrun_test.ts
  # shellcheck disable=SC2086
  step mem-phi-tiny 30 120 deno run -A bench/memory.ts --shapes $PHI --device $DEV --dtype $DT $MEM
  # shellcheck disable=SC2086
  step attn-huihui 30 90 deno run -A bench/attention.ts --shapes $HUIHUI --device $DEV --dtype $DT $ATT
  # The no-grad passes' LM head (Huihui's 1024 × 151,936), log-probs only against log-probs with entropy.
  # shellcheck disable=SC2086
  step head-huihui 10 45 deno run -A bench/head.ts --device $DEV --dtype $DT $HEAD
fi
# shellcheck disable=SC2046
[ "$DEV" = cuda ] && step test-cuda-bf16 60 150 $(suite cuda bfloat16)
# Eager decode with the default config's LoRA (r 16, every linear and expert): bf16 casts of the float32
# adapters held across steps (as collect does) against cast in every step. After the bf16 suite, which matters more.
# shellcheck disable=SC2086
[ "${MOERL_GPU_TESTS_ONLY:-0}" != 1 ] && step casts-huihui 15 60 deno run -A bench/generate_shapes.ts \
  --shapes $HUIHUI --device $DEV --dtype $DT --lora 16 --casts held,fresh --dispatch dense --decode eager $CASTS
# A decode step's draw at the default update's 512 rows: seeded streams (collect's) against libtorch's multinomial.
# shellcheck disable=SC2086
[ "${MOERL_GPU_TESTS_ONLY:-0}" != 1 ] && step sampling-512 10 30 deno run -A bench/sampling.ts --device $DEV $SAMPLING
grep -h "max |Δlogits|\|greedy tokens equal" "$LOGS"/test-*.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' \
  >"$LOGS/parity.txt"
# shellcheck disable=SC2046
[ "$DEV" = cuda ] && step test-cpu-f32 60 150 $(suite cpu float32)
step native-bindings 10 60 env MOERL_TEST_DEVICE=$DEV bash scripts/native_bindings.sh

echo "==== failing tests"
for f in "$LOGS"/test-*.log "$LOGS"/dp-gloo-tests.log; do
  [ -f "$f" ] && grep -q "FAILED" "$f" && {
    echo "--- $f"
    sed 's/\x1b\[[0-9;]*m//g' "$f" | grep "=> " | sort -u | head -20
  }
done
echo "==== benchmarks"
for f in "$LOGS"/decode-*.log "$LOGS"/update-*.log "$LOGS"/rl-*.log "$LOGS"/mem-*.log "$LOGS"/dp-nccl-*.log \
  "$LOGS"/attn-*.log; do
  [ -f "$f" ] && { echo "--- $(basename "$f" .log)"; grep -v "^\s*at " "$f" | tail -15; }
done
echo "==== summary ($((SECONDS - START))s of ${BUDGET}s)"
publish
cat "$LOGS/summary.txt"
