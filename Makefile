# m3ddm: two commands on a fresh machine: `make sample` and `make test`.
# Every target installs what it needs itself (idempotent: nothing is reinstalled when present).
# torch: an existing install is kept; otherwise TORCH is installed (the local CPU wheel here).
# Override with e.g. `make install TORCH="torch==2.5.1"` (a TORCH given on the command line is always installed).

PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check
OUT ?= out
VIDEO_CACHE ?= $(HOME)/.cache/m3ddm/real_videos

.PHONY: install install-test test test-fast sample train eval bench convert videos demo-weights clean

install:
ifeq ($(origin TORCH),command line)
	$(PIP) "$(TORCH)"
else
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
endif
	@$(PYTHON) -c "import torch, safetensors, numpy, imageio, imageio_ffmpeg" 2>/dev/null || $(PIP) -e .

install-test: install
	@$(PYTHON) -c "import pytest, diffusers" 2>/dev/null || $(PIP) -e ".[test]"

# The whole suite, slow tests included (they are marked `slow`; `make test-fast` skips them).
test: install-test
	$(PYTHON) -m pytest -q -rs

test-fast: install-test
	$(PYTHON) -m pytest -q -rs -m "not slow"

videos:
	bash tests/fetch_videos.sh $(VIDEO_CACHE)

sample: install
	$(PYTHON) sample.py $(SAMPLE_ARGS)

train: install
	$(PYTHON) train.py --data $(DATA) --out $(OUT)/train $(TRAIN_ARGS)

eval: install
	$(PYTHON) evaluate.py $(VIDEOS) --out $(OUT)/eval $(EVAL_ARGS)

bench: install
	$(PYTHON) -m m3ddm.bench $(BENCH_ARGS)

convert: install
	$(PYTHON) weights_convert.py vae $(SD) weights/vae.safetensors
	$(PYTHON) weights_convert.py unet $(UNET) weights/unet.safetensors

clean:
	rm -rf .pytest_cache build *.egg-info
