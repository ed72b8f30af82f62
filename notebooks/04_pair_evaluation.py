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
#
# **The line's decision.** The raw mask (the model's output snapped to the palette) is one
# operating point. A line decides per image from the defect score map: pixel threshold,
# connected components below a minimum area dropped, an image score (largest component or mean
# score) against a threshold (`seggpt_lib.eval.decision`). That decision is chosen on the
# **validation split only** (`calibration_objective`: `max_pes`, or `max_catch_at_yield` with
# `calibration_yield_target`), written as `operating_point.json` (beside the weights when they
# lie in the results folder, else in `work/`), and applied to the same test pairs: every figure
# has a *raw* and a *calibrated* row.

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
calibration_objective = "max_pes"  # max_pes or max_catch_at_yield, chosen on the validation split
calibration_yield_target = 0.6  # max_catch_at_yield: the yield to reach
pretrained_baseline = True  # also score the shipped pretrained checkpoint without fine-tuning, same pairs
n_panels = 3

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from seggpt_lib.experiments import results as RES, evaluation as EV, report as REP
from seggpt_lib.experiments import viz as V
from seggpt_lib.eval.metrics import summary_markdown

R = Path(results_dir)
split_root = Path(RES.load_fragment(R, RES.DataFragment).split_root)
em = EV.load_eval_model(R, weights=weights, device=device, precision=precision, max_batch=max_batch)
print("model:", em.describe())
pd.set_option("display.precision", 4)

# %%
ev = EV.pair_evaluation(em, split_root, grid=eval_grid, top_k=top_k, work_size=work_size, tile_pairing=tile_pairing,
                       catch_iou=catch_iou, yield_response=yield_response, seed=mapping_seed, max_queries=max_queries,
                       calibration_objective=calibration_objective, calibration_yield_target=calibration_yield_target,
                       results_dir=R)
summary = ev["summary"]
baseline_note = REP.baseline_note(summary)  # the figures equal to a trivial baseline's ("" when none)
display(Markdown(summary_markdown(summary) + "\n" + EV.operating_point_text(ev["operating_point"])
                 + (f"\n\n> ⚠ {baseline_note}" if baseline_note else "")))

# %% [markdown]
# ## Ours beside the original and the trivial baselines

# %%
comp = RES.write_table(EV.comparison_table(summary, RES.grid_miou(R)), R, "04_summary",
                     title=f"Summary (grid {eval_grid}, top-{top_k}, {tile_pairing} tile pairing)",
                     note="original: the published figures (11 VISION queries, grid 2). "
                          "Baselines: paint nothing / paint everything on the same pairs.")
fig = V.bar_chart(comp, "metric", [c for c in comp.columns if c != "metric"], title="Production-line figures", rotate=30)
RES.save_figure(fig, R, "04_summary");
comp.assign(equals_trivial_baseline=REP.baseline_column(comp))  # a figure within BASELINE_TOL of a baseline's

# %% [markdown]
# ## The line's decision: raw and calibrated
# The test pairs decided with the raw mask and with the operating point chosen on the validation
# split. The curves sweep the decision's image threshold (the calibrated decision's other
# settings fixed; the raw decision's dotted): catch rate against the yield on negative prompts
# (blue) and on defect-free queries (orange); AUC = area under catch against overkill
# (1 − yield), 1 = every defect caught before any overkill.

# %%
RES.save_figure(V.catch_yield_figure(ev["curve"], EV.decision_points(summary), raw_curve=ev["raw_curve"]),
                R, "04_catch_yield")
if len(ev["curve"]["per_class"]) >= 3:
    RES.save_figure(V.catch_yield_by_class(ev["curve"]["per_class"]), R, "04_catch_yield_by_class")
RES.write_table(EV.decision_table(summary, summary.get("calibrated"), summary["baselines"]), R, "04_decision",
                title="The line's decision: raw and calibrated (test pairs)",
                note=EV.operating_point_text(ev["operating_point"]) + f" AUC (negative prompts) "
                     f"{ev['curve']['auc_negative']:.3f}, (defect-free) {ev['curve']['auc_free']:.3f}.")

# %% [markdown]
# ## Without fine-tuning: the pretrained checkpoint, one-shot
# SegGPT as it is used: the shipped in-context checkpoint (pretrained on generic shapes only,
# `make pretrained`), *not* fine-tuned, prompted one-shot on the same test pairs. Every defect
# class here is one it never saw. Beside it the model notebook 02 trained; each with its own
# operating point calibrated on the validation split.

# %%
wft = None
if pretrained_baseline:
    wft = EV.pretrained_without_finetuning(
        split_root, summary, device=device, precision=precision, max_batch=max_batch, grid=eval_grid, top_k=top_k,
        work_size=work_size, tile_pairing=tile_pairing, catch_iou=catch_iou, yield_response=yield_response,
        seed=mapping_seed, max_queries=max_queries, calibration_objective=calibration_objective,
        calibration_yield_target=calibration_yield_target)
if wft is not None:
    RES.write_table(wft["table"], R, "04_without_finetuning",
                    title="The pretrained checkpoint without fine-tuning beside the fine-tuned model (test pairs)",
                    note=f"pretrained: {Path(wft['weights']).name}, one-shot on defect classes it never saw; "
                         "raw = snapped masks, calibrated = the operating point chosen on the validation split.")
    display(wft["table"])
else:
    print("not run (pretrained_baseline = False, or no shipped checkpoint)")

# %% [markdown]
# ## Does the prompt consistency tell a wrong prompt apart?
# The consistency of a pair compares the painted query region with the prompt's defect and its
# background in the model's own features; a wrong (negative) prompt should score lower.

# %%
sep = EV.consistency_separation(ev["table"])
point = ev["operating_point"]
RES.save_figure(V.consistency_histograms(sep["positive"], sep["negative"], sep["free"], auroc=sep["auroc"],
                                         threshold=point.default.consistency_threshold if point else None),
                R, "04_consistency")
display(Markdown(sep["sentence"]))

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
RES.write_fragment(R, RES.PairEvaluationFragment.build(ev, em, R, eval_grid, top_k, comp, without_finetuning=wft))
cal = summary.get("calibrated") or {}
display(Markdown(f"**PES {summary['pes']:.4f}** raw (catch {summary['catch_rate']:.3f}, yield {summary['yield_rate']:.3f}, "
                 f"defect-free yield {summary['free_yield_rate']:.3f})"
                 + (f"; **{cal['pes']:.4f}** calibrated on val (catch {cal['catch_rate']:.3f}, yield "
                    f"{cal['yield_rate']:.3f}, defect-free yield {cal['free_yield_rate']:.3f})" if cal else "")
                 + "; the original: PES 0.546 (catch 0.91, yield 0.182)."
                 + (f"\n\n> ⚠ {baseline_note}" if baseline_note else "")))
