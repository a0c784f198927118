#!/usr/bin/env bash
# Set up fsl-bench in ./.venv: exact pins from constraints.txt, bytecode compiled (PYTHONDONTWRITEBYTECODE
# would otherwise make every import recompile), then learn2learn through its rebuild helper. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FSL_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq "uv>=0.9,<1"
# Packages come from PyPI, or from a mirror named by the installers' own variables (README, "Set-up behind a
# mirror"): UV_INDEX_URL / UV_EXTRA_INDEX_URL / UV_FIND_LINKS for uv, PIP_INDEX_URL / PIP_EXTRA_INDEX_URL /
# PIP_FIND_LINKS (or pip.conf) for pip. unsafe-best-match lets a mirror and PyPI both offer a package.
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode \
    --index-strategy unsafe-best-match -c constraints.txt -e '.[dev]'
PYTHON="$VENV/bin/python" PIP_CONSTRAINT_FILE=constraints.txt bash tools/install_learn2learn.sh
echo "fsl-bench installed in $VENV"
