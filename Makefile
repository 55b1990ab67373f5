# The two commands of the README: `make run` and `make test`. Each sets up what it needs first,
# idempotently: a second run reuses the venv, the assets and the Ollama build.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock setup.py settings.ini | md5sum | cut -c1-12)
PARAMS ?= params/default.yaml
RUN ?= runs/default
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test lab bench clean-venv docs docs-refresh

$(STAMP): requirements.lock setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name movierec --display-name "Python (movierec)" >/dev/null
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# venv + pinned packages, the base model, MovieLens-100K and an Ollama server binary
setup: $(STAMP)
	$(BIN)/movierec setup

# the main job: the whole pipeline on MovieLens-100K with SmolLM2, through papermill
run: setup
	$(BIN)/movierec run --params $(PARAMS) --out $(RUN)

# the notebooks' own checks, then the test suite (real SmolLM2, real Ollama, papermill runs). The notebooks run two at
# a time with one thread each: their models are tiny (SmolLM2 at most for a few prompts), and on 2 cores that took 259 s against 487 s one at a time
# with two threads each (27 Nov 2026); the test suite stays one test at a time.
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --do_print
	$(BIN)/python -m pytest -q tests

# the documentation site in _docs/: every notebook as committed (outputs included, nothing executed)
docs: $(STAMP)
	$(BIN)/python tools/build_docs.py --out _docs

# execute the notebooks of nbs/ in place so they are committed with their outputs (tidied: no stderr, no
# widgets, no paths of this machine, small PNGs); NB="nbs/06_evaluate.ipynb ..." for some of them
docs-refresh: setup
	flock /tmp/movierec-cpu.lock $(BIN)/python tools/execute_notebooks.py $(NB)

lab: setup
	$(BIN)/jupyter lab --notebook-dir=nbs

clean-venv:
	rm -rf $(VENV)
