# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Training
#
# Fine-tunes SegGPT on the training split of notebook 01 with `seggpt_lib.engine.trainer`
# (AdamW, cosine annealing with warm restarts after a linear warm-up, 75 % of the label-pair
# patches hidden, or the whole query half for a `query_mask_share` of the samples as at
# inference, defect pixels weighted `fg_weight` in the smooth-L1 loss, negative pairs asking
# for an empty query half when `negative_target` is `empty`, the defect painted in one fixed
# `defect_color` or, without it, one random colour per sample as in the original). Training runs
# `steps` steps (`train_minutes`, when set, caps it in wall-clock time); `steps = 0` skips it and
# the given `weights` (or, without weights, the random initialisation) are evaluated.
#
# Shown: the loss, learning rate, predicted-defect share and validation mIoU curves
# (`metrics.csv`), and the original's image row **[input | masked label | label | raw
# prediction | prediction snapped to the palette]** on fixed validation pairs, before and after.

# %% tags=["parameters"]
results_dir = "results"
preset = "vit_micro"  # "auto": the architecture of `weights`
model = {}  # preset overrides (official constructor names)
weights = "pretrained"  # initial weights: "pretrained" (the shipped checkpoint), official .pth, HF, ours; empty: random init
steps = 500  # the training budget (0: no training); the same steps and seed give the same run
train_minutes = None  # optional wall-clock cap on top of steps; None: none
device = "cpu"
precision = "auto"
seed = 0
normalize = "imagenet"  # imagenet | dataset
train = {"lr": 1e-3, "batch_size": 16, "fg_weight": "auto", "weight_query_defects": True, "defect_color": [255, 255, 255],
         "query_mask_share": 0.5, "warmup_steps": 30, "cycle_steps": 100000, "mask_ratio": 0.75, "negative_target": "empty",
         "num_workers": 0}
eval_every = 50  # validation and checkpoints every N steps
val_pairs = 64
checkpoint = "best"  # best (validation PES, train.select_by) | last
n_panels = 3

# %%
import json
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from seggpt_lib.experiments import config as CFG, results as RES, training as TR, runner as RUN
from seggpt_lib.experiments import viz as V
from seggpt_lib.model.checkpoint import build_from_checkpoint

R = Path(results_dir)
params = CFG.notebook_config("02_training", globals())  # this cell's parameters as the typed config
data = RES.load_fragment(R, RES.DataFragment)
split_root = Path(data.split_root)
run_dir = RUN.training_run_dir(R)
pd.set_option("display.precision", 4)

# %% [markdown]
# ## The training configuration

# %%
cfg = TR.training_config(split_root, run_dir, params.train_settings(), mean_std=data.mean_std())
dev = cfg.device
shown = {k: v for k, v in cfg.to_dict().items() if k not in ("image_mean", "image_std")}
display(Markdown("```json\n" + json.dumps(shown, indent=1) + "\n```"))

# %% [markdown]
# ## Before training: the initial weights

# %%
model0 = TR.initial_model(cfg).to(dev)
n_params = sum(p.numel() for p in model0.parameters())
print(f"{cfg.preset}: {n_params / 1e6:.2f} M parameters, pair {tuple(model0.cfg.img_size)}, patch {model0.cfg.patch_size}")
panel_ds = TR.panel_dataset(cfg, split_root, n_panels, model0.cfg)
rows = V.model_panel_rows(model0, panel_ds, range(len(panel_ds)), device=dev)
RES.save_figure(V.five_panel_figure(rows, suptitle="initial weights"), R, "02_panels_start");

# %% [markdown]
# ## Training

# %%
res = TR.train_or_take(cfg, run_dir, model0, checkpoint)
eval_weights, trained = res["weights"], res["trained"]
# a collapse (the model paints nothing or everything at its last validation) said loudly
collapse_note = (f"### ⚠ Training collapsed: the model paints {res['collapse'].upper()}\n\n"
                 f"> **{TR.collapse_banner(res['collapse'], res['collapse_steps'])}**" if res.get("collapse") else "")
if collapse_note:
    display(Markdown(collapse_note))

# %% [markdown]
# ## Curves (from `metrics.csv`)

# %%
metrics = TR.read_metrics(run_dir) if trained else pd.DataFrame()
if len(metrics):
    RES.save_figure(V.training_curves(metrics, title=f"{cfg.preset}, {res['steps_done']} steps"), R, "02_curves")
    display(metrics.tail(5))
else:
    print("no training curves (no training)")

# %% [markdown]
# ## After training: the same validation pairs

# %%
model1 = build_from_checkpoint(eval_weights, preset=cfg.preset, **cfg.model).to(dev) if trained else model0
rows = V.model_panel_rows(model1, panel_ds, range(len(panel_ds)), device=dev)
title = (f"after {res['steps_done']} steps ({Path(eval_weights).parent.name} checkpoint)" if trained
         else f"evaluated weights: {Path(eval_weights).name}")
RES.save_figure(V.five_panel_figure(rows, suptitle=title), R, "02_panels_end");

# %%
summary = TR.training_table(cfg, res, metrics, n_params)
RES.write_table(summary, R, "02_training", title="Training")
RES.write_fragment(R, RES.TrainingFragment.build(R, cfg, res, eval_weights, trained, n_params))
if collapse_note:  # again here: the report opens with this cell's output
    display(Markdown(collapse_note))
summary
