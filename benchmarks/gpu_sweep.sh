#!/usr/bin/env bash
# Recipe sweep for the CPU default on a lent GPU machine: the grid configs/ablations/recipe_sweep.json
# (seggpt ablate; it needs the notebook tools of requirements.txt: papermill, nbconvert, jupytext, ipykernel).
set -euo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
timeout "${SWEEP_TIMEOUT:-330}" python3 -m seggpt_lib ablate --config configs/ablations/recipe_sweep.json \
  --set device=cuda --set steps="${SWEEP_STEPS:-2000}" --set results_dir=/tmp/sweep --jobs 2 --no-progress \
  || echo "sweep ended early"
cp /tmp/sweep/ablations/recipe_sweep/tables/ablation.* /tmp/sweep/ablations/recipe_sweep/tables/cells.* "$OUT/" 2>/dev/null || true
echo "sweep wall $(( $(date +%s) - t0 )) s"
