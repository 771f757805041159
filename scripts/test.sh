#!/usr/bin/env bash
# The whole test suite in the project's own virtual environment. pytest's exit 5 (no tests) is a failure.
. "$(dirname "$0")/venv.sh"
cd "$ROOT"
ruff check src tests benchmarks scripts
# Smoke test of the benchmark harness (no figures asserted): every configuration runs or records its error.
hasten bench --model digits --out "$(mktemp -d)" --quick --threads 1
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
