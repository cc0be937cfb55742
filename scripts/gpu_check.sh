#!/usr/bin/env bash
# The GPU check, run once on a machine with a CUDA GPU and a Python torch 2.x
# (no network needed): builds the shim against that libtorch with CUDA, runs
# the whole test suite on the CPU (float32) and on CUDA (float32 and
# bfloat16), and measures generation with random weights at real model
# shapes (eager decode steps against static buffers and CUDA graphs), fused
# against eager attention, training memory, and the data-parallel overhead
# with NCCL. Logs go to $OUT (default /tmp/moerl-gpu); a summary is printed last.
#
# Offline machines: put a Deno binary at .gpu/deno.xz and a prefilled Deno
# cache (DENO_DIR with the npm packages) at .gpu/deno_dir.tar.xz, and for the
# Gloo backend gloo's headers: tar cJf .gpu/gloo-include.tar.xz -C /usr/include gloo
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moerl-gpu}
mkdir -p "$OUT"
export DENO_NO_UPDATE_CHECK=1

if ! command -v deno >/dev/null 2>&1; then
  xz -dc .gpu/deno.xz >/tmp/deno && chmod +x /tmp/deno && export PATH=/tmp:$PATH
fi
# pip's torch ships no gloo headers: the Gloo backend (multi-process tests) builds with Debian's, carried along.
if [ ! -f /usr/include/gloo/algorithm.h ] && [ -f .gpu/gloo-include.tar.xz ]; then
  mkdir -p /tmp/gloo-include && tar xJf .gpu/gloo-include.tar.xz -C /tmp/gloo-include && export GLOO_INCLUDE=/tmp/gloo-include
fi
if [ -f .gpu/deno_dir.tar.xz ]; then
  tar xJf .gpu/deno_dir.tar.xz -C /tmp && export DENO_DIR=/tmp/deno_dir
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  deno --version | head -1
} 2>&1 | tee "$OUT/machine.txt"

step() { # name, command...: run, keep the log, print the verdict line
  local name=$1
  shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%d %4ds  %s\n' "$name" "$rc" $((SECONDS - t0)) \
    "$(grep -E '(passed|failed)' "$OUT/$name.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g')" | tee -a "$OUT/summary.txt"
  return $rc
}

step build deno task build || { tail -30 "$OUT/build.log"; exit 1; }
grep -E "^building|cuda" "$OUT/build.log" | head -3
# Committed test files only (work in progress in the tree is not part of the check): listed in
# .gpu/tests.txt when the copy has no git metadata, else asked of git, else every test.
LIST=$(cat .gpu/tests.txt 2>/dev/null || git ls-files 'tests/*_test.ts' 2>/dev/null)
TEST="deno test -A --v8-flags=--expose-gc ${LIST:-tests/}"
TEST=$(echo "$TEST" | tr '\n' ' ')
step test-cpu-f32 env MOERL_TEST_DEVICE=cpu $TEST
step test-cuda-f32 env MOERL_TEST_DEVICE=cuda $TEST
step test-cuda-bf16 env MOERL_TEST_DEVICE=cuda MOERL_TEST_DTYPE=bfloat16 $TEST
grep -h "max |Δlogits|\|greedy tokens equal" "$OUT/test-cuda-bf16.log" | sed 's/\x1b\[[0-9;]*m//g' | tee "$OUT/parity-bf16.txt"
if [ "${MOERL_GPU_TESTS_ONLY:-0}" = 1 ]; then cat "$OUT/summary.txt"; exit 0; fi
step gen-huihui deno run -A bench/generate_shapes.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
  --device cuda --dtype bfloat16 --batch 64 --prompt 128 --new 128
# Decode steps at Huihui shapes: eager against static buffers and CUDA graphs, each batch in one run.
step gen-huihui-decode deno run -A bench/generate_shapes.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
  --device cuda --dtype bfloat16 --dispatch dense --decode eager,static,graph --batch 16,64,256 --prompt 128 --new 128
step gen-phi-tiny deno run -A bench/generate_shapes.ts --shapes bench/shapes/phi-tiny-moe.json \
  --device cuda --dtype bfloat16 --batch 64 --prompt 128 --new 64
step mem-huihui deno run -A bench/memory.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
  --device cuda --dtype bfloat16 --batch 8 --seq 512
step mem-phi-tiny deno run -A bench/memory.ts --shapes bench/shapes/phi-tiny-moe.json \
  --device cuda --dtype bfloat16 --batch 8 --seq 512

# Fused attention against eager at Huihui shapes (prefill, decode, a training pass), and what binds to
# Deno's exported symbols once the CUDA driver is loaded (the device-crash investigation).
step attn-huihui deno run -A bench/attention.ts --shapes bench/shapes/huihui-moe-1b-a0.6b.json \
  --device cuda --dtype bfloat16 --batch 16 --prompt 512 --new 64
step native-bindings env MOERL_TEST_DEVICE=cuda scripts/native_bindings.sh

# Data parallel on one device: what the NCCL group and its gradient sums cost per update at Huihui shapes.
step dp-nccl-huihui deno run -A bench/data_parallel.ts --device cuda --dtype bfloat16 \
  --shapes bench/shapes/huihui-moe-1b-a0.6b.json --procs 1 --prompts 32 --k 4 --new 128 --micro 8

echo "==== failures (first 60 lines of each failing suite)"
for f in "$OUT"/test-*.log; do
  grep -q "FAILED" "$f" && { echo "--- $f"; sed 's/\x1b\[[0-9;]*m//g' "$f" | grep "=> " | sort -u | head -40; }
done
echo "==== generation and training memory"
cat "$OUT"/gen-*.log "$OUT"/attn-*.log "$OUT"/mem-*.log "$OUT"/dp-*.log "$OUT"/native-*.log | grep -v "^\s*at "
echo "==== summary"
cat "$OUT/summary.txt"
