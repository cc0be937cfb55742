#!/usr/bin/env bash
# Packs into .gpu/ (git-ignored) what scripts/gpu_check.sh needs on a GPU machine that reaches no network.
# Run it here, where npm and PyPI answer; then name .gpu in the device tool's `carry`:
#   .gpu/deno.xz              this machine's Deno binary (x86-64 Linux)
#   .gpu/deno_dir.tar.xz      a Deno cache (deno_dir/npm) holding deno.lock's npm packages, x86-64 Linux only
#   .gpu/gloo-include.tar.xz  gloo's headers (Debian's libgloo-dev): pip's torch lacks them, dist.cpp's Gloo needs them
#   .gpu/whl/                 TRL and what it needs beyond that machine's image (bench:rl's TRL side)
#   .gpu/tests.txt            the committed test files (the copy there has no git metadata)
# The working tree and .gpu travel together, 64 MiB at most: the sizes are printed last.
#
# Env: MOERL_PACK_PYTHON, a Python with pip (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "gpu_pack: the GPU machine is x86-64; pack on an x86-64 machine" >&2; exit 1; }
PY=${MOERL_PACK_PYTHON:-python3}
# The image holds torch, transformers, peft, accelerate, pyarrow, pandas and xxhash, but not these
# (KINDS.md of the device tool lists the image's packages). Pure-Python wheels: any platform will do.
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

rm -rf .gpu
mkdir -p .gpu/whl
git ls-files 'tests/*_test.ts' >.gpu/tests.txt

xz -T0 -6 -c "$(readlink -f "$(command -v deno)")" >.gpu/deno.xz

# A fresh cache, filled from deno.lock for every TypeScript file the check may run.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t entries < <(git ls-files '*.ts' | grep -v '^tests/fixtures/')
DENO_DIR=$work/deno_dir deno cache --frozen --quiet "${entries[@]}"
# Other platforms' native addons, bundles for browsers and source maps are dead weight there.
find "$work/deno_dir/npm" -type f \( \( -name '*.node' ! -name '*linux-x64-gnu*' \) -o -name '*.map' \
  -o -name '*.global.js' \) -delete
tar cf - -C "$work" deno_dir/npm | xz -T0 -6 >.gpu/deno_dir.tar.xz

if [ -f /usr/include/gloo/algorithm.h ]; then
  tar cf - -C /usr/include gloo | xz -T0 -6 >.gpu/gloo-include.tar.xz
else
  echo "gpu_pack: no /usr/include/gloo (apt-get install libgloo-dev): the check there builds without Gloo" >&2
fi

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpu/whl "${WHEELS[@]}"

tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
packed=$(du -sb .gpu | cut -f1)
du -sh .gpu/* | sed 's/^/  /'
awk -v t="$tree" -v p="$packed" 'BEGIN {
  printf "gpu_pack: working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB of 64\n", t / 2^20, p / 2^20, (t + p) / 2^20
  exit (t + p > 64 * 2^20) }' || { echo "gpu_pack: over the 64 MiB a device call carries" >&2; exit 1; }
