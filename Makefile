# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject.toml): the right wheel depends on the machine,
# and the NGC container brings its own build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PIP_QUIET ?= -q
ARGS ?=
PYTEST_ARGS ?=

.PHONY: all venv demo test benchmark clean

all: test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, torchvision" || { echo "error: installing $(TORCH_PIN) failed" >&2; exit 1; }
	$(PY) -m pip install $(PIP_QUIET) -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m single_stage_detector demo $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

benchmark: venv
	$(PY) -m single_stage_detector benchmark $(ARGS)

clean:
	rm -rf output .pytest_cache
