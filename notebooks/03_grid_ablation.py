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
# # 03 · Grid ablation
#
# Every positive pair of the test split (a defect query with a prompt of its own class from the
# training split) is predicted with the tiling `grids` 1, 2 and 4 (the original called it
# `split`): the query and its prompts are resized to
# a square canvas (`work_size`), cut into n×n tiles, each tile resized to the model's native
# size and paired with prompt tiles (`tile_pairing`: `aligned` pairs a tile with the prompts'
# tile at the same place, `all` with every tile of every prompt as the original did), the tile
# outputs are snapped to the palette and reassembled at full resolution. The original found
# grid 2 best (mIoU 0.173 / 0.538 / 0.327 for grid 1 / 2 / 4 on 11 VISION queries).
#
# Metrics follow the evaluation protocol: per-image IoU on the full-resolution binary masks,
# good catch when IoU ≥ `catch_iou`; mIoU is the mean of per-image IoU.

# %% tags=["parameters"]
results_dir = "results"
weights = ""  # empty: the weights notebook 02 produced
device = "cpu"
precision = "auto"
grids = [1, 2, 4]  # tiling: n x n tiles per image
top_k = 1
extra_top_k = 3  # one more row at eval_grid with this many prompts (0: none)
eval_grid = 2
work_size = "auto"  # canvas side when tiling; auto: median side of the test images, at most 1024
tile_pairing = "aligned"  # aligned | all
max_batch = 64
max_queries = None  # None: every positive test query
mapping_seed = 0
catch_iou = 0.3
n_panels = 3

# %%
from pathlib import Path

import pandas as pd

from seggpt_lib.experiments import results as RES, evaluation as EV
from seggpt_lib.experiments import viz as V

R = Path(results_dir)
split_root = Path(RES.load_fragment(R, RES.DataFragment).split_root)
em = EV.load_eval_model(R, weights=weights, device=device, precision=precision, max_batch=max_batch)
print("model:", em.describe())
pd.set_option("display.precision", 4)

# %% [markdown]
# ## mIoU by grid

# %%
abl = EV.grid_ablation(em, split_root, grids=grids, top_k=top_k, extra_top_k=extra_top_k, eval_grid=eval_grid,
                       work_size=work_size, tile_pairing=tile_pairing, catch_iou=catch_iou, seed=mapping_seed,
                       max_queries=max_queries)
frag = RES.GridAblationFragment.build(abl, em, top_k=top_k, tile_pairing=tile_pairing)
print(f"work size {abl['work_size']}, {abl['tile_pairing']} tile pairing, {len(abl['mapping'])} positive queries")
RES.write_table(abl["table"], R, "03_grid_miou", title="mIoU by tiling grid (positive pairs of the test split)",
              note=f"catch: IoU >= {catch_iou}. original_mIoU: the original's published figure (11 VISION queries).")

# %%
t1 = abl["table"][abl["table"]["top_k"] == top_k]
fig = V.bar_chart(t1.assign(grid=t1["grid"].map(lambda s: f"grid {s}")), "grid", ["mIoU", "catch_rate", "original_mIoU"],
                  title=f"mIoU and catch rate by tiling grid (top-{top_k})", rotate=0)
RES.save_figure(fig, R, "03_grid_miou");

# %% [markdown]
# ## Per-class IoU

# %%
per_class = RES.write_table(abl["per_class"], R, "03_per_class_iou", title=f"Mean IoU per class and tiling grid (top-{top_k})")
fig = V.bar_chart(per_class, "class", [c for c in per_class.columns if c.startswith("grid_")],
                  title="IoU per defect class", ylabel="mean IoU", hline=catch_iou, hline_label="catch threshold")
RES.save_figure(fig, R, "03_per_class_iou");
per_class

# %% [markdown]
# ## Per image

# %%
cols = ["file", "class", "grid", "top_k", "prompts", "iou", "catch", "pred_pixels", "gt_pixels", "seconds"]
per_image = RES.write_table(abl["per_image"][cols], R, "03_per_image", title="Every positive pair")
per_image.head(12)

# %% [markdown]
# ## Best and worst cases
# At the best grid: each row stacks the prompt (top) over the query (bottom), as the original's
# TensorBoard rows did: **[input | masked label | label | raw prediction | snapped prediction]**.

# %%
best_grid = frag.best_grid
at_best = abl["per_image"][(abl["per_image"]["grid"] == best_grid) & (abl["per_image"]["top_k"] == top_k)]
for worst, name in ((False, "best"), (True, "worst")):
    rows = EV.example_rows(em, split_root, at_best, abl["mapping"], n=n_panels, worst=worst, grid=best_grid,
                           top_k=top_k, work_size=abl["work_size"], tile_pairing=tile_pairing)
    RES.save_figure(V.five_panel_figure(rows, suptitle=f"{name} cases at grid {best_grid}"), R, f"03_{name}_cases")

# %%
RES.write_fragment(R, frag)
abl["table"]
