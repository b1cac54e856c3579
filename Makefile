# Set-up and the two entry points of the README. Everything installs into .venv from PyPI with the
# pinned set in requirements/constraints.txt (torch 2.14.1 + torchvision 0.29.1 on Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/her2st
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-all clean-venv

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The main job on the real default data (her2st-6): graphs, cross-validated training, summary table.
# Build once, train many: the train step reads the graphs just built, not the raw slides. Again: the graphs
# are rebuilt (from the embedding cache) and the run resumed (refused if the config changed).
demo: $(STAMP)
	$(VENV)/bin/gnnst build-graphs --config configs/her2st.yaml --out $(OUT)/graphs --overwrite
	$(VENV)/bin/gnnst train --graphs $(OUT)/graphs --config configs/her2st.yaml --out $(OUT)/train --resume

# The default test run (minutes); real-data tests skip when ../shared/data is absent.
test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
