# torch is pinned: an unpinned install resolves to a multi-GB CUDA build; 2.13.0 is a CPU wheel on these machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The example third-party plugin is installed as a user would, so the tests use it through its entry point.
install: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIN) -e '.[test]'
	$(BIN)/pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./examples/musco-spatial-svd

# One intra-op thread per test process: the suite's models are tiny, and where the cores are shared, OpenMP threads
# that spin-wait for a busy core made the suite several times slower.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

.PHONY: docs
docs: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIN) -e '.[docs]'
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

demo: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIN) -e '.[demo]'
	$(BIN)/python examples/demo.py

# The benchmarks' extra (ONNX Runtime, transformers, all-MiniLM-L6-v2, scikit-learn), then one benchmark:
# make bench BENCH="vbmf_pass.py --repeats 3"   (default: the latency table at batch 1, eager and ONNX Runtime)
BENCH ?= latency.py --batches 1 --backends eager,onnxruntime
bench: $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIN) -e '.[bench]'
	cd benchmarks && $(abspath $(BIN))/python $(BENCH)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
