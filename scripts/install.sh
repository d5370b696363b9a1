#!/usr/bin/env bash
# Create .venv and install moe-runtime into it (editable).
#   bash scripts/install.sh          runtime + Ray + Triton (what `moe train` needs)
#   bash scripts/install.sh dev      everything the test suite needs ([all]: ray, triton, hf, dev)
# Where no NVIDIA GPU is present, the CPU build of torch is installed first, so pip never pulls the
# multi-GB CUDA build. Re-running is cheap: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_ "torch>=2.6"
  else
    # The CPU build; pip picks it from the local wheel cache / index where present.
    pip_ "torch==2.13.0" || pip_ "torch>=2.6"
  fi
fi
case "${1:-}" in
  dev) pip_ -e ".[all]" ;;
  "") pip_ -e ".[ray,triton]" ;;
  *) echo "usage: bash scripts/install.sh [dev]" >&2; exit 2 ;;
esac
"$VENV/bin/python" -c "import moe, torch; print(f'moe-runtime {moe.__version__} installed in $VENV (torch {torch.__version__})')"
