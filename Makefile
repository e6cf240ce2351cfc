# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
# torch is installed first and pinned to the CPU wheel when no torch is present:
# an unpinned torch resolves to a multi-GB CUDA build. Users with GPUs keep their own torch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: demo test docs ui venv bench toyworld clean constraints

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tlora demo --out demo-output --overwrite

test: venv
	$(PY) -m pytest

# the browser UI on http://127.0.0.1:7860 (uploads and runs in tlora-workspace/)
ui: venv
	$(PY) -m tlora ui

# the documentation site into site/, strict: a broken link, a missing page or an unresolved API reference fails
docs: venv
	$(PY) -m mkdocs build --strict --site-dir site

bench: venv
	$(PY) -m benchmarks.run

toyworld: venv
	$(PY) -m benchmarks.toyworld

# the versions of everything installed now (but torch and tlora itself) become the pinned set
constraints: venv
	{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v -e '^torch==' -e '^tlora' -e '^#'; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) demo-output site tlora-workspace
