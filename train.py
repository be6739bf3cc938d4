"""Train or fine-tune the M3DDM+ UNet (or train a small VAE) on a folder of videos, on plain PyTorch.

    python train.py --data DIR --out DIR --vae vae.safetensors --init unet.safetensors     # fine-tune
    python train.py --data DIR --out DIR --vae vae.safetensors --config tiny|small|full|demo|FILE.json  # scratch
    torchrun --nproc_per_node 2 train.py ...      # DistributedDataParallel, NCCL on GPU, gloo on CPU

One file, top to bottom: config (the command line), data (the clip stream of m3ddm/data.py), model, objective
(epsilon-MSE of the UNet, or the VAE's reconstruction + KL), the loop, checkpoints and resume, log. Randomness:
each sample draws everything (video order aside; VAE posterior sample, timestep and noise included) from its own
generator seeded from (--seed, sample number, rank), so a run is a pure function of the seed: resume is exact.

Fixed reference bugs (spec training.md 1.3, 1.4, 1.8): clips are `start + k * stride` with room for every
frame (never padded copies of the last frame); global frames can be masked so they never show the region to
generate (--mask-global-frames all, the default); both classifier-free-guidance conditions can be dropped.
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from m3ddm import distributed
from m3ddm import masks as M
from m3ddm.data import TRAIN_STREAM, VAL_STREAM, ClipDataset, ClipSpec, clip_loader, list_videos, split_videos
from m3ddm.errors import UserError
from m3ddm.schedulers import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod
from m3ddm.training import (EMA, RunLog, black_latent, latest_checkpoint, load_state, out_of_time, save_checkpoint,
                            weights_filename, write_sample)
from m3ddm.unet3d import PREDICTION_TYPES, UNET_PRESETS, UNet3D, UNet3DConfig
from m3ddm.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from m3ddm.weights import config_from, load_unet, load_vae, read_header, sha256_file


# ---------------------------------------------------------------------------------------------------
# Config: the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or fine-tune the M3DDM+ UNet (or a small VAE) on videos.")
    for add_options in (model_and_data_options, run_options):
        add_options(p.add_argument)
    return p.parse_args(argv)


def model_and_data_options(a):
    """What is trained, from what, how long and how hard, on which clips and masks."""
    a("--data", required=True, help="folder of videos (recursive); its train/ and val/ subfolders are the splits")
    a("--out", required=True, help="output folder: unet.safetensors, checkpoint-*/, metrics.jsonl")
    a("--target", choices=("unet", "vae"), default="unet", help="what to train (default unet)")
    a("--config", help="UNet architecture for training from scratch: tiny|small|full|demo or FILE.json")
    a("--init", help="m3ddm unet file (with --target vae: vae file) to start from (fine-tuning; its config is used)")
    a("--vae", help="m3ddm vae file (a converted SD-1.5 VAE for real training); required for --target unet")
    a("--vae-config", default="tiny", help="--target vae: architecture trained from scratch, tiny|sd15|FILE.json")
    a("--freeze-encoder", action="store_true",
      help="--target vae: train the decoder only (post_quant_conv and decoder), so the latents, and a UNet trained "
           "on them, stay valid; with --init")
    a("--resume", help="continue a run exactly from a checkpoint folder or from the --out folder of a run")
    a("--max-steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    a("--max-minutes", type=float, default=0.0,
      help="stop earlier, with a checkpoint, once this process has trained this long (0 = no limit; default 0)")
    a("--batch-size", type=int, default=1, help="clips per micro-batch per process (default 1)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate, > 0 (default 1e-5)")
    a("--weight-decay", type=float, default=0.01)
    a("--warmup-steps", type=int, default=0, help="linear warm-up, then constant (default 0)")
    a("--lr-decay", choices=("none", "cosine"), default="none",
      help="after the warm-up: none (constant, default) or cosine (from --lr to 0 at --max-steps; a resumed run "
           "keeps its --max-steps)")
    a("--prediction-type", choices=PREDICTION_TYPES,
      help="--target unet: what the UNet learns to output, the noise (epsilon, the reference) or v (v_prediction, "
           "which a small model learns far better at high noise); default: that of --config or --init")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    a("--size", type=int, default=128, help="square training resolution in pixels, a multiple of 64 (default 128)")
    a("--frames", type=int, default=16, help="frames per clip, at least 2 (default 16)")
    a("--global-frames", type=int, default=16, help="global frames per video, 0 = none (default 16)")
    a("--max-stride", type=int, default=30, help="largest frame stride of a clip, at least 1 (default 30)")
    a("--crop", choices=("random", "center"), default="random", help="a random resized crop of the clip (default)")
    a("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
    a("--mask-strategy", choices=M.MASK_STRATEGIES, default="m3ddm_plus")
    a("--guide-case-weights", type=float, nargs=3, default=M.MaskSpec().guide_case_weights,
      metavar=("ALL_MASKED", "FIRST_LAST_RAW", "RANDOM_RAW"),
      help="odds of a clip's guide-frame case: no raw frame (as a short video or a first stage meets), first and "
           "last raw, each raw with p 0.5 (default 0.30 0.35 0.35, the M3DDM+ recipe)")
    a("--mask-global-frames", choices=M.GLOBAL_MASK_MODES, default="all",
      help="which global frames are masked like the clip (default all; the reference: overlap)")
    a("--p-uncond-local", type=float, help="P(unconditional local condition) in [0, 1]: 0 with --init, else 0.1")
    a("--p-uncond-global", type=float, help="P(zero global latents) in [0, 1]: 0 with --init, else 0.1")
    a("--temporal-weight", type=float, default=0.0,
      help="--target unet: add this times the MSE of the frame-to-frame change of the error, so that errors the "
           "frames do not share (flicker) cost more (default 0: the reference's loss)")
    a("--recon-loss", choices=("l1", "mse"), default="l1", help="--target vae reconstruction loss")
    a("--kl-weight", type=float, default=1e-6, help="--target vae KL weight (default 1e-6)")


def run_options(a):
    """Device, precision, loader, logging, checkpoints, validation, samples and evaluation."""
    a("--device", default="auto", help="auto (cuda if available, with torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:N")
    a("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
      help="autocast precision: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a gradient scaler")
    a("--gradient-checkpointing", action="store_true")
    a("--attention", choices=("sdpa", "math"), default="sdpa")
    a("--tf32", action="store_true", help="TF32 for fp32 matmuls and convolutions on CUDA (default: exact fp32)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--ema", type=float, default=0.0, help="EMA decay in [0, 1), e.g. 0.9999; 0 = off (default)")
    a("--vae-batch", type=int, default=16, help="images per VAE encode call")
    a("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    a("--cache-videos", action="store_true", help="keep each decoded video in memory (per worker): small datasets")
    a("--decode-short-side", type=int, default=0,
      help="let ffmpeg downscale frames to this short side while decoding (0 = native; e.g. 2 x --size)")
    a("--seed", type=int, default=6)
    a("--log-every", type=int, default=10, help="progress line every N steps (non-TTY stderr)")
    a("--log-data", action="store_true", help="record each rank's clips (video, start, stride) in metrics.jsonl")
    a("--save-every", type=int, default=500, help="checkpoint every N steps, 0 = only at the end")
    a("--keep-checkpoints", type=int, default=3, help="checkpoint folders kept, 0 = all")
    a("--val-every", type=int, default=0, help="validation loss every N steps on the val split, 0 = off")
    a("--val-clips", type=int, default=8, help="validation clips (fixed seeds, same every time)")
    a("--val-data", help="validation videos when --data has no val/ subfolder")
    a("--sample-every", type=int, default=0, help="outpaint a fixed clip every N steps into OUT/samples/ (0 = off)")
    a("--sample-steps", type=int, default=25, help="PNDM steps of those samples, at least 2 (default 25)")
    a("--eval-videos", nargs="+", metavar="VIDEO",
      help="video files or folders: run evaluate.py (--method model, crop ratio 0.25) on them after each "
           "checkpoint (its EMA weights with --ema) into OUT/eval/step-N/ and log its PSNR/SSIM to "
           "metrics.jsonl; --target unet only")
    a("--eval-steps", type=int, default=25, help="PNDM steps of that evaluation, at least 2 (default 25)")
    a("--eval-frames", type=int, default=16, help="first N frames of each evaluation video (default 16)")
    a("--eval-guidance", type=float, nargs=2, default=(2.0, 4.0), metavar=("LOCAL", "GLOBAL"),
      help="guidance scales of that evaluation (default 2 4, the reference's); give what the model will be "
           "sampled with (the demo: 1 1)")


# the least value of each whole-number option (--size: a positive multiple of 64)
AT_LEAST = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "frames": 2, "global_frames": 0, "max_stride": 1,
            "vae_batch": 1, "num_workers": 0, "decode_short_side": 0, "warmup_steps": 0, "log_every": 1,
            "save_every": 0, "keep_checkpoints": 0, "val_every": 0, "val_clips": 1, "sample_every": 0,
            "sample_steps": 2, "eval_steps": 2, "eval_frames": 2}
# the rule of each real-valued option (each of its values, for --eval-guidance), which must also be finite
RULES = {"lr": ("> 0", lambda v: v > 0), "weight_decay": (">= 0", lambda v: v >= 0),
         "ema": ("in [0, 1)", lambda v: 0 <= v < 1), "grad_clip": (">= 0", lambda v: v >= 0),
         "kl_weight": (">= 0", lambda v: v >= 0), "p_uncond_local": ("in [0, 1]", lambda v: 0 <= v <= 1),
         "p_uncond_global": ("in [0, 1]", lambda v: 0 <= v <= 1), "max_minutes": (">= 0", lambda v: v >= 0),
         "temporal_weight": (">= 0", lambda v: v >= 0), "eval_guidance": (">= 0", lambda v: v >= 0)}


def check_args(args):
    """Every input, before anything is loaded or written: one UserError naming the option."""
    for name, low in AT_LEAST.items():
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}.")
    if args.size < 64 or args.size % 64:
        raise UserError(f"--size {args.size} is not a positive multiple of 64; give e.g. 64, 128 or 256.")
    for name, (rule, ok) in RULES.items():
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]   # nargs options: every value
        if value is not None and not all(math.isfinite(v) and ok(v) for v in values):
            shown = " ".join(map(str, values))
            raise UserError(f"--{name.replace('_', '-')} {shown} is invalid; give "
                            f"{'numbers' if len(values) > 1 else 'a number'} {rule}.")
    if min(args.guide_case_weights) < 0 or sum(args.guide_case_weights) <= 0:
        raise UserError(f"--guide-case-weights {' '.join(map(str, args.guide_case_weights))} must be >= 0 with a "
                        "positive sum; give e.g. 0.30 0.35 0.35.")
    if args.crop_scale[0] <= 0 or args.crop_scale[0] > args.crop_scale[1] or args.crop_scale[1] > 1:
        raise UserError(f"--crop-scale {args.crop_scale} is not 0 < MIN <= MAX <= 1; give e.g. 0.08 1.0.")
    if args.eval_videos:
        if args.target != "unet":
            raise UserError("--eval-videos evaluates an outpainting UNet; it needs --target unet.")
        list_videos(args.eval_videos, "--eval-videos")  # files, or folders of videos (not searched recursively)
    if args.target == "unet" and not args.vae:
        raise UserError("--target unet needs --vae FILE (an m3ddm vae file, e.g. `python weights_convert.py vae "
                        "SD15_VAE vae.safetensors`).")
    if args.init and args.config:
        raise UserError("give either --init FILE (fine-tune) or --config (train from scratch), not both.")
    for flag, path in (("--vae", args.vae), ("--init", args.init)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist; give an m3ddm .safetensors file.")
    if args.temporal_weight and args.target != "unet":
        raise UserError("--temporal-weight weights the UNet's loss; it needs --target unet.")
    if args.freeze_encoder and not (args.target == "vae" and (args.init or args.resume)):
        raise UserError("--freeze-encoder fine-tunes a VAE's decoder; it needs --target vae and --init VAE_FILE.")
    if args.target == "unet" and not (args.init or args.config or args.resume):
        raise UserError("give --init FILE (fine-tune converted weights) or --config tiny|small|full|demo|FILE.json "
                        "(train from scratch).")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder (created when the first step is logged).")
    if args.val_data and not Path(args.val_data).is_dir():
        raise UserError(f"--val-data {args.val_data} is not a folder; give a folder of validation videos.")
    if args.target == "vae":
        args.global_frames = 0  # a VAE trains on frames only


# args that change the data stream or the model: a resumed run must use the same ones
RESUME_FIXED = ("target", "batch_size", "grad_accum", "size", "frames", "global_frames", "max_stride", "crop",
                "crop_scale", "mask_strategy", "guide_case_weights", "mask_global_frames", "p_uncond_local", "p_uncond_global", "seed",
                "ema", "freeze_encoder", "temporal_weight", "lr_decay")
# of those, options newer than some checkpoints: a checkpoint without them ran with these values
ADDED_LATER = {"guide_case_weights": list(M.MaskSpec().guide_case_weights), "freeze_encoder": False,
               "temporal_weight": 0.0, "lr_decay": "none"}


def setup_distributed(args):
    world = distributed.setup(args.device)  # cuda:LOCAL_RANK per rank, process group with a long timeout
    return world.rank, world.size, world.device


def autocast_for(args, device):
    """(precision, autocast context): --precision auto is bf16 on CUDA and fp32 (no autocast) on CPU."""
    precision = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.precision]
    return precision, torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext()


# ---------------------------------------------------------------------------------------------------
# Data (m3ddm/data.py: the video folder, clip sampling, crops, decoding, masks, the sample stream)


def clip_spec(args) -> ClipSpec:
    """The data options of the command line (same names) as the dataset's ClipSpec."""
    return ClipSpec(**{f.name: getattr(args, f.name) for f in fields(ClipSpec)})


def make_loaders(args, train_videos, val_videos, rank, world, step, device):
    """(training batches from sample step * clips-per-step on, validation batches or None, sample clip or None);
    the validation clips and the sample clip are fixed (the validation stream's first samples), on rank 0 only."""
    spec, per_step = clip_spec(args), args.batch_size * args.grad_accum
    remaining = max(args.max_steps - step, 0)
    loader = clip_loader(ClipDataset(train_videos, spec, TRAIN_STREAM, rank, world), args.batch_size,
                         step * per_step, remaining * per_step, args.num_workers, pin_memory=device.type == "cuda")
    val_loader = sample_item = None
    if args.val_every and val_videos and rank == 0:
        val_loader = clip_loader(ClipDataset(val_videos, spec, VAL_STREAM, 0, 1), args.batch_size, 0, args.val_clips)
    if args.sample_every and args.target == "unet" and rank == 0:  # a fixed clip: the first one of the val stream
        sample_item = ClipDataset(val_videos or train_videos, spec, VAL_STREAM, 0, 1)[0]
        if "error" in sample_item:
            raise UserError(f"sample clip: {sample_item['error']}.")
    return loader, val_loader, sample_item


# ---------------------------------------------------------------------------------------------------
# Model


def build_model(args, device, resume_dir):
    """(trainable model, its config, sources metadata)."""
    if args.target == "unet":
        if resume_dir is not None:
            path = resume_dir / "unet.safetensors"
            model, sources = load_unet(path, device, torch.float32), [{"name": str(path), "sha256": sha256_file(path)}]
        elif args.init:
            model, sources = load_init(args, device)
        else:
            with torch.random.fork_rng(devices=[]):  # a reproducible init without touching the caller's RNG
                torch.manual_seed(args.seed)
                model, sources = UNet3D(config_from(args.config, UNET_PRESETS, UNet3DConfig, "--config")).to(device), []
        if args.prediction_type is not None and resume_dir is None:
            model.config = dataclasses.replace(model.config, prediction_type=args.prediction_type)
        model.gradient_checkpointing = args.gradient_checkpointing
        model.set_attention(args.attention)
    else:
        model, sources = build_vae(args, device, resume_dir)
    return model.train(), model.config, sources


def load_init(args, device):
    """(model, sources) of --init, which must hold a model of --target's kind."""
    kind, _, _ = read_header(args.init)
    if kind != args.target:
        raise UserError(f"--init {args.init} holds a {kind}, not a {args.target}; give an m3ddm {args.target} file.")
    model = (load_unet if kind == "unet" else load_vae)(args.init, device, torch.float32)
    return model, [{"name": os.path.basename(args.init), "sha256": sha256_file(args.init)}]


def build_vae(args, device, resume_dir):
    """The VAE to train: resumed, fine-tuned from --init (the decoder only with --freeze-encoder) or new."""
    if resume_dir is not None:
        model, sources = load_vae(resume_dir / "vae.safetensors", device, torch.float32), []
    elif args.init:
        model, sources = load_init(args, device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = AutoencoderKL(config_from(args.vae_config, VAE_PRESETS, VAEConfig, "--vae-config")).to(device)
        sources = []
    if args.freeze_encoder:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    return model, sources


def kept_metadata(args, resume_dir):
    """What a decoder-only fine-tune keeps of its start file's metadata: the latent rescale (`m3ddm.demo rescale`),
    still exact while the encoder and quant_conv are frozen."""
    start = resume_dir / "vae.safetensors" if resume_dir is not None else args.init
    if args.target != "vae" or not args.freeze_encoder or not start:
        return {}
    return {k: v for k, v in read_header(start)[2].items() if k == "latent_rescale"}


def wrap_model(core, args, world, device):
    """What the backward pass runs: core in DistributedDataParallel under torchrun, then torch.compile'd."""
    if world > 1:
        core = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    return torch.compile(core) if args.compile else core


# ---------------------------------------------------------------------------------------------------
# Objective


class UNetObjective:
    """Epsilon-MSE of the 9-channel UNet on one batch (spec pipeline.md 7, training.md 1.8); for a
    v-prediction model the MSE to v = sqrt(a) eps - sqrt(1 - a) x0 instead. --temporal-weight w adds w times the
    MSE of the error's frame-to-frame change: an error all frames share costs the same, one of its own costs
    1 + 2w times as much."""

    def __init__(self, vae, opts, device, prediction="epsilon"):
        self.vae, self.o, self.device, self.prediction = vae, opts, device, prediction
        self.vae_dtype = next(vae.parameters()).dtype
        self.alphas = alphas_cumprod().to(device)
        self.black = black_latent(vae, opts.size, device, self.vae_dtype)

    @torch.no_grad()
    def inputs(self, batch):
        """(x (B, 9, F, h, w), t (B,), fps (B,), global latents (B, G, 4, h, w), target (B, 4, F, h, w): the
        noise, or v)."""
        o, dev = self.o, self.device
        xs, ts, noises, globs = [], [], [], []
        for i in range(batch["clip"].shape[0]):
            g = torch.Generator().manual_seed(int(batch["seed"][i]))
            images = torch.cat([batch["clip"][i], batch["cond"][i], batch["global"][i]])  # (2F+G, 3, S, S)
            z = self.vae.encode_latents(images.to(dev, self.vae_dtype), batch=o.vae_batch, generator=g,
                                        sample=True).float()  # (2F+G, 4, h, w)
            f = o.frames
            x0, cond, glob = z[:f], z[f:2 * f], z[2 * f:]
            mask = M.latent_mask(batch["mask"][i]).to(dev)  # (F, h, w)
            guides = batch["guides"][i].to(dev)
            if batch["drop_local"][i]:  # unconditional local branch: black frames, all-ones mask, guides kept
                keep = guides[:, None, None, None]
                cond = torch.where(keep, cond, self.black.expand_as(cond))
                mask = torch.where(keep[:, 0], mask, torch.ones_like(mask))
            if batch["drop_global"][i]:  # unconditional global branch: zero latents
                glob = torch.zeros_like(glob)
            t = int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (), generator=g))
            noise = torch.randn(x0.shape, generator=g).to(dev)  # (F, 4, h, w)
            x_t = add_noise(x0[None], noise[None], t, self.alphas)[0]
            xs.append(torch.cat([x_t, cond, mask[:, None]], dim=1).transpose(0, 1))  # (9, F, h, w)
            if self.prediction == "v_prediction":
                a = self.alphas[t]
                noise = a.sqrt() * noise - (1 - a).sqrt() * x0
            noises.append(noise.transpose(0, 1))  # (4, F, h, w): the target
            ts.append(t)
            globs.append(glob)
        # G == 0 stays a (B, 0, 4, h, w) tensor: the UNet's "no global condition"
        return (torch.stack(xs), torch.tensor(ts, device=dev), batch["fps"].to(dev), torch.stack(globs),
                torch.stack(noises))

    def loss(self, model, batch, autocast):
        x, t, fps, glob, noise = self.inputs(batch)
        with autocast:
            pred = model(x, t, fps, global_latents=glob)  # (B, 4, F, h, w)
        pred = pred.float()
        loss = F.mse_loss(pred, noise)
        if self.o.temporal_weight:  # the error's change from frame to frame: what flickers
            error = pred - noise
            loss = loss + self.o.temporal_weight * error.diff(dim=2).pow(2).mean()
        return loss


class VAEWithLoss(torch.nn.Module):
    """The VAE as one forward (encode, reparameterised sample, decode) so DDP can wrap it; saves as the VAE."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images, noise):
        post = self.vae.encode(images, batch=len(images))
        recon = self.vae.decode(post.mean + post.std * noise, batch=len(images))  # (N, 3, S, S)
        return recon, post.mean, post.logvar


class VAEObjective:
    """Reconstruction (L1 or MSE) + kl_weight * KL(posterior || N(0, I)) of the clip frames, for --target vae."""

    def __init__(self, vae, opts, device):
        self.o, self.device = opts, device
        self.latent_channels, self.factor = vae.config.latent_channels, vae.factor

    def loss(self, model, batch, autocast):
        images = batch["clip"].flatten(0, 1).to(self.device)  # (B*F, 3, S, S)
        g = torch.Generator().manual_seed(int(batch["seed"][0]))
        side = self.o.size // self.factor
        noise = torch.randn(len(images), self.latent_channels, side, side, generator=g).to(self.device)
        with autocast:
            recon, mean, logvar = model(images, noise)
        rec = F.l1_loss(recon.float(), images) if self.o.recon_loss == "l1" else F.mse_loss(recon.float(), images)
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return rec + self.o.kl_weight * kl


def build_objective(args, model, device, precision, sources):
    """(objective, the module its loss calls, the frozen VAE (in the autocast dtype on CUDA) or None, sources)."""
    if args.target == "vae":
        return VAEObjective(model, args, device), VAEWithLoss(model), None, sources
    vae = load_vae(args.vae, device, precision if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    if vae.factor != 8:
        raise UserError(f"--vae {args.vae} downsamples by {vae.factor}, the UNet needs a factor-8 VAE; "
                        "give an SD-1.5-shaped VAE.")
    sources = sources + [{"name": os.path.basename(args.vae), "sha256": sha256_file(args.vae)}]
    return UNetObjective(vae, args, device, model.config.prediction_type), model, vae, sources


# ---------------------------------------------------------------------------------------------------
# The loop


def lr_factor(step, warmup, decay, total):
    """--lr's multiplier at optimizer step `step` (0-based): linear warm-up, then 1 or a cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return 1.0


class Optimisation:
    """AdamW with a linear warm-up, the fp16 gradient scaler and the EMA: one optimizer step, and their state."""

    def __init__(self, model, args, device, precision, state=None):
        self.model, self.grad_clip = model, args.grad_clip
        self.ema = EMA(model, args.ema) if args.ema > 0 else None
        trained = [p for p in model.parameters() if p.requires_grad]   # all but a frozen encoder
        self.optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args.warmup_steps, args.lr_decay, args.max_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.step = int(state["step"]) if state is not None else 0
        if state is not None:
            for name in ("optimizer", "scheduler", "scaler"):
                getattr(self, name).load_state_dict(state[name])
            if self.ema is not None:
                self.ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}

    def update(self):
        """Unscale and clip the gradients, step, advance the lr schedule and the EMA: (lr used, gradient norm)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return lr, float(grad_norm)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.shadow if self.ema is not None else {},
                "step": self.step}


def train_step(train_model, objective, batches, opt, args, world, autocast, log, skipped):
    """One optimizer step of --grad-accum micro-batches: (rank-mean loss, grad norm, lr, each rank's clips drawn)."""
    losses, drawn = [], []
    for micro in range(args.grad_accum):
        batch = next(batches)
        for path, reason in batch["skipped"]:
            if path not in skipped:
                skipped.add(path)
                log.message(f"warning: skipped {path} ({reason}); {len(skipped)} video(s) skipped so far")
        if "error" in batch:
            raise UserError(f"training data: {batch['error']}.")
        sync = micro == args.grad_accum - 1 or world == 1
        with (nullcontext() if sync or not hasattr(train_model, "no_sync") else train_model.no_sync()):
            loss = objective.loss(train_model, batch, autocast)
            opt.scaler.scale(loss / args.grad_accum).backward()
        losses.append(loss.detach())
        drawn += [[v, int(s), int(st)] for v, s, st in zip(batch["video"], batch["start"], batch["stride"])]
    lr, grad_norm = opt.update()
    loss = torch.stack(losses).mean()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    clips = [drawn] * world  # --log-data: every rank's clips in rank order (a collective: every rank calls it)
    if args.log_data and world > 1:
        dist.all_gather_object(clips, drawn)
    return loss.item(), grad_norm, lr, clips


@torch.no_grad()
def run_validation(model, objective, val_loader, autocast):
    """The mean loss of the fixed validation clips, in eval mode (their draws never touch the training stream)."""
    was_training = model.training
    model.eval()
    losses = []
    for batch in val_loader:
        if "error" in batch:
            raise UserError(f"validation data: {batch['error']}.")
        losses.append(objective.loss(model, batch, autocast).item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def train(args):
    check_args(args)
    rank, world, device = setup_distributed(args)
    distributed.set_tf32(args.tf32)
    is_main, out = rank == 0, Path(args.out)  # --out is created when the first step is logged
    resume_dir, state = load_resume(args)
    precision, autocast = autocast_for(args, device)
    train_videos, val_videos = split_videos(args.data, args.val_data)
    model, config, sources = build_model(args, device, resume_dir)
    kept = kept_metadata(args, resume_dir)
    objective, core, vae, sources = build_objective(args, model, device, precision, sources)
    opt = Optimisation(model, args, device, precision, state)
    skipped = set(state["skipped"]) if state is not None else set()
    train_model = wrap_model(core, args, world, device)
    loader, val_loader, sample_item = make_loaders(args, train_videos, val_videos, rank, world, opt.step, device)
    log = RunLog(out, is_main, args.max_steps, opt.step)
    log_start(log, args, model, train_videos, val_videos, world, device, precision)

    def checkpoint():
        if is_main:
            meta = {"sources": sources, "step": str(opt.step), "trained_by": "m3ddm train.py", **kept}
            path = save_checkpoint(out, opt.step, args.target, model.state_dict(), config,
                                   trainer_state(opt, args, world, skipped), meta, opt.ema, args.keep_checkpoints)
            log.message(f"checkpoint {path}")
            if args.eval_videos and args.target == "unet":   # the EMA weights when there are any: what ships
                name = weights_filename(args.target, ema=opt.ema is not None)
                result = run_evaluation(args, path / name, opt.step, device, log)
                if result is not None:
                    log.record(step=opt.step, eval=result, eval_weights=name)
        if world > 1:
            dist.barrier()

    batches, started = iter(loader), time.monotonic()
    while opt.step < args.max_steps:
        loss, grad_norm, lr, clips = train_step(train_model, objective, batches, opt, args, world, autocast, log,
                                                skipped)
        step = opt.step
        log.step(step, loss, lr, grad_norm, sum(map(len, clips)), len(skipped), args.log_every,
                 clips if args.log_data else None)
        if args.val_every and step % args.val_every == 0 and val_loader is not None:
            log.validation(step, run_validation(core, objective, val_loader, autocast))
        if args.sample_every and step % args.sample_every == 0 and sample_item is not None:
            with autocast:  # the fp32 training model samples in the training precision (bf16 on CUDA)
                write_sample(out / "samples" / f"step-{step:07d}.mp4", model, vae, sample_item, args, device)
        if out_of_time(args.max_minutes, started, world, device):
            log.message(f"step {step}: --max-minutes {args.max_minutes:g} reached; stopping with a checkpoint")
            break
        if step < args.max_steps and args.save_every and step % args.save_every == 0:
            checkpoint()
    checkpoint()
    log.record(step=opt.step, done=True, skipped_videos=len(skipped))
    if world > 1:
        dist.destroy_process_group()
    return out / weights_filename(args.target)


# ---------------------------------------------------------------------------------------------------
# Checkpoints (m3ddm/training.py stores and finds them): what is saved, resume, evaluation of a checkpoint


def load_resume(args):
    """(checkpoint folder, trainer state) of --resume, or (None, None); the data-stream options must not change.
    Unset condition-dropout options: the resumed run's, else 0 when fine-tuning (as the reference), 0.1 from scratch."""
    resume_dir = latest_checkpoint(args.resume) if args.resume else None
    state = load_state(resume_dir) if resume_dir else None
    changed = [k for k in RESUME_FIXED if state and getattr(args, k) is not None
               and json.dumps(state["args"].get(k, ADDED_LATER.get(k))) != json.dumps(getattr(args, k))]
    if state and args.lr_decay != "none" and state["args"].get("max_steps") != args.max_steps:
        changed.append("max_steps")  # the cosine ends at the run's --max-steps
    if changed:
        raise UserError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the "
                        "checkpoint's run; give the same values to continue it exactly.")
    for name in ("p_uncond_local", "p_uncond_global"):
        if getattr(args, name) is None:
            setattr(args, name, state["args"][name] if state is not None else 0.0 if args.init else 0.1)
    return resume_dir, state


def trainer_state(opt, args, world, skipped):
    """What resume needs besides the weights: optimizer, schedule, scaler, EMA, step, the run's args."""
    return {**opt.state_dict(), "samples_per_rank": opt.step * args.batch_size * args.grad_accum,
            "world_size": world, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "skipped": sorted(skipped)}


EVAL_METRICS = ("psnr", "psnr_band", "ssim", "ssim_band", "flicker_band")


def run_evaluation(args, unet_file, step, device, log):
    """evaluate.py on --eval-videos with this checkpoint (a subprocess: no CLI module is imported here).
    Returns the whole-frame and band PSNR/SSIM and the band flicker averaged over crop ratios, or None after one
    warning line."""
    out = Path(args.out) / "eval" / f"step-{step:07d}"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "evaluate.py"), *args.eval_videos,
           "--out", str(out), "--method", "model", "--unet", str(unet_file), "--vae", str(args.vae),
           "--size", str(args.size), "--frames", str(args.eval_frames), "--steps", str(args.eval_steps),
           "--guidance-local", str(args.eval_guidance[0]), "--guidance-global", str(args.eval_guidance[1]),
           "--crop-ratio", "0.25", "--device", str(device), "--previews", "0"]
    log.message(f"step {step}: evaluating {unet_file} on {len(args.eval_videos)} --eval-videos input(s)")
    distributed.free_cached_memory(device)  # the subprocess needs the GPU memory this process cached
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        lines = [s.strip() for s in r.stderr.replace("\r", "\n").splitlines() if s.strip()]
        if r.returncode != 0:
            raise RuntimeError(f"exit {r.returncode}: {lines[-1] if lines else 'no output'}")
        average = json.loads((out / "summary.json").read_text())["methods"]["model"]["average"]
        result = {k: average[k] for k in EVAL_METRICS}
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        log.message(f"warning: evaluation at step {step} failed ({e}); training goes on")
        return None
    log.message(f"step {step} evaluation: " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


# ---------------------------------------------------------------------------------------------------
# Log


def log_start(log, args, model, train_videos, val_videos, world, device, precision):
    log.message(f"training {args.target} ({sum(p.numel() for p in model.parameters()):,} parameters) on the "
                f"{len(train_videos)} video files of {args.data} (unusable ones are skipped with a warning), "
                f"{world} process(es), device {device}, precision {precision}, from step {log.step0}")
    if args.val_every and not val_videos:
        log.message("no validation videos (no val/ folder and no --val-data): validation is off")


def main(argv=None):
    from m3ddm import cli

    def body():
        path = train(parse_args(argv))
        if int(os.environ.get("RANK", "0")) == 0:
            print(path)
    return cli.run(body, interrupted="completed checkpoints are kept; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
