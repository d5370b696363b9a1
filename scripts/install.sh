#!/usr/bin/env bash
# Create .venv and install moe-runtime into it (editable), at the versions requirements-lock.txt pins.
#   bash scripts/install.sh          runtime + Ray + Triton (what `moe train` needs)
#   bash scripts/install.sh dev      everything the test suite needs ([all]: ray, triton, hf, serve, dev)
# Torch first: where no NVIDIA GPU is present the CPU build of the locked version (pip finds it through
# your pip configuration, e.g. a local wheel or TORCH_INDEX_URL=<a CPU wheel index>), so nothing pulls the
# multi-GB CUDA build. Then the rest with uv (about 6x faster than pip on a fresh machine; installed
# into the venv from PyPI), or pip if uv cannot be had (MOE_INSTALLER=pip forces pip).
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default the lock's torch
# pin), MOE_LOCK=0 to resolve the newest releases of everything but torch instead of the lock (what
# scripts/check-latest.sh does). Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements-lock.txt
case "${1:-}" in
  dev) EXTRAS="all" ;;
  "") EXTRAS="ray,triton" ;;
  *) echo "usage: bash scripts/install.sh [dev]" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
constraints=()
[ "${MOE_LOCK:-1}" != 0 ] && constraints=(-c "$LOCK")
TORCH_SPEC=${TORCH_SPEC:-$(sed -n 's/^torch==\([^ ;]*\).*/torch==\1/p' "$LOCK" | head -n 1)}
[ -n "$TORCH_SPEC" ] || { echo "install.sh: no torch pin in $LOCK; set TORCH_SPEC" >&2; exit 2; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  # With a GPU, PyPI's build (CUDA); without, the CPU build where the pip configuration or
  # TORCH_INDEX_URL offers it (a bare PyPI would give the CUDA build here too: set TORCH_INDEX_URL).
  pip_ "${index[@]}" "$TORCH_SPEC"
fi
installer=pip
if [ "${MOE_INSTALLER:-uv}" = uv ] && { [ -x "$VENV/bin/uv" ] || pip_ uv 2>/dev/null; }; then
  installer=uv
fi
t0=$SECONDS
if [ "$installer" = uv ]; then
  # uv keeps the torch installed above: the lock's torch==X.Y.Z is satisfied by X.Y.Z+cpu
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${constraints[@]}" -e ".[$EXTRAS]" || {
    echo "install.sh: uv failed; retrying with pip" >&2; installer=pip; }
fi
if [ "$installer" = pip ]; then
  pip_ "${constraints[@]}" -e ".[$EXTRAS]"
fi
"$VENV/bin/python" -c "import moe_runtime, torch; print(f'moe-runtime {moe_runtime.__version__} installed in $VENV (torch {torch.__version__}; with $installer in $((SECONDS - t0)) s)')"
