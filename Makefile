# ablate: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DATA := data
FMNIST_RAW := $(DATA)/FashionMNIST/raw

.DEFAULT_GOAL := help
.PHONY: help install data demo study downstream sweep report bench gpu-check gpu-compile offline-kit reliability test test-all lint measure

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed data ## create .venv/ and install ablate (editable) with its dev tools and data

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

FMNIST_SUMS := $(CURDIR)/ablate/data/fashion_mnist.sha256

data: ## the real Fashion-MNIST where torchvision reads it (Debian's dataset-fashion-mnist), checksums checked; the garment scenes (COCO and ADE20K format) made from it
	@if [ -f $(FMNIST_RAW)/.complete ] && ! (cd $(FMNIST_RAW) && sha256sum --quiet -c $(FMNIST_SUMS) >/dev/null 2>&1); then \
	  echo "Fashion-MNIST in $(FMNIST_RAW) fails its checksums: rebuilding it"; rm -f $(FMNIST_RAW)/.complete; fi
	@$(MAKE) --no-print-directory $(FMNIST_RAW)/.complete
	@# the scenes need the installed package; without it they are written on first use instead
	@if [ -f $(VENV)/.installed ]; then $(PY) -m ablate.data.scenes $(DATA)/scenes $(DATA); fi

$(FMNIST_RAW)/.complete:
	@set -euo pipefail; src=/usr/share/datasets/fashion-mnist; \
	if [ ! -f $$src/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; \
	  else \
	    tmp=$$(mktemp -d); (cd $$tmp && apt-get download dataset-fashion-mnist) && dpkg -x $$tmp/*.deb $(DATA)/deb && rm -rf $$tmp; \
	    src=$(DATA)/deb/usr/share/datasets/fashion-mnist; \
	  fi; \
	fi; \
	mkdir -p $(FMNIST_RAW); \
	for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \
	  gunzip -c $$src/$$f.gz > $(FMNIST_RAW)/$$f; \
	done; \
	(cd $(FMNIST_RAW) && sha256sum --quiet -c $(FMNIST_SUMS)) || { \
	  echo "error: $$src/*.gz do not decompress to the original Fashion-MNIST files (checksums above);" \
	       "reinstall the package: apt-get install --reinstall dataset-fashion-mnist" >&2; exit 2; }; \
	touch $@; echo "Fashion-MNIST ready in $(FMNIST_RAW) (checksums match)"

SWEEP ?= demo
RESULTS := results

demo: install ## install, run the demo sweep on the real Fashion-MNIST, render reports/demo/
	$(PY) -m ablate.train -m sweeps=demo
	$(PY) -m analysis.report $(RESULTS)/demo --out reports/demo

study: install ## the paper's questions on the default model (sweeps/study.yaml, 78 runs, 53 minutes measured on 2 cores; resumable): reports/study/
	$(PY) -m ablate.train -m sweeps=study
	$(PY) -m analysis.report $(RESULTS)/study --out reports/study

downstream: install ## the paper's detection and segmentation tables on the garment scenes, pretraining included (resumable): reports/downstream/
	$(PY) -m ablate.train -m sweeps=downstream_pretrain
	$(PY) -m ablate.downstream -m sweeps=downstream
	$(PY) -m analysis.report $(RESULTS)/downstream --out reports/downstream

sweep: install ## run a named grid of sweeps/: make sweep SWEEP=figure2_local_mlp ARGS="model=tiny"
	$(PY) -m ablate.train -m sweeps=$(SWEEP) $(ARGS)

report: install ## figures and tables of a sweep's results: make report SWEEP=figure2_local_mlp
	$(PY) -m analysis.report $(RESULTS)/$(SWEEP) --out reports/$(SWEEP)

bench: install ## benchmark operators and models into reports/bench/: make bench ARGS="--quick" or ARGS="--device cuda"
	$(PY) -m ablate.bench $(ARGS)

# no `install` prerequisite: a GPU machine often has no internet; it needs the packages importable
GPU_CHECK_S ?= 480
gpu-check: ## every GPU check, one report, in at most GPU_CHECK_S seconds (8 minutes): reports/gpu-check/report.md
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m ablate.gpu_check --budget-s $(GPU_CHECK_S) $(ARGS)

KIT ?= offline-kit
KIT_PYTHON ?= 3.12
offline-kit: install ## wheels + Fashion-MNIST + setup.sh for a GPU machine without internet whose image has PyTorch: make offline-kit KIT_PYTHON=3.12
	PYTHON=$(PY) bash scripts/offline_kit.sh $(KIT) $(KIT_PYTHON)

gpu-compile: install ## every Triton kernel a GPU run launches, compiled for sm_90 here, no GPU: reports/gpu-compile/
	$(PY) -m ablate.gpu_compile $(ARGS)

reliability: install ## fault-injection suite: random SIGKILLs, damaged checkpoints/records, locks, full disk, bad inputs
	$(PY) -m ablate.reliability

test: install ## run the test suite (fast tests; GPU tests skip without a GPU)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-all: install ## run every test, the slow end-to-end ones included
	$(PY) -m pytest -q -n 2 --dist loadgroup -m ''

lint: install ## check style (ruff) and the layers of docs/DESIGN.md (import-linter, pyproject.toml)
	$(VENV)/bin/ruff check ablate analysis tests
	$(VENV)/bin/lint-imports

measure: install ## params and GMAC of the paper's models: make measure MODEL=tiny
	$(PY) -m ablate.measure -m operator=local_attention,dwconv,dynamic_dwconv,idynamic_dwconv model=$(or $(MODEL),tiny)
