# Everything sets itself up on a fresh machine: `make demo` trains the default job, `make test` runs the checks.
# Override the torch install for your cluster, e.g. make test TORCH="torch==2.5.1 --index-url ..."
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench data docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Fashion-MNIST from Debian's package when possible; otherwise rrepa downloads it on first use (the tests never do).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi
	@[ -d /usr/share/datasets/fashion-mnist ] || echo "note: Fashion-MNIST is not installed (needs root on Debian:" \
		"apt-get install dataset-fashion-mnist); the tests that need it will be skipped"

# The default job as data-parallel processes (torchrun, gloo) on the CPU: two processes of half the cores each
# train the 1.6 M-parameter flow 1.26x faster in bf16 than one process on every core (benchmarks/bench_train.py,
# 2-core Xeon). DEMO_PROCS=1 trains it in one process.
DEMO_PROCS ?= $(shell $(PYTHON) -c "import os; print(2 if os.cpu_count() > 1 else 1)")
demo: $(STAMP) data
	$(if $(filter 1,$(DEMO_PROCS)),$(VENV)/bin/rrepa train,OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone \
		--nproc_per_node $(DEMO_PROCS) -m rrepa.cli train)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# `data` first, as for `demo`: without Fashion-MNIST the tests that need it skip (-ra lists them with the reason).
test: $(STAMP) data lint
	HF_HUB_OFFLINE=1 RREPA_OFFLINE=1 $(PY) -m pytest -q -ra

# The documentation site (mkdocs + material + mkdocstrings, the `docs` extra), into site/; strict: a broken link or
# a page missing from the nav fails the build.
$(VENV)/.docs-installed: $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: $(STAMP)
	$(PY) benchmarks/bench_flow.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
