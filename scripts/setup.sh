#!/usr/bin/env bash
# One-shot setup for a newcomer (and CI): Deno, libtorch, then the FFI shim.
# Safe to run again: each step checks first and skips what is already there.
#   MOERL_BENCH_DEPS=1  also install Debian's python3-torch (for bench/, not tests)
#   LIBTORCH=/path      use that libtorch (ffi/build.ts checks it) instead of installing one
set -euo pipefail

DENO_VERSION=2.9.6 # the one pinned version; CI and everyone else use this

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

deno_ok() {
  command -v deno >/dev/null 2>&1 &&
    [ "$(deno --version 2>/dev/null | awk 'NR == 1 { print $2 }')" = "$DENO_VERSION" ]
}

# apt-get only as root (CI, containers); otherwise we print what to run.
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then apt-get update; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# --- Deno -------------------------------------------------------------------
# A previous run may have installed it locally (see below).
if ! deno_ok && [ -x "$ROOT/.tools/node_modules/.bin/deno" ]; then
  export PATH="$ROOT/.tools/node_modules/.bin:$PATH"
fi
if deno_ok; then
  say "deno $DENO_VERSION found"
else
  command -v npm >/dev/null 2>&1 || die "npm is needed to install Deno $DENO_VERSION (e.g. apt-get install npm)"
  say "installing deno@$DENO_VERSION with npm"
  # The npm package ships the binary in a per-platform dependency; npm may warn
  # about install scripts, so check that the binary really runs afterwards.
  NPM_GLOBAL="$(npm prefix -g)"
  if [ -w "$NPM_GLOBAL" ] && npm install -g "deno@$DENO_VERSION" &&
    export PATH="$NPM_GLOBAL/bin:$PATH" && hash -r && deno_ok; then
    say "installed deno $DENO_VERSION in $NPM_GLOBAL/bin"
  else
    # No write access to the global prefix (not root): install into the repo.
    npm install --prefix "$ROOT/.tools" "deno@$DENO_VERSION"
    export PATH="$ROOT/.tools/node_modules/.bin:$PATH"
    hash -r
    deno_ok || die "deno@$DENO_VERSION was installed but does not run: $(command -v deno || echo 'not on PATH')"
    say "installed deno $DENO_VERSION in .tools/; add it to your PATH:"
    say "  export PATH=\"$ROOT/.tools/node_modules/.bin:\$PATH\""
  fi
fi

# --- C++ compiler and libtorch ------------------------------------------------
PKGS=()
command -v "${CXX:-g++}" >/dev/null 2>&1 || PKGS+=(g++)
if [ -n "${LIBTORCH:-}" ]; then
  say "using LIBTORCH=$LIBTORCH" # ffi/build.ts fails with a clear message if it is wrong
elif FOUND="$(deno run -A ffi/build.ts --print 2>/dev/null)"; then
  say "libtorch found"
else
  PKGS+=(libtorch-dev)
fi
# Debian's libtorch calls the system BLAS, which defaults to the slow reference
# implementation (a 10x slower matmul here); OpenBLAS built for OpenMP (as
# libtorch is) takes over through update-alternatives when installed.
SYSTEM_TORCH=0
case " ${PKGS[*]} ${FOUND:-} " in *libtorch-dev* | *'"source": "system"'*) SYSTEM_TORCH=1 ;; esac
if [ "$SYSTEM_TORCH" = 1 ] && command -v dpkg >/dev/null 2>&1 &&
  ! dpkg -s libopenblas0-openmp >/dev/null 2>&1 && ! dpkg -s libopenblas0-pthread >/dev/null 2>&1; then
  PKGS+=(libopenblas0-openmp)
fi
# Data-parallel training on CPUs uses c10d's Gloo backend, whose header needs
# gloo's own headers: Debian ships them apart from libtorch-dev.
if [ "$SYSTEM_TORCH" = 1 ] && [ ! -f /usr/include/gloo/algorithm.h ]; then
  if can_apt; then
    PKGS+=(libgloo-dev)
  else
    say "note: without libgloo-dev the shim has no Gloo backend (multi-process CPU training);" \
      "install it with: sudo apt-get install libgloo-dev, then run this again"
  fi
fi
# Debian's python torch is only needed by the FFI benchmark (bench/).
if [ "${MOERL_BENCH_DEPS:-0}" = 1 ] && ! /usr/bin/python3 -c 'import torch' >/dev/null 2>&1; then
  PKGS+=(python3-torch)
fi
if [ "${#PKGS[@]}" -gt 0 ]; then
  if can_apt; then
    say "installing ${PKGS[*]} with apt-get"
    apt_install "${PKGS[@]}"
  else
    # Shows every place ffi/build.ts looked, and why each failed.
    deno run -A ffi/build.ts --print >/dev/null || true
    die "missing: ${PKGS[*]}; install with: sudo apt-get install ${PKGS[*]}" \
      "(for libtorch, pip install torch or export LIBTORCH=/path/to/libtorch also work), then run this again"
  fi
fi

# --- the FFI shim ---------------------------------------------------------------
deno task build
say "done"
