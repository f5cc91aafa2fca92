# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# Everything the project needs is installed here: Debian packages with apt, Python packages with pip.
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.distdpo-installed
APT_PACKAGES := libusb-1.0-0 libgomp1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint bench bench-device clean
setup: $(STAMP)

$(STAMP): setup.py Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt: installing$$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi
	@if $(PYTHON) -c 'import rclpy' >/dev/null 2>&1; then \
	  echo "using the ROS 2 installation's rclpy"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); extras="train,test"; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); extras="ros,train,test"; \
	fi; \
	$(PY) -m pip install -q --upgrade "pip>=23" && \
	$(PY) -m pip install -q "$(TORCH_SPEC)" && \
	$(PY) -m pip install -q -e ".[$$extras]" && touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distdpo demo

test: $(STAMP)
	$(PY) -m pytest -q test

# The CUDA path in one run (distdpo bench device, < 8 min on a GPU): JSON to BENCH_OUT and stdout.
# Needs no setup: on a GPU machine without .venv it runs the checkout with the system python3
# (torch, numpy, scipy, safetensors, pyyaml, tqdm); on a CPU it runs the reduced form.
BENCH_PY  ?= $(shell [ -x $(PY) ] && echo $(PY) || echo python3)
BENCH_OUT ?= bench_device.json
bench-device:
	PYTHONPATH=$(CURDIR):$(CURDIR)/training$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(BENCH_PY) -m distdpo_ros.cli bench device --json --out $(BENCH_OUT) $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check distdpo_ros training test launch

clean:
	rm -rf $(VENV) build *.egg-info
