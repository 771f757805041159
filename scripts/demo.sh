#!/usr/bin/env bash
# The main job: generate digits with the embedded default model and show the speed-up, in one process.
. "$(dirname "$0")/venv.sh"
cd "$ROOT"
python scripts/demo.py --out "$ROOT/runs" "$@"
