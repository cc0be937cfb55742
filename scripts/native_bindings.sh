#!/usr/bin/env bash
# Which native symbols end up where once Deno, the tokenizers addon and
# libtorch share a process: runs scripts/throw_check.ts (libtorch errors with
# the Hub client and tokenizers loaded) under the dynamic linker's binding
# log and prints
#   1. every symbol another object bound to the deno executable (Deno exports
#      uv_*, napi_* and memfd_create: a library calling one of these gets
#      Deno's, as libtorch 2.x's TCPStore did with uv_*);
#   2. every symbol of libstdc++ resolved to another object (libtorch 2.x
#      wheels carry copies of some, from their toolchain's static part);
#   3. which objects provide the exception runtime to which callers;
#   4. for every object mapped, the names it shares with Deno's exports (nm -D).
# Usage: scripts/native_bindings.sh [throw_check.ts arguments]; MOERL_LIB and
# MOERL_TEST_DEVICE=cuda as for the tests (run it on a GPU machine to include
# libcuda). Needs binutils (nm). Findings: docs/shim-and-memory.md.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
deno_bin=$(readlink -f "$(command -v deno)")

LD_DEBUG=bindings,files LD_DEBUG_OUTPUT="$log/ld" deno run -A scripts/throw_check.ts --rounds 2 "$@" >"$log/report.json"
echo "throw_check: $(cut -c1-160 "$log/report.json")"
# "binding file A [0] to B [0]: normal symbol `name' [version]" -> "A|B|name"
sed -nE "s/^ *[0-9]+:\s*binding file ([^ ]+) \[[0-9]+\] to ([^ ]+) \[[0-9]+\]: normal symbol \`([^']+)'.*/\1|\2|\3/p" \
  "$log"/ld.* | sort -u >"$log/bindings"
base() { sed -E 's#[^|]*/##g'; }

echo "== 1. symbols bound to the deno executable by other objects"
awk -F'|' -v d="$deno_bin" '$2 == d && $1 != d' "$log/bindings" | base || true
echo "== 2. libstdc++ symbols resolved outside libstdc++ / libc / libgcc_s"
awk -F'|' '$1 ~ /libstdc\+\+/ && $2 !~ /(libstdc\+\+|libc\.so|libm\.so|libgcc_s|ld-linux)/' "$log/bindings" | base || true
echo "== 3. exception runtime: caller -> provider"
grep -E '\|(__cxa_throw|__cxa_begin_catch|__gxx_personality_v0|_Unwind_RaiseException|_Unwind_Resume)$' \
  "$log/bindings" | base | sort -u || true
echo "== 4. names shared with Deno's exports (nm -D), per mapped object"
nm -D --defined-only "$deno_bin" | awk '{print $3}' | sed 's/@.*//' | sort -u >"$log/deno"
{ sed -nE 's/^ *[0-9]+:\s*calling init: (.+)$/\1/p' "$log"/ld.*; awk -F'|' '{print $1; print $2}' "$log/bindings"; } |
  sort -u |
  while read -r so; do
    [ -f "$so" ] || continue
    def=$(nm -D --defined-only "$so" 2>/dev/null | awk '{print $3}' | sed 's/@.*//' | sort -u | comm -12 "$log/deno" - | wc -l)
    use=$(nm -D --undefined-only "$so" 2>/dev/null | awk '{print $2}' | sed 's/@.*//' | sort -u | comm -12 "$log/deno" - | wc -l)
    if [ "$def$use" != "00" ]; then echo "$(basename "$so"): defines $def, uses $use"; fi
  done
