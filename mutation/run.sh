#!/usr/bin/env bash
# `make mutation`: a fresh mutmut run over the TensorFlow-free modules (mutation/targets.txt), then
# the per-module table and the survivors (mutation/summarize.py). Config: [tool.mutmut] in pyproject.toml.
# MUTMUT_ARGS, e.g. "--max-children 1", is passed to `mutmut run`; KEEP=1 reuses cached verdicts in mutants/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
mapfile -t TARGETS < <(grep -v '^#' mutation/targets.txt | sed '/^\s*$/d')
[ "${KEEP:-0}" = 1 ] || rm -rf mutants
start=$(date +%s)
# mutmut exits non-zero on its own bookkeeping in some versions; the table below is the verdict.
nice -n 10 "$BIN/mutmut" run ${MUTMUT_ARGS:-} "${TARGETS[@]}" || echo "mutmut run exited $?"
echo "mutmut run took $(( $(date +%s) - start )) s"
"$BIN/python" mutation/summarize.py --json mutants/summary.json
