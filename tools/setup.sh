#!/usr/bin/env bash
# Set up fsl-bench in ./.venv: exact pins from constraints.txt, bytecode compiled (PYTHONDONTWRITEBYTECODE
# would otherwise make every import recompile), then learn2learn through its rebuild helper. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FSL_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq "uv>=0.9,<1"
# The local mirrors exist on the reference machines; uv ignores missing ones only if we skip them.
extra=()
for idx in /opt/pypi-more/simple /opt/pypi/simple; do [ -d "$idx" ] && extra+=(--extra-index-url "file://$idx"); done
[ -d /opt/wheels ] && extra+=(--find-links /opt/wheels)
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode "${extra[@]}" \
    --index-strategy unsafe-best-match -c constraints.txt -e '.[dev]'
PYTHON="$VENV/bin/python" PIP_CONSTRAINT_FILE=constraints.txt bash tools/install_learn2learn.sh
echo "fsl-bench installed in $VENV"
