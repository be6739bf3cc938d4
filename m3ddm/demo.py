"""The demo model's recipe helpers (`make demo-weights`, `make sample`): data split, VAE latent rescale,
fp16 export, preview image. Run as `python -m m3ddm.demo CMD ...`.

    python -m m3ddm.demo split CACHE DATA [--extra DIR ...]
        DATA/train and DATA/val as symlinks to the clips in CACHE (and in each extra DIR, training only);
        the held-out clips go to val/.
    python -m m3ddm.demo synth PHOTOS OUT [--frames 64] [--seed 0] [--blur SIGMA]
        One synthetic camera-motion clip per still photograph in PHOTOS (smooth pan / zoom / slight
        rotation / handheld jitter, sub-pixel bilinear sampling), written as OUT/synth_NAME.mp4 (256x144,
        25 fps). Deterministic per photo name and seed; clips already present are kept. --blur SIGMA: the
        photograph low-passed first (Gaussian, SIGMA output pixels at the mid zoom), as OUT/synth_blurSIGMA_NAME.mp4:
        scenes whose large areas are smooth, as walls and skies are, which the photographs rarely show.
    python -m m3ddm.demo vae-l1 VAE VIDEOS... [--size 128] [--frames 16]
        Held-out reconstruction L1 (in [-1, 1], posterior mean) on the first frames of each video at the
        evaluation resolution (long side --size), as evaluate.py prepares them.
    python -m m3ddm.demo rescale VAE_IN VAE_OUT DATA
        Rescale the trained VAE's latent space (exactly: decode(encode(x)) is unchanged) so that the
        posterior samples times 0.18215 have unit standard deviation per channel on the training frames,
        as the diffusion schedule expects (the pipeline hard-codes SD-1.5's 0.18215).
    python -m m3ddm.demo export --vae F --vae-run DIR --unet-run DIR --data DATA --assets DIR
                                [--data-sums FILE] --vae-command S --unet-command S --wall-s N
        fp16 copies as ASSETS/demo_vae.safetensors and ASSETS/demo_unet.safetensors, with the training
        command, data list (names + sha256, photographs included), steps and losses in their metadata.
        The UNet is the checkpoint of the run with the highest held-out band PSNR in its metrics.jsonl
        (train.py --eval-videos; its EMA weights when the run had --ema); the VAE's held-out L1 is recorded.
    python -m m3ddm.demo preview TRUTH INPUT OUTPUT PNG [--frames 3] [--width 192]
        A grid, one row per frame: ground truth | input (centred on black at the output's shape) | output.
"""
import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cli
from .data import center_square_box, crop_resize
from .errors import UserError
from .files import create_temp
from .vae import LATENT_SCALE
from .video import VIDEO_EXTENSIONS, probe, read_frames_at
from .weights import load_unet, load_vae, read_header, save_model, sha256_file

HELD_OUT = ("kivy_cityCC0.mpg", "opencv_cup.mp4")


# ---------------------------------------------------------------------------------------------------
# split


def video_files(folder):
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder; run `make videos` (or `bash tests/fetch_demo_data.sh`) first.")
    return sorted(p for p in Path(folder).resolve().iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)


def split(cache, data, extra=()):
    cache, data = Path(cache).resolve(), Path(data)
    clips = video_files(cache)
    missing = [name for name in HELD_OUT if not (cache / name).is_file()]
    if not clips or missing:
        raise UserError(f"{cache} lacks the clips (missing {missing or 'all'}); run `make videos` first.")
    for folder in extra:
        found = [p for p in video_files(folder) if p.name not in HELD_OUT]
        if not found:
            raise UserError(f"--extra {folder} holds no videos; run `bash tests/fetch_demo_data.sh` first.")
        clips += found
    for sub in ("train", "val"):
        (data / sub).mkdir(parents=True, exist_ok=True)
        for old in (data / sub).iterdir():
            if old.is_symlink():
                old.unlink()
    for clip in clips:
        link = data / ("val" if clip.name in HELD_OUT else "train") / clip.name
        link.symlink_to(clip)
    print(f"{data}: {len(clips) - len(HELD_OUT)} training clips, held out {', '.join(HELD_OUT)}")


# ---------------------------------------------------------------------------------------------------
# synth: camera motion over still photographs

SYNTH_W, SYNTH_H, SYNTH_FPS = 256, 144, 25
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
MOTIONS = ("static", "pan", "zoom", "combo")
MOTION_WEIGHTS = (0.15, 0.45, 0.15, 0.25)


def load_photo(path):
    """float (3, H, W) in [0, 255]: grey is repeated, alpha dropped."""
    import imageio.v3 as iio
    im = np.asarray(iio.imread(path))
    if im.ndim == 2:
        im = im[:, :, None]
    im = np.repeat(im[:, :, :1], 3, axis=2) if im.shape[2] < 3 else im[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()


def _rand(g, low=0.0, high=1.0):
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def view_corners(cx, cy, half_h, angle):
    """(F, 4, 2) photo coordinates of the rotated 16:9 view's corners."""
    half_w = half_h * SYNTH_W / SYNTH_H
    u = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    x, y = u[:, 0] * half_w[:, None], u[:, 1] * half_h[:, None]  # (F, 4)
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    return torch.stack([cx[:, None] + c * x - s * y, cy[:, None] + s * x + c * y], dim=-1)


def draw_trajectory(height, width, frames, g):
    """(cx, cy, half_h, angle), each float64 (F,), photo pixels / radians: a smooth camera path whose view
    stays inside the photo. Start and end poses are drawn, the path between them is eased, then a small
    handheld wobble (sum of three slow sinusoids, under half an output pixel) is added."""
    motion = MOTIONS[int(torch.multinomial(torch.tensor(MOTION_WEIGHTS), 1, generator=g))]
    fit = min(height, width * SYNTH_H / SYNTH_W) / 2  # the largest half-height of an upright view
    t = torch.linspace(0, 1, frames, dtype=torch.float64)
    for attempt in range(40):
        shrink = 0.85 ** attempt
        h0 = fit * _rand(g, 0.45, 0.8)
        pan = shrink * _rand(g, 0.1, 0.6) * h0 * 2 * SYNTH_W / SYNTH_H if motion in ("pan", "combo") else 0.0
        zoom = math.exp(shrink * _rand(g, -0.25, 0.25)) if motion in ("zoom", "combo") else 1.0
        turn = math.radians(shrink * _rand(g, -4, 4)) if motion == "combo" else 0.0
        direction = _rand(g, 0, 2 * math.pi)
        cx0, cy0 = _rand(g, 0, width), _rand(g, 0, height)
        ease = _rand(g, -0.6, 0.6)
        tau = t + ease * t * (1 - t)
        wobble = [sum(_rand(g, 0.05, 0.25) * h0 / SYNTH_H * torch.sin(2 * math.pi * _rand(g, 0.3, 2.0) * t
                                                                       + _rand(g, 0, 2 * math.pi))
                      for _ in range(3)) for _ in range(2)]
        cx = cx0 + pan * math.cos(direction) * tau + wobble[0]
        cy = cy0 + pan * math.sin(direction) * tau + wobble[1]
        half_h = h0 * zoom ** tau
        angle = turn * tau + _rand(g, -0.5, 0.5) * math.radians(0.2) * torch.sin(math.pi * t)
        corners = view_corners(cx, cy, half_h, angle)
        if (corners[..., 0].min() >= 0 and corners[..., 0].max() <= width - 1 and corners[..., 1].min() >= 0
                and corners[..., 1].max() <= height - 1):
            return motion, (cx, cy, half_h, angle)
    h0 = torch.full_like(t, fit * 0.6)  # fall back to a still, centred view
    return "static", (torch.full_like(t, width / 2), torch.full_like(t, height / 2), h0, torch.zeros_like(t))


def render_view(photo, cx, cy, half_h, angle):
    """Bilinear sub-pixel sampling of one view per frame: uint8 (F, SYNTH_H, SYNTH_W, 3)."""
    _, height, width = photo.shape
    ys = (torch.arange(SYNTH_H, dtype=torch.float64) + 0.5 - SYNTH_H / 2) / (SYNTH_H / 2)  # [-1, 1] in the view
    xs = (torch.arange(SYNTH_W, dtype=torch.float64) + 0.5 - SYNTH_W / 2) / (SYNTH_W / 2)
    vy, vx = torch.meshgrid(ys, xs, indexing="ij")  # (H, W)
    out = []
    for k in range(len(cx)):
        x, y = vx * half_h[k] * SYNTH_W / SYNTH_H, vy * half_h[k]
        c, s = math.cos(angle[k]), math.sin(angle[k])
        px, py = cx[k] + c * x - s * y, cy[k] + s * x + c * y  # photo pixel coordinates
        grid = torch.stack([(2 * px + 1) / width - 1, (2 * py + 1) / height - 1], dim=-1)  # align_corners=False
        frame = F.grid_sample(photo[None], grid[None].float(), mode="bilinear", align_corners=False)
        out.append(frame[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
    return torch.stack(out).numpy()


def gaussian_blur(image, sigma):
    """float (C, H, W) -> the same, low-passed by a separable Gaussian (reflected borders)."""
    channels, height, width = image.shape
    radius = max(1, min(math.ceil(3 * sigma), height - 1, width - 1))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).expand(channels, 1, -1)
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps[:, :, None, :], groups=channels)     # along the width
    return F.conv2d(x, taps[:, :, :, None], groups=channels)[0]  # along the height


def synth_name(photo, blur=0.0):
    return f"synth_{f'blur{blur:g}_' if blur else ''}{Path(photo).stem}.mp4"


def synth_clip(path, frames, seed, blur=0.0):
    """(motion name, uint8 (F, SYNTH_H, SYNTH_W, 3)) for one photo; deterministic per (photo name, blur, seed)."""
    key = synth_name(path, blur) if blur else Path(path).name  # sharp clips keep their seeds from before --blur
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    photo = load_photo(path)
    # prefilter: scale the photo so that a mid-zoom view samples about 1.1 photo pixels per output pixel
    _, height, width = photo.shape
    fit = min(height, width * SYNTH_H / SYNTH_W)
    scale = min(1.0, 1.1 * SYNTH_H / (0.6 * fit))
    if scale < 1.0:
        size = (max(2, round(height * scale)), max(2, round(width * scale)))
        photo = F.interpolate(photo[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if blur:
        fit = min(photo.shape[1], photo.shape[2] * SYNTH_H / SYNTH_W)
        photo = gaussian_blur(photo, blur * 1.2 * fit / SYNTH_H)  # a mid-zoom view is 1.2 fit photo pixels high
    motion, path_ = draw_trajectory(photo.shape[1], photo.shape[2], frames, g)
    return motion, render_view(photo, *path_)


def synth(folder, out, frames=64, seed=0, blur=0.0):
    from .video import VideoWriter
    photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_EXTENSIONS)
    if not photos:
        raise UserError(f"{folder} holds no photographs; run `bash tests/fetch_demo_data.sh` first.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = 0
    for i, photo in enumerate(photos):
        target = out / synth_name(photo, blur)
        if target.exists():
            continue
        motion, clip = synth_clip(photo, frames, seed, blur)
        with VideoWriter(target, SYNTH_W, SYNTH_H, SYNTH_FPS) as writer:
            writer.write(clip)
        made += 1
        print(f"[{i + 1}/{len(photos)}] {target.name}: {motion}", file=sys.stderr, flush=True)
    print(f"{out}: {made} synthetic clips written, {len(photos) - made} already present")


# ---------------------------------------------------------------------------------------------------
# vae-l1: held-out reconstruction


def eval_frames(path, size=128, frames=16):
    """The first frames at the evaluation resolution (evaluate.py: long side size, short side a multiple of
    8, centre crop), float (F, 3, H, W) in [-1, 1]."""
    from .canvas import resize_antialias
    info = probe(path)
    x = torch.from_numpy(read_frames_at(path, list(range(min(frames, info.num_frames))), info)).permute(0, 3, 1, 2)
    w0, h0 = info.width, info.height
    w, h = (size, max(8, int(size * h0 / w0) // 8 * 8)) if w0 >= h0 else (max(8, int(size * w0 / h0) // 8 * 8), size)
    scale = max(w / w0, h / h0)
    sh, sw = max(h, round(h0 * scale)), max(w, round(w0 * scale))
    x = resize_antialias(x.float(), (sh, sw)).round().clamp(0, 255)
    top, left = (sh - h) // 2, (sw - w) // 2
    return x[:, :, top:top + h, left:left + w] / 127.5 - 1.0


@torch.no_grad()
def vae_l1(vae_file, videos, size=128, frames=16):
    """{video name: mean |decode(encode(x).mean) - x|} in [-1, 1] units, plus "mean" over the videos."""
    vae = load_vae(vae_file, "cpu", torch.float32).eval()
    result = {}
    for v in videos:
        x = eval_frames(v, size, frames)
        recon = vae.decode(vae.encode(x, batch=8).mean, batch=8).clamp(-1, 1)
        result[Path(v).name] = float((recon - x).abs().mean())
    result["mean"] = sum(result.values()) / len(result)
    return result


def data_list(data, sub, skip=frozenset()):
    """[{name, sha256}] of the clips in data/sub, but for the names in `skip` (not hashed)."""
    return [{"name": p.name, "sha256": sha256_file(p)} for p in sorted((Path(data) / sub).iterdir())
            if p.suffix.lower() in VIDEO_EXTENSIONS and p.name not in skip]


# ---------------------------------------------------------------------------------------------------
# rescale


def centre_frames(path, count=12, size=128):
    """count frames spread over the clip, centre square, resized to size: float (count, 3, size, size) in [-1, 1]."""
    info = probe(path)
    idx = np.linspace(0, info.num_frames - 1, count).round().astype(int).tolist()
    frames = read_frames_at(path, idx, info)  # (K, H, W, 3) uint8
    return crop_resize(frames, center_square_box(*frames.shape[1:3]), size)


@torch.no_grad()
def latent_std(vae, videos):
    """(C,) standard deviation of posterior samples (what train.py's UNet objective encodes, sample=True):
    sqrt(variance of the means + mean posterior variance). A channel the decoder barely uses keeps a
    posterior close to N(0, 1); scaling by the means alone would blow its sampling noise up."""
    posts = [vae.encode(centre_frames(v), batch=4) for v in videos]
    means = torch.cat([p.mean for p in posts]).transpose(0, 1).flatten(1)  # (C, N*h*w)
    noise_var = torch.cat([p.var for p in posts]).transpose(0, 1).flatten(1).mean(dim=1)  # (C,)
    return (means.var(dim=1) + noise_var).sqrt()


@torch.no_grad()
def scale_latents(vae, factor):
    """New latents = factor * old latents (per channel), with the decoder compensating exactly."""
    c = vae.config.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:c] *= factor[:, None, None, None]
    qc.bias[:c] *= factor
    qc.bias[c:] += 2.0 * torch.log(factor)  # logvar of the scaled posterior
    pqc.weight /= factor[None, :, None, None]


def rescale(vae_in, vae_out, data):
    vae = load_vae(vae_in, "cpu", torch.float32).eval()
    videos = sorted(p for p in (Path(data) / "train").iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    std = latent_std(vae, videos)
    factor = 1.0 / (LATENT_SCALE * std)
    scale_latents(vae, factor)
    new_std = latent_std(vae, videos[:1]) * LATENT_SCALE
    _, config, meta = read_header(vae_in)
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "kind", "config")}
    meta["latent_rescale"] = json.dumps([round(float(f), 6) for f in factor])
    save_model(vae_out, vae.state_dict(), "vae", vae.config, metadata=meta)
    print(f"latent std before {std.tolist()} -> scale factors {factor.tolist()}; "
          f"scaled std on {videos[0].name}: {new_std.tolist()}")


# ---------------------------------------------------------------------------------------------------
# export


def run_records(run):
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; train first (make demo-weights).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_losses(run):
    """(last step, mean loss of the last 20 logged steps, last validation loss or None) of a train.py run."""
    records = run_records(run)
    steps = [r for r in records if "loss" in r and "step" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    if not steps:
        raise UserError(f"{run}/metrics.jsonl has no training steps; train first.")
    tail = [r["loss"] for r in steps[-20:]]
    return steps[-1]["step"], sum(tail) / len(tail), (vals[-1] if vals else None)


def best_checkpoint(run, metric="psnr_band"):
    """(weights file, its eval record) of the checkpoint with the highest held-out `metric` that train.py
    --eval-videos logged to metrics.jsonl (the EMA weights when the run had --ema), among those still on disk."""
    evals = [r for r in run_records(run) if "eval" in r]
    found = [(r, Path(run) / f"checkpoint-{r['step']:07d}" / r.get("eval_weights", "unet.safetensors"))
             for r in evals]
    found = [(r, f) for r, f in found if f.is_file()]
    if not found:
        raise UserError(f"{run} has no evaluated checkpoint on disk; train with --eval-videos and "
                        "--keep-checkpoints 0 (keep all).")
    record, path = max(found, key=lambda rf: (rf[0]["eval"][metric], -rf[0]["step"]))
    return path, record


def eval_sampler(run, step):
    """'pndm 20 steps, guidance 1.0 / 1.0': how train.py's evaluation of checkpoint `step` sampled (evaluate.py's
    summary.json), or 'sampler not recorded' when that evaluation's folder is gone."""
    path = Path(run) / "eval" / f"step-{step:07d}" / "summary.json"
    if not path.is_file():
        return "sampler not recorded"
    o = json.loads(path.read_text())["model"]["options"]
    return f"{o['scheduler']} {o['steps']} steps, guidance {o['guidance_local']} / {o['guidance_global']}"


def photo_list(sums_file):
    """[{name, sha256}] of the photographs behind the synthetic clips, from tests/demo_data.sha256."""
    rows = [line.split() for line in Path(sums_file).read_text().splitlines() if line.strip()]
    return [{"name": name, "sha256": digest} for digest, name in rows if name.startswith("photos/")]


def training_clips(data, extra_train):
    """data/train's clips, then those of each --extra-train folder not already listed by name (it may link them)."""
    clips = data_list(data, "train")
    for folder in extra_train:
        clips += data_list(folder, ".", skip={c["name"] for c in clips})
    return clips


def training_metadata(run, command, data, wall_s, sums_file, extra_train=()):
    step, loss, val = final_losses(run)
    return {"demo": "m3ddm demo model: a small model trained on a 2-core CPU, not the official M3DDM+",
            "training_command": command, "data": training_clips(data, extra_train),
            "held_out": data_list(data, "val"),
            "photos": photo_list(sums_file) if sums_file else [],
            "steps": str(step), "final_loss": f"{loss:.4f}", "final_val_loss": "" if val is None else f"{val:.4f}",
            "demo_weights_wall_s": str(int(wall_s)), "trained_by": "m3ddm train.py (make demo-weights)"}


def export(a):
    assets = Path(a.assets)
    assets.mkdir(parents=True, exist_ok=True)
    unet_file, best = best_checkpoint(a.unet_run)
    held_out = [p for p in sorted((Path(a.data) / "val").iterdir()) if p.suffix.lower() in VIDEO_EXTENSIONS]
    vae_extra = {"held_out_l1": json.dumps({k: round(v, 4) for k, v in vae_l1(a.vae, held_out).items()})}
    unet_extra = {"selected_step": str(best["step"]), "selected_weights": best.get("eval_weights", ""),
                  "selected_by": "highest held-out band PSNR (train.py --eval-videos, crop 0.25, "
                                 f"{eval_sampler(a.unet_run, best['step'])}) of all checkpoints",
                  "selected_eval": json.dumps({k: round(v, 4) for k, v in best["eval"].items()})}
    for kind, path, run, command, extra in (("vae", a.vae, a.vae_run, a.vae_command, vae_extra),
                                            ("unet", unet_file, a.unet_run, a.unet_command, unet_extra)):
        model = (load_vae if kind == "vae" else load_unet)(path, "cpu", torch.float32)
        _, _, meta = read_header(path)
        extra = {**extra, **{k: meta[k] for k in ("latent_rescale", "ema_decay") if k in meta}}
        out = assets / f"demo_{kind}.safetensors"
        digest = save_model(out, model.state_dict(), kind, model.config, dtype=torch.float16,
                            metadata={**training_metadata(run, command, a.data, float(a.wall_s), a.data_sums,
                                                          a.extra_train if kind == "unet" else ()), **extra})
        step, loss, val = final_losses(run)
        print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, sha256 {digest[:12]}, from {path}, trained {step} steps, "
              f"final loss {loss:.4f}, val {val}, {extra.get('held_out_l1') or extra.get('selected_eval')}")


# ---------------------------------------------------------------------------------------------------
# preview


def fit_panel(frames, width, height):
    """uint8 (K, H, W, 3) -> uint8 (K, height, width, 3), antialiased resize."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def input_panel(frames, width, height):
    """The input clip at the output's scale, centred on a black panel of the output's shape."""
    h, w = frames.shape[1:3]
    scale = height / h
    inner_w = min(width, int(round(w * scale)))
    panel = np.zeros((len(frames), height, width, 3), np.uint8)
    left = (width - inner_w) // 2
    panel[:, :, left:left + inner_w] = fit_panel(frames, inner_w, height)
    return panel


def preview(truth, source, output, png, count=3, width=192, quiet=False):
    import imageio.v3 as iio
    out_info = probe(output)
    height = int(round(width * out_info.height / out_info.width))
    n = min(probe(truth).num_frames, probe(source).num_frames, out_info.num_frames)
    idx = np.linspace(0, n - 1, count + 2)[1:-1].round().astype(int).tolist()
    columns = [fit_panel(read_frames_at(truth, idx), width, height),
               input_panel(read_frames_at(source, idx), width, height),
               fit_panel(read_frames_at(output, idx, out_info), width, height)]
    gap = np.full((count, height, 4, 3), 255, np.uint8)
    rows = np.concatenate([columns[0], gap, columns[1], gap, columns[2]], axis=2)  # (count, height, W, 3)
    grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)]) for r in rows])[:-4]
    png = Path(png)
    tmp = create_temp(png, suffix=".png")
    iio.imwrite(tmp, grid)
    os.replace(tmp, png)
    if not quiet:
        print(png.resolve())


def check_args(a):
    """One rule per numeric option of the subcommands; bad values end in one error line (cli.run)."""
    rules = {"frames": ("at least 1", lambda v: v >= 1), "blur": ("a finite number >= 0", lambda v: 0 <= v < math.inf),
             "width": ("a positive even number", lambda v: v > 0 and v % 2 == 0),
             "size": ("a positive multiple of 8", lambda v: v > 0 and v % 8 == 0)}
    for name, (rule, ok) in rules.items():
        value = getattr(a, name, None)
        if value is not None and not ok(value):
            raise UserError(f"{a.cmd} --{name} {value} must be {rule}; give such a value.")
    for name in ("truth", "source", "output", "vae", "vae_in"):
        path = getattr(a, name, None)
        if path is not None and not Path(path).is_file():
            raise UserError(f"{a.cmd}: {path} does not exist; check the path.")
    folders = ("photos", "data") if a.cmd in ("synth", "rescale") else ()
    for name in folders:
        path = getattr(a, name, None)
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{a.cmd}: {path} is not a folder; run `bash tests/fetch_demo_data.sh` (or "
                            "`python -m m3ddm.demo split`) first.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("cache")
    s.add_argument("data")
    s.add_argument("--extra", nargs="*", default=[], help="more clip folders, training only")
    y = sub.add_parser("synth")
    y.add_argument("photos")
    y.add_argument("out")
    y.add_argument("--frames", type=int, default=64)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--blur", type=float, default=0.0, help="Gaussian sigma in output pixels (0 = sharp)")
    q = sub.add_parser("vae-l1")
    q.add_argument("vae")
    q.add_argument("videos", nargs="+")
    q.add_argument("--size", type=int, default=128)
    q.add_argument("--frames", type=int, default=16)
    r = sub.add_parser("rescale")
    r.add_argument("vae_in")
    r.add_argument("vae_out")
    r.add_argument("data")
    e = sub.add_parser("export")
    for name in ("vae", "vae-run", "unet-run", "data", "assets", "vae-command", "unet-command", "wall-s"):
        e.add_argument(f"--{name}", required=True)
    e.add_argument("--data-sums", help="tests/demo_data.sha256: the photographs' names and sha256")
    e.add_argument("--extra-train", nargs="*", default=[], help="folders of clips the UNet also trained on")
    b = sub.add_parser("best", help="print the weights file of a run's best evaluated checkpoint")
    b.add_argument("run")
    v = sub.add_parser("preview")
    for name in ("truth", "source", "output", "png"):
        v.add_argument(name)
    v.add_argument("--frames", type=int, default=3)
    v.add_argument("--width", type=int, default=192)
    a = p.parse_args(argv)

    def body():
        check_args(a)
        if a.cmd == "split":
            split(a.cache, a.data, a.extra)
        elif a.cmd == "synth":
            synth(a.photos, a.out, a.frames, a.seed, a.blur)
        elif a.cmd == "vae-l1":
            print(json.dumps(vae_l1(a.vae, a.videos, a.size, a.frames)))
        elif a.cmd == "best":
            print(best_checkpoint(a.run)[0])
        elif a.cmd == "preview":
            preview(a.truth, a.source, a.output, a.png, a.frames, a.width)
        elif a.cmd == "rescale":
            rescale(a.vae_in, a.vae_out, a.data)
        else:
            export(a)
    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
