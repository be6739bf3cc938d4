"""python -m m3ddm.bench_gpu: the released configuration on one GPU, in one prepared run (`make bench-gpu`).

    python -m m3ddm.bench_gpu --out out/bench_gpu                        # full config, cuda, bf16, 256 px
    python -m m3ddm.bench_gpu --config tiny --device cpu --size 64 --steps 2 --out /tmp/b   # same code, CPU

Sections, each guarded (an error is recorded in the JSON and the next section runs) and each skipped with a
note once the --budget-s would be exceeded, the JSON rewritten after every section:
  flops    one UNet call (3 guidance branches, global K/V once) counted on the meta device
  eager    the UNet built on the meta device, its storage allocated and randomised on the device (no 1.3 B
           CPU initialisation), bf16 (BatchNorms fp32): one UNet call and one whole clip of --steps PNDM
           steps, median of --repeats, peak memory (torch.cuda.max_memory_allocated), achieved TFLOP/s
  compile  the same with torch.compile (inductor; CUDA graphs on CUDA), agreement with eager, and the
           compile counters after the first clip and after clips with other fps values (no recompilation)
  precision  one clip in fp16 and in fp32 (TF32 off) from the same random values: bf16 and fp16 vs fp32
  video    one whole short video with real I/O (H.264 file in, pipeline.outpaint_video, file out), SD-1.5 VAE
Results: OUT/bench_gpu.json and a table on stdout; targets (2.0 s per clip, 6 GiB) marked met or not.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from . import bench
from .distributed import free_cached_memory, set_tf32
from .errors import UserError
from .sampler import assemble_conditioning, clip_noise, denoise_clip, encode_global_context
from .schedulers import PNDMScheduler
from .synthetic import randomize_
from .unet3d import UNET_PRESETS, UNet3D
from .vae import VAE_PRESETS, AutoencoderKL
from .weights import DTYPES, cast_model

SECTIONS = ("flops", "eager", "compile", "precision", "video")
TARGET_S_PER_CLIP, TARGET_PEAK_BYTES = 2.0, 6 * 2 ** 30
BRANCHES = 3
CLIP_FPS = (2, 6, 30)        # fps // stride of a 30 fps video at strides 15, 5, 1: values change, shapes do not


# ----------------------------------------------------------------------------------------------------
# Models and inputs on the device


def build_unet(config: str, dtype, device, seed: int) -> UNet3D:
    """Built on meta, cast on meta (BatchNorms stay fp32), storage allocated on the device, randomised there."""
    with torch.device("meta"):
        unet = UNet3D(copy.deepcopy(UNET_PRESETS[config])).eval()
    cast_model(unet, dtype)
    return randomize_(unet.to_empty(device=device), seed).requires_grad_(False)


def build_vae(config: str, dtype, device, seed: int) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(copy.deepcopy(VAE_PRESETS[config])).eval()
    return randomize_(vae.to(dtype).to_empty(device=device), seed).requires_grad_(False)


def clip_inputs(args, device):
    """Seeded latents of one fine-stage clip: top/bottom bands to generate, first and last frames guides."""
    gen = torch.Generator("cpu").manual_seed(args.seed)
    f, h = args.frames, args.size // 8
    shape = (1, 4, f, h, h)
    start, masked = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    black = torch.randn((1, 4, h, h), generator=gen)
    global_latents = torch.randn((bench.NUM_GLOBAL, 4, h, h), generator=gen).to(device)
    mask = torch.zeros(h, h)
    mask[: h // 4], mask[h - h // 4:] = 1, 1
    guides = [None] * f
    if f > 2:
        guides[0], guides[-1] = torch.randn((1, 4, h, h), generator=gen), torch.randn((1, 4, h, h), generator=gen)
    cond = assemble_conditioning(masked, black, mask, guides)
    for name in ("cond_latents", "cond_mask", "uncond_latents", "uncond_mask"):
        setattr(cond, name, getattr(cond, name).to(device))
    return {"start": start.to(device), "noise": clip_noise(args.seed, shape, device=device), "cond": cond,
            "global": global_latents}


def run_clip(unet, inputs, steps: int, dtype, fps: int) -> torch.Tensor:
    """One clip as the pipeline runs it: global tokens once, 3 branches, --steps PNDM steps; fp32 latents."""
    context = encode_global_context(unet, inputs["global"].to(dtype))
    return denoise_clip(unet, PNDMScheduler(steps), inputs["start"], inputs["noise"], inputs["cond"], context, fps)


def unet_call(unet, args, device, dtype):
    """One batched UNet call of the sampler (device tensors for t and fps, made once)."""
    h = args.size // 8
    gen = torch.Generator("cpu").manual_seed(args.seed + 1)
    x = torch.randn((BRANCHES, 9, args.frames, h, h), generator=gen).to(device, dtype)
    g = torch.randn((1, bench.NUM_GLOBAL, 4, h, h), generator=gen).to(device, dtype)
    t, fps = torch.tensor(bench.BENCH_TIMESTEP, device=device), torch.tensor([bench.UNET_FPS], device=device)
    with torch.no_grad():
        context = torch.cat([unet.encode_global(g)] * BRANCHES)   # contiguous, as the sampler's: one graph
    return torch.no_grad()(lambda model: model(x, t, fps, context=context))


# ----------------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> "bench.PeakMemory":
    """CUDA max allocated, or on CPU the peak RSS (reset where Linux allows), from now on."""
    memory = bench.PeakMemory(device)
    memory.reset()
    return memory


def timed(fn, repeats: int, warmup: int, device) -> dict:
    """Median/min/max of `repeats` timed calls after `warmup` untimed ones; the last output."""
    out = None
    for _ in range(warmup):
        out = fn(0)
    times = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn(i + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "out": out}


def rel_errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double(), ref.double()
    return {"rel_l2": ((got - ref).norm() / ref.norm()).item(),
            "max_abs_over_max_ref": ((got - ref).abs().max() / ref.abs().max()).item(),
            "finite": bool(torch.isfinite(got).all())}


def compile_counters() -> dict:
    from torch._dynamo.utils import counters
    return {"frames_ok": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


# ----------------------------------------------------------------------------------------------------
# Sections


def section_flops(args, state):
    """FLOPs of one UNet call on the meta device (shapes only)."""
    with torch.device("meta"):
        unet = UNet3D(copy.deepcopy(UNET_PRESETS[args.config])).eval()
        h = args.size // 8
        tokens = unet.encode_global(torch.zeros(1, bench.NUM_GLOBAL, 4, h, h)).expand(BRANCHES, -1, -1)
        x = torch.zeros(BRANCHES, 9, args.frames, h, h)
    flops = bench.count_flops(lambda: unet(x, bench.BENCH_TIMESTEP, bench.UNET_FPS, context=tokens))
    state["flops_per_call"] = flops
    return {"unet_call_flops": flops, "clip_flops": flops * (args.steps - 1)}


def _measure_model(args, state, model, name, warmup):
    device, dtype = state["device"], DTYPES[args.dtype]
    call = unet_call(state["eager"], args, device, dtype)
    memory = reset_peak(device)
    row_call = timed(lambda i: call(model), args.repeats, warmup, device)
    row_call["out"] = row_call["out"].clone()   # a CUDA-graph output is overwritten by the next replay
    row_clip = timed(lambda i: run_clip(model, state["inputs"], args.steps, dtype, CLIP_FPS[i % len(CLIP_FPS)]),
                     args.repeats, warmup, device)
    peak = memory.read()
    calls = args.steps - 1                       # PNDM at strength 1 runs timesteps[1:]
    flops = state.get("flops_per_call")
    result = {"name": name, "unet_call_median_s": row_call["median_s"], "unet_call_times_s": row_call["times_s"],
              "clip_median_s": row_clip["median_s"], "clip_times_s": row_clip["times_s"], "unet_calls_per_clip": calls,
              "peak_memory_bytes": peak, "memory_kind": memory.kind}
    if flops:
        result["tflops_per_s_unet_call"] = flops / row_call["median_s"] / 1e12
        result["tflops_per_s_clip"] = flops * calls / row_clip["median_s"] / 1e12
    return result, row_call["out"], row_clip["out"]


def section_eager(args, state):
    device, dtype = state["device"], DTYPES[args.dtype]
    t0 = time.perf_counter()
    state["eager"] = build_unet(args.config, dtype, device, args.seed)
    sync(device)
    build_s = time.perf_counter() - t0
    state["inputs"] = clip_inputs(args, device)
    result, call_out, clip_out = _measure_model(args, state, state["eager"], f"eager {args.dtype}", warmup=1)
    state["eager_call"], state["eager_clip"] = call_out, clip_out
    result["build_and_randomise_s"] = build_s
    result["meets_2s_per_clip"] = result["clip_median_s"] <= TARGET_S_PER_CLIP
    result["meets_6gib"] = result["peak_memory_bytes"] <= TARGET_PEAK_BYTES
    return result


def section_compile(args, state):
    device = state["device"]
    torch._dynamo.reset()
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    compiled = torch.compile(state["eager"], mode=mode, dynamic=False, backend=args.compile_backend)
    call = unet_call(state["eager"], args, device, DTYPES[args.dtype])
    t0 = time.perf_counter()
    call(compiled)
    sync(device)
    first_call_s = time.perf_counter() - t0
    run_clip(compiled, state["inputs"], args.steps, DTYPES[args.dtype], CLIP_FPS[0])   # a first whole clip
    after_first_clip = compile_counters()
    result, call_out, clip_out = _measure_model(args, state, compiled, f"compiled {args.dtype} ({args.compile_backend}, "
                                                f"{mode})", warmup=1)
    after_all = compile_counters()
    result.update({"compile_and_first_call_s": first_call_s, "counters_after_first_clip": after_first_clip,
                   "counters_after_all_clips": after_all, "recompiled_after_first_clip":
                   after_all["unique_graphs"] != after_first_clip["unique_graphs"]
                   or after_all["frames_total"] != after_first_clip["frames_total"],
                   "clip_fps_values": list(CLIP_FPS),
                   "agreement_unet_call": rel_errors(call_out.float(), state["eager_call"].float()),
                   "agreement_clip": rel_errors(clip_out, state["eager_clip"]),
                   "speedup_clip": state["results"]["eager"]["clip_median_s"] / result["clip_median_s"],
                   "speedup_unet_call": state["results"]["eager"]["unet_call_median_s"] / result["unet_call_median_s"]})
    return result


def section_precision(args, state):
    """One clip (CLIP_FPS[0]) in fp16 and fp32 from the same random values as the bf16 model."""
    device, clips = state["device"], {}
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    set_tf32(False)                              # fp32 is the exact reference
    try:
        for name in ("fp32", "fp16", "bf16"):
            own = name != args.dtype
            model = build_unet(args.config, DTYPES[name], device, args.seed) if own else state["eager"]
            clips[name] = run_clip(model, state["inputs"], args.steps, DTYPES[name], CLIP_FPS[0])
            if own:
                del model
                free_cached_memory(device)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    return {"clip_fps": CLIP_FPS[0], "steps": args.steps,
            "bf16_vs_fp32": rel_errors(clips["bf16"], clips["fp32"]),
            "fp16_vs_fp32": rel_errors(clips["fp16"], clips["fp32"]),
            "fp16_vs_bf16": rel_errors(clips["fp16"], clips["bf16"])}


def section_video(args, state):
    """A whole short video file through outpaint_video with the eager model and the VAE, real H.264 I/O."""
    from .pipeline import OutpaintOptions, outpaint_video
    device, dtype = state["device"], DTYPES[args.dtype]
    vae = build_vae(args.vae_config, dtype, device, args.seed + 1)
    ns = argparse.Namespace(out=args.out, size=args.size, seed=args.seed)
    path = Path(args.video) if args.video else bench.write_synthetic_video(args.video_frames, ns)
    out_dir = Path(args.out) / "video_output"
    options = OutpaintOptions(size=args.size, steps=args.steps, seed=args.seed)
    memory = reset_peak(device)
    t0 = time.perf_counter()
    record = outpaint_video(path, out_dir, state["eager"], vae, [bench.target_ratio(path)], options, device=device,
                            dtype=dtype)
    sync(device)
    wall = time.perf_counter() - t0
    return {"input": str(path), "frames": record["video"]["num_frames"], "clips": record["num_clips"],
            "wall_s": wall, "s_per_clip": wall / record["num_clips"], "peak_memory_bytes": memory.read(),
            "memory_kind": memory.kind,
            "timings_s": record["timings_s"], "outputs": record["outputs"], "vae_config": args.vae_config}


RUNNERS = {"flops": section_flops, "eager": section_eager, "compile": section_compile,
           "precision": section_precision, "video": section_video}
NEEDS = {"compile": "eager", "precision": "eager", "video": "eager"}


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(prog="python -m m3ddm.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench_gpu", help="result folder (default out/bench_gpu)")
    p.add_argument("--config", default="full", choices=sorted(UNET_PRESETS))
    p.add_argument("--vae-config", choices=sorted(VAE_PRESETS), help="default sd15 with --config full, else tiny")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="PNDM steps per clip (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="timed clips and UNet calls per row (default 3)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    p.add_argument("--compile-mode", help="torch.compile mode (default reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--video", help="a real clip for the video section (default: a synthetic H.264 file)")
    p.add_argument("--video-frames", type=int, default=40, help="frames of the synthetic video (default 40: 3 clips)")
    p.add_argument("--budget-s", type=float, default=420, help="skip sections that would end after this (default 420)")
    p.add_argument("--threads", type=int, help="CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args):
    device = bench.resolve_device(args.device)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not args.sections or set(args.sections) - set(SECTIONS):
        raise UserError(f"--sections {','.join(args.sections)} is not a subset of {','.join(SECTIONS)}.")
    multiple = 8 * 2 ** (len(UNET_PRESETS[args.config].block_out_channels) - 1)
    if args.size % multiple or args.size < max(64, multiple):
        raise UserError(f"--size {args.size} does not fit the {args.config} UNet; use a multiple of {max(64, multiple)}.")
    if args.steps < 2 or args.repeats < 1 or args.frames < 1:
        raise UserError("--steps must be 2 or more, --repeats and --frames 1 or more.")
    if args.video and not Path(args.video).is_file():
        raise UserError(f"--video {args.video} does not exist; give a video file.")
    args.vae_config = args.vae_config or ("sd15" if args.config == "full" else "tiny")
    return device


def machine(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    return info


def write_json(result, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_gpu.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def run(args) -> dict:
    device = check_args(args)
    torch.set_grad_enabled(False)
    state = {"device": device, "results": {}}
    result = {"machine": machine(device), "args": vars(args).copy(), "sections": state["results"], "skipped": {},
              "errors": {}}
    start, spent = time.perf_counter(), {}
    out = Path(args.out)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        need = NEEDS.get(name)
        if need and need not in state["results"]:
            result["skipped"][name] = f"needs the {need} section, which did not run"
            continue
        elapsed = time.perf_counter() - start
        guess = {"compile": 3 * spent.get("eager", 0) + 120, "precision": 2 * spent.get("eager", 0)}.get(name, 0)
        if name != "flops" and elapsed + guess > args.budget_s:   # flops: shapes only, seconds
            result["skipped"][name] = f"budget: {elapsed:.0f} s spent, about {guess:.0f} s more needed, budget {args.budget_s:.0f} s"
            continue
        print(f"[bench_gpu] {name} ({elapsed:.0f} s so far)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            state["results"][name] = RUNNERS[name](args, state)
        except Exception as e:                  # noqa: BLE001  a failed section must not lose the others
            result["errors"][name] = f"{type(e).__name__}: {e}"
            result["errors"][name + "_traceback"] = traceback.format_exc()[-4000:]
        spent[name] = time.perf_counter() - t0
        result["section_wall_s"] = spent
        result["total_wall_s"] = time.perf_counter() - start
        write_json(result, out)
    result["total_wall_s"] = time.perf_counter() - start
    write_json(result, out)
    return result


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


def table(result) -> str:
    s, lines = result["sections"], []
    for name in ("eager", "compile"):
        if name in s:
            r = s[name]
            lines.append(f"{r['name']:<40} clip {r['clip_median_s']:.3f} s  UNet call {r['unet_call_median_s']:.4f} s  "
                         f"{r.get('tflops_per_s_unet_call', 0):.3g} TFLOP/s  peak {gib(r['peak_memory_bytes'])}")
    if "compile" in s:
        c = s["compile"]
        lines.append(f"compiled/eager clip speedup {c['speedup_clip']:.2f}x (clip rel L2 {c['agreement_clip']['rel_l2']:.2e}), "
                     f"recompiled after the first clip: {c['recompiled_after_first_clip']}")
    if "precision" in s:
        p = s["precision"]
        lines.append("vs fp32, one clip: " + ", ".join(f"{k} rel L2 {v['rel_l2']:.2e} max {v['max_abs_over_max_ref']:.2e}"
                                                     for k, v in p.items() if isinstance(v, dict)))
    if "video" in s:
        v = s["video"]
        lines.append(f"video: {v['frames']} frames, {v['clips']} clips, {v['wall_s']:.1f} s ({v['s_per_clip']:.2f} s/clip), "
                     f"peak {gib(v['peak_memory_bytes'])}")
    if "eager" in s:
        e = s["eager"]
        lines.append(f"targets: <= {TARGET_S_PER_CLIP} s per clip: {e['meets_2s_per_clip']}; <= 6 GiB: {e['meets_6gib']}")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    for name, why in result["errors"].items():
        if not name.endswith("_traceback"):
            lines.append(f"error in {name}: {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)
    print(table(result))
    print(f"json: {Path(args.out) / 'bench_gpu.json'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
