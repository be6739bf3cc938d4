"""Benchmark video outpainting: PSNR, SSIM, LPIPS, FVD and flicker, for the model and simple baselines.

For each video and crop ratio: the ground truth is the video at the evaluation resolution (long side
--size, the source aspect, short side rounded down to a multiple of 8, centre-cropped), the border
band(s) are removed (int(side * ratio / 2) columns or rows per side, as in the reference), the method
outpaints back to the full frame, and the exact uint8 frames are scored in memory: nothing in the
scored path is re-encoded. Each metric is reported on the whole frame (the published protocol) and on
the generated band alone.

    python evaluate.py VIDEOS_OR_DIRS... --out DIR [--method model zero replicate reflect fill]
        [--crop-ratio 0.25 0.66] [--axis horizontal|vertical] [--size 256] [--frames 16|-1]
        [--unet U --vae V --steps 50 --scheduler pndm --seed 6] [--lpips L] [--i3d I --i3d-sha256 HEX]

summary.json records how every row was made: the protocol, the weights (path and sha256), the sampler
settings of the model rows, the device, dtype and m3ddm version.
"""
import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from m3ddm import canvas, cli, data, pipeline, video, weights
from m3ddm import metrics as M
from m3ddm.errors import UserError
from m3ddm.schedulers import SCHEDULERS
from m3ddm.version import __version__

BASELINES = ("zero", "replicate", "reflect", "fill")
METHODS = ("model",) + BASELINES
NOT_COMPUTED = "not computed: weights missing"
DEFAULT_LPIPS = "weights/lpips.safetensors"
OUTPUT_FILES = ("per_video.csv", "summary.json", "summary.md")  # plus preview_*.mp4
METRIC_COLUMNS = ("psnr", "psnr_band", "ssim", "ssim_band", "ssim_gauss", "ssim_gauss_band",
                  "lpips", "lpips_band", "flicker_band")


# ------------------------------------------------------------------------------------------------
# Inputs and geometry


def eval_size(width, height, size):
    """(W, H) at the evaluation resolution: long side = size, the source aspect, short side a multiple of 8."""
    if width >= height:
        return size, max(8, int(size * height / width) // 8 * 8)
    return max(8, int(size * width / height) // 8 * 8), size


def resize_center_crop(frames, width, height):
    """uint8 (F, 3, H0, W0) -> uint8 (F, 3, height, width): scale to cover, then centre-crop.

    Bilinear with anti-aliasing (the reference meant INTER_AREA but its call fell back to aliasing
    bilinear; see spec training.md 3.1).
    """
    _, _, h0, w0 = frames.shape
    scale = max(width / w0, height / h0)
    sh, sw = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    x = canvas.resize_antialias(frames.float(), (sh, sw))
    top, left = (sh - height) // 2, (sw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8)


def border_cut(width, height, ratio, axis):
    """Pixels removed on each side: int(side * ratio / 2), as in the reference's apply_crop."""
    side = width if axis == "horizontal" else height
    cut = int(side * ratio / 2)
    if cut < 1 or side - 2 * cut < 1:
        raise UserError(f"crop ratio {ratio} removes {cut} of {side} pixels per side at this --size; "
                        "choose a ratio in (0, 1) that leaves both a band and a centre.")
    return cut


def band_mask(height, width, cut, axis):
    """(H, W) bool, True on the removed (generated) border bands."""
    m = torch.zeros(height, width, dtype=torch.bool)
    if axis == "horizontal":
        m[:, :cut] = True
        m[:, width - cut:] = True
    else:
        m[:cut] = True
        m[height - cut:] = True
    return m


def crop_input(gt, cut, axis):
    """The model input: the ground truth without its border bands."""
    return gt[..., cut:gt.shape[-1] - cut] if axis == "horizontal" else gt[..., cut:gt.shape[-2] - cut, :]


def band_strip(frames, cut, axis):
    """The generated bands alone, joined side by side (or stacked): (F, 3, H, 2 cut) or (F, 3, 2 cut, W)."""
    if axis == "horizontal":
        return torch.cat([frames[..., :cut], frames[..., frames.shape[-1] - cut:]], -1)
    return torch.cat([frames[..., :cut, :], frames[..., frames.shape[-2] - cut:, :]], -2)


# ------------------------------------------------------------------------------------------------
# Baselines


def _source_index(n_in, cut, mode):
    """For each output position along the padded axis, the input position it copies."""
    j = torch.arange(n_in + 2 * cut) - cut
    if mode == "replicate":
        return j.clamp(0, n_in - 1)
    if n_in == 1:
        return torch.zeros_like(j)
    period = 2 * (n_in - 1)  # mirror without repeating the edge pixel, repeated as often as needed
    j = j.remainder(period)
    return torch.where(j >= n_in, period - j, j)


def pad_baseline(inp, cut, axis, mode):
    """Outpaint by constant fill, edge replication or reflection; the known centre is copied unchanged.

    mode "zero": 0 in the model's [-1, 1] pixel space, i.e. mid grey 128 (black would mostly measure
    how bright the video is); "black": 0 in uint8, the masked input the model sees.
    """
    dim = -1 if axis == "horizontal" else -2
    if mode in ("zero", "black"):
        pad = (cut, cut, 0, 0) if axis == "horizontal" else (0, 0, cut, cut)
        return F.pad(inp, pad, value=128 if mode == "zero" else 0)
    return inp.index_select(dim % inp.dim(), _source_index(inp.shape[dim], cut, mode))


def fill_baseline(inp, cut, axis):
    """The border fill the sampler uses for its starting latents (m3ddm/canvas.py)."""
    f, _, h, w = inp.shape
    full_h, full_w = (h, w + 2 * cut) if axis == "horizontal" else (h + 2 * cut, w)
    band = band_mask(full_h, full_w, cut, axis)
    return canvas.border_fill(pad_baseline(inp, cut, axis, "black"), band)


class ModelMethod:
    """M3DDM+ through the same whole-video pipeline as sample.py (m3ddm.pipeline.outpaint_frames).

    The input frames sit unscaled at the centre of the square --size canvas, exactly where the
    ground truth's centre is, and the output is the centred crop of the ground truth's size, so the
    known pixels come back unchanged (the reference's geometry, spec training.md 3.2).
    """

    def __init__(self, args):
        self.device = torch.device(args.device)
        dtype = weights.DTYPES[args.dtype]
        self.unet = weights.load_unet(args.unet, self.device, dtype)
        self.vae = weights.load_vae(args.vae, self.device, dtype)
        self.options = pipeline.OutpaintOptions(size=args.size, steps=args.steps, seed=args.seed,
                                                scheduler=args.scheduler, start_timestep=args.start_timestep,
                                                guidance_local=args.guidance_local,
                                                guidance_global=args.guidance_global).check()

    def provenance(self, args):
        """How the model rows were made: weights (path, sha256), sampler options, device, dtype, m3ddm version."""
        return {"weights": {k: {"path": str(p), "sha256": weights.sha256_file(p)}
                            for k, p in (("unet", args.unet), ("vae", args.vae))},
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.options).items()},
                "device": str(self.device), "dtype": str(next(self.unet.parameters()).dtype).replace("torch.", ""),
                "m3ddm_version": __version__}

    def __call__(self, inp, width, height, fps, progress=None):
        """inp uint8 (F, 3, h, w) -> uint8 (F, 3, height, width); progress(line) gets the pipeline's lines."""
        s = self.options.size
        h_in, w_in = inp.shape[-2:]
        geom = canvas.CanvasGeometry(
            source_hw=(h_in, w_in), ratios=((width, height),), size=s, union_hw=(float(height), float(width)),
            scale=1.0, resized_hw=(h_in, w_in), pad=((s - h_in) // 2, (s - w_in) // 2),
            crops={(width, height): ((s - width) // 2, (s - height) // 2, width, height)})
        result = pipeline.outpaint_frames(canvas.tensor_to_frames(inp), self.unet, self.vae, fps=fps,
                                          options=self.options, geometry=geom, device=self.device, progress=progress)
        return canvas.frames_to_tensor(result.crops[(width, height)])


# ------------------------------------------------------------------------------------------------
# Scoring


def score(gt, out, band, lpips_model):
    """Per-video means of the per-frame metrics, whole frame and band, plus the band flicker ratio."""
    uniform, gauss = M.ssim_map(gt, out, M.SSIM_UNIFORM7), M.ssim_map(gt, out, M.SSIM_GAUSSIAN11)
    row = {
        "psnr": M.psnr(gt, out).mean().item(),
        "psnr_band": M.psnr(gt, out, band).mean().item(),
        "ssim": M.reduce_ssim_map(uniform, M.SSIM_UNIFORM7).mean().item(),
        "ssim_band": M.reduce_ssim_map(uniform, M.SSIM_UNIFORM7, band).mean().item(),
        "ssim_gauss": M.reduce_ssim_map(gauss, M.SSIM_GAUSSIAN11).mean().item(),
        "ssim_gauss_band": M.reduce_ssim_map(gauss, M.SSIM_GAUSSIAN11, band).mean().item(),
        "lpips": NOT_COMPUTED,
        "lpips_band": NOT_COMPUTED,
        "flicker_band": M.flicker_ratio(out, gt, band) if gt.shape[0] > 1 else math.nan,
    }
    if lpips_model is not None:
        whole, banded = M.lpips_frames(lpips_model, gt, out, regions=(None, band)).mean(1).tolist()
        row["lpips"], row["lpips_band"] = whole, banded
    row["known_exact"] = bool((gt[..., ~band] == out[..., ~band]).all())
    return row


def _mean(values):
    """Mean of the numbers (inf and nan propagate); a reason string if nothing was computed."""
    numbers = [v for v in values if not isinstance(v, str)]
    if not numbers:
        return values[0] if values else NOT_COMPUTED
    return sum(numbers) / len(numbers)


def summarize(rows, fvd_results, ratios, methods):
    """Per method: per crop ratio means over videos, and the average over ratios (as published)."""
    summary = {}
    for method in methods:
        per = {}
        for r in ratios:
            sel = [row for row in rows if row["method"] == method and row["crop_ratio"] == r]
            entry = {k: _mean([row[k] for row in sel]) for k in METRIC_COLUMNS}
            entry.update(fvd_results.get((method, r), {"fvd": NOT_COMPUTED, "fvd_band": NOT_COMPUTED}))
            entry["videos"] = len(sel)
            per[f"{r:g}"] = entry
        keys = list(METRIC_COLUMNS) + ["fvd", "fvd_band"]
        per["average"] = {k: _mean([per[f"{r:g}"][k] for r in ratios]) for k in keys}
        per["average"]["videos"] = per[f"{ratios[0]:g}"]["videos"]
        summary[method] = per
    return summary


def markdown_table(summary, ratios):
    cols = [("PSNR", "psnr", 2), ("SSIM", "ssim", 4), ("LPIPS", "lpips", 4), ("FVD", "fvd", 1),
            ("PSNR band", "psnr_band", 2), ("SSIM band", "ssim_band", 4), ("LPIPS band", "lpips_band", 4),
            ("FVD band", "fvd_band", 1), ("SSIM-G", "ssim_gauss", 4), ("flicker band", "flicker_band", 3)]
    lines = ["| method | crop | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for method, per in summary.items():
        for key in [f"{r:g}" for r in ratios] + ["average"]:
            e = per[key]
            cells = [M.format_value(e[k], d) if not isinstance(e[k], str) else "not computed" for _, k, d in cols]
            lines.append(f"| {method} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Output files (temporary name in the target folder, then rename)


def write_csv(path, rows):
    fields = ["video", "method", "crop_ratio", "axis", "frames", "width", "height", "cut"] + \
        list(METRIC_COLUMNS) + ["known_exact", "seconds"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: M.format_value(v, 6) if isinstance(v, float) else v for k, v in row.items()})
    pipeline.write_atomic(path, write)


def write_text(path, text):
    def write(tmp):
        tmp.write_text(text)
    pipeline.write_atomic(path, write)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return M.json_value(x)


# ------------------------------------------------------------------------------------------------
# Video I/O


def read_frames(path, count, info=None):
    """The first `count` frames (all if count == -1) as uint8 (F, 3, H, W) RGB, and the frame rate.
    info: the video's video.VideoInfo when already probed."""
    info = info or video.probe(path)
    if count != -1 and info.num_frames < count:
        raise UserError(f"{path} has {info.num_frames} frames, fewer than --frames {count}; "
                        "lower --frames or pass --frames -1 to use every frame.")
    if info.num_frames < 2:
        raise UserError(f"{path} has {info.num_frames} frame; the evaluation needs at least 2.")
    frames = []
    reader = video.iter_frames(path, info)
    try:
        for frame in reader:
            frames.append(frame)
            if len(frames) == count:
                break
    finally:
        reader.close()
    return canvas.frames_to_tensor(np.stack(frames)), info.fps


def write_preview(path, panels, fps):
    """Side-by-side H.264 preview (ground truth | input | output); not part of the scored path."""
    frames = canvas.tensor_to_frames(torch.cat(panels, -1))  # (F, H, 3W, 3)
    with video.VideoWriter(path, frames.shape[2], frames.shape[1], fps) as writer:
        writer.write(frames)


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark video outpainting: PSNR, SSIM, LPIPS, FVD, flicker.")
    p.add_argument("videos", nargs="+", help="video files, or folders of videos (not searched recursively)")
    p.add_argument("--out", required=True, help="output folder for per_video.csv, summary.json, summary.md")
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(BASELINES),
                   help="methods to score (default: every baseline); 'model' needs --unet and --vae")
    p.add_argument("--crop-ratio", nargs="+", type=float, default=[0.25, 0.66],
                   help="fraction of the width (or height) removed, half on each side (default 0.25 0.66)")
    p.add_argument("--axis", choices=("horizontal", "vertical"), default="horizontal")
    p.add_argument("--size", type=int, default=256,
                   help="long side of the evaluation frames: a multiple of 8, at least 32; with --method model a "
                        "multiple of 64, the model's canvas (default 256)")
    p.add_argument("--frames", type=int, default=16, help="first N frames of each video, -1 for all (default 16)")
    p.add_argument("--unet", help="m3ddm unet weights (for --method model)")
    p.add_argument("--vae", help="m3ddm vae weights (for --method model)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps for the model (default 50)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="pndm",
                   help="sampler for the model (default pndm, as the reference), as sample.py")
    p.add_argument("--start-timestep", type=int, default=None, help="ddim/dpm++: as sample.py's (default: the "
                   "scheduler's own grid)")
    p.add_argument("--guidance-local", type=float, default=2.0, help="as sample.py's (default 2)")
    p.add_argument("--guidance-global", type=float, default=4.0, help="as sample.py's (default 4)")
    p.add_argument("--seed", type=int, default=6, help="sampler seed for the model (default 6, as the reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(weights.DTYPES), default="fp32",
                   help="model precision (default fp32 on every device, so that scores do not depend on it; "
                        "sample.py takes bf16 on CUDA)")
    p.add_argument("--lpips", default=DEFAULT_LPIPS,
                   help="m3ddm LPIPS weights from `weights_convert.py lpips` (skipped if the default is absent)")
    p.add_argument("--i3d", help="i3d_torchscript.pt for FVD (FVD is skipped without it)")
    p.add_argument("--i3d-sha256", help="sha256 of the I3D file; it is loaded only if its hash matches")
    p.add_argument("--previews", type=int, default=2, help="videos that get side-by-side mp4s, 0 or more (default 2)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_args(args):
    for r in args.crop_ratio:
        if not 0 < r < 1:
            raise UserError(f"crop ratio {r} is outside (0, 1); pass fractions such as --crop-ratio 0.25 0.66.")
    if args.frames != -1 and args.frames < 2:
        raise UserError(f"--frames {args.frames} is too small; pass at least 2, or -1 for every frame.")
    if args.size < 32 or args.size % 8:
        raise UserError(f"--size {args.size} must be a multiple of 8 and at least 32; use e.g. --size 256.")
    if "model" in args.method and args.size % canvas.SIDE_MULTIPLE:
        raise UserError(f"--size {args.size} with --method model must be a multiple of {canvas.SIDE_MULTIPLE} (the "
                        "model's square canvas); use e.g. --size 256.")
    if args.previews < 0:
        raise UserError(f"--previews {args.previews} is negative; pass 0 (no previews) or more.")
    args.device = str(resolve_device(args.device))
    if "model" in args.method:
        for flag, value in (("--unet", args.unet), ("--vae", args.vae)):
            if not value or not Path(value).is_file():
                raise UserError(f"--method model needs the model weights, but {flag} "
                                f"{'is not given' if not value else value + ' does not exist'}; "
                                "pass m3ddm files made by `weights_convert.py`.")
    if args.i3d and not args.i3d_sha256:
        raise UserError("--i3d needs --i3d-sha256 (the sha256 of your i3d_torchscript.pt), "
                        "so that no unverified TorchScript file is ever loaded.")
    if args.i3d and args.frames != -1 and args.frames < M.I3D_MIN_FRAMES:
        raise UserError(f"FVD needs at least {M.I3D_MIN_FRAMES} frames per video; raise --frames.")


def resolve_device(name):
    """sample.py's rule: the given device, else cuda when available, else cpu."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    return device


def load_lpips_if_present(args):
    path = Path(args.lpips)
    if not path.is_file():
        if args.lpips != DEFAULT_LPIPS:
            raise UserError(f"LPIPS weights {path} do not exist; create them with `python weights_convert.py lpips`.")
        return None
    return M.load_lpips(path, device=args.device)


def progress(text, end=None):
    """One line rewritten in place on a terminal (end it with end="\\n"); in a log, one line each."""
    cli.progress_line(text, final=end == "\n")


class Evaluation:
    """One evaluation run: the scorers and models, the per-video rows and the I3D features for FVD.

    Under torchrun each rank scores its share of the videos (`score_share`); rank 0 gathers every video's rows
    and features and puts them in input order (`merge`), so its reports equal a single process's."""

    def __init__(self, args, world=None):
        self.args = args
        self.world = world
        self.start = time.time()
        self.prefix = f"[rank {world.rank}] " if world is not None and world.size > 1 else ""
        self.say("loading the scorers" + (" and the model" if "model" in args.method else "") + f" on {args.device}")
        self.lpips = load_lpips_if_present(args)
        self.i3d = M.load_i3d(args.i3d, args.i3d_sha256, args.device) if args.i3d else None
        self.model = ModelMethod(args) if "model" in args.method else None
        self.out_dir = Path(args.out)
        self.rows = []
        self.feats = {}  # (kind, method, ratio) -> list of (400,) I3D features, one per video, in input order
        self.notes = set()

    def say(self, text):
        progress(f"{self.prefix}[{time.time() - self.start:6.1f}s] {text}")

    def model_progress(self, context):
        """The pipeline's lines in the progress line; each distinct `note:` once, on a line of its own."""
        def show(line):
            if not line.startswith("note: "):
                self.say(f"{context}: {line}")
            elif line not in self.notes:
                self.notes.add(line)
                progress(line, end="\n")
        return show

    def add_features(self, key, frames):
        if self.i3d is not None:
            self.feats.setdefault(key, []).append(M.i3d_features(self.i3d, frames[None])[0])

    def score_share(self, indices, videos, infos) -> list:
        """[(video index, its rows, its features)] for this rank's videos; stops at the first bad one, whose
        entry is (index, error message, None)."""
        results = []
        for i in indices:
            self.rows, self.feats = [], {}
            try:
                self.video(i, len(videos), videos[i], infos.get(i))
            except UserError as e:
                if self.world is None or self.world.size == 1:
                    raise                      # one process: the error as it was raised
                results.append((i, str(e), None))
                break
            results.append((i, self.rows, self.feats))
        return results

    def merge(self, parts):
        """Rank 0: the gathered per-video results in input order; raises the first video's error if any failed."""
        results = sorted((r for part in parts for r in part), key=lambda r: r[0])
        for _, rows, feats in results:
            if feats is None:
                raise UserError(rows)
        self.rows, self.feats = [], {}
        for _, rows, feats in results:
            self.rows += rows
            for key, values in feats.items():
                self.feats.setdefault(key, []).extend(values)

    def outpaint(self, method, inp, cut, width, height, fps, context=""):
        if method == "model":
            return self.model(inp, width, height, fps, progress=self.model_progress(context))
        if method == "fill":
            return fill_baseline(inp, cut, self.args.axis)
        return pad_baseline(inp, cut, self.args.axis, method)

    def video(self, index, count, path, info=None):
        args = self.args
        frames, fps = read_frames(path, args.frames, info)
        width, height = eval_size(frames.shape[-1], frames.shape[-2], args.size)
        if self.lpips is not None and min(width, height) < M.LPIPS_MIN_SIDE:
            raise UserError(f"{path.name} becomes {width}x{height} at --size {args.size}, too small for LPIPS "
                            f"(at least {M.LPIPS_MIN_SIDE} px a side); raise --size.")
        gt = resize_center_crop(frames, width, height)  # (F, 3, H, W) uint8: the ground truth
        self.add_features(("gt", None, None), gt)
        for ratio in args.crop_ratio:
            cut = border_cut(width, height, ratio, args.axis)
            band = band_mask(height, width, cut, args.axis)
            inp = crop_input(gt, cut, args.axis)                  # what every method gets
            self.add_features(("gt_band", None, ratio), band_strip(gt, cut, args.axis))
            for method in args.method:
                context = f"video {index + 1}/{count} {path.name}: crop {ratio:g}, {method}"
                self.say(context)
                t0 = time.time()
                out = self.outpaint(method, inp, cut, width, height, fps, context)
                row = {"video": path.name, "method": method, "crop_ratio": ratio, "axis": args.axis,
                       "frames": gt.shape[0], "width": width, "height": height, "cut": cut}
                row.update(score(gt, out, band, self.lpips))
                row["seconds"] = round(time.time() - t0, 3)
                self.rows.append(row)
                self.add_features(("out", method, ratio), out)
                self.add_features(("out_band", method, ratio), band_strip(out, cut, args.axis))
                if index < args.previews:
                    write_preview(self.out_dir / f"preview_{path.stem}_{method}_{ratio:g}.mp4",
                                  [gt, pad_baseline(inp, cut, args.axis, "black"), out], fps)

    def fvd(self):
        results = {}
        for method in self.args.method:
            for ratio in self.args.crop_ratio:
                results[(method, ratio)] = {
                    "fvd": self.frechet(("gt", None, None), ("out", method, ratio)),
                    "fvd_band": self.frechet(("gt_band", None, ratio), ("out_band", method, ratio)),
                }
        return results

    def frechet(self, real_key, fake_key):
        if self.i3d is None:
            return NOT_COMPUTED
        real, fake = self.feats.get(real_key, []), self.feats.get(fake_key, [])
        if min(len(real), len(fake)) < 2:
            return "not computed: needs at least 2 videos"
        return M.frechet_distance(torch.stack(real), torch.stack(fake))

    def record(self, videos, summary):
        args = self.args
        return {
            "m3ddm_version": __version__,
            "protocol": protocol(args),
            "videos": [p.name for p in videos],
            "weights": {
                "lpips": str(args.lpips) if self.lpips is not None else NOT_COMPUTED,
                "i3d": {"path": str(args.i3d), "sha256": args.i3d_sha256.lower()} if self.i3d is not None
                else NOT_COMPUTED,
                "unet": args.unet if self.model else None,
                "vae": args.vae if self.model else None,
            },
            "model": self.model.provenance(args) if self.model else None,
            "methods": summary,
        }


def check_outputs_spare_inputs(out_dir, videos):
    """Refuse an --out folder where an output name would replace an input video."""
    out_dir = Path(out_dir).resolve()
    for v in videos:
        if v.resolve().parent == out_dir and (v.name in OUTPUT_FILES or v.name.startswith("preview_")):
            raise UserError(f"--out {out_dir} would overwrite the input {v.name}; choose another output folder.")


def run(args):
    from m3ddm import distributed
    check_args(args)
    videos = data.list_videos(args.videos)
    check_outputs_spare_inputs(args.out, videos)
    world = distributed.setup_sharding(args.device)
    try:
        args.device = str(world.device)
        return run_sharded(args, distributed.broadcast_from_main(world, videos), world)   # one list for all
    finally:
        distributed.cleanup()


def video_cost(info, args):
    """Expected cost of scoring one video: the frames it outpaints (16 per clip for the model)."""
    frames = info.num_frames if args.frames == -1 else min(args.frames, info.num_frames)
    if "model" in args.method:
        from m3ddm.schedule import build_schedule
        return 1 + pipeline.CLIP_LEN * len(build_schedule(frames, limit_frames=None).clips)
    return 1 + frames


def share(args, videos, world):
    """(this rank's video indices, {index: VideoInfo}): under torchrun the videos are probed round robin,
    shared, and split by expected cost; a video that cannot be read stops every rank with the same error."""
    from m3ddm import distributed
    if world.size == 1:
        return list(range(len(videos))), {}

    def look(path):
        try:
            return video.probe(path), None
        except UserError as e:
            return None, str(e)

    looked = distributed.map_over_ranks(world, look, videos)
    errors = [e for _, e in looked if e]
    if errors:
        raise UserError(errors[0])
    mine = distributed.shard_by_cost([video_cost(info, args) for info, _ in looked], world.size)[world.rank]
    return mine, {i: looked[i][0] for i in mine}


def run_sharded(args, videos, world):
    from m3ddm import distributed
    ev = Evaluation(args, world)
    ev.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mine, infos = share(args, videos, world)
    except UserError:                          # the same on every rank: rank 0 alone reports it
        if world.is_main:
            raise
        return 0
    parts = distributed.gather_to_main(world, ev.score_share(mine, videos, infos))
    error = None
    if world.is_main:
        try:
            ev.merge(parts)
        except UserError as e:
            error = str(e)
    error = distributed.broadcast_from_main(world, error)
    if error is not None:
        if world.is_main:
            raise UserError(error)
        return 0                               # rank 0 alone reports it (one error line, exit code 2)
    if world.is_main:
        ev.say(f"scored {len(videos)} video(s)")
        if sys.stderr.isatty():
            print(file=sys.stderr)
        write_reports(args, ev, videos)
    distributed.barrier(world)                 # the reports are written before any rank exits
    return 0


def write_reports(args, ev, videos):
    summary = summarize(ev.rows, ev.fvd(), args.crop_ratio, args.method)
    table = markdown_table(summary, args.crop_ratio)
    record = ev.record(videos, summary)
    write_csv(ev.out_dir / "per_video.csv", ev.rows)
    write_text(ev.out_dir / "summary.json", json.dumps(_jsonable(record), indent=2) + "\n")
    write_text(ev.out_dir / "summary.md", summary_markdown(record, table))
    print(table, end="")


def protocol(args):
    return {
        "size": args.size, "frames": args.frames, "axis": args.axis, "crop_ratios": args.crop_ratio,
        "ground_truth": "first --frames frames, resized to cover (bilinear, anti-aliased) and centre-cropped to "
                        "long side --size, short side a multiple of 8",
        "removed": "int(side * crop_ratio / 2) pixels on each side",
        "scored_on": "exact uint8 RGB frames in memory (no JPEG or video re-encoding)",
        "psnr": "per frame on [0, 1], then mean over frames, then over videos",
        "ssim": "scikit-image structural_similarity: 'ssim' = 7x7 uniform window, sample covariance (the reference); "
                "'ssim_gauss' = Gaussian 11 / sigma 1.5, population covariance (Wang et al. 2004)",
        "lpips": "AlexNet, v0.1 heads, RGB in [-1, 1]; band = spatial maps upsampled and averaged over the band",
        "fvd": "I3D TorchScript (StyleGAN-V protocol: rescale, resize to 224), Frechet distance in float64 over all "
               "videos; band = the two bands joined into one strip",
        "flicker_band": "mean |frame t+1 - frame t| in the band, output over ground truth (1 = as calm as the truth)",
        "band": "metric restricted to the generated pixels (SSIM: windows centred in the band)",
        "average": "mean over the crop ratios of the per-ratio means, as published",
    }


def summary_markdown(record, table):
    p = record["protocol"]
    label = {"lpips": "LPIPS", "i3d": "FVD"}
    notes = [f"{label[k]}: {v}" for k, v in record["weights"].items() if k in label and v == NOT_COMPUTED]
    fvd = [e["fvd"] for per in record["methods"].values() for e in per.values() if isinstance(e["fvd"], str)]
    if fvd and record["weights"]["i3d"] != NOT_COMPUTED:
        notes.append(f"FVD: {fvd[0]}")
    return (f"# Outpainting evaluation\n\n{len(record['videos'])} video(s), {p['frames']} frames, long side "
            f"{p['size']}, {p['axis']} crop ratios {', '.join(f'{r:g}' for r in p['crop_ratios'])}. "
            "'band' columns score the generated pixels only; 'average' is the mean over crop ratios.\n\n"
            + table + "".join(f"\n{n}" for n in notes) + ("\n" if notes else ""))


def main(argv=None):
    args = parse_args(argv)
    return cli.run(lambda: run(args), interrupted="no partial report was kept")


if __name__ == "__main__":
    sys.exit(main())
