#!/usr/bin/env bash
# Everything a lent GPU should run, in one call of under 10 minutes (estimated; the parts were
# sized separately): benchmarks/gpu_check.sh without its pytest and fp32 stages (parity, attention
# alone, the model benchmark with each attention path and compiled by blocks, the 100-step ViT-L
# training smoke run), then benchmarks/gpu_study.sh (the magnetic-tile study) under a hard limit.
#   run(command="benchmarks/gpu_all.sh", carry=[".data"], timeout_s=590)
# with the magnetic-tile set copied into the git-ignored .data/ first (see gpu_study.sh).
# Outputs in $OUT: summary.txt and gpu_check_logs.tar.gz (the check), gpu_study.tar.gz,
# summary.json and gpu_study.log (the study): five files, within what a lent machine returns.
# The exit status is 0 only if both parts passed.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OUT="${OUT:-$REPO/gpu_all_out}"
mkdir -p "$OUT"
export GPU_CHECK_PYTEST="${GPU_CHECK_PYTEST:-0}" GPU_CHECK_FP32="${GPU_CHECK_FP32:-0}"
T0=$(date +%s)
bash "$REPO/benchmarks/gpu_check.sh"
RC_CHECK=$?
echo "=== gpu_all: check rc=$RC_CHECK after $(( $(date +%s) - T0 )) s"
timeout "${GPU_ALL_STUDY_LIMIT:-270}" bash "$REPO/benchmarks/gpu_study.sh"
RC_STUDY=$?
echo "=== gpu_all: study rc=$RC_STUDY; total $(( $(date +%s) - T0 )) s"
[ "$RC_CHECK" -eq 0 ] && [ "$RC_STUDY" -eq 0 ]
