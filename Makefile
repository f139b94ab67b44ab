# Two commands on a fresh machine: `make demo` and `make test` (plus `make docs`).
#
# Without make: `pip install .` (torch is the only requirement; extras: triton, plot, train,
# hf, docs, test; see pyproject.toml).
#
# torch is installed first, on its own, as "$(TORCH_SPEC)" (default torch==2.13.0), so that
# the project's `torch>=2.6` is already satisfied when the project is installed. pip resolves
# that pin from its configured indexes: where a CPU wheel of it lies locally (this project's
# machines and CI) that is what comes; from PyPI on Linux x86_64 it is a CUDA build. On a CPU
# machine without a local wheel, take PyTorch's CPU index:
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# or pin another torch: make test TORCH_SPEC=torch==2.6.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.nsa-installed

.PHONY: demo test docs install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# NSA, full and window attention trained on pass-key retrieval, compared (nsa demo --help);
# --overwrite: a second `make demo` replaces the demo's own files in demo-out/
demo: $(STAMP)
	$(VENV)/bin/nsa demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

# API pages (pdoc, offline) under build/docs; open build/docs/index.html
docs: $(STAMP)
	$(PY) scripts/docs.py build/docs

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
