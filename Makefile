# make pretrain  -- install what is missing, then run the default pretraining job
# make test      -- install what is missing, then run the test suite (what CI runs)
# make bench     -- run the benchmarks
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Used only when no torch is importable; an existing torch is always kept.
# On our CPU machines this resolves to the local CPU wheel.
TORCH_REQUIREMENT ?= torch==2.13.0
NPROC ?= 1
ARGS ?=
STAMP := .make/installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: install pretrain test bench clean

# Idempotent: does nothing when d2v_fast._C imports from outside the checkout and no
# build input changed since the last install.
install:
	@if [ -f $(STAMP) ] && [ -z "$$(find $(SOURCES) -newer $(STAMP) 2>/dev/null)" ] \
	   && (cd / && $(PYTHON) -c "import d2v_fast._C, pytest, pytest_benchmark, tokenizers, transformers, accelerate, soundfile, espeakng_loader, PIL") >/dev/null 2>&1; then \
	  echo "d2v_fast is installed and up to date"; \
	else \
	  $(MAKE) --no-print-directory _install; \
	fi

_install:
	@$(PYTHON) -c "import torch" >/dev/null 2>&1 || $(PIP) install "$(TORCH_REQUIREMENT)"
	$(PIP) install "setuptools>=64" wheel ninja "pybind11>=2.10"
	$(PIP) install --no-build-isolation -e ".[dev]"
	cd / && $(PYTHON) -c "import d2v_fast._C"
	@mkdir -p .make && touch $(STAMP)

pretrain: install
	$(PYTHON) -m d2v_fast.pretrain --nproc-per-node $(NPROC) $(ARGS)

test: install
	$(PYTHON) -m pytest tests benchmarks -q

bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build .make d2v_fast/*.so *.egg-info .pytest_cache .benchmarks
