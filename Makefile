# Two commands from a fresh clone:
#   make demo   installs hcp into .venv, builds the offline demo model and data, trains the quickstart
#   make test   installs hcp with test extras into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA driver, pin the local CPU wheel of torch (an unpinned torch pulls a
# multi-GB CUDA build). With a GPU, pip keeps or picks a CUDA build within the package's range.
TORCH_REQ := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-r requirements/cpu.txt")

.PHONY: venv demo test bench clean

$(BIN)/.hcp-installed: pyproject.toml setup.py requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_REQ) -e ".[test]"
	touch $@

venv: $(BIN)/.hcp-installed

demo: venv
	$(BIN)/hcp demo demo
	$(BIN)/hcp run examples/quickstart.toml

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --dist worksteal

bench: venv
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs demo
