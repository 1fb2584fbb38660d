# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use (PyTorch pinned to the builds this project is tested with).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv
venv: $(VENV)/.installed

# The project's modules are compiled once: an editable install compiles nothing, and where
# PYTHONDONTWRITEBYTECODE is set imports cache nothing, so every process would compile them again.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PINS)
	$(VENV)/bin/pip install -q -e '.[test]' $(TORCH_PINS)
	$(VENV)/bin/python -m compileall -q evl pipelines benchmarks scripts
	touch $@

demo: $(VENV)/.installed
	$(PY) -m evl.train

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra
