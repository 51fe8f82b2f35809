# Two commands do all set-up on a fresh machine:
#   make run    install into .venv and open the app on the embedded demo model (http://127.0.0.1:7860)
#   make test   install into .venv (plus Chromium for the browser test) and run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test install install-dev chromium benchmark benchmark-quality quality

# uv (from PyPI, pinned) installs the same pinned requirements as pip would, downloading and
# unpacking in parallel: 27 s for the 6 GB of wheels with an empty cache here, where pip took about
# 1 m 50 s (2026-12-08). --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set (this
# machine, CI) nothing else writes .pyc files, and every process of the tests would import torch,
# diffusers and gradio from source (18 s instead of 9 s each; the suite took 13 m 54 s instead of 10).
UV := $(VENV)/bin/uv
UV_VERSION := 0.9.30

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip install --python $(PY) --compile-bytecode -r requirements.txt
	$(UV) pip install --python $(PY) --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(UV) pip install --python $(PY) --compile-bytecode -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

chromium:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "no chromium: the browser test will be skipped")

run: install
	$(PY) app.py

# Three pytest workers on two cores, one file each at a time (module fixtures, such as a test
# file's server, are built once), the longest files first (tests/conftest.py), one torch thread per
# process: two 2-thread processes on 2 cores spin against each other and run several times slower
# than one after the other. The third worker fills the time the others spend waiting on servers,
# browsers and job processes (2026-12-08: 11 m 13 s of tests with two workers, 8 m 42 s and 9 m 26 s with three).
test: install-dev chromium
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

benchmark: install
	$(PY) -m benchmarks

benchmark-quality: install
	$(PY) -m benchmarks.quality

quality: install
	$(PY) -m unlearn_core.demo.quality check --model assets/demo-model --seeds 16 --out docs/demo-quality
