#!/usr/bin/env bash
# Re-resolve requirements-lock.txt: every dependency of moe-runtime[all] pinned, for Python >= 3.10 on
# every platform (uv's universal resolution: forks by Python version and platform carry markers).
# scripts/install.sh and .ci/run install with it as a constraints file, so an upstream release cannot
# change what CI tests. Torch stays at TORCH_VERSION (default: the lock's current pin), the version
# whose CPU build the project is tested with.
#     bash scripts/lock.sh                       # re-resolve, newest releases of everything else
#     TORCH_VERSION=2.14.1 bash scripts/lock.sh  # move torch too
# Then run `bash scripts/check-latest.sh` (same versions, all tests) before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-lock.txt
if [ -z "${TORCH_VERSION:-}" ]; then
  TORCH_VERSION=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK" 2>/dev/null | head -n 1)
fi
: "${TORCH_VERSION:?set TORCH_VERSION (no torch pin in $LOCK to keep)}"
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  TOOLS=$(mktemp -d)
  trap 'rm -rf "$TOOLS"' EXIT
  python3 -m venv "$TOOLS/venv" && "$TOOLS/venv/bin/python" -m pip install -q uv
  UV=$TOOLS/venv/bin/uv
fi
pins=$(mktemp)
echo "torch==$TORCH_VERSION" > "$pins"
"$UV" pip compile pyproject.toml --all-extras --universal --python-version 3.10 --upgrade -c "$pins" -q \
  --custom-compile-command "bash scripts/lock.sh" -o "$LOCK"
rm -f "$pins"
echo "wrote $LOCK: $(grep -c '==' "$LOCK") pins; torch==$TORCH_VERSION; $(grep -E '^(transformers|ray|triton)==' "$LOCK" | tr '\n' ' ')"
