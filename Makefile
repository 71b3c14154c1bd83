# Two commands a newcomer needs: `make demo` and `make test`. Both create or update .venv first.
PY ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET := { grep -v '^WARNING: Location' || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install allocator browser tpu gpu-plan demo test test-fast clean

install: $(STAMP) allocator

# Re-install whenever requirements.txt or pyproject.toml changes. torch==2.13.0 (CPU build, on disk here) is
# installed first where the index has it, so `torch>=...` in requirements.txt does not pull a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET)
	-$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q -r requirements.txt 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import jax, flax, optax, orbax.checkpoint, grain, transformers, torch, fastapi, uvicorn, selenium, clipvip_jax"
	touch $(STAMP)

# tcmalloc, which the commands preload on their own where it is installed (clipvip_jax/runtime/host_allocator.py): XLA:CPU
# allocates each step's temporaries afresh, and glibc's malloc makes every step fault them in again (the B/16 CPU
# step 1.8x slower; docs/performance.md 1a). Installed with apt-get when missing and we are root; otherwise one line
# says how. Optional: without it everything works, CPU steps are slower.
allocator:
	@$(PY) -c "import sys; sys.path.insert(0, 'clipvip_jax/runtime'); import host_allocator as h; sys.exit(h.find() is None)" || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get update -qq >/dev/null && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; } || \
	      echo "make: apt-get could not install libtcmalloc-minimal4: CPU steps will be slower"; \
	  else echo "make: CPU training is faster with tcmalloc (sudo apt-get install libtcmalloc-minimal4)"; fi; }

# Debian's chromium + chromedriver for the page test (tests/test_serve.py drives them with Selenium; no browser
# download). Installed with apt-get when missing and we are root (CI is); otherwise one line says how.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "make: the page test needs chromium and chromium-driver (sudo apt-get install chromium chromium-driver)"; fi; }

# libtpu, for the TPU planner only (python -m clipvip_jax.plan): the version jax[tpu] pins for the installed jax,
# into .venv/libtpu, a folder of its own that only the planner puts on sys.path (clipvip_jax/train/targets.py).
# Ordinary commands never see it: JAX keeps picking CPU/GPU with no TPU start-up probing or warnings. Installed once
# (order-only on the venv); `rm -r .venv/libtpu` and `make tpu` again after upgrading jax.
tpu: $(VENV)/libtpu/.installed

$(VENV)/libtpu/.installed: | $(STAMP)
	@jaxv=$$($(BIN)/python -c 'import jax; print(jax.__version__)'); \
	  $(BIN)/python -m pip install -q --dry-run "jax[tpu]==$$jaxv" --report $(VENV)/tpu-report.json 2>&1 | $(QUIET); \
	  v=$$($(BIN)/python -c "import json; print(*[i['metadata']['version'] for i in json.load(open('$(VENV)/tpu-report.json'))['install'] if i['metadata']['name'] == 'libtpu'])"); \
	  test -n "$$v" || { echo "make: no libtpu version found for jax $$jaxv"; exit 1; }; \
	  rm -rf $(VENV)/libtpu && $(BIN)/python -m pip install -q --no-deps --target $(VENV)/libtpu "libtpu==$$v" 2>&1 | $(QUIET); \
	  echo "make: libtpu $$v for jax $$jaxv in $(VENV)/libtpu (the planner's only)"
	touch $@

# The JAX CUDA plugin, for planning NVIDIA GPUs without one (python -m clipvip_jax.plan --topology h100:8): the
# plugin and PJRT wheels of the installed jax's version (~480 MB, no CUDA libraries: compiling needs none) into
# .venv/cuda-plan, which only the planner puts on sys.path (clipvip_jax/train/targets.py). Optional; not in `make test`.
gpu-plan: $(VENV)/cuda-plan/.installed

$(VENV)/cuda-plan/.installed: | $(STAMP)
	@jaxv=$$($(BIN)/python -c 'import jax; print(jax.__version__)'); \
	  rm -rf $(VENV)/cuda-plan && $(BIN)/python -m pip install -q --no-deps --target $(VENV)/cuda-plan \
	    "jax-cuda12-plugin==$$jaxv" "jax-cuda12-pjrt==$$jaxv" 2>&1 | $(QUIET); \
	  echo "make: the JAX CUDA plugin $$jaxv in $(VENV)/cuda-plan (the planner's only)"
	touch $@

demo: install
	$(BIN)/python -m clipvip_jax.demo

# Test files run in parallel processes (pytest-xdist), a file's tests in one process so that its module fixtures
# are built once: the suite is compile-bound, and XLA compiles on one core (2 cores: 9.7 instead of 15 minutes).
# The test processes share one persistent compilation cache (.jax_cache): the tiny models' steps compiled by one
# file are loaded by the others, and by the next run. One folder per CPU model and feature set: a checkout kept
# across machines would otherwise load some programs XLA:CPU compiled for another CPU and compile others afresh,
# and two programs of one function can round differently (tests that compare two runs at 1e-5 then disagree).
CPU_KEY := $(shell awk -F': ' '/^model name/ && !m {m=$$2} /^flags/ && !f {f=$$2} END {print m f}' \
  /proc/cpuinfo 2>/dev/null | sha1sum | cut -c1-12)
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache/$(CPU_KEY) \
  $(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The whole suite, slow tests included (CI runs exactly this).
test: install browser tpu gpu-plan
	$(PYTEST) tests

# Everything but the tests marked slow.
test-fast: install browser tpu gpu-plan
	$(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache
