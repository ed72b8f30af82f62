#!/usr/bin/env bash
# What a lent GPU machine (one H100/H200, 16 cores) runs, in about 6 minutes (estimated: stages 0-4
# plus fp32 took ~2 min on an H200 before stages 5-7 were added; the machine's start comes on top):
#   0. environment: python with torch + transformers (else .venv + requirements), torch/GPU info
#   1. attention parity on the GPU vs float64 (fp32, bf16; forward and backward), no pytest needed
#   2. tests/test_attention.py on the GPU (when pytest and hypothesis are there; GPU_CHECK_PYTEST=0 skips)
#   3. the attention implementations alone at the ViT-L shape (bf16)
#   4. the model benchmark, ViT-L, bf16 autocast: ours vs transformers eager (--json)
#   5. the same with FlexAttention (--set attn_impl=flex: the bias added inside a compiled kernel
#      at head dim 64, no widened head dim; only the attention is compiled, seconds)
#   6. ours under torch.compile by blocks (regional: seconds), with each attention path; the
#      whole-model compile only with GPU_CHECK_COMPILE_FULL=1 (more than 150 s on ViT-L)
#   7. a 100-step training smoke run on synthetic data (seggpt train, ViT-L, bf16)
#   8. the model benchmark in fp32 (GPU_CHECK_FP32=0 skips it)
# Every stage prints its name and wall time. Outputs go under $OUT (default ./gpu_check_out): one
# log per stage in $OUT/logs/, packed at the end into $OUT/gpu_check_logs.tar.gz (the logs folder
# is then removed, unless GPU_CHECK_PACK=0: a lent machine returns at most 8 files), and
# $OUT/summary.txt with the result tables and the JSON lines.
# A failing stage is reported and the script goes on; the exit status is 1 if any stage failed.
# Dry run elsewhere: GPU_CHECK_DEVICE=cpu GPU_CHECK_BENCH_ARGS="--preset vit_micro --iters 1 --warmup 1"
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_check_out}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
FAILED=()
T_ALL=$(date +%s)
DEV="${GPU_CHECK_DEVICE:-cuda}"
read -r -a XARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"  # extra benchmark arguments (dry runs)

stage() {  # stage NAME LOGFILE CMD...: run, tee to $LOGS/LOGFILE, time it, record failures
  local name="$1" log="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo
  echo "=== [$(date +%H:%M:%S)] stage: $name"
  set +e
  "$@" 2>&1 | tee "$LOGS/$log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "=== stage: $name: rc=$rc, $(( $(date +%s) - t0 )) s"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name (rc $rc)"); fi
  return 0
}

# --- 0. environment -------------------------------------------------------------------------
t0=$(date +%s)
echo "=== stage: environment"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import torch, transformers' >/dev/null 2>&1; then
  echo "torch/transformers not importable with $PY: creating .venv (system site packages) and installing requirements"
  "$PY" -m venv .venv --system-site-packages
  PY="$REPO/.venv/bin/python"
  "$PY" -m pip install -q -r requirements.txt
fi
"$PY" - <<'EOF' 2>&1 | tee "$LOGS/environment.txt"
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(), "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.1f} GiB | sm_{p.major}{p.minor}")
    print("flash SDPA:", torch.backends.cuda.flash_sdp_enabled(), "| mem-efficient SDPA:", torch.backends.cuda.mem_efficient_sdp_enabled())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOGS/environment.txt" || true
echo "=== stage: environment: $(( $(date +%s) - t0 )) s"
if [ "$DEV" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible: stopping" >&2
  exit 1
fi

# --- 1-2. attention parity --------------------------------------------------------------------
stage "attention parity vs float64 (cuda; fp32, bf16; fwd+bwd)" attention_parity.txt \
  "$PY" benchmarks/bench_model.py --parity --device "$DEV"
if [ "${GPU_CHECK_PYTEST:-1}" != "1" ]; then
  echo "(GPU_CHECK_PYTEST=0: tests/test_attention.py skipped; the parity stage above covers the GPU)"
elif "$PY" -c 'import pytest, hypothesis' >/dev/null 2>&1; then
  stage "pytest tests/test_attention.py (cpu + cuda)" pytest_attention.txt \
    "$PY" -m pytest tests/test_attention.py -q -p no:cacheprovider
else
  echo "(pytest/hypothesis missing: tests/test_attention.py skipped; the parity stage above covers the GPU)"
fi

# --- 3. attention alone -------------------------------------------------------------------------
stage "attention implementations, ViT-L shape, bf16" attention_bench.txt \
  "$PY" benchmarks/bench_model.py --attention --device "$DEV" --precision bf16 --json ${XARGS[@]+"${XARGS[@]}"}

# --- 4-5. the model benchmark -------------------------------------------------------------------
stage "model benchmark ViT-L bf16 (ours vs transformers eager)" bench_vit_large_bf16.txt \
  "$PY" benchmarks/bench_model.py --device "$DEV" --precision bf16 --json ${XARGS[@]+"${XARGS[@]}"}

stage "model benchmark ViT-L bf16, flex attention" bench_vit_large_bf16_flex.txt \
  "$PY" benchmarks/bench_model.py --device "$DEV" --precision bf16 --set attn_impl=flex --no-ckpt-extra --json \
  ${XARGS[@]+"${XARGS[@]}"}

# --- 6. torch.compile ---------------------------------------------------------------------------
# Regional compilation (--compile blocks: one transformer block compiled, the graph reused by all
# 24; seconds) with each attention path; the whole-model compile (minutes on ViT-L) only with
# GPU_CHECK_COMPILE_FULL=1. Each under a hard limit of GPU_CHECK_COMPILE_LIMIT s (default 240).
if [ "${GPU_CHECK_COMPILE:-1}" = "1" ]; then
  for impl in auto flex; do
    stage "model benchmark ViT-L bf16, ours compiled by blocks, attention $impl" "bench_vit_large_bf16_compile_$impl.txt" \
      timeout "${GPU_CHECK_COMPILE_LIMIT:-240}" "$PY" benchmarks/bench_model.py --device "$DEV" --precision bf16 \
      --compile blocks --set "attn_impl=$impl" --iters 5 --warmup 2 --no-ckpt-extra --json ${XARGS[@]+"${XARGS[@]}"}
  done
fi
if [ "${GPU_CHECK_COMPILE_FULL:-0}" = "1" ]; then
  stage "model benchmark ViT-L bf16, ours compiled whole" bench_vit_large_bf16_compile_full.txt \
    timeout "${GPU_CHECK_COMPILE_LIMIT:-240}" "$PY" benchmarks/bench_model.py --device "$DEV" --precision bf16 \
    --compile full --iters 5 --warmup 2 --no-ckpt-extra --json ${XARGS[@]+"${XARGS[@]}"}
fi

# --- 7. a 100-step training smoke run on synthetic data ------------------------------------------
# ViT-L from scratch (GPU_CHECK_TRAIN_PRESET) at 896x448, bf16, fused AdamW, batch 4, on a small
# synthetic set (10 images per class): the whole training command end to end (data loading,
# steps, evaluation, atomic checkpoints); its metrics.csv lands in the logs.
SMOKE="${TMPDIR:-/tmp}/gpu_check_smoke"
rm -rf "$SMOKE"
mkdir -p "$SMOKE"
stage "synthetic data for the training smoke run" smoke_data.txt bash -c \
  "\"$PY\" -m seggpt_lib prepare synthetic --out \"$SMOKE/raw\" --per-class 10 --size 256 && \
   \"$PY\" -m seggpt_lib prepare split --src \"$SMOKE/raw\" --out \"$SMOKE/data\""
# the pipeline's recipe (fg_weight, defect colour, query-mask share, negatives: PIPELINE_RECIPE in
# seggpt_lib/experiments/config.py), with this check's own size, steps, batch and learning rate
"$PY" - "$SMOKE" "${GPU_CHECK_TRAIN_PRESET:-vit_large}" "$DEV" <<'EOF' || true
import json, sys
from seggpt_lib.experiments.config import PIPELINE_RECIPE
smoke, preset, device = sys.argv[1:4]
recipe = {k: PIPELINE_RECIPE[k] for k in ("fg_weight", "query_mask_share", "defect_color", "negative_target")}
json.dump({"preset": preset, "device": device, "max_steps": 100, "data_count": 400, "batch_size": 4,
           "num_workers": 4, "train_dataset_dir": f"{smoke}/data/train", "val_dataset_dir": f"{smoke}/data/val",
           "log_dir": f"{smoke}/runs", "eval_per_epoch": 1, "val_pairs": 16, "warmup_steps": 10, "lr": 1e-4, **recipe},
          open(f"{smoke}/train.json", "w"), indent=1)
EOF
stage "training smoke run: 100 steps (${GPU_CHECK_TRAIN_PRESET:-vit_large})" train_smoke.txt \
  timeout "${GPU_CHECK_TRAIN_LIMIT:-240}" "$PY" -m seggpt_lib train --no-progress --config "$SMOKE/train.json" \
  ${GPU_CHECK_TRAIN_ARGS:-}
find "$SMOKE/runs" -name metrics.csv -exec cp {} "$LOGS/train_smoke_metrics.csv" \; 2>/dev/null || true
rm -rf "$SMOKE"

# --- 8. fp32 (auto: the reference attention on CUDA fp32), last: the least informative ---------
if [ "${GPU_CHECK_FP32:-1}" = "1" ]; then
  stage "model benchmark ViT-L fp32" bench_vit_large_fp32.txt \
    "$PY" benchmarks/bench_model.py --device "$DEV" --precision fp32 --iters 3 --warmup 1 --no-ckpt-extra --json \
    ${XARGS[@]+"${XARGS[@]}"}
fi

# --- summary -------------------------------------------------------------------------------------
SUMMARY="$OUT/summary.txt"
{
  echo "gpu_check: $(( $(date +%s) - T_ALL )) s"
  cat "$LOGS/environment.txt"
  [ -s "$LOGS/attention_parity.txt" ] && head -n 1 "$LOGS/attention_parity.txt"
  [ -s "$LOGS/pytest_attention.txt" ] && tail -n 1 "$LOGS/pytest_attention.txt"
  [ -s "$LOGS/attention_bench.txt" ] && grep -v '^{' "$LOGS/attention_bench.txt" | grep -v '^W[0-9]'
  for f in bench_vit_large_bf16 bench_vit_large_bf16_flex bench_vit_large_bf16_compile_auto \
           bench_vit_large_bf16_compile_flex bench_vit_large_bf16_compile_full bench_vit_large_fp32; do
    [ -s "$LOGS/$f.txt" ] || continue
    echo
    echo "--- $f"
    grep -A 12 '^SegGPT benchmark' "$LOGS/$f.txt" | grep -v '^{' || true
    "$PY" - "$LOGS/$f.txt" <<'EOF' || true
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception:
    sys.exit(0)
g = lambda v: "n/a" if v is None else f"{v:.1f}"
print(f"RESULT {sys.argv[1].rsplit('/', 1)[-1][:-4]}: inference {r['inference_speedup']:.2f}x "
      f"(whole pair decoded {r.get('inference_speedup_full_decode', float('nan')):.2f}x) "
      f"({r['ours_infer_samples_per_s']:.1f} vs {r['theirs_infer_samples_per_s']:.1f} samples/s), "
      f"training {r['train_speedup']:.2f}x ({r['ours_train_samples_per_s']:.1f} vs {r['theirs_train_samples_per_s']:.1f}), "
      f"train peak GiB ours {g(r['ours_train_peak_gib'])} vs {g(r['theirs_train_peak_gib'])}, "
      f"ours act-ckpt {g(r.get('ours_train_ckpt_peak_gib'))}")
print("JSON", json.dumps(r, sort_keys=True))
EOF
  done
  if [ "${#FAILED[@]}" -ne 0 ]; then printf 'FAILED stage: %s\n' "${FAILED[@]}"; else echo "all stages passed"; fi
} > "$SUMMARY" 2>&1 || true
tar czf "$OUT/gpu_check_logs.tar.gz" -C "$OUT" logs
if [ "${GPU_CHECK_PACK:-1}" != "0" ]; then rm -rf "$LOGS"; fi
echo
echo "=== summary; logs packed in $OUT/gpu_check_logs.tar.gz"
grep -v '^JSON' "$SUMMARY"
[ "${#FAILED[@]}" -eq 0 ]
