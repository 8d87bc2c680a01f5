# Set-up and checks for a fresh machine. `make demo` and `make test` install into $(VENV).
VENV ?= .venv
PYTHON ?= python3
# The torch / torchvision pair to install first; override for another CUDA / CPU build.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel

# Non-editable install with the test extra, so the tests exercise the installed package.
install: $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q ".[test]"

demo: install
	$(BIN)/vlp demo --out demo-out

test: install
	$(BIN)/python -m pytest -q --durations=15

# A few minutes: every test not marked slow.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_stores.py

clean:
	rm -rf $(VENV) build *.egg-info demo-out
