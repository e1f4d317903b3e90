VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: venv test

# A local virtual environment. torch==2.13.0 is installed first, and only when torch is not
# importable, so that pip never pulls a multi-GB CUDA build for the bare `torch` requirement.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)
