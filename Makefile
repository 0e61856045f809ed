# Every target (re)creates the local virtual environment first; torch comes from the CPU wheel on disk.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-px demo

test: $(STAMP)
	$(PY) -m ruff check hf_px tests scripts
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
