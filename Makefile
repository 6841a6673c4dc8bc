# The two commands of the README: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench clean

# torch first, pinned: on these machines 2.13.0 is a local CPU build, while an unpinned torch with
# none installed would pull several GB of CUDA packages. Then the package, which torch>=2.4 satisfies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[all]"
	touch $(STAMP)

# The main job on the embedded default: MLE vs SMILE fine-tuning of a small BLIP on generated scenes.
demo: $(STAMP)
	$(PY) -m seqloss compare --out runs/demo

# Lint and type check first (seconds), then the suite.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Lint (ruff: pyflakes, isort, bugbear, pyupgrade) and type check (mypy, basic), as configured in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m mypy

# The documentation site into site/ (MkDocs Material + mkdocstrings; warnings are errors, as tests/test_docs.py builds it).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The full tables behind benchmarks/RESULTS.md (several minutes on 2 cores).
bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py --repeats 7
	$(PY) benchmarks/bench_linear.py --repeats 3
	$(PY) benchmarks/bench_masking.py
	$(PY) benchmarks/bench_train_step.py --repeats 5

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .hypothesis
