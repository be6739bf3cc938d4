"""python -m m3ddm.bench: time, peak memory and FLOPs of the UNet, one clip, the VAE and a whole video.

Everything is measured in one process on the same inputs: random weights from a fixed seed (speed does
not depend on the weights) and synthetic latents/frames, unless --video gives a real clip. Each row
reports the median and spread of --repeats timed runs after --warmup untimed ones, the peak memory of
the row, the FLOPs of one run counted by torch's FlopCounterMode (matmuls and convolutions) and the
achieved TFLOP/s. The per-clip section runs the fast sampler path and the reference-shaped plain path
(4 guidance branches, global latents re-encoded per step, per-frame cross-attention keys/values,
math attention, fp32) on the same noise and reports their speed ratio and max relative difference.
The FLOPs of one UNet call are also counted on the meta device (shapes only), so the full configuration
can be costed on any machine. --scaling runs the whole-video row at several frame counts.

Peak memory: CUDA max allocated bytes; on CPU the process's peak RSS (ru_maxrss). On Linux the RSS
high-water mark is reset before each row (/proc/self/clear_refs), so the number is that row's own peak
(including everything the process already holds); elsewhere it is the process peak since start.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import cli
from .errors import UserError
from .sampler import (assemble_conditioning, clip_noise, denoise_clip, encode_global_context,
                      sampler_branches)
from .schedulers import PNDMScheduler
from .unet3d import UNET_PRESETS, UNet3D
from .vae import VAE_PRESETS, AutoencoderKL
from .weights import DTYPES

SECTIONS = ("unet", "clip", "vae", "video")
NUM_GLOBAL = 16            # global frames of M3DDM+ (spec pipeline.md section 3)
GUIDANCE_LOCAL, GUIDANCE_GLOBAL = 2.0, 4.0
UNET_FPS = 4               # any fps conditioning; speed does not depend on it
BENCH_TIMESTEP = 961       # the first timestep of the reference's loop


# ----------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One measured thing: timings of the repeats, peak memory, FLOPs of one run."""
    section: str
    name: str
    times_s: list
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    peak_mem_bytes: int
    mem_kind: str
    flops: Optional[int]
    tflops_per_s: Optional[float]
    info: dict = field(default_factory=dict)


class PeakMemory:
    """Peak memory of one row: CUDA max allocated, or the CPU peak RSS (reset per row where Linux allows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_process_peak_rss"

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets the peak RSS (VmHWM, which ru_maxrss reports) to the current RSS, Linux >= 4.0
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_peak_rss_of_row"
        except OSError:
            self.kind = "cpu_process_peak_rss"

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V of a fused attention call: 2 * 2 * batch * heads * Lq * Lk * d multiply-adds."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


def _extra_flop_formulas() -> dict:
    """FlopCounterMode knows the CUDA fused attention kernels but not the CPU one (it would count 0)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def count_flops(fn: Callable) -> int:
    """FLOPs of one call of fn (matmuls, convolutions and attention; elementwise work is not counted)."""
    with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def spread(times: list) -> tuple:
    """(median, min, max, interquartile range) of the timed runs."""
    med = statistics.median(times)
    if len(times) < 2:
        return med, min(times), max(times), 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return med, min(times), max(times), q3 - q1


def measure(section: str, name: str, fn: Callable, args, device: torch.device,
            flop_fn: Optional[Callable] = None, info: Optional[dict] = None) -> tuple:
    """Count FLOPs in one untimed run of flop_fn (default fn; pass the eager model when fn is compiled),
    then --warmup untimed and --repeats timed runs of fn. Returns (Row, output of the last run)."""
    memory = PeakMemory(device)
    memory.reset()
    flops = count_flops(flop_fn or fn) if args.flops else None
    out = None
    for _ in range(args.warmup):
        out = fn()
    synchronize(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    med, lo, hi, iqr = spread(times)
    rate = flops / med / 1e12 if flops and med > 0 else None
    row = Row(section, name, times, med, lo, hi, iqr, memory.read(), memory.kind, flops, rate, info or {})
    progress(f"{section}: {name}: median {med:.3f} s")
    return row, out


def progress(message: str):
    cli.progress_line(f"[bench] {message}")


# ----------------------------------------------------------------------------------------------------
# Models and inputs


def randomize_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from a seeded generator. A fresh UNet zero-initialises its attention outputs
    and makes its temporal halves identities, which would hide attention from the fast/plain comparison."""
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                value = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
            elif name.endswith("weight"):   # norm scales
                value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            else:                           # biases and norm shifts
                value = 0.02 * torch.randn(p.shape, generator=gen)
            p.copy_(value.to(p.dtype))
    return model


def build_unet(config: str, seed: int, device: torch.device) -> UNet3D:
    """The UNet of a preset with seeded random weights, fp32, eval mode."""
    torch.manual_seed(seed)   # module constructors draw from the global RNG; this is the bench process only
    unet = UNet3D(copy.deepcopy(UNET_PRESETS[config]))
    return randomize_weights_(unet, seed).to(device).eval()


def build_vae(config: str, seed: int, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(copy.deepcopy(VAE_PRESETS[config]))
    return randomize_weights_(vae, seed).to(device=device, dtype=dtype).eval()


@contextmanager
def plain_attention(unet: UNet3D):
    """The reference's attention inside the block: math softmax and per-frame cross-attention keys/values."""
    unet.set_attention("math", per_frame_context=True)
    try:
        yield unet
    finally:
        unet.set_attention("sdpa", per_frame_context=False)


@dataclass
class Models:
    """The plain (fp32, eager) UNet, the fast UNet (--dtype, maybe compiled) and its eager module."""
    plain: UNet3D
    fast_eager: UNet3D
    fast: Callable


def build_models(args, device: torch.device, dtype: torch.dtype) -> Models:
    plain = build_unet(args.config, args.seed, device)
    plain.set_attention("sdpa", per_frame_context=False)
    fast_eager = plain if dtype == torch.float32 else copy.deepcopy(plain).to(dtype)
    fast = fast_eager
    if args.compile:
        # CUDA graphs ("reduce-overhead") remove the per-kernel launch cost that dominates small shapes
        mode = "reduce-overhead" if device.type == "cuda" else None
        fast = torch.compile(fast_eager, mode=mode, dynamic=False)
    return Models(plain, fast_eager, fast)


@dataclass
class ClipInputs:
    """Synthetic latents of one clip, shaped like the pipeline's (spec pipeline.md 5.3)."""
    start: torch.Tensor            # (1, 4, F, h, w) border-filled frame latents
    noise: torch.Tensor            # (1, 4, F, h, w)
    conditioning: object           # ClipConditioning
    global_latents: torch.Tensor   # (G, 4, h, w)


def make_clip_inputs(args, device: torch.device) -> ClipInputs:
    """Random latents from the seed; the mask outpaints the top and bottom quarters (a 2:1 -> 1:1 canvas)
    and the first and last frames are guides, as in a fine-stage clip."""
    gen = torch.Generator("cpu").manual_seed(args.seed)
    f, h = args.frames, args.size // 8
    shape = (1, 4, f, h, h)
    start = torch.randn(shape, generator=gen)
    masked = torch.randn(shape, generator=gen)
    black = torch.randn((1, 4, h, h), generator=gen)
    global_latents = torch.randn((NUM_GLOBAL, 4, h, h), generator=gen)
    mask = torch.zeros(h, h)
    mask[: h // 4] = 1
    mask[h - h // 4:] = 1
    guides = [None] * f
    if f > 2:
        guides[0] = torch.randn((1, 4, h, h), generator=gen)
        guides[-1] = torch.randn((1, 4, h, h), generator=gen)
    conditioning = assemble_conditioning(masked, black, mask, guides)
    for name in ("cond_latents", "cond_mask", "uncond_latents", "uncond_mask"):
        setattr(conditioning, name, getattr(conditioning, name).to(device))
    noise = clip_noise(args.seed, shape, device=device)
    return ClipInputs(start.to(device), noise, conditioning, global_latents.to(device))


# ----------------------------------------------------------------------------------------------------
# Sections


def bench_unet(args, models: Models, inputs: ClipInputs, device, dtype) -> list:
    """One UNet call: the fast form (--batch, --dtype, shared global tokens, fused attention) and the
    reference form (4-way batch, fp32, global latents encoded inside the call, per-frame keys/values)."""
    gen = torch.Generator("cpu").manual_seed(args.seed + 1)
    h, f = args.size // 8, args.frames
    x = torch.randn((4, 9, f, h, h), generator=gen).to(device)
    with torch.no_grad():
        tokens = models.fast_eager.encode_global(inputs.global_latents[None].to(dtype))   # (1, T, 320)
    x_fast = x[:1].expand(args.batch, -1, -1, -1, -1).to(dtype)
    context = tokens.expand(args.batch, -1, -1)
    # device tensors made once: a Python scalar would be a host-to-device copy per call (and a recompile
    # per value under torch.compile)
    t, fps = torch.tensor(BENCH_TIMESTEP, device=device), torch.tensor([UNET_FPS], device=device)

    @torch.no_grad()
    def fast(unet=models.fast):
        return unet(x_fast, t, fps, context=context)

    global_latents = inputs.global_latents[None].expand(4, -1, -1, -1, -1)

    @torch.no_grad()
    def plain():
        with plain_attention(models.plain):
            return models.plain(x, t, fps, global_latents=global_latents)

    shape = f"{args.frames}x{args.size}px"
    rows = [measure("unet", f"forward fast B={args.batch} {args.dtype} {shape}", fast, args, device,
                    flop_fn=lambda: fast(models.fast_eager), info={"batch": args.batch, "dtype": args.dtype})[0]]
    if not args.skip_plain:
        rows.append(measure("unet", f"forward plain B=4 fp32 {shape}", plain, args, device,
                            info={"batch": 4, "dtype": "fp32"})[0])
    return rows


def unet_call_flops(config: str, size: int, frames: int, batch: int) -> dict:
    """FLOPs of one UNet call, counted on the meta device (shapes only, no compute, any config on any
    machine): the fast form (batch, shared global tokens) and the reference form (4-way batch, per-frame
    cross-attention keys/values, global latents encoded inside the call)."""
    with torch.device("meta"):
        unet = UNet3D(copy.deepcopy(UNET_PRESETS[config])).eval()
        h = size // 8
        global_latents = torch.zeros(1, NUM_GLOBAL, 4, h, h)
        tokens = unet.encode_global(global_latents)
        x = torch.zeros(max(batch, 4), 9, frames, h, h)
    fast = count_flops(lambda: unet(x[:batch], BENCH_TIMESTEP, UNET_FPS, context=tokens.expand(batch, -1, -1)))
    with plain_attention(unet):
        plain = count_flops(lambda: unet(x[:4], BENCH_TIMESTEP, UNET_FPS,
                                         global_latents=global_latents.expand(4, -1, -1, -1, -1)))
    return {"config": config, "size": size, "frames": frames, "fast_batch": batch, "fast": fast,
            "plain_batch": 4, "plain": plain}


def run_clip(unet, inputs: ClipInputs, steps: int, plain: bool, dtype) -> torch.Tensor:
    """One whole clip (global tokens included) -> final latents (1, 4, F, h, w), fp32."""
    context = encode_global_context(unet, inputs.global_latents.to(dtype))
    return denoise_clip(unet, PNDMScheduler(steps), inputs.start, inputs.noise, inputs.conditioning, context,
                        UNET_FPS, guidance_local=GUIDANCE_LOCAL, guidance_global=GUIDANCE_GLOBAL, plain=plain)


def max_rel_diff(fast: torch.Tensor, plain: torch.Tensor) -> float:
    """max|fast - plain| / max|plain|."""
    plain = plain.float()
    return ((fast.float() - plain).abs().max() / plain.abs().max()).item()


def compare_clip_paths(unet: UNet3D, inputs: ClipInputs, steps: int) -> float:
    """Final latents of the fast and plain paths on the same model, inputs and noise, fp32: max rel diff."""
    fast = run_clip(unet, inputs, steps, plain=False, dtype=torch.float32)
    with plain_attention(unet):
        plain = run_clip(unet, inputs, steps, plain=True, dtype=torch.float32)
    return max_rel_diff(fast, plain)


def bench_clip(args, models: Models, inputs: ClipInputs, device, dtype) -> dict:
    """One clip of --steps PNDM steps, fast path vs plain path, same inputs and noise."""
    branches = {p: len(sampler_branches(GUIDANCE_LOCAL, GUIDANCE_GLOBAL, True, p)) for p in (False, True)}
    fast_row, fast_out = measure(
        "clip", f"fast ({branches[False]} branches, {args.dtype}{', compiled' if args.compile else ''})",
        lambda: run_clip(models.fast, inputs, args.steps, False, dtype), args, device,
        flop_fn=lambda: run_clip(models.fast_eager, inputs, args.steps, False, dtype),
        info={"steps": args.steps, "branches": branches[False], "dtype": args.dtype})
    result = {"rows": [fast_row], "steps": args.steps}
    if args.skip_plain:
        return result

    def plain():
        with plain_attention(models.plain):
            return run_clip(models.plain, inputs, args.steps, True, torch.float32)

    plain_row, plain_out = measure("clip", f"plain ({branches[True]} branches, fp32, math attention)",
                                   plain, args, device,
                                   info={"steps": args.steps, "branches": branches[True], "dtype": "fp32"})
    result["rows"].append(plain_row)
    result["speedup_fast_over_plain"] = plain_row.median_s / fast_row.median_s
    result["max_rel_diff"] = max_rel_diff(fast_out, plain_out)
    return result


def bench_vae(args, vae: AutoencoderKL, device, dtype) -> list:
    """Encode then decode --frames frames at --size px, in batches of --vae-batch."""
    gen = torch.Generator("cpu").manual_seed(args.seed + 2)
    pixels = (torch.rand((args.frames, 3, args.size, args.size), generator=gen) * 2 - 1).to(device, dtype)
    with torch.no_grad():
        latents = vae.encode_latents(pixels, batch=args.vae_batch)
    info = {"frames": args.frames, "vae_config": args.vae_config, "batch": args.vae_batch}
    encode = torch.no_grad()(lambda: vae.encode_latents(pixels, batch=args.vae_batch))
    decode = torch.no_grad()(lambda: vae.decode_latents(latents, batch=args.vae_batch))
    return [measure("vae", f"encode {args.frames}x{args.size}px {args.vae_config}", encode, args, device,
                    info=info)[0],
            measure("vae", f"decode {args.frames}x{args.size}px {args.vae_config}", decode, args, device,
                    info=info)[0]]


# ----------------------------------------------------------------------------------------------------
# Whole video


def synthetic_frames(num_frames: int, size: int, seed: int) -> np.ndarray:
    """uint8 (N, H, W, 3) landscape frames (about 16:9, W = size): a seeded colour field with a square
    moving across it, so every frame differs."""
    height = max(2, (size * 9 // 16) // 2 * 2)
    gen = torch.Generator("cpu").manual_seed(seed)
    base = torch.rand((3, 1, height // 2, size // 2), generator=gen)
    base = torch.nn.functional.interpolate(base, size=(height, size), mode="bilinear", align_corners=False)
    frames = (base[:, 0].permute(1, 2, 0) * 255).to(torch.uint8).repeat(num_frames, 1, 1, 1)  # (N, H, W, 3)
    side = max(2, height // 4)
    for i in range(num_frames):
        x = (i * 3) % max(1, size - side)
        frames[i, height // 3: height // 3 + side, x: x + side] = torch.tensor([230, 40, 40], dtype=torch.uint8)
    return frames.numpy()


def write_synthetic_video(num_frames: int, args) -> Path:
    """The synthetic frames as an H.264 file, so the whole-video row runs the real streaming pipeline."""
    from .video import VideoWriter
    folder = Path(args.out) / "video_input"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic_{num_frames}f_{args.size}px.mp4"
    frames = synthetic_frames(num_frames, args.size, args.seed)
    with VideoWriter(path, frames.shape[2], frames.shape[1], 30) as writer:
        writer.write(frames)
    return path


def target_ratio(path) -> tuple:
    """1:1 for a non-square source (outpaints two sides), 16:9 for a square one."""
    from .video import probe
    h, w = probe(path).hw
    return (16, 9) if h == w else (1, 1)


def bench_video(args, models: Models, vae: AutoencoderKL, device, dtype, num_frames: Optional[int] = None) -> Row:
    """A whole video file through pipeline.outpaint_video (decode, VAE, all clips, composite, H.264 out),
    fast path: time per clip and peak memory. Synthetic frames unless --video."""
    from .pipeline import OutpaintOptions, outpaint_video
    frames = num_frames or args.video_frames
    path = Path(args.video) if args.video and num_frames is None else write_synthetic_video(frames, args)
    ratio = target_ratio(path)
    out_dir = Path(args.out) / "video_output"
    out_dir.mkdir(parents=True, exist_ok=True)
    options = OutpaintOptions(size=args.size, steps=args.steps, seed=args.seed, vae_batch=args.vae_batch)

    def run(unet):
        return lambda: outpaint_video(path, out_dir, unet, vae, [ratio], replace(options), device=device,
                                      dtype=dtype, progress=None, overwrite=True)   # a repeat replaces the last

    real = bool(args.video) and num_frames is None
    source = path.name if real else f"synthetic {frames}f"
    name = f"{source} {args.size}px -> {ratio[0]}:{ratio[1]}"
    row, record = measure("scaling" if num_frames else "video", name, run(models.fast), args, device,
                          flop_fn=run(models.fast_eager))
    clips = record["num_clips"]
    row.info.update({"frames": record["video"]["num_frames"], "clips": clips, "s_per_clip": row.median_s / clips,
                     "clips_per_stride": record["clips_per_stride"], "steps": args.steps,
                     "pipeline_timings_s_last_run": record["timings_s"]})
    return row


def bench_scaling(args, models: Models, vae: AutoencoderKL, device, dtype) -> list:
    """The whole-video bench at each --scaling frame count: time per clip and peak memory."""
    return [bench_video(args, models, vae, device, dtype, num_frames=n) for n in args.scaling]


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_int_list(text: str, option: str) -> list:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"{option} {text!r} is not a comma-separated list of positive whole numbers; "
                        "use e.g. 20,40,80.")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m3ddm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", choices=sorted(UNET_PRESETS), help="UNet preset (default small)")
    p.add_argument("--size", type=int, default=256, help="square canvas side in pixels (default 256)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--batch", type=int, default=3, help="UNet forward batch of the fast row (default 3 branches)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="fast-path dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--steps", type=int, help="PNDM steps per clip (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--vae-config", choices=sorted(VAE_PRESETS),
                   help="VAE preset (default sd15 with --config full, else tiny)")
    p.add_argument("--vae-batch", type=int, default=8, help="images per VAE call (default 8)")
    p.add_argument("--video", help="a real video file for the whole-video row (default: synthetic frames)")
    p.add_argument("--video-frames", type=int, default=40,
                   help="frames of the synthetic whole video (default 40: several clips)")
    p.add_argument("--scaling", help="comma-separated frame counts for whole-video scaling rows, e.g. 20,40,80")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast UNet (mode reduce-overhead, i.e. CUDA graphs, on CUDA)")
    p.add_argument("--skip-plain", action="store_true", help="measure only the fast path")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP-counting run")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch, 1 or more (default: torch's own; 1 is steadier on a loaded machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and noise")
    p.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    p.add_argument("--json", help="JSON result path (default OUT/bench.json)")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but this torch sees no CUDA GPU; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use cpu, cuda or auto.")
    return device


def check_args(args) -> tuple:
    """Validate and fill defaults; returns (device, dtype)."""
    device = resolve_device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.steps = args.steps if args.steps is not None else (50 if device.type == "cuda" else 5)
    args.vae_config = args.vae_config or ("sd15" if args.config == "full" else "tiny")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        raise UserError(f"--sections has unknown names {unknown}; use a subset of {','.join(SECTIONS)}.")
    args.scaling = parse_int_list(args.scaling, "--scaling") if args.scaling else []
    multiple = 8 * 2 ** (len(UNET_PRESETS[args.config].block_out_channels) - 1)
    if args.size < multiple or args.size % multiple:
        raise UserError(f"--size {args.size} does not fit the {args.config} UNet; use a multiple of {multiple} "
                        "pixels, e.g. 256.")
    if args.size < 40:
        raise UserError(f"--size {args.size} is too small for the global-frame encoder; use 64 or more.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads is {args.threads}; use 1 or more.")
    for option in ("frames", "batch", "steps", "repeats", "vae_batch", "video_frames"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} is {getattr(args, option)}; use 1 or more.")
    if args.steps < 2:
        raise UserError(f"--steps {args.steps} runs no denoising step (the PNDM loop skips its first timestep); "
                        "use --steps 2 or more.")
    if args.warmup < 0:
        raise UserError(f"--warmup is {args.warmup}; use 0 or more.")
    if args.compile and args.warmup < 2:
        progress("--compile: warm-up raised to 2 runs so that compilation and CUDA-graph recording are not timed")
        args.warmup = 2
    if args.video and not Path(args.video).is_file():
        raise UserError(f"--video {args.video} does not exist; give the path of a video file.")
    check_writable(json_path(args), "--json" if args.json else "--out")
    return device, DTYPES[args.dtype]


def json_path(args) -> Path:
    return Path(args.json) if args.json else Path(args.out) / "bench.json"


def check_writable(path: Path, option: str):
    """The JSON result can be written to path: checked before the run, so that a long run is not lost at its end.
    Nothing is created (the nearest existing folder takes a probe file, removed at once)."""
    existing = next(p for p in [path.parent.absolute(), *path.parent.absolute().parents] if p.exists())
    if path.is_dir():
        raise UserError(f"{option}: {path} is a folder; give the name of a .json file.")
    if not existing.is_dir():
        raise UserError(f"{option}: {existing} is a file, so {path} cannot be written; choose another {option}.")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".m3ddm-write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{option}: {path} cannot be written ({e.strerror} in {existing}); choose another {option}.") \
            from None


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


def run_bench(args) -> dict:
    """Every requested section, in one process; returns the JSON-ready result."""
    device, dtype = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # after the check: torch raises on a negative count
    torch.set_grad_enabled(False)
    result = {"machine": machine_info(device), "args": {k: v for k, v in vars(args).items()}, "sections": {}}
    sections = result["sections"]
    result["unet_call_flops"] = unet_call_flops(args.config, args.size, args.frames, args.batch)
    models = inputs = vae = None
    if {"unet", "clip", "video"} & set(args.sections) or args.scaling:
        progress(f"building the {args.config} UNet on {device}")
        models = build_models(args, device, dtype)
        inputs = make_clip_inputs(args, device)
    if "unet" in args.sections:
        sections["unet"] = {"rows": bench_unet(args, models, inputs, device, dtype)}
    if "clip" in args.sections:
        sections["clip"] = bench_clip(args, models, inputs, device, dtype)
    if {"vae", "video"} & set(args.sections) or args.scaling:
        vae = build_vae(args.vae_config, args.seed, device, dtype)
    if "vae" in args.sections:
        sections["vae"] = {"rows": bench_vae(args, vae, device, dtype)}
    if "video" in args.sections:
        sections["video"] = {"rows": [bench_video(args, models, vae, device, dtype)]}
    if args.scaling:
        sections["scaling"] = {"rows": bench_scaling(args, models, vae, device, dtype)}
    if hasattr(os, "getloadavg"):   # the machine's load over the run: CPU timings are only as good as this
        result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


def jsonable(value):
    if isinstance(value, Row):
        return asdict(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(result: dict, path: Path):
    """Write to a temporary name in the target folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    os.replace(tmp, path)


def human_bytes(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def format_table(result: dict) -> str:
    header = f"{'section':<8} {'row':<52} {'median s':>9} {'min-max s':>15} {'IQR s':>7} " \
             f"{'peak mem':>10} {'GFLOP':>10} {'TFLOP/s':>8}"
    lines = [header, "-" * len(header)]
    for section in result["sections"].values():
        for row in section["rows"]:
            name = row.name + (f" [{row.info['clips']} clips, {row.info['s_per_clip']:.2f} s/clip]"
                               if "s_per_clip" in row.info else "")
            flops = f"{row.flops / 1e9:.1f}" if row.flops else "-"
            rate = f"{row.tflops_per_s:.3g}" if row.tflops_per_s else "-"
            lines.append(f"{row.section:<8} {name:<52} {row.median_s:>9.3f} "
                         f"{row.min_s:>7.3f}-{row.max_s:<7.3f} {row.iqr_s:>7.3f} "
                         f"{human_bytes(row.peak_mem_bytes):>10} {flops:>10} {rate:>8}")
    calls = result["unet_call_flops"]
    lines.append(f"one UNet call ({calls['config']}, {calls['frames']}x{calls['size']}px, counted on meta): "
                 f"fast B={calls['fast_batch']} {calls['fast'] / 1e12:.3f} TFLOP, "
                 f"plain B={calls['plain_batch']} {calls['plain'] / 1e12:.3f} TFLOP")
    machine = result["machine"]
    lines.append(f"machine: {machine.get('gpu', machine['platform'])}, torch {machine['torch']}, "
                 f"{machine['torch_threads']} threads, load {machine.get('load_average_1_5_15')}; "
                 f"memory = {result['sections'] and next(iter(result['sections'].values()))['rows'][0].mem_kind}")
    return "\n".join(lines)


def speedup_line(result: dict) -> Optional[str]:
    clip = result["sections"].get("clip", {})
    if "speedup_fast_over_plain" not in clip:
        return None
    return (f"fast/plain per-clip speedup: {clip['speedup_fast_over_plain']:.2f}x "
            f"(max rel diff {clip['max_rel_diff']:.2e})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: _run_and_report(args), interrupted="nothing was written")


def _run_and_report(args) -> int:
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        result = run_bench(args)
    finally:  # main() may be called in-process (tests): leave torch's global settings as they were
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    path = json_path(args)
    write_json(result, path)
    print(format_table(result))
    print(f"json: {path}")
    line = speedup_line(result)
    if line:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
