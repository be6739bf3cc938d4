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
import shutil
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
from .resume import describe_differences
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
    resumed_from_clip: int = 0      # clips taken from the work folder of an interrupted run
    max_work_bytes: int = 0         # largest size of the work folder during the run


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
        self.first_clip, self.release_at = _first_and_last_use(self.schedule)
        self._drop_after = {}  # clip -> work-folder state files no clip after it needs

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

    def _new_frames(self, clip) -> list:
        """The clip's frames that no earlier clip had: their inputs are encoded with this clip."""
        return sorted(f for f in set(clip.frames) if self.first_clip[f] == clip.index)

    def _clip_pixels(self, clip, encode: bool = True) -> dict:
        """Read the clip's new frames and those that become final now; encode the new ones (encode=True).
        Returns {frame: (masked canvas (3, S, S), source frame (3, H, W))} for the frames read. The frames read
        depend on the schedule alone, so a resumed run reads (and resizes) them in the same groups."""
        new = self._new_frames(clip)
        idx = sorted(set(new) | {f for f, _ in clip.final})
        if not idx:
            return {}
        masked, src = self._canvases(idx)
        if new and encode:
            self._encode_inputs(new, masked[[idx.index(f) for f in new]])
        return {f: (masked[k], src[k]) for k, f in enumerate(idx)}

    def _say(self, line: str):
        if self.progress is not None:
            self.progress(line)

    def _step_reporter(self, c: int, first: int = 0):
        """on_step hook of the first clip this run samples (clip `first`, 0 unless resumed): `clip c/n  step i/N`
        about ten times (no host sync), so its minutes are not silent; later clips report once each (`_report`)."""
        if c > first or self.progress is None:
            return None
        total, n = len(sampling_timesteps(make_scheduler(self.options))[1]), len(self.schedule.clips)
        every = max(1, total // 10)

        def on_step(i, *_):
            if i == 0 or (i + 1) % every == 0:
                self._say(f"clip {c + 1}/{n}  step {i + 1}/{total}")
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

    @staticmethod
    def _final_latents(clip, final: torch.Tensor) -> Optional[torch.Tensor]:
        """The latents of the frames that are final after this clip (last writer wins): a fresh contiguous
        fp32 (n, 4, h, w), what the work folder stores and a resumed run decodes again; None if there are none."""
        if not clip.final:
            return None
        return final[0, :, [k for _, k in clip.final]].permute(1, 0, 2, 3).contiguous()

    def _finish(self, clip, z: Optional[torch.Tensor], pixels: dict) -> list:
        """Decode and composite the final frames of this clip from their latents z (n, 4, h, w)."""
        if z is None:
            return []
        t0 = time.perf_counter()
        z = z.to(self.device, self.dtype)
        generated = from_model(self.vae.decode_latents(z, batch=self.options.vae_batch))  # (n, 3, S, S) uint8
        masked = torch.stack([pixels[f][0] for f, _ in clip.final])
        composite = paste_known(generated, masked, self.geom, feather=self.options.feather)
        self.stats.timings["decode"] += time.perf_counter() - t0
        return [FinalFrame(f, generated[j].cpu(), masked[j].cpu(), composite[j].cpu(), pixels[f][1])
                for j, (f, _) in enumerate(clip.final)]

    def _release(self, clip, work=None):
        self.stats.max_cached_inputs = max(self.stats.max_cached_inputs, len(self.inputs))
        self.stats.max_stored_latents = max(self.stats.max_stored_latents, len(self.stored))
        for f in clip.release:
            self.inputs.pop(f, None)
            self.stored.pop(f, None)
        for j in self._drop_after.pop(clip.index, []):
            work.drop_state(j)

    def _prepare(self) -> tuple:
        """The global context and the black latent, once per run (a resumed run computes them again)."""
        t0 = time.perf_counter()
        if self.global_pixels is not None:
            self._say(f"encoding {len(self.global_pixels)} global frames")
        context = self._global_context()
        black = self._black_latent()                                        # (1, 4, h, w)
        self.stats.timings["global"] += time.perf_counter() - t0
        opts = self.options
        self.stats.unet_batch = len(sampler_branches(opts.guidance_local, opts.guidance_global,
                                                     context.real is not None, opts.plain))
        return context, black

    @torch.no_grad()
    def run(self, emit: Callable[[FinalFrame], None], work=None) -> RunStats:
        """Run the schedule; emit(FinalFrame) for every output frame in frame order. work: a resume.WorkFolder
        to continue from (its position) and to record every finished clip in, or None."""
        context, black = self._prepare()
        if self.options.plain:
            self.unet.set_attention("math", per_frame_context=True)
        out = _InOrder(emit, self.stats)
        try:
            first = self._resume(work, out) if work is not None else 0
            start = time.perf_counter()
            for clip in self.schedule.clips[first:]:
                if clip.index == first:
                    self._say(f"clip {first + 1}/{len(self.schedule.clips)}: reading and encoding its frames")
                pixels = self._clip_pixels(clip)
                final = self._sample(clip, context, black, self._step_reporter(clip.index, first))
                z = self._final_latents(clip, final)
                if work is not None:
                    self._record_clip(work, clip, z)
                out.add(self._finish(clip, z, pixels))
                self._release(clip, work)
                self._report(clip.index, clip, start, first)
        finally:
            if self.options.plain:
                self.unet.set_attention("sdpa", per_frame_context=False)
            self.frames.close()
        if out.next != self.schedule.num_output or out.pending:
            raise RuntimeError(f"internal error: emitted {out.next} of {self.schedule.num_output} frames")
        return self.stats

    # -- the work folder (m3ddm/resume.py)

    def _record_clip(self, work, clip, z: Optional[torch.Tensor]):
        """Store what a restart after this clip needs: its new guides and inputs while a later clip uses one of
        them, its final latents, the VAE sampling RNG state; then the position."""
        stored = {clip.frames[k]: self.stored[clip.frames[k]] for k in clip.store}
        inputs = {f: self.inputs[f] for f in self._new_frames(clip)}
        last_use = max((self.release_at[f] for f in {*stored, *inputs}), default=clip.index)
        state = {"stored": stored, "inputs": inputs} if last_use > clip.index else None
        if state:
            self._drop_after.setdefault(last_use, []).append(clip.index)
        work.save_clip(clip.index, state, z, self.vae_gen.get_state() if self.vae_gen is not None else None)
        self.stats.max_work_bytes = max(self.stats.max_work_bytes, work.size_bytes())

    def _resume(self, work, out) -> int:
        """Continue an interrupted run: restore the latents still needed, decode the finished frames again
        from their stored latents (clip by clip, as they were decoded), and return the next clip to run."""
        first = work.next_clip
        if first and self.vae_gen is not None and work.vae_rng is not None:
            self.vae_gen.set_state(work.vae_rng)
        done = sum(len(clip.final) for clip in self.schedule.clips[:first])
        if first:
            self._say(f"resuming {work.path.name}: {first} clips done, decoding their {done} final frames again")
        for clip in self.schedule.clips[:first]:
            self._restore_state(work, clip, first)
            if clip.final:
                out.add(self._finish(clip, work.load_final(clip.index), self._clip_pixels(clip, encode=False)))
            self.stats.clips_per_stride[clip.stride] = self.stats.clips_per_stride.get(clip.stride, 0) + 1
            self.stats.unet_calls += len(sampling_timesteps(make_scheduler(self.options))[1])
        self.stats.resumed_from_clip = first
        if first:
            self._say(f"resumed after clip {first}/{len(self.schedule.clips)} from {work.path}")
        return first

    def _restore_state(self, work, clip, first: int):
        """Take clip's stored and input latents that clips from `first` on still use."""
        state = work.load_state(clip.index)
        if state is None:
            return
        live = [f for f in {*state["stored"], *state["inputs"]} if self.release_at[f] >= first]
        if not live:
            work.drop_state(clip.index)           # left by a run killed before it pruned the file
            return
        self._drop_after.setdefault(max(self.release_at[f] for f in live), []).append(clip.index)
        self.stored.update({f: t for f, t in state["stored"].items() if self.release_at[f] >= first})
        self.inputs.update({f: t for f, t in state["inputs"].items() if self.release_at[f] >= first})

    def _report(self, c: int, clip, start: float, first: int = 0):
        if self.progress is None:
            return
        n = len(self.schedule.clips)
        elapsed = time.perf_counter() - start
        eta = elapsed / (c + 1 - first) * (n - c - 1)
        self.progress(f"stride {clip.stride:>2}  clip {c + 1}/{n}  elapsed {_hms(elapsed)}  ETA {_hms(eta)}")


class _InOrder:
    """Hands frames to emit in frame order (a frame can be final before an earlier one)."""

    def __init__(self, emit: Callable[[FinalFrame], None], stats: RunStats):
        self.emit, self.stats, self.pending, self.next = emit, stats, {}, 0

    def add(self, frames: list):
        t0 = time.perf_counter()
        self.pending.update({f.index: f for f in frames})
        while self.next in self.pending:
            self.emit(self.pending.pop(self.next))
            self.next += 1
        self.stats.timings["write"] += time.perf_counter() - t0


def _first_and_last_use(schedule: Schedule) -> tuple:
    """({frame: index of the first clip with it}, {frame: index of the clip after which it is released})."""
    first, release = {}, {}
    for clip in schedule.clips:
        for f in clip.frames:
            first.setdefault(f, clip.index)
        for f in clip.release:
            release[f] = clip.index
    return first, release


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
    stem = output_stem(path)
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


def output_stem(path) -> str:
    """The name outputs are made from: the input's name up to its first '.' (as the reference)."""
    return Path(path).name.split(".")[0] or Path(path).stem


def made_with(ratios, options: OutpaintOptions, dtype, weight_sha256: Optional[dict]) -> dict:
    """What an output depends on, as its run record and its work folder store it: every option, the ratios
    written, the dtype and the weights' sha256 (None: no weights files named, so nothing can be matched).
    Not the device index, the output folder or the progress settings."""
    return {"options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
            "ratios": sorted(ratio_label(r) for r in ratios), "dtype": str(dtype).replace("torch.", ""),
            "weights": dict(sorted(weight_sha256.items())) if weight_sha256 else None}


@dataclass
class VideoJob:
    """One input file's run, decided before a frame is read (`plan_video`)."""
    path: Path
    info: object            # video.VideoInfo
    ratios: list            # the ratios written
    skipped: list           # requested ratios the input already has (nothing written for them)
    out_dir: Path
    outputs: dict           # ratio -> output path
    record_path: Path       # <stem>.json
    preview_path: Path      # <stem>_preview.png
    geom: CanvasGeometry
    options: OutpaintOptions
    dtype: torch.dtype
    weights: dict           # {"unet": path, "vae": path} or {}
    made_with: dict
    stale: list             # dead writers' temporary files removed from out_dir

    @property
    def work_path(self) -> Path:
        from .resume import work_folder_path
        return work_folder_path(self.out_dir, output_stem(self.path))


def plan_video(path, out_dir, ratios, options: OutpaintOptions, unet, vae, dtype, weights=None, info=None,
               progress=None) -> VideoJob:
    """Probe the input (unless info is given) and decide the ratios, the output names and the canvas; check
    the output folder, that no output is the input, and that the models take this --size."""
    from .video import probe
    info = info or probe(path)
    ratios = [tuple(r) for r in ratios]
    skipped = [r for r in ratios if not needs_outpainting(info.hw, r)]
    if len(skipped) == len(ratios):
        raise UserError(f"{path} is already {', '.join(ratio_label(r) for r in ratios)} ({info.width}x{info.height}); "
                        "nothing to outpaint: choose another --ratio.")
    ratios = [r for r in ratios if r not in skipped]
    out_dir = check_output_dir(out_dir)
    stale = _remove_debris(out_dir, progress)
    outputs = output_paths(path, out_dir, ratios)
    stem = output_stem(path)
    record_path, preview_path = out_dir / f"{stem}.json", out_dir / f"{stem}_preview.png"
    check_not_input(list(outputs.values()) + [record_path, preview_path], path)
    geom = canvas_geometry(info.hw, ratios, options.size)
    _check_models(unet, vae, options)
    weights = dict(weights or {})
    sha = {k: _sha256(p) for k, p in weights.items()}
    return VideoJob(Path(path), info, ratios, skipped, out_dir, outputs, record_path, preview_path, geom, options,
                    dtype, weights, made_with(ratios, options, dtype, sha), stale)


def check_existing(job: VideoJob, overwrite: bool) -> Optional[dict]:
    """The run record when every output exists and was made with the same options, ratios, dtype and weights
    (the video is done); None when the video is to be made. UserError when an output or record exists that was
    made otherwise (or cannot say how) and overwrite is off."""
    present = [p for p in [*job.outputs.values(), job.record_path] if p.exists()]
    if not present:
        return None
    try:
        made = json.loads(job.record_path.read_text()).get("made_with")
    except (OSError, ValueError, AttributeError):
        made = None
    known = job.made_with["weights"] is not None
    if known and made == job.made_with:
        if all(p.exists() for p in job.outputs.values()):
            if job.work_path.is_dir():       # a run killed after its record, before removing its work folder
                shutil.rmtree(job.work_path, ignore_errors=True)
            return json.loads(job.record_path.read_text())
        return None                          # an output was deleted: make them again, the same way
    if overwrite:
        return None
    if not known:
        why = "this run names no weights files (weights=), so it cannot tell how that was made"
    elif made is None:
        why = f"no run record ({job.record_path.name}) says how it was made"
    else:
        why = f"it was made with other settings: {describe_differences(made, job.made_with)}"
    raise UserError(f"{present[0]} exists and {why}; pass --overwrite to replace it, or choose another --out.")


def open_work_folder(job: VideoJob, device, overwrite: bool):
    """The resume.WorkFolder of this video (continued when it is an unfinished run of the same settings), or
    None when no weights files are named (their sha256 is what ties a work folder to its model)."""
    from .resume import WorkFolder
    if job.made_with["weights"] is None:
        return None
    info = job.info
    key = {"made_with": job.made_with, "device_type": torch.device(device).type,
           "source": {"name": job.path.name, "size_bytes": job.path.stat().st_size, "num_frames": info.num_frames,
                      "width": info.width, "height": info.height, "fps": str(info.fps_fraction)}}
    return WorkFolder.open(job.work_path, key, overwrite, job.path.name)


def remaining_clips(job: VideoJob) -> int:
    """The clips still to run for this video: its schedule's, less those an unfinished run has done."""
    from .resume import finished_clips
    n = len(build_schedule(job.info.num_frames, job.options.strides, job.options.limit_frames).clips)
    return n - min(n, finished_clips(job.work_path))


def outpaint_video(path, out_dir, unet, vae, ratios: Sequence[tuple], options: Optional[OutpaintOptions] = None,
                   device="cpu", dtype=None, weights: Optional[dict] = None, progress="stderr",
                   argv: Optional[dict] = None, overwrite: bool = False, info=None, preview=None) -> dict:
    """Outpaint one video file to every ratio. Returns the run record (also written as <stem>.json) with
    "status": "made", or "skipped" when the outputs already exist and were made the same way.

    Writes `out_dir/<stem>_<a>-<b>.mp4` per ratio (H.264, source fps, source audio copied),
    `<stem>.json` and `<stem>_preview.png`. Nothing appears under a final name unless complete.
    weights: {"unet": path, "vae": path}; their sha256 goes into the record and ties outputs and the work
    folder to the model. With weights, an interrupted run keeps `<stem>.m3ddm-work/` and the next call with
    the same settings continues it (m3ddm/resume.py). An existing output made otherwise is replaced only with
    overwrite=True. info: the input's video.VideoInfo, when already probed. progress: as outpaint_frames.
    preview: a function (preview path, {ratio: output path}) that writes the preview instead of the built-in
    input | output grid (sample.py --truth draws truth | input | output).
    """
    options, progress = (options or OutpaintOptions()).check(), _progress(progress)
    t_start = time.perf_counter()
    dtype = dtype or next(unet.parameters()).dtype
    job = plan_video(path, out_dir, ratios, options, unet, vae, dtype, weights, info, progress)
    done = check_existing(job, overwrite)
    if done is not None:
        return {**done, "record": str(job.record_path), "status": "skipped"}
    work = open_work_folder(job, device, overwrite)
    engine = _engine(job, unet, vae, device, dtype, progress)
    written, preview_rows, audio_notes = _write_outputs(job, engine, work)
    if preview is None:
        write_atomic(job.preview_path, lambda tmp: _imwrite_png(tmp, _preview(preview_rows, engine.pix_mask)))
    else:
        preview(job.preview_path, written)
    record = _run_record(job, engine, written, audio_notes, argv, device, time.perf_counter() - t_start)
    write_atomic(job.record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    if work is not None:
        work.remove()
    return {**record, "record": str(job.record_path), "status": "made"}


def _engine(job: VideoJob, unet, vae, device, dtype, progress) -> Outpainter:
    from .video import read_frames_at
    info = job.info
    gpx, _ = _global_pixels(lambda idx: frames_to_tensor(read_frames_at(job.path, idx, info)), info.num_frames,
                            job.options, progress)
    return Outpainter(unet, vae, StreamingFrames(job.path, info), info.num_frames, info.fps, job.geom, gpx,
                      job.options, device, dtype, progress)


def _write_outputs(job: VideoJob, engine: Outpainter, work) -> tuple:
    """Run the engine into one writer per ratio. Returns ({ratio: path written}, preview frames, audio notes);
    on any failure (or a signal) every writer is aborted, leaving nothing under a final name."""
    n_out = engine.schedule.num_output
    preview_at, preview_rows, writers = sorted({0, n_out // 2, n_out - 1}), [], {}
    try:
        for r, target in job.outputs.items():
            height, width = _output_hw(job, r)
            writers[r] = _writer(target, width, height, job.info, n_out)

        def emit(frame: FinalFrame):
            if frame.index in preview_at:
                preview_rows.append(frame)
            for r, w in writers.items():
                w.write(tensor_to_frames(_output_frame(job, frame, r)))

        engine.run(emit, work)
        written = {r: str(w.close()) for r, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return written, preview_rows, {ratio_label(r): w.audio_note for r, w in writers.items() if w.audio_note}


def _output_hw(job: VideoJob, ratio) -> tuple:
    if job.options.keep_resolution:
        return full_res_layout(job.geom, ratio).out_hw
    width, height = job.geom.crops[ratio][2:]
    return height, width


def _output_frame(job: VideoJob, frame: FinalFrame, ratio) -> torch.Tensor:
    """(1, 3, h, w) uint8: the frame as written for one ratio."""
    if job.options.keep_resolution:
        return composite_full_res(frame.source[None], frame.generated[None], job.geom, ratio, job.options.feather)
    return crop(frame.composite[None], job.geom, ratio)


def _run_record(job: VideoJob, engine: Outpainter, written: dict, audio_notes: dict, argv, device,
                seconds: float) -> dict:
    geom, options, stats = job.geom, job.options, engine.stats
    return {
        "m3ddm_version": __version__,
        "input": str(job.path),
        "outputs": {ratio_label(r): p for r, p in written.items()},
        "preview": str(job.preview_path),
        "skipped_ratios": {ratio_label(r): "the input already has this ratio; no output written" for r in job.skipped},
        "arguments": argv or {},
        "options": job.made_with["options"],
        "made_with": job.made_with,
        "weights": {k: {"path": str(p), "sha256": _sha256(p)} for k, p in job.weights.items()},
        "device": str(device), "dtype": job.made_with["dtype"],
        "video": _video_record(job.info),
        "removed_stale_temps": [p.name for p in job.stale],
        "num_output_frames": engine.schedule.num_output,
        "geometry": {"canvas": geom.size, "resized_hw": list(geom.resized_hw), "pad": list(geom.pad),
                     "crops": {ratio_label(r): list(b) for r, b in geom.crops.items()},
                     "full_res": {ratio_label(r): list(full_res_layout(geom, r).out_hw) for r in geom.ratios}
                     if options.keep_resolution else {}},
        "global_frame_indices": global_frame_indices(job.info.num_frames, options.global_frames)
        if options.global_frames else [],
        "notes": [n for n in [global_frames_note(job.info.num_frames, options)] if n],
        "strides_used": list(engine.schedule.strides),
        "clips_per_stride": {str(k): v for k, v in stats.clips_per_stride.items()},
        "num_clips": len(engine.schedule.clips),
        "resumed_from_clip": stats.resumed_from_clip,
        "work_folder_peak_bytes": stats.max_work_bytes,
        "unet_calls": stats.unet_calls, "unet_batch": stats.unet_batch,
        "audio_notes": audio_notes,
        "timings_s": {**{k: round(v, 3) for k, v in stats.timings.items()}, "total": round(seconds, 3)},
    }


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
