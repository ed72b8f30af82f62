# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Data transformation
#
# Builds (synthetic) or converts (VISION COCO, magnetic tile) the defect dataset into our layout
# (`images/`, `labels/` with 0 = background, non-zero = defect, `classes.csv`), splits it
# (seeded, stratified by class) into `train/val/test`, and shows what the model will see:
# samples with their masks, class counts, image statistics and the pair colouring of training
# samples (prompt on top, query below; background black, the defect in one colour).
#
# The original project flattened the VISION sub-datasets into one `train_dataset/{train,val}`
# folder pair with the class as the file-name prefix; `data_prep` does the same and keeps the
# class in `classes.csv`.

# %% tags=["parameters"]
results_dir = "results"  # tables/, figures/, work/ go here
source = "synthetic"  # synthetic | coco | magnetic_tile | folder
source_path = ""  # the folder to convert or use (not for synthetic)
synthetic = {"per_class": 40, "size": 256, "n_free": None, "seed": 0}
limit_per_class = None  # magnetic_tile: first N photos of each class
split_seed = 0
val = 0.15
test = 0.15
rebuild_data = False  # False: reuse an identical earlier build
preset = "vit_micro"  # the model size decides the pair layout shown below
model = {}
weights = "pretrained"  # the shipped pretrained checkpoint; with preset "auto" the architecture is read from the weights
seed = 0
train = {"lr": 1e-3, "batch_size": 16, "fg_weight": "auto", "weight_query_defects": True, "defect_color": [255, 255, 255], "query_mask_share": 0.5,
         "warmup_steps": 30, "cycle_steps": 100000, "mask_ratio": 0.75, "negative_target": "empty", "num_workers": 0}  # the pipeline's recipe (pair layout, colouring)

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from data_prep.prepare import prepare_data, stats_table
from seggpt_lib.experiments import results as RES, dataset as DS
from seggpt_lib.experiments import viz as V

R = Path(results_dir)
work = RES.result_dirs(R)["work"]
pd.set_option("display.precision", 4)

# %% [markdown]
# ## Build or convert, then split

# %%
info = prepare_data(work, source=source, source_path=source_path, synthetic=synthetic,
                   limit_per_class=limit_per_class, split_seed=split_seed, val=val, test=test,
                   rebuild=rebuild_data)
split_root = Path(info["split_root"])
print(f"dataset: {info['root']}\nsplit:   {split_root}  ({info['seconds']:.1f} s{', reused' if info['reused'] else ''})")

# %% [markdown]
# ## Class counts per split
# Defect-free images (empty mask) are counted as `free`: they are never prompts or positive
# queries, only the queries of the defect-free yield.

# %%
counts = RES.write_table(DS.class_counts(split_root), R, "01_class_counts", title="Images per class and split")
counts

# %% [markdown]
# ## Image statistics
# Per-channel mean and standard deviation on the 0..1 scale (the original normalised with its
# dataset's own statistics, `[0.178, 0.301, 0.194] / [0.255, 0.220, 0.238]`; the official
# weights expect ImageNet's), image sizes and the mean share of defect pixels.

# %%
stats = RES.write_table(stats_table(split_root), R, "01_image_stats", title="Image statistics per split")
stats

# %% [markdown]
# ## Samples with their masks (training split)

# %%
fig = V.dataset_samples(split_root / "train", per_class=2, size=128, seed=seed)
RES.save_figure(fig, R, "01_samples");

# %% [markdown]
# ## Pair colouring: what a training sample looks like
# Each sample stacks a prompt (top) and a query (bottom). The label pair is coloured black
# for background and, for the defect, **one random colour per sample** (the original's
# recipe) or the fixed `defect_color` of the training recipe (the colour the predictor
# paints prompts in). A random `mask_ratio` share of the label-pair patches is hidden and
# must be painted by the model; a `query_mask_share` of the samples hide the whole query
# half instead, as at inference. Negative pairs (prompt of another class) ask for an empty
# query half when `negative_target` is `empty`.

# %%
ds = DS.display_dataset(split_root, preset=preset, model=model, weights=weights, seed=seed, train=train, n=4)
print(f"model input: pair {2 * ds.image_size[0]}x{ds.image_size[1]}, patch {ds.patch_size}, grid {ds.grid}")
fig = V.pair_samples_figure(ds, range(min(4, len(ds))))
RES.save_figure(fig, R, "01_pair_colouring");

# %%
RES.write_fragment(R, RES.DataFragment.build(info, counts, stats))
display(Markdown(f"**{int(counts['total'].iloc[-1])} images**, {len(counts) - 1} classes, split into "
                 + ", ".join(f"{c} {int(counts[c].iloc[-1])}" for c in counts.columns[1:-1])))
