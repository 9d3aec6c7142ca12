#!/usr/bin/env bash
# One call on a lent GPU machine: install, GPU tests, GPU benchmarks, a Markdown report in $OUT,
# within 6 minutes (each phase has a share of the budget; the report is written whatever fails).
#
#   device run:  bench/gpu.sh                 (the device tool sets OUT; carry: [".whl"])
#   here:        bench/gpu.sh --dry-run       (CPU: no install, the GPU tests skip, the bench runs
#                                              only CSFM_BENCH_SELECT, default the matmul roof)
# CSFM_GPU_TESTS: the test paths (default tests); CSFM_GPU_BUDGET_S: the budget (default 345 s).
#
# The GPU machine has no wfdb (csfm's readers import it): put its wheel in .whl first, here,
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl wfdb==4.3.1
# and name .whl in the call's carry. Files written to $OUT: report.md, install.log, gpu-tests.log,
# gpu-tests.xml, bench.log, bench.jsonl (the report's last lines are printed too).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
BUDGET=${CSFM_GPU_BUDGET_S:-345}   # seconds for everything, the report included
START=$(date +%s)
export PYTHONUNBUFFERED=1
PHASES=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run NAME CAP_SECONDS LOG CMD...: at most CAP seconds and never past the budget (minus 15 s for the
# report); SIGINT first, so pytest still writes its JUnit XML and the bench its finished cases.
run() {
  local name=$1 cap=$2 log=$3; shift 3
  local limit; limit=$(left); limit=$(( limit - 15 < cap ? limit - 15 : cap ))
  if (( limit < 10 )); then echo "$name: skipped, no time left" | tee "$log"; PHASES+=("--phase" "$name=0"); return; fi
  local t0; t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  PHASES+=("--phase" "$name=$(( $(date +%s) - t0 ))")
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s), log $log"
}

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if (( DRY )); then
  echo "dry run: no install" >"$OUT/install.log"
  DEVICES=cpu
  SELECT=${CSFM_BENCH_SELECT:-matmul}
else
  run install 120 "$OUT/install.log" $PY -m pip install --no-build-isolation --no-deps -e .
  DEVICES=cuda
  SELECT=${CSFM_BENCH_SELECT:-}
fi

run tests 120 "$OUT/gpu-tests.log" $PY -m pytest -m gpu ${CSFM_GPU_TESTS:-tests} -q -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"

rm -f "$OUT/bench.jsonl"
export CSFM_BENCH_DEVICES=$DEVICES CSFM_BENCH_JSON="$OUT/bench.jsonl"
# The attention cases first (issue #10's main table), then the training steps, then the ops
# (their torch.compile baselines take longest to set up).
run bench 600 "$OUT/bench.log" $PY -m pytest bench/test_attention.py bench/test_model.py bench/test_kernels.py \
  --benchmark-only -q -p no:cacheprovider ${SELECT:+-k "$SELECT"}

$PY bench/report.py --bench "$OUT/bench.jsonl" --tests "$OUT/gpu-tests.xml" "${PHASES[@]}" --out "$OUT/report.md"
echo "report: $OUT/report.md ($(( $(date +%s) - START )) s in all)"
tail -n 40 "$OUT/report.md"
