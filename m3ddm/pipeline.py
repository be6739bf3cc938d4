"""One video of M3DDM+ outpainting: global frames, per-frame latent caches, the clip schedule, output.

Data flow (DESIGN.md): frames -> canvas (masked, border-filled) -> VAE latents cached per frame ->
global latents once -> schedule -> per clip: sampler.denoise_clip -> stored latents (first writer wins)
-> decode the frames that are final -> paste the known pixels back -> writers (one per ratio).

Two entry points:
- `outpaint_video(path, out_dir, unet, vae, ratios, options)`: a file in, one mp4 per ratio out
  (`<stem>_<a>-<b>.mp4`, audio copied), plus `<stem>.json` (run record) and `<stem>_preview.png`.
- `outpaint_frames(frames, unet, vae, ratios, fps, options)`: in memory, for evaluate.py.

Memory: source frames are streamed (the decoder restarts once per stage), frames are written as
soon as they are final, and the per-frame latents (inputs and stored results, on the host) are
dropped after the last clip that needs them (`Clip.release`), so host memory is bounded by the clip
plus the per-frame latents and GPU memory does not grow with the video length.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .version import __version__
from .canvas import (CanvasGeometry, border_fill, canvas_geometry, composite_full_res, crop, frames_to_canvas,
                     frames_to_tensor, from_model, full_res_layout, global_frames_to_model, needs_outpainting,
                     paste_known, pixel_mask, ratio_label, tensor_to_frames, to_model)
from .errors import UserError
from .files import create_temp, remove_stale_temps, write_atomic  # noqa: F401 (write_atomic: evaluate.py)
from .sampler import (assemble_conditioning, clip_noise, denoise_clip, encode_global_context,
                      sampler_branches, sampling_timesteps)
from .masks import latent_mask
from .schedule import DEFAULT_STRIDES, Schedule, build_schedule, global_frame_indices, unet_fps
from . import schedulers

CLIP_LEN = 16


@dataclass
class OutpaintOptions:
    """Everything that changes the result, with the reference's defaults (spec pipeline.md section 1).

    size: side S of the square working canvas (multiple of 64). strides: coarse-to-fine grid strides.
    global_frames: G frames at linspace(0, N-1, G) (0 = no global condition). limit_frames: output only
    the first L frames (None = all). seed: per-clip noise seed. scheduler/steps: "pndm" (reference),
    "ddim" or "dpm++" (schedulers.SCHEDULERS). start_timestep (ddim, dpm++; None = the scheduler's own grid):
    start there and spread the steps over [start_timestep -> alphas_cumprod[0]]; schedulers.REFERENCE_START
    (961) is the segment of the default PNDM-50. guidance_local / guidance_global: see sampler.py.
    feather: px of blending at the seam (0 = hard paste). keep_resolution: also composite at the source's
    full resolution. vae_sample: sample the VAE posterior (seeded) instead of its mean. plain: the
    reference-shaped slow path. vae_batch: images per VAE call.
    """
    size: int = 256
    strides: tuple = DEFAULT_STRIDES
    global_frames: int = 16
    limit_frames: Optional[int] = None
    seed: int = 6
    scheduler: str = "pndm"
    steps: int = 50
    start_timestep: Optional[int] = None
    guidance_local: float = 2.0
    guidance_global: float = 4.0
    feather: int = 0
    keep_resolution: bool = False
    vae_sample: bool = False
    plain: bool = False
    vae_batch: int = 8

    def check(self) -> "OutpaintOptions":
        if self.scheduler not in schedulers.SCHEDULERS:
            raise UserError(f"--scheduler {self.scheduler!r} is unknown; use {' or '.join(schedulers.SCHEDULERS)}.")
        if not 1 <= int(self.steps) <= 999:   # 1000 leading steps would start at timestep 1000, past the schedule
            raise UserError(f"--steps {self.steps} is out of range; use 1 to 999 (50 is the default).")
        if self.scheduler == "pndm" and self.steps < 2:
            raise UserError("--steps 1 with the pndm scheduler runs no denoising step (the reference loop skips "
                            "the first timestep); use --steps 2 or more, or --scheduler ddim.")
        if self.start_timestep is not None:
            self.check_start()
        if self.global_frames < 0:
            raise UserError(f"--global-frames {self.global_frames} is negative; use 0 or more (16 is the default).")
        if self.feather < 0:
            raise UserError(f"--feather {self.feather} is negative; use 0 (hard paste) or a positive pixel count.")
        if self.limit_frames is not None and self.limit_frames != -1 and self.limit_frames < 1:
            raise UserError(f"--limit-frames {self.limit_frames} is invalid; use a positive frame count or -1 for all.")
        for name in ("guidance_local", "guidance_global"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid; use a number >= 0.")
        if self.vae_batch < 1:
            raise UserError(f"vae_batch {self.vae_batch} is invalid; use 1 or more.")
        return self

    def check_start(self):
        start, steps = self.start_timestep, int(self.steps)
        if self.scheduler == "pndm":
            raise UserError(f"--start-timestep {start} needs --scheduler ddim or dpm++ (pndm starts where the "
                            f"reference does, at {schedulers.REFERENCE_START}).")
        if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= 999:
            raise UserError(f"--start-timestep {start} is out of range; use 1 to 999 "
                            f"({schedulers.REFERENCE_START} = where the default PNDM-50 starts).")
        if steps > start + 1:
            raise UserError(f"--steps {steps} is more than the {start + 1} timesteps from --start-timestep {start} "
                            f"to 0; use --steps {start + 1} or fewer.")


def make_scheduler(options: OutpaintOptions):
    return schedulers.make_scheduler(options.scheduler, int(options.steps), options.start_timestep)


@dataclass
class FinalFrame:
    """One output frame, ready to be written: all uint8 tensors (3, ., .) on the host."""
    index: int
    generated: torch.Tensor   # (3, S, S) decoded canvas, before the paste-back
    masked: torch.Tensor      # (3, S, S) the source on its canvas, black border
    composite: torch.Tensor   # (3, S, S) generated with the known pixels pasted back
    source: torch.Tensor      # (3, H, W) the source frame at full resolution


@dataclass
class RunStats:
    clips_per_stride: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"read": 0.0, "encode": 0.0, "global": 0.0, "sample": 0.0,
                                                   "decode": 0.0, "write": 0.0})
    unet_calls: int = 0
    unet_batch: int = 0
    max_cached_inputs: int = 0      # most frames whose input latents were held at once
    max_stored_latents: int = 0     # most stored (guide) latents held at once


# ----------------------------------------------------------------------------------------------------
# Frame sources


class ArrayFrames:
    """Frames from an in-memory uint8 (N, H, W, 3) array."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return frames_to_tensor(self.frames[list(indices)])   # (n, 3, H, W) uint8

    def close(self):
        pass


class StreamingFrames:
    """Frames by index from a forward-only decode of a file. Keeps only the frames of the last request
    (consecutive clips share a frame); asking for an earlier frame restarts the decoder (once per stage)."""

    def __init__(self, path, info):
        self.path, self.info = path, info
        self._iter, self._pos, self._kept = None, -1, {}

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        from .video import iter_frames
        wanted = sorted(set(int(i) for i in indices))
        got = {i: self._kept[i] for i in wanted if i in self._kept}
        missing = [i for i in wanted if i not in got]
        if missing and missing[0] <= self._pos:
            self.close()
        for i in missing:
            if self._iter is None:
                self._iter, self._pos = iter_frames(self.path, self.info), -1
            while self._pos < i:
                try:
                    frame = next(self._iter)
                except StopIteration:
                    raise UserError(f"{self.path} ended at frame {self._pos} although probing counted "
                                    f"{self.info.num_frames}; re-encode the video with ffmpeg.") from None
                self._pos += 1
            got[i] = frame
        self._kept = got
        return frames_to_tensor(np.stack([got[int(i)] for i in indices]))

    def close(self):
        if self._iter is not None:
            self._iter.close()
        self._iter, self._pos = None, -1


# ----------------------------------------------------------------------------------------------------
# The engine


class Outpainter:
    """Runs one video's clip schedule. Build it once per video; `run(emit)` calls `emit(FinalFrame)`
    for every output frame, in frame order."""

    def __init__(self, unet, vae, frames, num_frames: int, fps: float, geom: CanvasGeometry,
                 global_pixels: Optional[torch.Tensor], options: OutpaintOptions, device, dtype,
                 progress: Optional[Callable[[str], None]] = None):
        self.unet, self.vae, self.frames = unet, vae, frames
        self.num_frames, self.fps, self.geom, self.options = num_frames, float(fps), geom, options
        self.device, self.dtype = torch.device(device), dtype
        self.progress = progress
        self.schedule: Schedule = build_schedule(num_frames, options.strides, options.limit_frames)
        self.stats = RunStats()
        self.pix_mask = pixel_mask(geom, device=self.device)                    # (S, S) 1 = generate
        self.lat_mask = latent_mask(self.pix_mask)                              # (h, w)
        self.vae_gen = torch.Generator("cpu").manual_seed(int(options.seed)) if options.vae_sample else None
        self.inputs = {}     # frame -> (masked latent, filled latent), each (4, h, w) on the host
        self.stored = {}     # frame -> final latent (4, h, w) on the host (first writer wins)
        self.global_pixels = global_pixels

    # -- VAE helpers

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (n, 3, S, S) -> scaled latents (n, 4, h, w)."""
        x = pixels.to(self.device, self.dtype)
        return self.vae.encode_latents(x, batch=self.options.vae_batch, generator=self.vae_gen,
                                       sample=self.options.vae_sample).float()

    def _black_latent(self) -> torch.Tensor:
        s = self.geom.size
        return self._encode(torch.full((1, 3, s, s), -1.0))                     # (1, 4, h, w)

    def _global_context(self):
        g = 0 if self.global_pixels is None else self.global_pixels.shape[0]
        h = self.geom.latent_size
        latents = self._encode(self.global_pixels) if g else torch.zeros(0, 4, h, h, device=self.device)
        return encode_global_context(self.unet, latents.to(self.dtype))

    def _canvases(self, idx: list) -> tuple:
        """Masked canvases (n, 3, S, S) uint8 and source frames (n, 3, H, W) uint8 of unique frames idx."""
        t0 = time.perf_counter()
        src = self.frames.get(idx)
        # a few frames at a time: the float resize of 16 full-HD frames would take 400 MB
        masked = torch.cat([frames_to_canvas(part, self.geom, device=self.device) for part in src.split(4)])
        self.stats.timings["read"] += time.perf_counter() - t0
        return masked, src

    def _encode_inputs(self, idx: list, masked: torch.Tensor):
        t0 = time.perf_counter()
        filled = border_fill(masked, self.pix_mask)
        lat = self._encode(torch.cat([to_model(masked), to_model(filled)]))     # (2n, 4, h, w)
        n = len(idx)
        for k, f in enumerate(idx):
            self.inputs[f] = (lat[k].cpu(), lat[n + k].cpu())
        self.stats.timings["encode"] += time.perf_counter() - t0

    # -- the run

    def _clip_pixels(self, clip) -> dict:
        """Read the clip's frames that are not encoded yet or become final now; encode the new ones.
        Returns {frame: (masked canvas (3, S, S), source frame (3, H, W))} for the frames read."""
        final_frames = [f for f, _ in clip.final]
        idx = sorted({f for f in clip.frames if f not in self.inputs} | set(final_frames))
        if not idx:
            return {}
        masked, src = self._canvases(idx)
        new = [k for k, f in enumerate(idx) if f not in self.inputs]
        if new:
            self._encode_inputs([idx[k] for k in new], masked[new])
        return {f: (masked[k], src[k]) for k, f in enumerate(idx)}

    def _say(self, line: str):
        if self.progress is not None:
            self.progress(line)

    def _step_reporter(self, c: int):
        """on_step hook of the first clip: `clip 1/n  step i/N` about ten times (no host sync), so the first
        clip's minutes are not silent; later clips report once each (`_report`)."""
        if c > 0 or self.progress is None:
            return None
        total, n = len(sampling_timesteps(make_scheduler(self.options))[1]), len(self.schedule.clips)
        every = max(1, total // 10)

        def on_step(i, *_):
            if i == 0 or (i + 1) % every == 0:
                self._say(f"clip 1/{n}  step {i + 1}/{total}")
        return on_step

    def _sample(self, clip, context, black, on_step=None) -> torch.Tensor:
        """Denoise one clip; stores the latents it writes first. Returns (1, 4, 16, h, w) on the device."""
        opts, h = self.options, self.geom.latent_size
        t0 = time.perf_counter()
        masked_lat = torch.stack([self.inputs[f][0] for f in clip.frames], dim=1)[None]  # (1, 4, 16, h, w)
        filled_lat = torch.stack([self.inputs[f][1] for f in clip.frames], dim=1)[None]
        guides = [self.stored[f].to(self.device) if g else None for f, g in zip(clip.frames, clip.guide)]
        cond = assemble_conditioning(masked_lat.to(self.device), black, self.lat_mask, guides)
        noise = clip_noise(opts.seed, (1, 4, CLIP_LEN, h, h), device=self.device)   # the same for every clip
        scheduler = make_scheduler(opts)
        final = denoise_clip(self.unet, scheduler, filled_lat.to(self.device), noise, cond, context,
                             unet_fps(self.fps, clip.stride), opts.guidance_local, opts.guidance_global,
                             plain=opts.plain, generator=torch.Generator("cpu").manual_seed(int(opts.seed)),
                             on_step=on_step)
        for k in clip.store:                                                # first writer wins
            self.stored[clip.frames[k]] = final[0, :, k].cpu().clone()
        self.stats.timings["sample"] += time.perf_counter() - t0
        self.stats.clips_per_stride[clip.stride] = self.stats.clips_per_stride.get(clip.stride, 0) + 1
        self.stats.unet_calls += len(sampling_timesteps(scheduler)[1])
        return final

    def _finish(self, clip, final: torch.Tensor, pixels: dict) -> list:
        """Decode and composite the frames that are final after this clip (last writer wins)."""
        if not clip.final:
            return []
        t0 = time.perf_counter()
        pos = [k for _, k in clip.final]
        z = final[0, :, pos].permute(1, 0, 2, 3).to(self.dtype)                     # (n, 4, h, w)
        generated = from_model(self.vae.decode_latents(z, batch=self.options.vae_batch))  # (n, 3, S, S) uint8
        masked = torch.stack([pixels[f][0] for f, _ in clip.final])
        composite = paste_known(generated, masked, self.geom, feather=self.options.feather)
        self.stats.timings["decode"] += time.perf_counter() - t0
        return [FinalFrame(f, generated[j].cpu(), masked[j].cpu(), composite[j].cpu(), pixels[f][1])
                for j, (f, _) in enumerate(clip.final)]

    def _release(self, clip):
        self.stats.max_cached_inputs = max(self.stats.max_cached_inputs, len(self.inputs))
        self.stats.max_stored_latents = max(self.stats.max_stored_latents, len(self.stored))
        for f in clip.release:
            self.inputs.pop(f, None)
            self.stored.pop(f, None)

    @torch.no_grad()
    def run(self, emit: Callable[[FinalFrame], None]) -> RunStats:
        t0 = time.perf_counter()
        if self.global_pixels is not None:
            self._say(f"encoding {len(self.global_pixels)} global frames")
        context = self._global_context()
        black = self._black_latent()                                        # (1, 4, h, w)
        self.stats.timings["global"] += time.perf_counter() - t0
        opts = self.options
        self.stats.unet_batch = len(sampler_branches(opts.guidance_local, opts.guidance_global,
                                                     context.real is not None, opts.plain))
        if opts.plain:
            self.unet.set_attention("math", per_frame_context=True)
        pending, next_out = {}, 0        # frames final but waiting for an earlier one; next frame to emit
        start = time.perf_counter()
        try:
            for c, clip in enumerate(self.schedule.clips):
                if c == 0:
                    self._say(f"clip 1/{len(self.schedule.clips)}: reading and encoding its frames")
                pixels = self._clip_pixels(clip)
                final = self._sample(clip, context, black, self._step_reporter(c))
                pending.update({f.index: f for f in self._finish(clip, final, pixels)})
                t1 = time.perf_counter()
                while next_out in pending:
                    emit(pending.pop(next_out))
                    next_out += 1
                self.stats.timings["write"] += time.perf_counter() - t1
                self._release(clip)
                self._report(c, clip, start)
        finally:
            if opts.plain:
                self.unet.set_attention("sdpa", per_frame_context=False)
            self.frames.close()
        if next_out != self.schedule.num_output or pending:
            raise RuntimeError(f"internal error: emitted {next_out} of {self.schedule.num_output} frames")
        return self.stats

    def _report(self, c: int, clip, start: float):
        if self.progress is None:
            return
        n = len(self.schedule.clips)
        elapsed = time.perf_counter() - start
        eta = elapsed / (c + 1) * (n - c - 1)
        self.progress(f"stride {clip.stride:>2}  clip {c + 1}/{n}  elapsed {_hms(elapsed)}  ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def global_frames_note(num_frames: int, options: OutpaintOptions) -> Optional[str]:
    """The note when --global-frames asks for more frames than the video has (linspace then repeats some)."""
    if options.global_frames <= num_frames:
        return None
    return (f"note: the video has {num_frames} frame(s) but {options.global_frames} global frames are asked for "
            "(--global-frames), so some global frames are repeats.")


def _global_pixels(frames_at: Callable[[list], torch.Tensor], num_frames: int, options: OutpaintOptions,
                   progress=None):
    """Global frames (G, 3, S, S) in [-1, 1], squashed to S x S, or None for G = 0."""
    if options.global_frames == 0:
        return None, []
    note = global_frames_note(num_frames, options)
    if progress is not None:
        for line in ([note] if note else []) + [f"reading {options.global_frames} global frames"]:
            progress(line)
    idx = global_frame_indices(num_frames, options.global_frames)
    return global_frames_to_model(frames_at(idx), options.size), idx


def _check_models(unet, vae, options: OutpaintOptions):
    multiple = 8 * unet.size_multiple
    if options.size % multiple:
        raise UserError(f"--size {options.size} is not a multiple of {multiple}, which this UNet needs; "
                        f"use e.g. {max(multiple, options.size // multiple * multiple)}.")


# ----------------------------------------------------------------------------------------------------
# In-memory entry point


@dataclass
class OutpaintResult:
    """Result of `outpaint_frames`.

    canvas: uint8 (N', S, S, 3) composited square canvases (N' = N, or L with limit_frames).
    crops: {(a, b): uint8 (N', h, w, 3)} the per-ratio outputs (centred crops of the canvas).
    full_res: {(a, b): uint8 (N', H', W', 3)} with keep_resolution, else {}.
    geometry: the CanvasGeometry used; mask: uint8 (S, S), 1 = generated; stats: RunStats.
    """
    canvas: np.ndarray
    crops: dict
    full_res: dict
    geometry: CanvasGeometry
    mask: np.ndarray
    stats: RunStats


def outpaint_frames(frames: np.ndarray, unet, vae, ratios: Sequence[tuple] = ((16, 9),), fps: float = 30.0,
                    options: Optional[OutpaintOptions] = None, geometry: Optional[CanvasGeometry] = None,
                    device="cpu", dtype=None, progress="stderr") -> OutpaintResult:
    """Outpaint an in-memory video. For evaluate.py's model method.

    frames: uint8 numpy (N, H, W, 3) RGB, N >= 1. ratios: target (a, b) ratios (W:H), e.g. [(16, 9)].
    fps: the source frame rate (only its fps // stride conditioning matters). options: OutpaintOptions.
    geometry: a ready canvas.CanvasGeometry (e.g. canvas_geometry((H, W), ratios, size)) to impose the
    canvas; by default it is computed from the frames, `ratios` and options.size.
    device / dtype: where and how to run (dtype None: the UNet's own dtype).
    progress: "stderr" (default: a line per stage, about ten for the first clip's steps, one per clip, and
    `note:` lines), None (silent), or a callable that gets each line.
    Returns an OutpaintResult; the kept region of every output equals the source on its canvas.
    """
    options, progress = (options or OutpaintOptions()).check(), _progress(progress)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise UserError(f"frames must be uint8 (N, H, W, 3) with N >= 1, received {frames.dtype} {frames.shape}; "
                        "convert them with np.asarray(..., dtype=np.uint8).")
    geom = geometry or canvas_geometry(frames.shape[1:3], list(ratios), options.size)
    options = replace(options, size=geom.size)
    _check_models(unet, vae, options)
    dtype = dtype or next(unet.parameters()).dtype
    source = ArrayFrames(frames)
    gpx, _ = _global_pixels(source.get, len(frames), options, progress)
    engine = Outpainter(unet, vae, source, len(frames), fps, geom, gpx, options, device, dtype, progress)
    out = []
    engine.run(out.append)
    canvas = torch.stack([f.composite for f in out])                              # (N', 3, S, S)
    crops = {tuple(r): tensor_to_frames(crop(canvas, geom, r)) for r in geom.ratios}
    full = {}
    if options.keep_resolution:
        gen = torch.stack([f.generated for f in out])
        src = torch.stack([f.source for f in out])
        full = {tuple(r): tensor_to_frames(composite_full_res(src, gen, geom, r, options.feather))
                for r in geom.ratios}
    return OutpaintResult(canvas=tensor_to_frames(canvas), crops=crops, full_res=full, geometry=geom,
                          mask=pixel_mask(geom).to(torch.uint8).numpy(), stats=engine.stats)


# ----------------------------------------------------------------------------------------------------
# Files


def output_paths(path, out_dir, ratios) -> dict:
    """{ratio: out_dir/<stem>_<a>-<b>.mp4}; stem = the input's name up to its first '.' (as the reference).
    A still image (.png, .jpg, .jpeg) gives an image of its own format: <stem>_<a>-<b>.png."""
    from .video import is_image
    stem = Path(path).name.split(".")[0] or Path(path).stem
    suffix = Path(path).suffix.lower() if is_image(path) else ".mp4"
    return {tuple(r): Path(out_dir) / f"{stem}_{ratio_label(r, '-')}{suffix}" for r in ratios}


def check_output_dir(out_dir) -> Path:
    """Create the output folder if needed and check that it is writable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"Output folder {out_dir} is not a folder (a file has that name); choose another --out.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Output folder {out_dir} cannot be created ({e.strerror}); choose another --out.") from None
    if not out_dir.is_dir():
        raise UserError(f"Output folder {out_dir} is not a folder; choose another --out.")
    try:
        create_temp(out_dir / "m3ddm-write-test", "probe").unlink()
    except OSError:
        raise UserError(f"Output folder {out_dir} is not writable; choose another --out or fix its permissions.") from None
    return out_dir


def check_not_input(targets, path):
    """UserError when an output name is (or links to) the input file."""
    for target in targets:
        target = Path(target)
        if (target.exists() and os.path.samefile(target, path)) or target.resolve() == Path(path).resolve():
            raise UserError(f"Output {target} is the input video itself; choose another --out folder.")


def _preview(rows: list, mask: torch.Tensor) -> np.ndarray:
    """uint8 (H, W, 3) grid: one row per sampled frame; columns = input on its canvas | mask (white =
    generated) | output canvas."""
    mask_rgb = (mask.cpu() * 255).to(torch.uint8).expand(3, -1, -1)           # (3, S, S)
    lines = [torch.cat([f.masked, mask_rgb, f.composite], dim=2) for f in rows]  # (3, S, 3S) each
    return tensor_to_frames(torch.cat(lines, dim=1)[None])[0]


def outpaint_video(path, out_dir, unet, vae, ratios: Sequence[tuple], options: Optional[OutpaintOptions] = None,
                   device="cpu", dtype=None, weights: Optional[dict] = None, progress="stderr",
                   argv: Optional[dict] = None) -> dict:
    """Outpaint one video file to every ratio. Returns the run record (also written as <stem>.json).

    Writes `out_dir/<stem>_<a>-<b>.mp4` per ratio (H.264, source fps, source audio copied),
    `<stem>.json` and `<stem>_preview.png`. Nothing appears under a final name unless complete.
    weights: {"unet": path, "vae": path} for the record (their sha256 is recorded). progress: as outpaint_frames.
    """
    from .video import probe, read_frames_at
    options, progress = (options or OutpaintOptions()).check(), _progress(progress)
    t_start = time.perf_counter()
    info = probe(path)
    ratios = [tuple(r) for r in ratios]
    skipped = [r for r in ratios if not needs_outpainting(info.hw, r)]
    if len(skipped) == len(ratios):
        raise UserError(f"{path} is already {', '.join(ratio_label(r) for r in ratios)} ({info.width}x{info.height}); "
                        "nothing to outpaint: choose another --ratio.")
    ratios = [r for r in ratios if r not in skipped]
    out_dir = check_output_dir(out_dir)
    stale = _remove_debris(out_dir, progress)
    outputs = output_paths(path, out_dir, ratios)
    stem = Path(path).name.split(".")[0] or Path(path).stem
    side_files = [out_dir / f"{stem}.json", out_dir / f"{stem}_preview.png"]
    check_not_input(list(outputs.values()) + side_files, path)
    geom = canvas_geometry(info.hw, ratios, options.size)
    _check_models(unet, vae, options)
    dtype = dtype or next(unet.parameters()).dtype

    gpx, gidx = _global_pixels(lambda idx: frames_to_tensor(read_frames_at(path, idx, info)), info.num_frames, options,
                               progress)
    engine = Outpainter(unet, vae, StreamingFrames(path, info), info.num_frames, info.fps, geom, gpx, options,
                        device, dtype, progress)
    n_out = engine.schedule.num_output
    preview_at = sorted({0, n_out // 2, n_out - 1})
    preview_rows = []
    writers = {}
    try:
        for r, target in outputs.items():
            if options.keep_resolution:
                height, width = full_res_layout(geom, r).out_hw
            else:
                width, height = geom.crops[r][2:]
            writers[r] = _writer(target, width, height, info, engine.schedule.num_output)

        def emit(frame: FinalFrame):
            if frame.index in preview_at:
                preview_rows.append(frame)
            for r, w in writers.items():
                if options.keep_resolution:
                    out = composite_full_res(frame.source[None], frame.generated[None], geom, r, options.feather)
                else:
                    out = crop(frame.composite[None], geom, r)
                w.write(tensor_to_frames(out))

        stats = engine.run(emit)
        written = {r: str(w.close()) for r, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    audio_notes = {ratio_label(r): w.audio_note for r, w in writers.items() if w.audio_note}

    write_atomic(side_files[1], lambda tmp: _imwrite_png(tmp, _preview(preview_rows, engine.pix_mask)))
    record = {
        "m3ddm_version": __version__,
        "input": str(path),
        "outputs": {ratio_label(r): p for r, p in written.items()},
        "preview": str(side_files[1]),
        "skipped_ratios": {ratio_label(r): "the input already has this ratio; no output written" for r in skipped},
        "arguments": argv or {},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        "weights": {k: {"path": str(p), "sha256": _sha256(p)} for k, p in (weights or {}).items()},
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "video": _video_record(info),
        "removed_stale_temps": [p.name for p in stale],
        "num_output_frames": n_out,
        "geometry": {"canvas": geom.size, "resized_hw": list(geom.resized_hw), "pad": list(geom.pad),
                     "crops": {ratio_label(r): list(b) for r, b in geom.crops.items()},
                     "full_res": {ratio_label(r): list(full_res_layout(geom, r).out_hw) for r in geom.ratios}
                     if options.keep_resolution else {}},
        "global_frame_indices": gidx, "notes": [n for n in [global_frames_note(info.num_frames, options)] if n],
        "strides_used": list(engine.schedule.strides),
        "clips_per_stride": {str(k): v for k, v in stats.clips_per_stride.items()},
        "num_clips": len(engine.schedule.clips),
        "unet_calls": stats.unet_calls, "unet_batch": stats.unet_batch,
        "audio_notes": audio_notes,
        "timings_s": {**{k: round(v, 3) for k, v in stats.timings.items()},
                      "total": round(time.perf_counter() - t_start, 3)},
    }
    write_atomic(side_files[0], lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    record["record"] = str(side_files[0])
    return record


def _remove_debris(out_dir: Path, progress) -> list:
    """Remove the temporary files that killed runs left in out_dir (dead writers on this host only)."""
    stale = remove_stale_temps(out_dir)
    if stale and progress is not None:
        progress(f"removed {len(stale)} temporary file(s) left by a killed run in {out_dir}")
    return stale


def _video_record(info) -> dict:
    return {"num_frames": info.num_frames, "fps": info.fps, "fps_fraction": str(info.fps_fraction),
            "width": info.width, "height": info.height, "codec": info.codec, "has_audio": info.has_audio,
            "audio_codec": info.audio_codec, "duration_s": round(info.duration, 6), "variable_frame_rate": info.vfr,
            "max_drift_s": round(info.max_drift, 6), "start_time_s": round(info.start_time, 6)}


def _writer(target: Path, width: int, height: int, info, num_frames: int):
    """The output writer for one ratio: a still image for image inputs, else H.264 with the source's audio
    and, for a variable-frame-rate source, the source's frame times (m3ddm/video.py)."""
    from .video import ImageWriter, VideoWriter, is_image
    if is_image(target):
        return ImageWriter(target, width, height)
    timestamps = info.timestamps[:num_frames] if info.vfr else None
    return VideoWriter(target, width, height, info.fps_fraction, audio_from=info.path, timestamps=timestamps,
                       time_base=info.time_base, audio_start=info.start_time)


def _imwrite_png(path, image: np.ndarray):
    import imageio.v2 as imageio
    imageio.imwrite(path, image, format="png")


_SHA_CACHE = {}


def _sha256(path) -> str:
    from .weights import sha256_file
    key = (str(path), os.path.getmtime(path))
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def progress_to_stderr(prefix: str = "") -> Callable[[str], None]:
    from .cli import progress_line
    return lambda line: progress_line(f"{prefix}{line}")


def _progress(progress) -> Optional[Callable[[str], None]]:
    """The entry points' `progress`: "stderr" -> lines on stderr, None -> silent, a callable -> itself."""
    return progress_to_stderr() if progress == "stderr" else progress
