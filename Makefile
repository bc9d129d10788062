# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject.toml): the right wheel depends on the machine,
# and the NGC container brings its own build.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PIP_QUIET ?= -q
# Extras for `make test`: DALI (nvidia-dali-cuda130, ~200 MB, matches the cu130 torch build)
# so that CI runs the real DALI pipelines on the CPU. `make test EXTRAS=test` skips them.
EXTRAS ?= test,dali
ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist). Default 0: one process. The suite's training runs each use
# every core, so on 2 cores a second process only contends (a demo took 2-3x longer); on a
# machine with more cores, PYTEST_WORKERS=4 runs the suite in 4 processes, grouped by file.
PYTEST_WORKERS ?= 0

.PHONY: all venv demo test test-demos benchmark wheelhouse gpu-check gpu-check-compat clean

all: test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, torchvision" || { echo "error: installing $(TORCH_PIN) failed" >&2; exit 1; }
	$(PY) -m pip install $(PIP_QUIET) -e .
	touch $@

$(VENV)/.installed-$(EXTRAS): $(VENV)/.installed
	$(PY) -m pip install $(PIP_QUIET) -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# The demo's exit status is the training's (0: target reached); the plots and the detection
# grid drawn after it are extras whose failure is reported but does not change it.
# `make demo PRESET=yolov3_tiny_cpu`: the demo of another small preset (output/demo-<preset>).
PRESET ?=
DEMO_OUT ?= output/demo$(if $(PRESET),-$(PRESET),)
demo: venv
	@status=0; $(PY) -m single_stage_detector demo $(if $(PRESET),--preset $(PRESET),) --output-dir $(DEMO_OUT) $(ARGS) \
	  || status=$$?; \
	if [ -f $(DEMO_OUT)/mlperf.log ]; then \
	  $(PY) -m single_stage_detector plot $(DEMO_OUT)/mlperf.log --output $(DEMO_OUT)/plots > /dev/null \
	    || echo "warning: plotting $(DEMO_OUT)/mlperf.log failed" >&2; \
	  if [ -f $(DEMO_OUT)/checkpoint.pt ]; then \
	    $(PY) -m single_stage_detector show-detections $(DEMO_OUT)/checkpoint.pt \
	      --output $(DEMO_OUT)/plots/detections.png > /dev/null \
	      || echo "warning: drawing detections failed" >&2; \
	  fi; \
	  echo "plots: $(DEMO_OUT)/plots/ ($$(ls $(DEMO_OUT)/plots 2>/dev/null | tr "\n" " "))"; \
	fi; \
	exit $$status

# `make test` leaves out the demos besides the SSD one (YOLOv1-v3 and DALI to their targets, a few
# minutes each on 2 cores); `make test-demos` runs them, one after the other on idle cores.
test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not demo" $(PYTEST_ARGS)

test-demos: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -m demo $(PYTEST_ARGS)

benchmark: venv
	$(PY) -m single_stage_detector benchmark $(ARGS)

# The GPU check (docs/GPU.md). `make wheelhouse PY=3.12` (where the package index is
# reachable) downloads into wheelhouse/ what the harness needs beyond PyTorch for Linux x86-64
# and that Python (TORCHVISION=<version> and DALI=1 add those); on the GPU node,
# `WHEELHOUSE=wheelhouse make gpu-check OUT=dir` installs from it without network and runs the
# check with the node's own PyTorch (GPU_CHECK_PYTHON, default python3; .venv's if present).
WHEELHOUSE_DIR ?= wheelhouse
WHEELHOUSE ?=
OUT ?= output/gpu_check
GPU_CHECK_ARGS ?=
wheelhouse:
	scripts/make_wheelhouse.sh $(WHEELHOUSE_DIR) $(if $(filter 3.%,$(PY)),$(PY),3.12)

gpu-check:
	WHEELHOUSE="$(WHEELHOUSE)" OUT="$(OUT)" \
	  PYTHON="$${GPU_CHECK_PYTHON:-$$(test -x $(VENV)/bin/python && echo $(VENV)/bin/python || echo python3)}" \
	  scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# The check without a GPU under a GPU node's PyTorch and Python (default torch 2.11 + CUDA 13 on
# Python 3.12, in .venv-node, ~5 GB): the wheel folder, the offline install and the --smoke steps.
gpu-check-compat:
	scripts/gpu_check_compat.sh $(if $(filter-out output/gpu_check,$(OUT)),$(OUT),)

clean:
	rm -rf output .pytest_cache
