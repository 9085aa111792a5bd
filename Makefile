# svconv — `make test`, `make demo`, `make bench`. Each target creates .venv (Python >= 3.12) if
# it is missing and installs what it needs from this repository's own files.

VENV      ?= .venv
PY        := $(VENV)/bin/python
JAX_PIN   ?= jax==0.11.2 jaxlib==0.11.2
PYTEST_ARGS ?= -n 2

# A working Python >= 3.12: python3.13 / python3.12 on PATH (pyenv shims that fail are skipped),
# then pyenv's installed versions.
define FIND_PYTHON
for c in python3.13 python3.12 python3; do \
  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
    command -v $$c; exit 0; fi; done; \
if command -v pyenv >/dev/null 2>&1; then \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do \
    p="$$(pyenv root)/versions/$$v/bin/python3"; \
    if [ -x "$$p" ]; then echo "$$p"; exit 0; fi; done; fi; \
exit 1
endef

.PHONY: test demo bench lint venv clean

$(PY):
	@py="$$( $(FIND_PYTHON) )" || { \
	  echo "svconv needs Python >= 3.12 (JAX 0.11+). Install one, e.g. 'pyenv install 3.12' or your"; \
	  echo "distribution's python3.12 package with venv support, then run make again."; exit 1; }; \
	echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

test: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[test]'
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[experiments]'
	$(PY) -m experiments.demo

bench: $(PY)
	$(PY) -m pip install -q $(JAX_PIN) -e '.[bench]'
	$(PY) -m experiments.bench

lint: $(PY)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check svconv pallas_kernels tests experiments
	$(PY) -m ruff format --check svconv pallas_kernels tests experiments

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
