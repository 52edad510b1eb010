# make test: set up a venv (torch 2.13 CPU + var_rt with test extras) and run the tests (Triton kernels in the
#            interpreter on the CPU). make demo: set up and draw the embedded trained demo models' grid.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup test demo bench clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps torch-fidelity==0.4.0   # var-rt fid's Inception port; torchvision not needed
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/var-rt demo --out out/demo.png --seed 0

# the GPU suite's CPU dry run: every step of benchmarks/run_gpu_suite.sh part1 + part2 at tiny sizes
bench: setup
	PYTHON=$(PY) bash benchmarks/run_gpu_suite.sh --dry-run out/dry-run

clean:
	rm -rf build *.egg-info var_rt/_C*.so out
