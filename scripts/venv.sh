# Sourced by demo.sh and test.sh: create (once) and activate the project's own virtual environment.
# torch is pinned to the CPU build first, so no later requirement can pull a CUDA wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HASTEN_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import hasten, pytest" >/dev/null 2>&1 || [ "$ROOT/pyproject.toml" -nt "$VENV/.hasten-installed" ]; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  python -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
  touch "$VENV/.hasten-installed"
fi
