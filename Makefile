# Two entry points (see README):
#   make reproduce   create .venv, install, run the whole notebook pipeline on built-in synthetic data
#   make test        create .venv if missing, install, run the test suite
#   make ablate      an ablation grid: make ablate NAME=original [QUICK=1] (configs/ablations/NAME.json)
#   make pretrained  rebuild the shipped pretrained checkpoint (pretrained/; resumable, about 45 min on 2 cores)
#   make lab         JupyterLab on the interactive explorer (notebooks/explorer.ipynb) with results/
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Pipeline parameters (override on the command line: make reproduce WEIGHTS=... DATA=... DEVICE=cuda)
CONFIG  ?= configs/pipeline.json
DATA    ?=
WEIGHTS ?=
DEVICE  ?=
PRESET  ?=
STEPS   ?=
OVERRIDES := $(if $(DATA),--set data=$(DATA)) $(if $(WEIGHTS),--set weights=$(WEIGHTS)) \
             $(if $(DEVICE),--set device=$(DEVICE)) $(if $(PRESET),--set preset=$(PRESET)) \
             $(if $(STEPS),--set steps=$(STEPS))

.PHONY: reproduce test install browser clean lab ablate pretrained study

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the HTML-report test (skipped cleanly where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( (apt-get install -y -q chromium >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) && echo "installed chromium" ) || \
	  echo "chromium not available: browser test will be skipped"

reproduce: $(STAMP)
	$(VENV)/bin/seggpt reproduce --config $(CONFIG) $(OVERRIDES)

# An ablation grid (configs/ablations/$(NAME).json; see README "Ablations"): make ablate NAME=original
# [QUICK=1] [JOBS=2] [DEVICE=...]; a rerun skips the finished cells. Results: results/ablations/NAME/index.html
ifneq ($(origin NAME),command line)
NAME  := original# (an environment's NAME, e.g. the host name some shells set, is not a grid)
endif
QUICK ?=
JOBS  ?=
ablate: $(STAMP)
	$(VENV)/bin/seggpt ablate --config configs/ablations/$(NAME).json $(if $(QUICK),--quick) \
	  $(if $(JOBS),--jobs $(JOBS)) $(OVERRIDES)

# The shipped pretrained checkpoint (pretrained/vit_micro_shapes.*): build the shapes set, pretrain,
# export weights + SHA-256 + recipe + curve. Resumable: interrupted, the same command continues.
pretrained: $(STAMP)
	$(VENV)/bin/seggpt pretrain

# The magnetic-tile study on this CPU (README "Magnetic-tile study"): budgets in steps, so the same
# command gives the same tables; needs the set in ../shared/datasets/magnetic_tile (or DATA=...);
# STUDY_SET="key=value ..." adds study settings (seggpt study --help).
STUDY_SET ?=
STUDY_CPU := --set preset=vit_micro minutes=null steps=400 eval_every=50 val_pairs=32 tune_steps=30 \
	  max_queries=30 top_k=3 train.batch_size=32 train.num_workers=0
study: $(STAMP)
	$(VENV)/bin/seggpt study --device cpu $(if $(DATA),--data $(DATA)) $(STUDY_CPU) $(STUDY_SET)

test: $(STAMP) browser
	$(PY) -m pytest -q --timeout=600

# The explorer in JupyterLab, reading the repository's last results (results/, from make reproduce).
# Headless: make lab NO_BROWSER=1 (then open the printed address); LAB_PORT / LAB_IP to serve elsewhere.
LAB_PORT   ?= 8888
LAB_IP     ?= localhost
NO_BROWSER ?=
LAB_URL    := http://$(LAB_IP):$(LAB_PORT)/lab/tree/notebooks/explorer.ipynb

lab: $(STAMP)
	@test -f results/work/01_data_transformation.json || \
	  echo "note: no results in results/ yet: run make reproduce first (the explorer needs notebooks 01 and 02)"
	@echo "Explorer: $(LAB_URL)  (JupyterLab prints it again below with its access token; Ctrl-C stops it)"
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab notebooks/explorer.ipynb --ServerApp.root_dir=$(CURDIR) \
	  --ServerApp.ip=$(LAB_IP) --ServerApp.port=$(LAB_PORT) --ServerApp.port_retries=0 $(if $(NO_BROWSER),--no-browser) \
	  $$(test "$$(id -u)" = 0 && echo --allow-root)

clean:
	rm -rf results/reports results/figures results/tables results/summary.json results/index.html results/work runs
