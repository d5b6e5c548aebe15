# The README's two commands: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without an NVIDIA driver, pin the local CPU torch wheel (any other spec pulls CUDA wheels).
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
DEMO_DIR ?= work/demo

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The grep only hides this machine's notes about absent local indexes; pip's status still counts.
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(PY) -c "import torch, numpy, cv2, onnx, onnxruntime, albumentations" 
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m training.demo --work-dir $(DEMO_DIR)

lint: setup
	$(PY) -m ruff check medoe training export tests

clean:
	rm -rf $(VENV) work .pytest_cache
