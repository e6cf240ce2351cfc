# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
# torch is installed first and pinned to the CPU wheel when no torch is present:
# an unpinned torch resolves to a multi-GB CUDA build. Users with GPUs keep their own torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: demo test venv bench toyworld clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tlora demo --out demo-output --overwrite

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m benchmarks.run

toyworld: venv
	$(PY) -m benchmarks.toyworld

clean:
	rm -rf $(VENV) demo-output
