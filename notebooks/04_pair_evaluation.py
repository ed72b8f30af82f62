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
# # 04 · Pair evaluation: catch, yield and PES
#
# Three runs over the test split at tiling grid `eval_grid` with `top_k` prompts from the training split:
#
# * **positive prompts** (the query's own defect class): per-image IoU, **good catch** when
#   IoU ≥ `catch_iou` (the protocol's 0.3), else escape; `catch_rate` = good catches / positive pairs;
# * **negative prompts** (another defect class): the **response rate** (predicted defect
#   pixels / all pixels) must stay below `yield_response` (the protocol's 0.000239) for a **correct yield**,
#   else overkill; `yield_rate` = correct yields / negative pairs. The IoU against the query's
#   own defect is reported too (the original's "negative mIoU");
# * **defect-free queries** (prompts of random defect classes): the same response test, the
#   **defect-free yield** a line manager asks for first.
#
# `PES = 0.5·catch_rate + 0.5·yield_rate`. A model that paints nothing scores catch 0,
# yield 1, PES 0.5, so every figure stands beside the *paint nothing* and *paint everything*
# baselines on the same pairs, and beside the original's published figures (grid 2: positive
# mIoU 0.541, catch 0.91; negative mIoU 0.527, yield 0.182; PES 0.546). IoU of an empty
# prediction on an empty ground truth is 1 (nothing to find, nothing painted).

# %% tags=["parameters"]
results_dir = "results"
weights = ""  # empty: the weights notebook 02 produced
device = "cpu"
precision = "auto"
eval_grid = 2  # tiling: n x n tiles per image
top_k = 1
work_size = "auto"
tile_pairing = "aligned"
max_batch = 64
max_queries = None
mapping_seed = 0
catch_iou = 0.3
yield_response = 0.000239
n_panels = 3

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from seggpt_lib.experiments import results as RES, evaluation as EV
from seggpt_lib.experiments import viz as V
from seggpt_lib.eval.metrics import summary_markdown

R = Path(results_dir)
split_root = Path(RES.load_fragment(R, RES.DataFragment).split_root)
em = EV.load_eval_model(R, weights=weights, device=device, precision=precision, max_batch=max_batch)
print("model:", em.describe())
pd.set_option("display.precision", 4)

# %%
ev = EV.pair_evaluation(em, split_root, grid=eval_grid, top_k=top_k, work_size=work_size, tile_pairing=tile_pairing,
                       catch_iou=catch_iou, yield_response=yield_response, seed=mapping_seed, max_queries=max_queries)
summary = ev["summary"]
display(Markdown(summary_markdown(summary)))

# %% [markdown]
# ## Ours beside the original and the trivial baselines

# %%
comp = RES.write_table(EV.comparison_table(summary, RES.grid_miou(R)), R, "04_summary",
                     title=f"Summary (grid {eval_grid}, top-{top_k}, {tile_pairing} tile pairing)",
                     note="original: the published figures (11 VISION queries, grid 2). "
                          "Baselines: paint nothing / paint everything on the same pairs.")
fig = V.bar_chart(comp, "metric", ["ours", "original", "paint_nothing", "paint_everything"],
                  title="Production-line figures", rotate=30)
RES.save_figure(fig, R, "04_summary");
comp

# %% [markdown]
# ## Per image

# %%
tabs = EV.per_image_tables(ev["table"])
RES.write_table(tabs["positive"], R, "04_positive", title="Positive prompts: IoU and catch")
RES.write_table(tabs["negative"], R, "04_negative", title="Negative prompts: response rate and yield")
RES.write_table(tabs["free"], R, "04_free", title="Defect-free queries: response rate and yield")
RES.write_table(tabs["side_by_side"], R, "04_per_image", title="Per image, the original's layout")
tabs["side_by_side"]

# %% [markdown]
# The original's per-image figures (grid 2), for reference:

# %%
RES.write_table(EV.published_per_image(), R, "04_original_per_image", title="The original's per-image figures (grid 2)")

# %% [markdown]
# ## Where the model responds
# Positive pairs by IoU (catch threshold dashed) and response rates of the negative and
# defect-free pairs (yield threshold dashed, log scale).

# %%
fig = V.rate_figure(ev["table"], catch_iou=catch_iou, yield_response=yield_response)
RES.save_figure(fig, R, "04_rates");

# %% [markdown]
# ## Examples: the worst positive pairs and the strongest responses to negative prompts

# %%
rows = EV.example_rows(em, split_root, ev["table"], ev["mappings"]["positive"], n=n_panels, worst=True,
                      grid=eval_grid, top_k=top_k, work_size=ev["work_size"], tile_pairing=tile_pairing)
RES.save_figure(V.five_panel_figure(rows, suptitle="positive prompts: lowest IoU"), R, "04_positive_worst")
if ev["mappings"]["negative"]:
    rows = EV.example_rows(em, split_root, ev["table"], ev["mappings"]["negative"], n=n_panels, worst=False,
                          grid=eval_grid, top_k=top_k, work_size=ev["work_size"], tile_pairing=tile_pairing,
                          kind="negative", by="response_rate")
    RES.save_figure(V.five_panel_figure(rows, suptitle="negative prompts: strongest response"), R, "04_negative_strongest")

# %%
RES.write_fragment(R, RES.PairEvaluationFragment(
    summary=summary, grid=eval_grid, top_k=top_k, work_size=ev["work_size"], tile_pairing=tile_pairing,
    weights=em.weights, device=em.device, comparison=comp.to_dict("records")))
display(Markdown(f"**PES {summary['pes']:.4f}** (catch {summary['catch_rate']:.3f}, yield {summary['yield_rate']:.3f}); "
                 f"defect-free yield {summary['free_yield_rate']:.3f}; the original: PES 0.546 (catch 0.91, yield 0.182)."))
