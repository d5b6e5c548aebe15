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
DEMO_PORT ?= 7860
# The shipped model (2.1 MiB); it is rebuilt only when missing (about 12 minutes on 2 cores).
MODEL := model_repository/medoe/1/model.onnx
MODEL_RUN := work/demo-model

.PHONY: setup test demo train-demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The grep only hides this machine's notes about absent local indexes; pip's status still counts.
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(PY) -c "import torch, numpy, cv2, onnx, onnxruntime, albumentations" 
	touch $@

test: setup
	$(PY) -m pytest -q

# The served demo: embedded Triton + the Gradio page on 127.0.0.1; Ctrl-C stops both.
demo: setup $(MODEL)
	$(PY) -m serving.demo --start-triton model_repository --port $(DEMO_PORT)

# Order-only on the stamp: a re-installed .venv must not retrain the shipped model.
$(MODEL): | $(STAMP)
	$(PY) -m training.train --config deeplabv3plus_tiny_synthetic_cpu --model medoe --work-dir $(MODEL_RUN)
	$(PY) -m export.to_onnx --checkpoint $(MODEL_RUN)/final --out $@ --warmup 1x256x512

# The issue-2 training demo: baseline and MEDOE trained on synthetic scenes, their table printed.
train-demo: setup
	$(PY) -m training.demo --work-dir $(DEMO_DIR)

lint: setup
	$(PY) -m ruff check medoe training export serving bench tests

clean:
	rm -rf $(VENV) work .pytest_cache
