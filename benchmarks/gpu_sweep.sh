#!/usr/bin/env bash
# Recipe sweep for the CPU default on a lent GPU machine (its image has torch + transformers).
set -euo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
timeout "${SWEEP_TIMEOUT:-330}" python3 benchmarks/recipe_sweep.py --out /tmp/sweep --steps "${SWEEP_STEPS:-2000}" \
  --eval-every 250 --device cuda --workers 2 || echo "sweep ended early"
cp /tmp/sweep/sweep.csv "$OUT/" 2>/dev/null || true
for f in /tmp/sweep/*.log; do tail -n 3 "$f"; done
echo "sweep wall $(( $(date +%s) - t0 )) s"
