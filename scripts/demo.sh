#!/usr/bin/env bash
# The main job: generate digits with the embedded default model, then show the speed-up.
. "$(dirname "$0")/venv.sh"
mkdir -p "$ROOT/runs"
hasten generate --model digits --labels 0-9 --per-label 4 --steps 50 --cfg 3 --seed 0 --out "$ROOT/runs/grid.png"
