"""The demo model's recipe helpers (`make demo-weights`, `make sample`): data split, VAE latent rescale,
fp16 export, preview image. Run as `python -m m3ddm.demo CMD ...`.

    python -m m3ddm.demo split CACHE DATA
        DATA/train and DATA/val as symlinks to the clips in CACHE; the held-out clips go to val/.
    python -m m3ddm.demo rescale VAE_IN VAE_OUT DATA
        Rescale the trained VAE's latent space (exactly: decode(encode(x)) is unchanged) so that the
        latents times 0.18215 have unit standard deviation per channel on the training frames, as the
        diffusion schedule expects (the pipeline hard-codes SD-1.5's 0.18215).
    python -m m3ddm.demo export --vae F --unet F --vae-run DIR --unet-run DIR --data DATA
                                        --assets DIR --vae-command S --unet-command S --wall-s N
        fp16 copies as ASSETS/demo_vae.safetensors and ASSETS/demo_unet.safetensors, with the training
        command, data list (names + sha256), steps and final losses in their metadata.
    python -m m3ddm.demo preview TRUTH INPUT OUTPUT PNG [--frames 3] [--width 192]
        A grid, one row per frame: ground truth | input (centred on black at the output's shape) | output.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cli
from .data import center_square_box, crop_resize
from .errors import UserError
from .vae import LATENT_SCALE
from .video import VIDEO_EXTENSIONS, probe, read_frames_at
from .weights import load_unet, load_vae, read_header, save_model, sha256_file

HELD_OUT = ("kivy_cityCC0.mpg", "opencv_cup.mp4")


# ---------------------------------------------------------------------------------------------------
# split


def split(cache, data):
    cache, data = Path(cache).resolve(), Path(data)
    clips = sorted(p for p in cache.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    missing = [name for name in HELD_OUT if not (cache / name).is_file()]
    if not clips or missing:
        raise UserError(f"{cache} lacks the clips (missing {missing or 'all'}); run `make videos` first.")
    for sub in ("train", "val"):
        (data / sub).mkdir(parents=True, exist_ok=True)
        for old in (data / sub).iterdir():
            if old.is_symlink():
                old.unlink()
    for clip in clips:
        link = data / ("val" if clip.name in HELD_OUT else "train") / clip.name
        link.symlink_to(clip)
    print(f"{data}: {len(clips) - len(HELD_OUT)} training clips, held out {', '.join(HELD_OUT)}")


def data_list(data, sub):
    return [{"name": p.name, "sha256": sha256_file(p)} for p in sorted((Path(data) / sub).iterdir())
            if p.suffix.lower() in VIDEO_EXTENSIONS]


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
    z = torch.cat([vae.encode(centre_frames(v), batch=4).mean for v in videos])  # (N, C, h, w)
    return z.transpose(0, 1).flatten(1).std(dim=1)  # (C,)


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


def final_losses(run):
    """(last step, mean loss of the last 20 logged steps, last validation loss or None) of a train.py run."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    if not steps:
        raise UserError(f"{run}/metrics.jsonl has no training steps; train first.")
    tail = [r["loss"] for r in steps[-20:]]
    return steps[-1]["step"], sum(tail) / len(tail), (vals[-1] if vals else None)


def training_metadata(run, command, data, wall_s):
    step, loss, val = final_losses(run)
    return {"demo": "m3ddm demo model: a small model trained for minutes on a CPU, not the official M3DDM+",
            "training_command": command, "data": data_list(data, "train"), "held_out": data_list(data, "val"),
            "steps": str(step), "final_loss": f"{loss:.4f}", "final_val_loss": "" if val is None else f"{val:.4f}",
            "demo_weights_wall_s": str(int(wall_s)), "trained_by": "m3ddm train.py (make demo-weights)"}


def export(a):
    assets = Path(a.assets)
    assets.mkdir(parents=True, exist_ok=True)
    wall = float(a.wall_s)
    for kind, path, run, command in (("vae", a.vae, a.vae_run, a.vae_command),
                                     ("unet", a.unet, a.unet_run, a.unet_command)):
        model = (load_vae if kind == "vae" else load_unet)(path, "cpu", torch.float32)
        _, _, meta = read_header(path)
        extra = {k: meta[k] for k in ("latent_rescale",) if k in meta}
        out = assets / f"demo_{kind}.safetensors"
        digest = save_model(out, model.state_dict(), kind, model.config, dtype=torch.float16,
                            metadata={**training_metadata(run, command, a.data, wall), **extra})
        step, loss, val = final_losses(run)
        print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, sha256 {digest[:12]}, steps {step}, "
              f"final loss {loss:.4f}, val {val}")


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


def preview(truth, source, output, png, count=3, width=192):
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
    tmp = png.with_name(f".{png.name}.tmp.png")
    iio.imwrite(tmp, grid)
    tmp.replace(png)
    print(png.resolve())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("cache")
    s.add_argument("data")
    r = sub.add_parser("rescale")
    r.add_argument("vae_in")
    r.add_argument("vae_out")
    r.add_argument("data")
    e = sub.add_parser("export")
    for name in ("vae", "unet", "vae-run", "unet-run", "data", "assets", "vae-command", "unet-command", "wall-s"):
        e.add_argument(f"--{name}", required=True)
    v = sub.add_parser("preview")
    for name in ("truth", "source", "output", "png"):
        v.add_argument(name)
    v.add_argument("--frames", type=int, default=3)
    v.add_argument("--width", type=int, default=192)
    a = p.parse_args(argv)

    def body():
        if a.cmd == "split":
            split(a.cache, a.data)
        elif a.cmd == "preview":
            preview(a.truth, a.source, a.output, a.png, a.frames, a.width)
        elif a.cmd == "rescale":
            rescale(a.vae_in, a.vae_out, a.data)
        else:
            export(a)
    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
