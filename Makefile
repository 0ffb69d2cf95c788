# lmtrain: install, test, and the newcomer's demo.
#
# torch is installed first, from TORCH_SPEC, so that pip never picks a torch build on its own
# (a bare `torch` requirement can pull a multi-GB CUDA build). Override it for a GPU machine:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole suite, CPU only: two pytest workers (pytest-xdist), one test file per worker at a
# time so module fixtures are built once; about 4.5 minutes on 2 cores (8-10 serially).
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Everything but the end-to-end tests that train or spawn processes.
test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# The main job on the embedded default corpus.
demo: install
	$(BIN)/lmtrain run

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
