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
# # Explorer
#
# Open it with `make lab` (JupyterLab on this notebook; `make lab NO_BROWSER=1` on a machine
# without a browser: open the address it prints). It reads the repository's `results/`
# (written by `make reproduce`), also when run from `notebooks/`.
#
# Pick a test query, its prompts (from the training split: the query's own class gives a
# positive pair, another class a negative one), top-k and tiling grid; the prediction, the
# overlays and the metrics redraw on every change. The highlighted prompts are exactly the ones
# used, in the order you clicked them; top-k is their number. A positive pair is scored by its
# IoU (catch or escape), a negative pair or a defect-free query by its response rate (yield or
# overkill). The threshold slider sets the pixel threshold on the per-pixel defect score (0.5 =
# the snapped mask) and redraws the mask, the score map and the line's pass/defect decision
# without running the model again. One colour legend for every panel: red = predicted where
# there is no defect, green = a true defect missed, yellow = hit, blue = a prompt's defect mask.
#
# **The calibrated decision.** When the results hold an operating point (notebook 04 chose one on
# the validation split: `operating_point.json`), the slider starts at its calibrated pixel
# threshold and is labelled *calibrated* while it stays there; the *calibrated* button goes back
# to it. The verdict is then the full decision: pixel threshold, connected components below the
# minimum area dropped, the image score against its threshold (and the prompt consistency where
# the point uses it). Without an operating point the slider starts at 0.5 (the snapped mask) and
# the verdict is "anything painted".
#
# The callbacks live in `seggpt_lib.experiments.viz.Explorer`, so the same thing works from plain Python:
# `Explorer(...).update(query=..., prompts=[...], top_k=..., grid=...)` returns the metrics
# and the figure. Run notebooks 01 and 02 first (or give `weights` and `split_dir`). Not a stage of
# `seggpt reproduce`.

# %% tags=["parameters"]
results_dir = "results"
weights = ""  # empty: the weights notebook 02 produced
split_dir = ""  # empty: the split of notebook 01
device = "cpu"
precision = "auto"
work_size = "auto"
tile_pairing = "aligned"
max_batch = 64
query = ""  # the query shown first; empty: the first test image
grid = 1  # tiling of the first prediction shown
top_k = 1

# %%
from pathlib import Path

from IPython.display import display

from seggpt_lib.experiments import results as RES, evaluation as EV
from seggpt_lib.experiments import viz as V

R = V.find_results_dir(results_dir)  # "results" from notebooks/: the repository's results/
split_root = V.find_results_dir(split_dir) if split_dir else Path(RES.load_fragment(R, RES.DataFragment).split_root)
em = EV.load_eval_model(R, weights=weights, device=device, precision=precision, max_batch=max_batch)
q_root, p_root = EV.eval_roots(split_root)
point = V.results_operating_point(R, weights)  # notebook 04's calibration (or the one beside `weights`)
explorer = V.Explorer(em.predictor, q_root, p_root, work_size=EV.work_size_of(work_size, q_root, em),
                      tile_pairing=tile_pairing, operating_point=point)
print("results:", R.resolve())
print("model:", em.describe())
if point is not None:
    print(EV.operating_point_text(point), f"The slider starts at {explorer.threshold:.2f} (calibrated).")
else:
    print("no operating point in the results (run notebook 04): the slider starts at 0.5, the snapped mask")
print(f"{len(explorer.queries)} queries, {len(explorer.prompt_files)} prompt candidates")

# %% [markdown]
# ## Interactive

# %%
display(explorer.widget())

# %% [markdown]
# ## The same from Python: a positive and a negative prompt for one query

# %%
q = query or next(f for f in explorer.queries if explorer.query_class(f) != "free")
pos = explorer.update(query=q, top_k=top_k, grid=grid)
print(explorer.metrics_text(pos))
V.show(pos["figure"])
other = next(f for f in explorer.prompt_files if explorer.prompt_class(f) != pos["query_class"])
neg = explorer.update(query=q, prompts=[other], top_k=1, grid=grid)
print(explorer.metrics_text(neg))
V.show(neg["figure"])
