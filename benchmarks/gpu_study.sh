#!/usr/bin/env bash
# The magnetic-tile study on a lent GPU (one H100/H200), one command, sized for under 3 minutes (not yet
# measured on a GPU: training is 4 x 0.35 min by the wall clock, tuning and scoring the rest):
#   seggpt study --device cuda: vit_tiny (224 px per image) from scratch; for each protocol (seen classes,
#   2 held-out classes) the original's negatives and class-aware negatives are trained 0.35 min each (the
#   same budget), then scored with one image prompt, a top-3 ensemble and a learned prompt (60 tuning
#   steps per class, the model frozen) on the same test queries (at most 60 per kind).
# Data: $GPU_STUDY_DATA, else .data/magnetic_tile inside the repository, else ../shared/datasets/magnetic_tile.
# The ../shared folder beside a checkout does not travel to a lent machine: copy the set into the
# repository, ignored by git, and carry it (29 MB):
#   mkdir -p .data && cp -r ../shared/datasets/magnetic_tile .data/ && echo /.data/ >> .git/info/exclude
#   run(command="benchmarks/gpu_study.sh", carry=[".data"], timeout_s=420)
# Outputs under $OUT (default ./gpu_study_out), three files: gpu_study.tar.gz (tables/*.csv|md, figures/*.png,
# summary.json), summary.json (rows, settings, timings, machine: platform, CPU, GPU, torch) and gpu_study.log.
# Dry run on a CPU: GPU_STUDY_DEVICE=cpu GPU_STUDY_ARGS="--quick" benchmarks/gpu_study.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_study_out}"
WORK="${GPU_STUDY_WORK:-${TMPDIR:-/tmp}/gpu_study_work}"
DEV="${GPU_STUDY_DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import torch, torchvision, safetensors, pandas' >/dev/null 2>&1; then
  PY="$REPO/.venv/bin/python"  # this repository's environment (make install)
fi
DATA="${GPU_STUDY_DATA:-}"
if [ -z "$DATA" ]; then
  for cand in "$REPO/.data/magnetic_tile" "$REPO/../shared/datasets/magnetic_tile"; do
    if [ -d "$cand" ]; then DATA="$cand"; break; fi
  done
fi
if [ -z "$DATA" ] || [ ! -d "$DATA" ]; then
  echo "magnetic-tile dataset not found (set GPU_STUDY_DATA or copy it to .data/magnetic_tile)" >&2
  exit 1
fi
read -r -a XARGS <<< "${GPU_STUDY_ARGS:-}"

T0=$(date +%s)
set +e
"$PY" -m seggpt_lib study --data "$DATA" --device "$DEV" --out "$OUT/study" --work "$WORK" \
  --set max_queries=60 ${XARGS[@]+"${XARGS[@]}"} 2>&1 | tee "$OUT/gpu_study.log"
RC=${PIPESTATUS[0]}
set -e
echo "gpu_study: rc=$RC, $(( $(date +%s) - T0 )) s" | tee -a "$OUT/gpu_study.log"
if [ -f "$OUT/study/summary.json" ]; then
  cp "$OUT/study/summary.json" "$OUT/summary.json"
  for f in "$OUT"/study/tables/study_seen.md "$OUT"/study/tables/study_holdout.md; do
    [ -f "$f" ] && cat "$f" | tee -a "$OUT/gpu_study.log"
  done
fi
[ -d "$OUT/study" ] && tar czf "$OUT/gpu_study.tar.gz" -C "$OUT" --exclude=study/work study && rm -rf "$OUT/study"
rm -rf "$WORK"
exit "$RC"
