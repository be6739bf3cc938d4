# m3ddm: two commands on a fresh machine: `make sample` and `make test`.
# Every target installs what it needs itself (idempotent: nothing is reinstalled when present).
# torch: an existing install is kept; otherwise TORCH is installed (the local CPU wheel here).
# Override with e.g. `make install TORCH="torch==2.5.1"` (a TORCH given on the command line is always installed).
#
# Which Python (a distribution's python3 is "externally managed", PEP 668: pip may not install into it):
#   PYTHON=/path/to/python given (command line or environment): that one, as it is;
#   else an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX): its python;
#   else a project-local virtual environment $(VENV) (.venv), created with $(BASE_PYTHON) (python3) on first use.
#   Where the distribution lacks ensurepip (Debian/Ubuntu without python3-venv) it is made --without-pip and
#   pip is bootstrapped from the system's pip (`pip --python`) or its pip wheel (/usr/share/python-wheels).

VENV ?= .venv
BASE_PYTHON ?= python3
ifneq ($(filter command environment,$(firstword $(origin PYTHON))),)
  ENV_TARGET :=
else ifneq ($(VIRTUAL_ENV),)
  PYTHON := $(VIRTUAL_ENV)/bin/python
else ifneq ($(CONDA_PREFIX),)
  PYTHON := $(CONDA_PREFIX)/bin/python
else
  PYTHON := $(VENV)/bin/python
  ENV_TARGET := $(PYTHON)
endif
TORCH ?= torch==2.13.0
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check
OUT ?= out
VIDEO_CACHE ?= $(HOME)/.cache/m3ddm/real_videos

.PHONY: install install-test test test-fast sample train eval bench bench-gpu bench-fullsize convert videos demo-weights demo-weights-gpu clean python

# the project-local virtual environment (only when no PYTHON / active environment was given)
$(VENV)/bin/python:
	@echo "creating the virtual environment $(VENV) with $(BASE_PYTHON)" >&2
	@rm -rf $(VENV); $(BASE_PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { rm -rf $(VENV) && \
		$(BASE_PYTHON) -m venv --without-pip $(VENV) && \
		{ $(BASE_PYTHON) -m pip --python $(VENV)/bin/python install -q pip 2>/dev/null || \
		  { whl=$$(ls /usr/share/python-wheels/pip-*.whl 2>/dev/null | tail -n 1); [ -n "$$whl" ] && \
		    $(VENV)/bin/python $$whl/pip install -q pip; }; }; } || \
		{ rm -rf $(VENV); echo "error: could not create $(VENV) with $(BASE_PYTHON) (no venv/ensurepip and no pip to \
	bootstrap it); install python3-venv (Debian/Ubuntu), or pass PYTHON=/path/to/python of an environment pip may \
	install into." >&2; exit 1; }

# the Python that every target uses
python: $(ENV_TARGET)
	@echo $(PYTHON)

install: $(ENV_TARGET)
ifeq ($(origin TORCH),command line)
	$(PIP) "$(TORCH)"
else
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH)"
endif
	@$(PYTHON) -c "import torch, safetensors, numpy, imageio, imageio_ffmpeg" 2>/dev/null || $(PIP) -e .

install-test: install
	@$(PYTHON) -c "import pytest, diffusers" 2>/dev/null || $(PIP) -e ".[test]"

# The whole suite, slow tests included (they are marked `slow`; `make test-fast` skips them).
# OMP_WAIT_POLICY=PASSIVE: libgomp's busy-wait makes 2 threads crawl when a test runs a subprocess beside pytest
test: install-test
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q -rs

test-fast: install-test
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q -rs -m "not slow"

videos:
	bash tests/fetch_videos.sh $(VIDEO_CACHE)

# `make sample`: the demo model outpaints the bundled 4:3 clip (unseen in training) to 16:9 on the CPU; prints the
# output video and its preview PNG (ground truth | input | output). SAMPLE_ARGS adds or overrides sample.py options.
DEMO_CLIP = m3ddm/assets/kivy_city_4x3.mp4
DEMO_TRUTH = m3ddm/assets/kivy_city_16x9_truth.mp4
# --overwrite: a SAMPLE_ARGS change replaces the demo's earlier output (the same arguments skip it: it is done)
DEMO_SAMPLE_ARGS = --ratio 16:9 --size 128 --scheduler ddim --steps 20 --global-frames 8 --guidance-local 1 --guidance-global 1 \
	--out $(OUT)/sample --overwrite

sample: install
	@start=$$(date +%s); $(DEMO_ENV) $(PYTHON) sample.py $(DEMO_CLIP) $(DEMO_SAMPLE_ARGS) --truth $(DEMO_TRUTH) \
		$(SAMPLE_ARGS) && echo "sampling took $$(( $$(date +%s) - start )) s" >&2

train: install
	$(PYTHON) train.py --data $(DATA) --out $(OUT)/train $(TRAIN_ARGS)

eval: install
	$(PYTHON) evaluate.py $(VIDEOS) --out $(OUT)/eval $(EVAL_ARGS)

bench: install
	$(PYTHON) -m m3ddm.bench $(BENCH_ARGS)

# the prepared GPU run: full config, 256 px, 16 frames, 50 PNDM steps, bf16, eager and compiled, fp16/fp32
# agreement, a whole video; under 8 minutes on one H100/H200 (--budget-s 420 skips what would not fit)
bench-gpu: install
	$(PYTHON) -m m3ddm.bench_gpu --out $(OUT)/bench_gpu $(BENCH_GPU_ARGS)

# the released configuration through weights_convert.py and sample.py on the CPU (~20 GB of disk)
bench-fullsize: install
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m m3ddm.bench_fullsize --out $(OUT)/fullsize $(BENCH_FULLSIZE_ARGS)

convert: install
	$(PYTHON) weights_convert.py vae $(SD) weights/vae.safetensors
	$(PYTHON) weights_convert.py unet $(UNET) weights/unet.safetensors

# ---- demo model (m3ddm/assets/demo_*.safetensors): `make demo-weights` retrains it from scratch on the fetched
# clips (kivy_cityCC0.mpg and opencv_cup.mp4 held out) plus synthetic camera motion over packaged photographs;
# resumable: rerun it after an interruption. The UNet keeps every checkpoint; export ships the EMA weights of the
# checkpoint with the best held-out band PSNR logged in metrics.jsonl (train.py --eval-videos).
DEMO ?= $(OUT)/demo
DEMO_DATA_CACHE ?= $(HOME)/.cache/m3ddm/demo_data
DEMO_VAE_STEPS ?= 1500
DEMO_UNET_STEPS ?= 1800
DEMO_TUNE_STEPS ?= 1400
DEMO_NOGUIDE_STEPS ?= 3000
DEMO_DATA_ARGS = --data $(DEMO)/data --num-workers 1 --cache-videos --decode-short-side 144 --seed 0 --log-every 25
DEMO_VAE_ARGS = --target vae --vae-config demo --out $(DEMO)/vae $(DEMO_DATA_ARGS) --size 64 --frames 2 \
	--batch-size 8 --max-steps $(DEMO_VAE_STEPS) --lr 8e-4 --warmup-steps 100 --recon-loss l1 --kl-weight 1e-6 \
	--crop-scale 0.2 1.0 --ema 0.995 --save-every 250 --keep-checkpoints 3 --val-every 250 --val-clips 8
# then the decoder alone, from the rescaled VAE: the encoder and quant_conv are frozen, so the latents the UNet
# trains on (and the exact rescale) do not change; crops nearer the pipeline's scale (0.2-0.6 of a frame's area)
DEMO_DEC_STEPS ?= 2000
DEMO_DEC_ARGS = --target vae --init $(DEMO)/vae_scaled.safetensors --freeze-encoder --out $(DEMO)/vae_dec \
	$(subst --seed 0,--seed 4,$(DEMO_DATA_ARGS)) --size 64 --frames 2 --batch-size 8 --max-steps $(DEMO_DEC_STEPS) \
	--lr 3e-4 --warmup-steps 50 --recon-loss l1 --kl-weight 1e-6 --crop-scale 0.2 0.6 --ema 0.995 --save-every 250 \
	--keep-checkpoints 0 --val-every 250 --val-clips 8
DEMO_UNET_ARGS = --target unet --config demo --vae $(DEMO)/vae_scaled.safetensors \
	--out $(DEMO)/unet $(DEMO_DATA_ARGS) --size 128 --frames 16 --global-frames 8 --max-stride 15 --batch-size 1 \
	--max-steps $(DEMO_UNET_STEPS) --lr 3e-4 --warmup-steps 100 --crop-scale 0.5 1.0 --mask-strategy m3ddm_plus \
	--p-uncond-local 0.1 --p-uncond-global 0.1 --ema 0.995 --save-every 200 --keep-checkpoints 0 \
	--eval-videos $(DEMO)/data/val --eval-steps 20 --eval-frames 16
# then the same recipe as v-prediction, from that run's EMA weights: an epsilon model this small gets the border's
# colour and layout wrong at high noise (x0 = (x_t - sqrt(1-a) eps) / sqrt(a) magnifies its error 12x at t = 961)
DEMO_TUNE_ARGS = $(subst --config demo,--init $(DEMO)/unet/unet_ema.safetensors --prediction-type v_prediction,\
	$(subst --out $(DEMO)/unet ,--out $(DEMO)/unet_v ,$(subst --seed 0,--seed 1,$(subst --warmup-steps 100,\
	--warmup-steps 50,$(subst --max-steps $(DEMO_UNET_STEPS),--max-steps $(DEMO_TUNE_STEPS),$(DEMO_UNET_ARGS))))))
# then more clips without raw guide frames (70 % instead of 30 %): the task of a short video, of every video's first
# stage and of the held-out table, which the v-prediction run still did worst
DEMO_NOGUIDE_ARGS = $(subst --init $(DEMO)/unet/,--init $(DEMO)/unet_v/,$(subst --out $(DEMO)/unet_v ,--out \
	$(DEMO)/unet_v2 ,$(subst --seed 1,--seed 2,$(subst --max-steps $(DEMO_TUNE_STEPS),--max-steps $(DEMO_NOGUIDE_STEPS) \
	--guide-case-weights 0.7 0.15 0.15,$(subst --prediction-type v_prediction ,,$(DEMO_TUNE_ARGS))))))
# then a loss that also weighs the error's frame-to-frame change (train.py --temporal-weight 1: an error the frames
# do not share costs 3x), from the best checkpoint of the run before: the border flickered at 11x the truth's
DEMO_TEMPORAL_STEPS ?= 1000
DEMO_TEMPORAL_ARGS = $(subst --init $(DEMO)/unet_v/unet_ema.safetensors,--init $$($(PYTHON) -m m3ddm.demo best \
	$(DEMO)/unet_v2),$(subst --out $(DEMO)/unet_v2 ,--out $(DEMO)/unet_t ,$(subst --seed 2,--seed 3,$(subst \
	--max-steps $(DEMO_NOGUIDE_STEPS),--max-steps $(DEMO_TEMPORAL_STEPS) --temporal-weight 1,$(DEMO_NOGUIDE_ARGS)))))
# then 4x that weight (an unshared error costs 9x), from that run's best checkpoint
DEMO_TEMPORAL2_STEPS ?= 800
DEMO_TEMPORAL2_ARGS = $(subst demo best $(DEMO)/unet_v2,demo best $(DEMO)/unet_t,$(subst --out $(DEMO)/unet_t ,--out \
	$(DEMO)/unet_t2 ,$(subst --seed 3,--seed 4,$(subst --max-steps $(DEMO_TEMPORAL_STEPS) --temporal-weight 1,\
	--max-steps $(DEMO_TEMPORAL2_STEPS) --temporal-weight 4,$(DEMO_TEMPORAL_ARGS)))))
# then the same data plus the photographs low-passed (`demo synth --blur 4`, in data_smooth/ beside links to
# data/train): on the plain wall of a held-out clip the model painted textures of its photographs, which rarely
# have smooth areas; its checkpoints are scored at the guidance the demo ships with (1 / 1): at 2 / 4 the scores
# fall with training
DEMO_SMOOTH_STEPS ?= 1600
DEMO_SMOOTH_ARGS = $(subst --data $(DEMO)/data ,--data $(DEMO)/data_smooth ,$(subst demo best $(DEMO)/unet_t,demo \
	best $(DEMO)/unet_t2,$(subst --out $(DEMO)/unet_t2 ,--out $(DEMO)/unet_s ,$(subst --seed 4,--seed 6,$(subst \
	--max-steps $(DEMO_TEMPORAL2_STEPS),--max-steps $(DEMO_SMOOTH_STEPS),$(DEMO_TEMPORAL2_ARGS)))))) --eval-guidance 1 1
# then the photographs low-passed more (`demo synth --blur 8`, in data_smooth8/ beside links to data_smooth/train),
# from that run's best checkpoint: the white wall of a held-out clip was still the border that flickered most
DEMO_SMOOTH8_STEPS ?= 1000
DEMO_SMOOTH8_ARGS = $(subst --data $(DEMO)/data_smooth ,--data $(DEMO)/data_smooth8 ,$(subst demo best \
	$(DEMO)/unet_t2,demo best $(DEMO)/unet_s,$(subst --out $(DEMO)/unet_s ,--out $(DEMO)/unet_s8 ,$(subst \
	--seed 6,--seed 7,$(subst --max-steps $(DEMO_SMOOTH_STEPS),--max-steps $(DEMO_SMOOTH8_STEPS),$(DEMO_SMOOTH_ARGS))))))
# libgomp's default busy-wait makes 2 threads ~30x slower when other processes share the 2 cores
DEMO_ENV = OMP_WAIT_POLICY=PASSIVE
# --resume DIR when DIR already holds a checkpoint of an interrupted run
demo_resume = $$(ls -d $(1)/checkpoint-* >/dev/null 2>&1 && echo --resume $(1))
# true when the run in DIR has finished (train.py's last metrics.jsonl record): a rerun does not touch it
demo_done = grep -q '"done": true' $(1)/metrics.jsonl 2>/dev/null

demo-weights: install
	bash tests/fetch_videos.sh $(VIDEO_CACHE)
	bash tests/fetch_demo_data.sh $(DEMO_DATA_CACHE)
	$(PYTHON) -m m3ddm.demo split $(VIDEO_CACHE) $(DEMO)/data --extra $(DEMO_DATA_CACHE)/clips
	$(DEMO_ENV) $(PYTHON) -m m3ddm.demo synth $(DEMO_DATA_CACHE)/photos $(DEMO)/data/train --frames 64 --seed 0
	mkdir -p $(DEMO)/data_smooth/train && cd $(DEMO)/data_smooth/train && for f in ../../data/train/*; do ln -sfn $$f .; done
	$(DEMO_ENV) $(PYTHON) -m m3ddm.demo synth $(DEMO_DATA_CACHE)/photos $(DEMO)/data_smooth/train --frames 64 --seed 0 --blur 4
	mkdir -p $(DEMO)/data_smooth8/train && cd $(DEMO)/data_smooth8/train && for f in ../../data_smooth/train/*; do ln -sfn $$f .; done
	$(DEMO_ENV) $(PYTHON) -m m3ddm.demo synth $(DEMO_DATA_CACHE)/photos $(DEMO)/data_smooth8/train --frames 64 --seed 0 --blur 8
	@[ -f $(DEMO)/started_at ] || date +%s > $(DEMO)/started_at
	$(call demo_done,$(DEMO)/vae) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_VAE_ARGS) $(call demo_resume,$(DEMO)/vae)
	[ $(DEMO)/vae_scaled.safetensors -nt $(DEMO)/vae/vae_ema.safetensors ] || \
		$(DEMO_ENV) $(PYTHON) -m m3ddm.demo rescale $(DEMO)/vae/vae_ema.safetensors $(DEMO)/vae_scaled.safetensors $(DEMO)/data
	$(call demo_done,$(DEMO)/vae_dec) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_DEC_ARGS) $(call demo_resume,$(DEMO)/vae_dec)
	$(call demo_done,$(DEMO)/unet) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_UNET_ARGS) $(call demo_resume,$(DEMO)/unet)
	$(call demo_done,$(DEMO)/unet_v) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_TUNE_ARGS) $(call demo_resume,$(DEMO)/unet_v)
	$(call demo_done,$(DEMO)/unet_v2) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_NOGUIDE_ARGS) $(call demo_resume,$(DEMO)/unet_v2)
	$(call demo_done,$(DEMO)/unet_t) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_TEMPORAL_ARGS) $(call demo_resume,$(DEMO)/unet_t)
	$(call demo_done,$(DEMO)/unet_t2) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_TEMPORAL2_ARGS) $(call demo_resume,$(DEMO)/unet_t2)
	$(call demo_done,$(DEMO)/unet_s) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_SMOOTH_ARGS) $(call demo_resume,$(DEMO)/unet_s)
	$(call demo_done,$(DEMO)/unet_s8) || $(DEMO_ENV) $(PYTHON) train.py $(DEMO_SMOOTH8_ARGS) $(call demo_resume,$(DEMO)/unet_s8)
	$(DEMO_ENV) $(PYTHON) -m m3ddm.demo export --vae $(DEMO)/vae_dec/vae_ema.safetensors --unet-run $(DEMO)/unet_s8 \
		--vae-run $(DEMO)/vae_dec --data $(DEMO)/data --assets m3ddm/assets \
		--data-sums tests/demo_data.sha256 --extra-train $(DEMO)/data_smooth8/train \
		--vae-command "python3 train.py $(strip $(DEMO_VAE_ARGS)) (then python3 -m m3ddm.demo rescale, then python3 train.py $(strip $(DEMO_DEC_ARGS)))" \
		--unet-command "python3 train.py $(strip $(DEMO_UNET_ARGS)) (then python3 train.py $(strip $(DEMO_TUNE_ARGS)), then python3 train.py $(strip $(DEMO_NOGUIDE_ARGS)), then python3 train.py $(strip $(DEMO_TEMPORAL_ARGS)), then python3 train.py $(strip $(DEMO_TEMPORAL2_ARGS)), then python3 -m m3ddm.demo synth --blur 4 into data_smooth, then python3 train.py $(strip $(DEMO_SMOOTH_ARGS)), then python3 -m m3ddm.demo synth --blur 8 into data_smooth8, then python3 train.py $(strip $(DEMO_SMOOTH8_ARGS)))" \
		--wall-s $$(( $$(date +%s) - $$(cat $(DEMO)/started_at) ))

# issue 16 item 4, prepared for a GPU machine: the demo recipe (v-prediction, M3DDM+ masks with 70 % guide-free
# clips, condition dropout, EMA) for the wider `demo_gpu` UNet from scratch, 8 clips per step in bf16, stopped with a
# checkpoint after DEMO_GPU_MINUTES; every checkpoint is scored on the held-out clips and the best one's EMA weights
# are copied to $(OUT)/demo_gpu_unet.safetensors. Needs $(DEMO)/data and $(DEMO)/vae_scaled.safetensors from
# `make demo-weights` (carry them to the machine; `cp -rL` the data: it is links into the caches).
DEMO_GPU_MINUTES ?= 10
DEMO_GPU_CONFIG ?= demo_gpu
DEMO_GPU_DEVICE ?= cuda
DEMO_GPU_PRECISION ?= bf16
DEMO_GPU_BATCH ?= 8
DEMO_GPU_SIZE ?= 128
DEMO_GPU_ARGS = --target unet --config $(DEMO_GPU_CONFIG) --prediction-type v_prediction \
	--vae $(DEMO)/vae_scaled.safetensors --out $(DEMO)/unet_gpu --data $(DEMO)/data --num-workers 4 --cache-videos \
	--decode-short-side 144 --seed 0 --log-every 25 --size $(DEMO_GPU_SIZE) --frames 16 --global-frames 8 \
	--max-stride 15 --batch-size $(DEMO_GPU_BATCH) --max-steps 1000000 --max-minutes $(DEMO_GPU_MINUTES) --lr 3e-4 \
	--warmup-steps 100 --crop-scale 0.5 1.0 --mask-strategy m3ddm_plus --guide-case-weights 0.7 0.15 0.15 \
	--temporal-weight 1 --p-uncond-local 0.1 --p-uncond-global 0.1 --ema 0.995 --save-every 250 --keep-checkpoints 0 \
	--eval-videos $(DEMO)/data/val --eval-steps 20 --eval-frames 16 --device $(DEMO_GPU_DEVICE) \
	--precision $(DEMO_GPU_PRECISION)

demo-weights-gpu: install
	$(DEMO_ENV) $(PYTHON) train.py $(DEMO_GPU_ARGS) $(call demo_resume,$(DEMO)/unet_gpu)
	mkdir -p $(OUT) && cp "$$($(PYTHON) -m m3ddm.demo best $(DEMO)/unet_gpu)" $(OUT)/demo_gpu_unet.safetensors
	cp $(DEMO)/unet_gpu/metrics.jsonl $(OUT)/demo_gpu_metrics.jsonl
	@echo $(OUT)/demo_gpu_unet.safetensors

clean:
	rm -rf .pytest_cache build *.egg-info    # the environment stays: `rm -rf .venv` to remake it
