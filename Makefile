# svconv — `make test`, `make demo`, `make bench`. Each target creates .venv (Python >= 3.12) if
# it is missing and installs what it needs from this repository's own files; `make gpu-check`
# uses the packages already installed on a GPU machine (no venv, no network). `make help` lists
# the targets.

VENV      ?= .venv
PY        := $(VENV)/bin/python
JAX_PIN   ?= jax==0.11.2 jaxlib==0.11.2
PYTEST_ARGS ?= -n 2 --dist worksteal

# A working Python >= 3.12: python3.12 / python3.13 on PATH (pyenv shims that fail are skipped),
# then pyenv's installed versions, 3.12 first (the version on our GPU machines).
define FIND_PYTHON
for c in python3.12 python3.13 python3; do \
  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
    command -v $$c; exit 0; fi; done; \
if command -v pyenv >/dev/null 2>&1; then \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.' | sort -rV) \
           $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[3-9])\.' | sort -V); do \
    p="$$(pyenv root)/versions/$$v/bin/python3"; \
    if [ -x "$$p" ]; then echo "$$p"; exit 0; fi; done; fi; \
exit 1
endef

.PHONY: help test test-kernels test-jax-next machine-code-mosaic demo bench gpu-check gpu-tune lint venv \
        clean docs test-docs dist-check

help:
	@echo "make test       create .venv, install svconv and the test deps, run the test suite"
	@echo "                (but the Pallas kernels' own tests)"
	@echo "make test-kernels  the Pallas kernels' own tests: the Triton kernels in the interpreter,"
	@echo "                the Mosaic kernels in GPU interpret mode, every Triton kernel"
	@echo "                compiled to sm_90/sm_80 machine code"
	@echo "make test-jax-next  the JAX-dependent tests on the newest JAX in range (.venv-next)"
	@echo "make machine-code-mosaic  the Mosaic GPU kernels compiled for sm_90a without a GPU by"
	@echo "                XLA's CUDA plugin (.venv-mosaic): no spills, shared memory in limits"
	@echo "make demo       create .venv, run the worked examples (quick mode)"
	@echo "make bench      benchmark on this machine -> results/bench-<device>.{md,json}; also"
	@echo "                the static traffic report (results/traffic.md); BENCH_ARGS=--quick;"
	@echo "                the low-rank filters against the per-pixel route and deepinv ->"
	@echo "                results/bench-product-<device>.{md,json} (BENCH_PRODUCT_ARGS=--quick)"
	@echo "make gpu-check  on a machine with an NVIDIA GPU and the packages preinstalled: the"
	@echo "                tests with the kernels compiled, a randomized comparison with the"
	@echo "                reference, the GPU benchmark -> results/, summary and logs in"
	@echo "                out/gpu-check/ (GPU_CHECK_ARGS=--out DIR); DRY_RUN=1: the same on a"
	@echo "                CPU with tiny shapes (the test suite runs this)"
	@echo "make gpu-tune   on a GPU machine, after gpu-check: each Pallas kernel's tiles against"
	@echo "                neighbouring tilings -> results/tune-<device>.{md,json}"
	@echo "                (GPU_TUNE_ARGS=--time-limit S, default 240; DRY_RUN=1 on a CPU)"
	@echo "make docs       the documentation site -> docs/_build/html (Sphinx; warnings are errors)"
	@echo "make test-docs  every example of the README, the docs and the docstrings, run as doctests"
	@echo "make dist-check build the wheel and the sdist (dist/), install each into a fresh venv and"
	@echo "                run a smoke test there"
	@echo "make lint       ruff check and format check, mypy"
	@echo "make clean      remove .venv and caches"

$(PY):
	@py="$$( $(FIND_PYTHON) )" || { \
	  echo "svconv needs Python >= 3.12 (JAX 0.11+). Install one, e.g. 'pyenv install 3.12' or your"; \
	  echo "distribution's python3.12 package with venv support, then run make again."; exit 1; }; \
	echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

# The Pallas kernels' own tests without a GPU (the Triton kernels against oracles in the
# interpreter, the Mosaic GPU kernels in GPU interpret mode, every Triton kernel compiled to
# sm_90/sm_80 machine code): a third of the suite's time, run by `make test-kernels`, which keeps
# `make test` under 15 minutes on 2 cores (CI runs both targets; `make gpu-check` runs
# everything on a GPU).
KERNEL_TESTS ?= tests/test_mosaic.py tests/test_machine_code.py tests/test_pallas_modulated.py \
                tests/test_pallas_local.py tests/test_pallas_pixel.py

test: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[test,machine-code,experiments]'
	$(PY) -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(KERNEL_TESTS))

test-kernels: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[test,machine-code,experiments]'
	$(PY) -m pytest $(PYTEST_ARGS) $(KERNEL_TESTS)

# The parts of the suite that depend on the JAX release (the kernels' lowering for CUDA, their
# machine code, the interpreters, the JAX rules), on the newest release the range admits, in
# .venv-next, with the triton that parses that JAX's IR.
NEXT_VENV  ?= .venv-next
NEXT_PIN   ?= jax==0.12.0.1 jaxlib==0.12.0.1 triton==3.9.0
NEXT_TESTS ?= tests/test_machine_code.py tests/test_dispatch.py tests/test_traffic.py \
              tests/test_pallas_modulated.py tests/test_pallas_local.py tests/test_pallas_pixel.py \
              tests/test_gaussian.py tests/test_transforms.py tests/test_sharding.py \
              tests/test_kernel_helpers.py tests/test_mosaic.py tests/test_deformable.py \
              tests/test_product.py

test-jax-next: $(PY)
	@test -x $(NEXT_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(NEXT_VENV)
	$(NEXT_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEXT_VENV)/bin/python -m pip install -q $(NEXT_PIN) -e '.[test]'
	$(NEXT_VENV)/bin/python -m pytest $(PYTEST_ARGS) $(NEXT_TESTS)

# The Mosaic GPU kernels' machine code: XLA's CUDA plugin compiles them for an H100 (sm_90a) on
# this machine, GPU or not, with the CUDA toolkit's ptxas (the test skips without one), in
# .venv-mosaic. Every case and the table: `$(MOSAIC_VENV)/bin/python -m
# experiments.static.mosaic_machine_code` -> results/mosaic-machine-code.{md,json}.
MOSAIC_VENV ?= .venv-mosaic
MOSAIC_PIN  ?= jax==0.11.2 jaxlib==0.11.2 jax-cuda13-plugin==0.11.2

machine-code-mosaic: $(PY)
	@test -x $(MOSAIC_VENV)/bin/python || "$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(MOSAIC_VENV)
	$(MOSAIC_VENV)/bin/python -m pip install -q --upgrade pip
	$(MOSAIC_VENV)/bin/python -m pip install -q $(MOSAIC_PIN) -e '.[test]'
	JAX_PLATFORMS=cpu $(MOSAIC_VENV)/bin/python -m pytest tests/test_mosaic_machine_code.py

demo: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[experiments]'
	$(PY) -m experiments.demo

# PyTorch baselines: in $(PY) when torch imports there, else in .venv-torch (torch and the
# torchvision built for it, for deform_conv2d; deepinv, for its SpaceVaryingBlur; best effort:
# without them the tables have no torch columns and say why).
TORCH_PY  ?= python3
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEEPINV_PIN ?= deepinv==0.5.0
BENCH_ARGS ?=
BENCH_PRODUCT_ARGS ?=

bench: $(PY) .venv-torch
	$(PY) -m pip install -q $(JAX_PIN) -e '.[bench]'
	$(PY) -m experiments.static.traffic
	$(PY) -m experiments.bench $(BENCH_ARGS)
	$(PY) -m experiments.bench_product $(BENCH_PRODUCT_ARGS)

# The GPU machine's own Python and packages (jax with its CUDA plugin, torch, pytest): no venv.
GPU_CHECK_PY   ?= python3
GPU_CHECK_ARGS ?=
DRY_RUN        ?=

gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) -m experiments.gpu_check \
	  $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)

gpu-tune:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) -m experiments.gpu_check.tune \
	  $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(GPU_TUNE_ARGS)

.PHONY: .venv-torch
.venv-torch:
	@if $(PY) -c 'import torch' 2>/dev/null; then echo "torch imports in $(PY)"; \
	elif .venv-torch/bin/python -c 'import torch' 2>/dev/null; then :; \
	else echo "creating .venv-torch ($(TORCH_PIN)) for the PyTorch baselines"; \
	  rm -rf .venv-torch; \
	  { $(TORCH_PY) -m venv .venv-torch && .venv-torch/bin/pip install -q $(TORCH_PIN) numpy; } \
	  || { echo "could not install $(TORCH_PIN) into .venv-torch: benchmarking without torch"; \
	       rm -rf .venv-torch; }; fi
	@if [ -x .venv-torch/bin/python ] && ! .venv-torch/bin/python -c 'import deepinv' 2>/dev/null; \
	then .venv-torch/bin/pip install -q $(DEEPINV_PIN) \
	  || echo "could not install $(DEEPINV_PIN) into .venv-torch: no deepinv column"; fi

lint: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e . $(RUFF_PIN) $(MYPY_PIN)
	$(PY) -m ruff check svconv pallas_kernels tests experiments docs/conf.py docs/conftest.py
	$(PY) -m ruff format --check svconv pallas_kernels tests experiments docs/conf.py docs/conftest.py
	$(PY) -m mypy

RUFF_PIN ?= ruff==0.17.6
MYPY_PIN ?= mypy==2.4.1

# The documentation site, warnings as errors; its examples run in `make test-docs`.
docs: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[docs]'
	rm -rf docs/_build
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "the site: docs/_build/html/index.html"

# Every example of the README, of the docs pages and of the docstrings, as doctests (the
# printed numbers are compared); docs/conftest.py gives the CPU 4 devices.
DOC_EXAMPLES ?= README.md docs svconv
test-docs: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[test,experiments]'
	$(PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider --doctest-glob='*.md' --doctest-modules \
	  --ignore=docs/_build --ignore=docs/conf.py $(DOC_EXAMPLES)

# The release files: a wheel and an sdist built in isolation (`python -m build`), each installed
# into a fresh venv with its dependencies from the package index, then tests/dist_smoke.py run
# there from outside the repository.
DIST_VENV ?= .venv-dist
dist-check: $(PY)
	$(PY) -m pip install -q build
	rm -rf dist
	$(PY) -m build --outdir dist .
	@base="$$($(PY) -c 'import sys; print(sys._base_executable)')"; set -e; \
	for f in dist/*.whl dist/*.tar.gz; do \
	  echo "== $$f in a fresh venv"; rm -rf $(DIST_VENV); "$$base" -m venv $(DIST_VENV); \
	  $(DIST_VENV)/bin/python -m pip install -q --upgrade pip; \
	  $(DIST_VENV)/bin/python -m pip install -q "$$f" $(JAX_PIN); \
	  (cd $(DIST_VENV) && bin/python "$(CURDIR)/tests/dist_smoke.py" "$$f"); done; \
	rm -rf $(DIST_VENV)

clean:
	rm -rf $(VENV) $(NEXT_VENV) $(MOSAIC_VENV) $(DIST_VENV) .pytest_cache .ruff_cache .mypy_cache \
	  *.egg-info dist docs/_build
