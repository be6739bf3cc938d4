"""Train or fine-tune the M3DDM+ UNet (or train a small VAE) on a folder of videos, on plain PyTorch.

    python train.py --data DIR --out DIR --vae vae.safetensors --init unet.safetensors     # fine-tune
    python train.py --data DIR --out DIR --vae vae.safetensors --config tiny|small|full|demo|FILE.json  # scratch
    torchrun --nproc_per_node 2 train.py ...      # DistributedDataParallel, NCCL on GPU, gloo on CPU

One readable file: the data pipeline (video folder -> clip, masks, global frames), the epsilon-MSE loop,
checkpoints, resume and logging all live here; the models, masks and weights format come from the package.

Randomness: every training sample n of rank r draws everything (video order aside) from its own generator,
seeded from (--seed, stream, n * world_size + r): stride, start, crop, masks, guide case, condition
dropout, VAE posterior sample, timestep and noise. The run is therefore a pure function of the seed and the
sample counter, whatever the number of DataLoader workers, and resuming from a checkpoint is exact.

Fixed reference bugs (spec training.md 1.3, 1.4, 1.8): clips are `start + k * stride` with room for every
frame (never padded copies of the last frame); global frames can be masked so they never show the region to
generate (--mask-global-frames all, the default); both classifier-free-guidance conditions can be dropped.
"""
import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from m3ddm import distributed
from m3ddm import masks as M
from m3ddm import video
from m3ddm.errors import UserError
from m3ddm.schedule import global_frame_indices
from m3ddm.schedulers import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod
from m3ddm.unet3d import UNET_PRESETS, UNet3D, UNet3DConfig
from m3ddm.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from m3ddm.weights import load_unet, load_vae, make_config, read_header, save_model, sha256_file

TRAIN_STREAM, VAL_STREAM = 0, 1
STATE_FILE = "trainer_state.pt"

# ---------------------------------------------------------------------------------------------------
# Data: videos, clip sampling, crops


def find_videos(folder) -> list:
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in video.VIDEO_EXTENSIONS and p.is_file())


def split_videos(data):
    """(train videos, val videos): DATA/train and DATA/val when DATA/train exists, else everything is train."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder; give a folder of videos (or with train/ and val/).")
    if (data / "train").is_dir():
        train, val = find_videos(data / "train"), find_videos(data / "val") if (data / "val").is_dir() else []
    else:
        train, val = find_videos(data), []
    if not train:
        raise UserError(f"no video files ({', '.join(video.VIDEO_EXTENSIONS)}) found under {data}; "
                        "give a folder that holds videos.")
    return train, val


def clip_indices(num_video_frames: int, clip_frames: int, max_stride: int, generator):
    """(indices, stride): `clip_frames` distinct real frames start + k*stride (the reference's intended rule).

    stride ~ U{1 .. min(max_stride, (N-1) // (F-1))}, start ~ U{0 .. N-1 - (F-1)*stride}; needs N >= F.
    """
    n, f = num_video_frames, clip_frames
    if n < f:
        raise ValueError(f"a clip of {f} frames needs a video of at least {f} frames, received {n}")
    top = max(1, min(max_stride, (n - 1) // max(f - 1, 1)))
    stride = int(torch.randint(1, top + 1, (), generator=generator))
    start = int(torch.randint(0, n - (f - 1) * stride, (), generator=generator))
    return [start + k * stride for k in range(f)], stride


def global_indices(num_video_frames: int, count: int) -> list:
    """np.linspace(0, N-1, G, dtype=int) over the whole video, as the reference and the pipeline."""
    return global_frame_indices(num_video_frames, count) if count else []


def random_resized_crop_box(height, width, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as RandomResizedCrop chooses it: area fraction ~ U(scale), log aspect ~ U(log ratio),
    up to 10 tries, then a centre crop clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item())
        aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_square_box(height, width):
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(frames: np.ndarray, box, size: int) -> torch.Tensor:
    """uint8 (K, H, W, 3) -> float (K, 3, size, size) in [-1, 1]: crop, then antialiased bilinear resize."""
    top, left, h, w = box
    x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + h, left:left + w])).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Data: decoding (m3ddm.video; only the needed frames are kept)


def _scaled_frames(path, info, short_side, last=None):
    """Frames 0..last (all if None) as uint8 (K, h, w, 3), downscaled by ffmpeg to a short side <= short_side."""
    import imageio_ffmpeg
    s = int(short_side)
    scale = ["-vf", f"scale='if(gt(iw,ih),-2,min({s},iw))':'if(gt(iw,ih),min({s},ih),-2)'"]
    quiet = logging.getLogger("imageio_ffmpeg")  # it warns that the scale filter changes the frame size
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-fps_mode", "passthrough", *scale])
        w, h = next(reader)["size"]
    finally:
        quiet.setLevel(level)
    frames = []
    try:
        for raw in reader:
            frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
            if last is not None and len(frames) > last:
                break
    finally:
        reader.close()
    if last is not None and len(frames) <= last:
        raise RuntimeError(f"the video ended before frame {last} (probe counted {info.num_frames})")
    return np.stack(frames)


class VideoSource:
    """Frames of the videos of one split, through m3ddm.video (true frame count and exact fps from `probe`).

    Without a cache, each sample decodes its video sequentially up to its last needed frame and keeps only the
    needed ones; since the last global frame is the video's last frame that is in practice the whole video, so
    `--decode-short-side` (ffmpeg downscales while decoding) matters for large videos. Probes are remembered per
    process. With cache=True each video is decoded once (downscaled if asked) and kept in memory, per DataLoader
    worker: for small datasets only."""

    def __init__(self, short_side=0, cache=False):
        self.short_side, self.cache = short_side, cache
        self.info, self.frames = {}, {}

    def length(self, path):
        """(number of frames, fps)."""
        if path not in self.info:
            self.info[path] = video.probe(path)
        if self.cache and path not in self.frames:
            info = self.info[path]
            self.frames[path] = (_scaled_frames(path, info, self.short_side) if self.short_side
                                 else np.stack(list(video.iter_frames(path, info))))
        info = self.info[path]
        return (len(self.frames[path]) if self.cache else info.num_frames), info.fps

    def read(self, path, indices):
        """uint8 (len(indices), H, W, 3)."""
        if self.cache:
            return self.frames[path][indices]
        if self.short_side:
            return _scaled_frames(path, self.info[path], self.short_side, max(indices))[indices]
        return video.read_frames_at(path, indices, self.info[path])


# ---------------------------------------------------------------------------------------------------
# Data: one training sample


def sample_seed(seed: int, stream: int, n: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919_000_003 + int(n) * 2_654_435_761) % (2 ** 63 - 1)


class ClipDataset(Dataset):
    """Item n -> one clip of sample number n (an index into an endless stream, see ClipSampler).

    A video that cannot be decoded or is shorter than the clip is skipped (the next video of the epoch's order
    is used) and reported in the item's "skipped" list; if no video is usable the item carries "error"."""

    def __init__(self, videos, opts, stream=TRAIN_STREAM, rank=0, world_size=1):
        self.videos, self.o, self.stream = list(videos), opts, stream
        self.rank, self.world_size = rank, world_size
        self.source = VideoSource(opts.decode_short_side, opts.cache_videos)
        self.bad = {}

    def __len__(self):
        return 2 ** 62  # an endless stream; ClipSampler decides which sample numbers are drawn

    def _order(self, epoch):
        g = torch.Generator().manual_seed(sample_seed(self.o.seed, self.stream + 100, epoch))
        return torch.randperm(len(self.videos), generator=g).tolist()

    def __getitem__(self, n):
        n_global = n * self.world_size + self.rank
        v = len(self.videos)
        order = self._order(n_global // v) if self.stream == TRAIN_STREAM else list(range(v))
        skipped = []
        for attempt in range(v):
            path = self.videos[order[(n_global + attempt) % v]]
            if path in self.bad:
                continue
            try:
                item = self._make(path, n_global)
                item["skipped"] = skipped
                return item
            except (ValueError, OSError, RuntimeError) as e:  # unreadable or short: skip, never stop the run
                self.bad[path] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                skipped.append((path, self.bad[path]))
        return {"error": f"none of the {v} videos could be used ({len(self.bad)} unreadable or shorter than "
                         f"{self.o.frames} frames); add readable videos of at least {self.o.frames} frames",
                "skipped": skipped}

    def _make(self, path, n_global):
        o = self.o
        g = torch.Generator().manual_seed(sample_seed(o.seed, self.stream, n_global))
        num, fps = self.source.length(path)
        if num < o.frames:
            raise ValueError(f"only {num} frames, a clip needs {o.frames}")
        clip_idx, stride = clip_indices(num, o.frames, o.max_stride, g)
        glob_idx = global_indices(num, o.global_frames)
        wanted = sorted(set(clip_idx) | set(glob_idx))
        frames = self.source.read(path, wanted)  # uint8 (K, H, W, 3)
        where = {src: k for k, src in enumerate(wanted)}
        height, width = frames.shape[1:3]
        if o.crop == "random":
            box = random_resized_crop_box(height, width, g, tuple(o.crop_scale))
        else:
            box = center_square_box(height, width)
        clip = crop_resize(frames[[where[i] for i in clip_idx]], box, o.size)  # (F, 3, S, S)
        masks = M.sample_clip_masks(o.frames, o.size, o.size, g, o.mask_strategy)
        m = masks.masks[:, None]  # (F, 1, S, S)
        cond = clip * (1 - m) - m  # masked pixels are black (-1); guide frames stay raw
        item = {"clip": clip, "cond": cond, "mask": masks.masks, "guides": masks.guides,
                "fps": int(fps // stride), "seed": int(torch.randint(0, 2 ** 62, (), generator=g)),
                "drop_local": bool(torch.rand((), generator=g) < o.p_uncond_local),
                "drop_global": bool(torch.rand((), generator=g) < o.p_uncond_global),
                "video": os.path.basename(path), "start": clip_idx[0], "stride": stride}
        if glob_idx:
            gm = M.global_frame_masks(o.mask_global_frames, masks, clip_idx, glob_idx)[:, None]  # (G, 1, S, S)
            glob = crop_resize(frames[[where[i] for i in glob_idx]], box, o.size)  # same crop: masks align
            item["global"] = glob * (1 - gm) - gm
        else:
            item["global"] = torch.zeros(0, 3, o.size, o.size)
        return item


def collate(items):
    errors = [it["error"] for it in items if "error" in it]
    skipped = [s for it in items for s in it["skipped"]]
    if errors:
        return {"error": errors[0], "skipped": skipped}
    out = {k: torch.stack([it[k] for it in items]) for k in ("clip", "cond", "mask", "guides", "global")}
    for k in ("fps", "seed", "start", "stride"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
    for k in ("drop_local", "drop_global"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.bool)
    out["video"] = [it["video"] for it in items]
    out["skipped"] = skipped
    return out


class ClipSampler(Sampler):
    """Sample numbers start, start+1, ..., start+count-1 (per rank): resuming restarts at the right sample."""

    def __init__(self, start, count):
        self.start, self.count = start, count

    def __iter__(self):
        return iter(range(self.start, self.start + self.count))

    def __len__(self):
        return self.count


# ---------------------------------------------------------------------------------------------------
# Losses


def black_latent(vae, size, device, dtype):
    """Latent of an all-black (-1) frame: the unconditional local condition (posterior mean)."""
    with torch.no_grad():
        return vae.encode_latents(-torch.ones(1, 3, size, size, device=device, dtype=dtype))[0].float()  # (4, h, w)


class UNetObjective:
    """Epsilon-MSE of the 9-channel UNet on one batch (spec pipeline.md 7, training.md 1.8)."""

    def __init__(self, vae, opts, device):
        self.vae, self.o, self.device = vae, opts, device
        self.vae_dtype = next(vae.parameters()).dtype
        self.alphas = alphas_cumprod().to(device)
        self.black = black_latent(vae, opts.size, device, self.vae_dtype)

    @torch.no_grad()
    def inputs(self, batch):
        """(x (B, 9, F, h, w), t (B,), fps (B,), global latents (B, G, 4, h, w), target noise (B, 4, F, h, w))."""
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
            noises.append(noise.transpose(0, 1))  # (4, F, h, w)
            ts.append(t)
            globs.append(glob)
        # G == 0 stays a (B, 0, 4, h, w) tensor: the UNet's "no global condition"
        return (torch.stack(xs), torch.tensor(ts, device=dev), batch["fps"].to(dev), torch.stack(globs),
                torch.stack(noises))

    def loss(self, model, batch, autocast):
        x, t, fps, glob, noise = self.inputs(batch)
        with autocast:
            pred = model(x, t, fps, global_latents=glob)  # (B, 4, F, h, w)
        return F.mse_loss(pred.float(), noise)


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


# ---------------------------------------------------------------------------------------------------
# Model set-up, EMA, checkpoints


def config_from(arg, presets, cls, flag):
    """A preset name or a JSON file -> a model config (UNet3DConfig or VAEConfig)."""
    if arg in presets:
        return presets[arg]
    path = Path(arg)
    if path.suffix != ".json" or not path.is_file():
        raise UserError(f"{flag} {arg} is neither a preset ({', '.join(sorted(presets))}) nor a JSON "
                        "file; give a preset name or an existing .json config.")
    try:
        return make_config(cls, json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UserError(f"{flag} {arg} is not a valid config ({e}); fix the JSON file.") from None


class EMA:
    """Exponential moving average of all parameters and floating buffers, kept in fp32."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)


def latest_checkpoint(folder):
    folder = Path(folder)
    if (folder / STATE_FILE).is_file():
        return folder
    found = sorted(p for p in folder.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    if not found:
        raise UserError(f"--resume {folder} holds no checkpoint ({STATE_FILE} or checkpoint-*/); "
                        "give a checkpoint folder or the --out folder of an earlier run.")
    return found[-1]


def model_filename(target):
    return "unet.safetensors" if target == "unet" else "vae.safetensors"


def save_checkpoint(out, step, model, config, state, ema, args, sources):
    """OUT/checkpoint-STEP/{model, ema model, trainer_state.pt} via a temporary folder renamed at the end; then
    OUT/unet.safetensors (or vae.safetensors), itself written atomically. Older checkpoints beyond --keep."""
    out = Path(out)
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f".checkpoint-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = model_filename(args.target)
    meta = {"sources": sources, "step": str(step), "trained_by": "m3ddm train.py"}
    save_model(tmp / name, model.state_dict(), args.target, config, metadata=meta)
    if ema is not None:
        save_model(tmp / name.replace(".safetensors", "_ema.safetensors"), ema.shadow, args.target, config,
                   metadata={**meta, "ema_decay": str(ema.decay)})
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for f in final.glob("*.safetensors"):
        shutil.copyfile(f, out / f".{f.name}.tmp")
        os.replace(out / f".{f.name}.tmp", out / f.name)
    if args.keep_checkpoints > 0:
        for old in sorted(out.glob("checkpoint-*"))[:-args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Progress line on stderr (rank 0), metrics.jsonl in --out."""

    def __init__(self, out, enabled, max_steps, resume_step):
        self.enabled, self.max_steps = enabled, max_steps
        self.path = Path(out) / "metrics.jsonl"
        self.tty = sys.stderr.isatty()
        self.t0, self.step0 = time.time(), resume_step
        if enabled and self.path.exists():  # drop records after the resumed step (a crashed run's tail)
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def record(self, **rec):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def progress(self, step, loss, lr, clips_per_s, final=False):
        if not self.enabled:
            return
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = (self.max_steps - step) / rate if rate > 0 else 0.0
        line = (f"step {step}/{self.max_steps} loss {loss:.4f} lr {lr:.2e} clips/s {clips_per_s:.2f} "
                f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        end = "\n" if (final or not self.tty) else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)

    def message(self, text):
        if self.enabled:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or fine-tune the M3DDM+ UNet (or a small VAE) on videos.")
    a = p.add_argument
    a("--data", required=True, help="folder of videos, searched recursively; with train/ (and val/) subfolders "
                                    "those are the splits")
    a("--out", required=True, help="output folder: unet.safetensors, checkpoint-*/, metrics.jsonl")
    a("--target", choices=("unet", "vae"), default="unet", help="what to train (default unet)")
    a("--config", help="UNet architecture for training from scratch: tiny|small|full|demo or FILE.json")
    a("--init", help="m3ddm unet file to start from (fine-tuning; its config is used)")
    a("--vae", help="m3ddm vae file (a converted SD-1.5 VAE for real training); required for --target unet")
    a("--vae-config", default="tiny", help="--target vae: architecture trained from scratch, tiny|sd15|FILE.json")
    a("--resume", help="continue a run exactly from a checkpoint folder or from the --out folder of a run")
    a("--max-steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    a("--batch-size", type=int, default=1, help="clips per micro-batch per process (default 1)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    a("--weight-decay", type=float, default=0.01)
    a("--warmup-steps", type=int, default=0, help="linear warm-up, then constant (default 0)")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    a("--size", type=int, default=128, help="square training resolution in pixels (default 128)")
    a("--frames", type=int, default=16, help="frames per clip (default 16)")
    a("--global-frames", type=int, default=16, help="global frames per video, 0 = none (default 16)")
    a("--max-stride", type=int, default=30, help="largest frame stride of a clip (default 30)")
    a("--crop", choices=("random", "center"), default="random",
      help="random resized crop shared by the clip's frames (default), or the centre square")
    a("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
    a("--mask-strategy", choices=M.MASK_STRATEGIES, default="m3ddm_plus")
    a("--mask-global-frames", choices=M.GLOBAL_MASK_MODES, default="all",
      help="which global frames are masked like the clip (reference: overlap; default all)")
    a("--p-uncond-local", type=float, default=None,
      help="probability of the unconditional local condition (default 0 with --init, 0.1 from scratch)")
    a("--p-uncond-global", type=float, default=None,
      help="probability of zero global latents (default 0 with --init, 0.1 from scratch)")
    a("--recon-loss", choices=("l1", "mse"), default="l1", help="--target vae reconstruction loss")
    a("--kl-weight", type=float, default=1e-6, help="--target vae KL weight (default 1e-6)")
    a("--device", default="auto", help="auto (cuda if available, with torchrun cuda:LOCAL_RANK), cpu, cuda, cuda:N")
    a("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
      help="autocast precision: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a gradient scaler")
    a("--tf32", action="store_true", help="TF32 for fp32 matmuls and convolutions on CUDA (default: exact fp32)")
    a("--gradient-checkpointing", action="store_true")
    a("--attention", choices=("sdpa", "math"), default="sdpa")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--ema", type=float, default=0.0, help="EMA decay, e.g. 0.9999; 0 = off (default)")
    a("--vae-batch", type=int, default=16, help="images per VAE encode call")
    a("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    a("--cache-videos", action="store_true",
      help="decode each video once and keep its frames in memory (per worker): small datasets only")
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
    a("--sample-every", type=int, default=0,
      help="outpaint one fixed clip every N steps into OUT/samples/ (0 = off); --target unet only")
    a("--sample-steps", type=int, default=25, help="PNDM steps of those samples (default 25)")
    a("--eval-videos", nargs="+", metavar="VIDEO",
      help="video files or folders: run evaluate.py (--method model, crop ratio 0.25) on them after each "
           "checkpoint into OUT/eval/step-N/ and log its PSNR/SSIM to metrics.jsonl; --target unet only")
    a("--eval-steps", type=int, default=25, help="sampler steps of that evaluation (default 25)")
    a("--eval-frames", type=int, default=16, help="first N frames of each evaluation video (default 16)")
    args = p.parse_args(argv)
    return args


def check_args(args):
    for name in ("max_steps", "batch_size", "grad_accum", "frames", "vae_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}; "
                            "give a positive number.")
    if args.size % 64:
        raise UserError(f"--size {args.size} is not a multiple of 64; give e.g. 64, 128 or 256.")
    if args.frames < 2:
        raise UserError(f"--frames must be at least 2, got {args.frames}.")
    if args.global_frames < 0 or args.num_workers < 0:
        raise UserError("--global-frames and --num-workers must not be negative; give 0 or more.")
    if args.eval_videos:
        if args.target != "unet":
            raise UserError("--eval-videos evaluates an outpainting UNet; it needs --target unet.")
        for v in map(Path, args.eval_videos):
            if not v.exists() or v.is_dir() and not any(q.suffix.lower() in video.VIDEO_EXTENSIONS for q in v.iterdir()):
                raise UserError(f"--eval-videos {v} {'holds no videos' if v.exists() else 'does not exist'}; "
                                "give video files or folders of videos (not searched recursively).")
        if args.eval_steps < 1 or args.eval_frames < 2:
            raise UserError("--eval-steps must be at least 1 and --eval-frames at least 2.")
    if args.target == "unet" and not args.vae:
        raise UserError("--target unet needs --vae FILE (an m3ddm vae file, e.g. `python weights_convert.py vae "
                        "SD15_VAE vae.safetensors`).")
    if args.init and args.config:
        raise UserError("give either --init FILE (fine-tune) or --config (train from scratch), not both.")
    if args.target == "unet" and not (args.init or args.config or args.resume):
        raise UserError("give --init FILE (fine-tune converted weights) or --config tiny|small|full|demo|FILE.json "
                        "(train from scratch).")
    for name in ("p_uncond_local", "p_uncond_global"):
        if getattr(args, name) is not None and not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}.")
    if args.target == "vae":
        args.global_frames = 0  # a VAE trains on frames only
    if args.crop_scale[0] <= 0 or args.crop_scale[0] > args.crop_scale[1] or args.crop_scale[1] > 1:
        raise UserError(f"--crop-scale {args.crop_scale} is not 0 < MIN <= MAX <= 1; give e.g. 0.08 1.0.")


# args that change the data stream or the model: a resumed run must use the same ones
RESUME_FIXED = ("target", "batch_size", "grad_accum", "size", "frames", "global_frames", "max_stride", "crop",
                "crop_scale", "mask_strategy", "mask_global_frames", "p_uncond_local", "p_uncond_global", "seed",
                "ema")


# ---------------------------------------------------------------------------------------------------
# Training


def setup_distributed(args):
    world = distributed.setup(args.device)  # cuda:LOCAL_RANK per rank, process group with a long timeout
    return world.rank, world.size, world.device


def build_model(args, device, resume_dir):
    """(trainable model, its config, sources metadata)."""
    if args.target == "unet":
        if resume_dir is not None:
            path = resume_dir / "unet.safetensors"
            model, sources = load_unet(path, device, torch.float32), [{"name": str(path), "sha256": sha256_file(path)}]
        elif args.init:
            kind, _, _ = read_header(args.init)
            if kind != "unet":
                raise UserError(f"--init {args.init} holds a {kind}, not a unet; give an m3ddm unet file.")
            model = load_unet(args.init, device, torch.float32)
            sources = [{"name": os.path.basename(args.init), "sha256": sha256_file(args.init)}]
        else:
            with torch.random.fork_rng(devices=[]):  # a reproducible init without touching the caller's RNG
                torch.manual_seed(args.seed)
                model, sources = UNet3D(config_from(args.config, UNET_PRESETS, UNet3DConfig, "--config")).to(device), []
        model.gradient_checkpointing = args.gradient_checkpointing
        model.set_attention(args.attention)
    else:
        if resume_dir is not None:
            model = load_vae(resume_dir / "vae.safetensors", device, torch.float32)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                model = AutoencoderKL(config_from(args.vae_config, VAE_PRESETS, VAEConfig, "--vae-config")).to(device)
        sources = []
    return model.train(), model.config, sources


def frozen_vae(args, device, precision):
    vae = load_vae(args.vae, device, precision if device.type == "cuda" and precision != torch.float32 else
                   torch.float32)
    if vae.factor != 8:
        raise UserError(f"--vae {args.vae} downsamples by {vae.factor}, the UNet needs a factor-8 VAE; "
                        "give an SD-1.5-shaped VAE.")
    return vae.eval().requires_grad_(False)


def run_validation(model, objective, val_loader, autocast):
    if val_loader is None:
        return None
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in val_loader:
            if "error" in batch:
                raise UserError(f"validation data: {batch['error']}.")
            losses.append(objective.loss(model, batch, autocast).item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def write_sample(path, unet, vae, item, args, device):
    """Outpaint one fixed clip with the live UNet (PNDM, --sample-steps, guidance 2 / 4, guides none) and write
    [masked input | output | ground truth] side by side as an mp4 (temporary name, then rename)."""
    from m3ddm.sampler import assemble_conditioning, clip_noise, denoise_clip, encode_global_context
    from m3ddm.schedulers import PNDMScheduler
    was_training = unet.training
    unet.eval()
    dtype = next(vae.parameters()).dtype
    f = args.frames
    cond_px = item["clip"] * (1 - item["mask"][0][None, None]) - item["mask"][0][None, None]  # one mask, no guides
    z = vae.encode_latents(torch.cat([cond_px, item["global"]]).to(device, dtype), batch=args.vae_batch).float()
    masked = z[:f].transpose(0, 1)[None]  # (1, 4, F, h, w)
    black = black_latent(vae, args.size, device, dtype)[None]  # (1, 4, h, w)
    conditioning = assemble_conditioning(masked, black, M.latent_mask(item["mask"][0]).to(device), [None] * f)
    context = encode_global_context(unet, z[f:])
    noise = clip_noise(args.seed, masked.shape, device)
    latents = denoise_clip(unet, PNDMScheduler(args.sample_steps), masked, noise, conditioning, context,
                           item["fps"], guidance_local=2.0, guidance_global=4.0 if args.global_frames else 1.0)
    out = vae.decode_latents(latents[0].transpose(0, 1).to(dtype), batch=args.vae_batch).float().cpu()
    panels = torch.cat([cond_px, out, item["clip"]], dim=3)  # (F, 3, S, 3S)
    frames = ((panels.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with video.VideoWriter(path, frames.shape[2], frames.shape[1], 8) as writer:
        writer.write(frames)
    unet.train(was_training)


EVAL_METRICS = ("psnr", "psnr_band", "ssim", "ssim_band")


def run_evaluation(args, unet_file, step, device, log):
    """evaluate.py on --eval-videos with this checkpoint (a subprocess: no CLI module is imported here).
    Returns the whole-frame and band PSNR/SSIM averaged over crop ratios, or None after one warning line."""
    out = Path(args.out) / "eval" / f"step-{step:07d}"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "evaluate.py"), *args.eval_videos,
           "--out", str(out), "--method", "model", "--unet", str(unet_file), "--vae", str(args.vae),
           "--size", str(args.size), "--frames", str(args.eval_frames), "--steps", str(args.eval_steps),
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


def train(args):
    check_args(args)
    rank, world, device = setup_distributed(args)
    distributed.set_tf32(args.tf32)
    is_main = rank == 0
    out = Path(args.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    resume_dir, state = None, None
    if args.resume:
        resume_dir = latest_checkpoint(args.resume)
        state = torch.load(resume_dir / STATE_FILE, map_location="cpu", weights_only=True)
        changed = [k for k in RESUME_FIXED if getattr(args, k) is not None
                   and json.dumps(state["args"].get(k)) != json.dumps(getattr(args, k))]
        if changed:
            raise UserError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ from the "
                            "checkpoint's run; give the same values to continue it exactly.")

    # condition-dropout defaults: 0 when fine-tuning (as the reference), 0.1 from scratch
    for name in ("p_uncond_local", "p_uncond_global"):
        if getattr(args, name) is None:
            setattr(args, name, state["args"][name] if state is not None else 0.0 if args.init else 0.1)
    precision = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.precision]
    autocast = (torch.autocast(device.type, dtype=precision) if precision != torch.float32 else nullcontext())

    train_videos, val_videos = split_videos(args.data)
    if args.val_data:
        val_videos = find_videos(args.val_data)
    model, config, sources = build_model(args, device, resume_dir)
    if args.target == "unet":
        vae = frozen_vae(args, device, precision)
        sources = sources + [{"name": os.path.basename(args.vae), "sha256": sha256_file(args.vae)}]
        objective = UNetObjective(vae, args, device)
    else:
        vae, objective = None, VAEObjective(model, args, device)
    core = model if args.target == "unet" else VAEWithLoss(model)  # what the loss calls

    ema = EMA(model, args.ema) if args.ema > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        step = int(state["step"])
    skipped_seen = set(state["skipped"]) if state is not None else set()

    train_model = core
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    per_step = args.batch_size * args.grad_accum
    remaining = max(args.max_steps - step, 0)
    dataset = ClipDataset(train_videos, args, TRAIN_STREAM, rank, world)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=ClipSampler(step * per_step, remaining * per_step),
                        num_workers=args.num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        prefetch_factor=2 if args.num_workers else None)
    val_loader = None
    if args.val_every and val_videos and is_main:
        val_set = ClipDataset(val_videos, args, VAL_STREAM, 0, 1)
        val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=ClipSampler(0, args.val_clips),
                                num_workers=0, collate_fn=collate)

    sample_item = None
    if args.sample_every and args.target == "unet" and is_main:  # a fixed clip: the first one of the val stream
        sample_item = ClipDataset(val_videos or train_videos, args, VAL_STREAM, 0, 1)[0]
        if "error" in sample_item:
            raise UserError(f"sample clip: {sample_item['error']}.")
    log = Logger(out, is_main, args.max_steps, step)
    log.message(f"training {args.target} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                f"{len(train_videos)} videos, {world} process(es), device {device}, precision {precision}, "
                f"from step {step}")
    if args.val_every and not val_videos:
        log.message("no validation videos (no val/ folder and no --val-data): validation is off")

    def checkpoint(at_step):
        if is_main:
            st = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict(), "ema": ema.shadow if ema is not None else {},
                  "step": at_step, "samples_per_rank": at_step * per_step, "world_size": world,
                  "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                  "skipped": sorted(skipped_seen)}
            path = save_checkpoint(out, at_step, model, config, st, ema, args, sources)
            log.message(f"checkpoint {path}")
            if args.eval_videos and args.target == "unet":
                result = run_evaluation(args, path / model_filename(args.target), at_step, device, log)
                if result is not None:
                    log.record(step=at_step, eval=result)
        if world > 1:
            dist.barrier()

    batches = iter(loader)
    t_last = time.time()
    while step < args.max_steps:
        losses, data_log = [], []
        for micro in range(args.grad_accum):
            batch = next(batches)
            for path, reason in batch["skipped"]:
                if path not in skipped_seen:
                    skipped_seen.add(path)
                    log.message(f"warning: skipped {path} ({reason}); {len(skipped_seen)} video(s) skipped so far")
            if "error" in batch:
                raise UserError(f"training data: {batch['error']}.")
            sync = micro == args.grad_accum - 1 or world == 1
            with (nullcontext() if sync or not hasattr(train_model, "no_sync") else train_model.no_sync()):
                loss = objective.loss(train_model, batch, autocast)
                scaler.scale(loss / args.grad_accum).backward()
            losses.append(loss.detach())
            data_log += [[v, int(s), int(st)] for v, s, st in zip(batch["video"], batch["start"], batch["stride"])]
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else
                                                   float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1

        loss_value = torch.stack(losses).mean()
        if world > 1:
            dist.all_reduce(loss_value)
            loss_value /= world
        gathered = None
        if args.log_data:
            gathered = [None] * world
            if world > 1:
                dist.all_gather_object(gathered, data_log)
            else:
                gathered = [data_log]
        now = time.time()
        clips_per_s = per_step * world / max(now - t_last, 1e-9)
        t_last = now
        rec = {"step": step, "loss": loss_value.item(), "lr": lr, "grad_norm": float(grad_norm),
               "clips_per_s": clips_per_s, "elapsed_s": now - log.t0, "skipped_videos": len(skipped_seen)}
        if gathered is not None:
            rec["data"] = gathered
        log.record(**rec)
        if step % args.log_every == 0 or step == args.max_steps or step == 1:
            log.progress(step, rec["loss"], lr, clips_per_s, final=step == args.max_steps)
        if args.val_every and step % args.val_every == 0 and val_loader is not None:
            val = run_validation(core, objective, val_loader, autocast)
            log.record(step=step, val_loss=val)
            log.message(f"step {step} validation loss {val:.4f}")
        if args.sample_every and step % args.sample_every == 0 and is_main and sample_item is not None:
            with autocast:  # the fp32 training model samples in the training precision (bf16 on CUDA)
                write_sample(out / "samples" / f"step-{step:07d}.mp4", model, vae, sample_item, args, device)
        if step < args.max_steps and args.save_every and step % args.save_every == 0:
            checkpoint(step)
    checkpoint(step)
    log.record(step=step, done=True, skipped_videos=len(skipped_seen))
    if world > 1:
        dist.destroy_process_group()
    return out / model_filename(args.target)


def main(argv=None):
    try:
        args = parse_args(argv)
        path = train(args)
    except UserError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
