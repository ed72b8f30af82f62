# Two entry points (see README):
#   make reproduce   create .venv, install, run the whole notebook pipeline on built-in synthetic data
#   make test        create .venv if missing, install, run the test suite
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

.PHONY: reproduce test install browser clean

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

test: $(STAMP) browser
	$(PY) -m pytest -q --timeout=600

clean:
	rm -rf results/reports results/figures results/tables results/summary.json results/index.html results/work runs
