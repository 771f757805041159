#!/usr/bin/env bash
# The main job: text-to-image with the embedded shapes model, plain and accelerated side by side, in one process.
. "$(dirname "$0")/venv.sh"
cd "$ROOT"
python scripts/demo.py --out "$ROOT/runs" "$@"
