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
# Pick a test query, its prompts (from the training split: the query's own class gives a
# positive pair, another class a negative one), top-k and tiling grid;
# the prediction, the overlays
# and the metrics update live. Green: ground truth missed; red: painted where there is no
# defect; yellow: hit.
#
# The callbacks live in `seggpt_lib.experiments.viz.Explorer`, so the same thing works from plain Python:
# `Explorer(...).update(query=..., prompts=[...], top_k=..., grid=...)` returns the metrics
# and the figure. Run notebooks 01 and 02 first (or give `weights` and `split_dir`). Not a stage of
# `seggpt reproduce`: open it in Jupyter.

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

R = Path(results_dir)
split_root = Path(split_dir or RES.load_fragment(R, RES.DataFragment).split_root)
em = EV.load_eval_model(R, weights=weights, device=device, precision=precision, max_batch=max_batch)
q_root, p_root = EV.eval_roots(split_root)
explorer = V.Explorer(em.predictor, q_root, p_root, work_size=EV.work_size_of(work_size, q_root, em),
                      tile_pairing=tile_pairing)
print("model:", em.describe())
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
other = next(f for f in explorer.prompt_files if explorer.prompt_index.class_of(explorer.prompt_index.find(f)) != pos["query_class"])
neg = explorer.update(query=q, prompts=[other], top_k=1, grid=grid)
print(explorer.metrics_text(neg))
V.show(neg["figure"])
