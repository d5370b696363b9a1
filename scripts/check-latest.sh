#!/usr/bin/env bash
# Find the next upstream break before users do: install the NEWEST release of every dependency
# (no lock) into a throwaway venv and run the default test tier there.
#     bash scripts/check-latest.sh              # newest releases; torch at the lock's version (see below)
#     bash scripts/check-latest.sh -x -k hf     # extra arguments go to pytest
# Torch: the newest torch on PyPI is the multi-GB CUDA build, so torch stays at the lock's CPU build
# unless TORCH_SPEC (e.g. "torch==2.15.0") and, for its CPU build, TORCH_INDEX_URL say otherwise.
# Prints the versions it tested. If it passes and you want them, `bash scripts/lock.sh` re-resolves
# the lock to the same releases.
set -euo pipefail
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export VENV=$TMP/venv MOE_LOCK=0
bash scripts/install.sh dev  # torch: TORCH_SPEC / TORCH_INDEX_URL as install.sh reads them
echo "== newest releases under test that differ from requirements-lock.txt:"
same=0
while IFS= read -r pin; do
  name=${pin%%==*} version=${pin#*==}
  case "$name" in pip|uv|setuptools|wheel) continue ;; esac
  if grep -qiE "^${name//[-_.]/[-_.]}==${version%%+*}( |$)" requirements-lock.txt; then
    same=$((same + 1))
  else
    locked=$(grep -iE "^${name//[-_.]/[-_.]}==" requirements-lock.txt | cut -d' ' -f1 | tr '\n' ' ')
    echo "  $pin (lock: ${locked:-not in the lock})"
  fi
done < <("$VENV/bin/python" -m pip list --format=freeze --exclude-editable 2>/dev/null)
echo "== $same others as locked"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
