"""python -m m3ddm.precision: bf16 and fp16 against fp32 at full depth (the released configuration), on CPU.

    nice python -m m3ddm.precision --out out/precision --size 64      # about 30 min on 2 loaded cores

One batched UNet call of the sampler (3 guidance branches, 16 frames, 16 global frames) and one 10-step DDIM
clip (final latents), with random weights of the released shapes (m3ddm.synthetic: the same values in every
dtype), at --size px (the depth, 16 transformers and 22 resnets, is the released one; the spatial size only
sets the token counts). Reported: relative L2 error and max|error| / max|fp32| against fp32.

How each dtype runs: bf16 natively (this CPU's oneDNN has bf16 kernels that accumulate in fp32, as a GPU
does); fp16 with every convolution and matrix product computed in fp32 from fp16 inputs and rounded back
to fp16 (`GPUStyleAccumulation`), which is what cuDNN/cuBLAS do on a GPU: PyTorch's CPU fp16 convolution
is a reference loop (minutes per layer). Norms, softmax and reductions accumulate in fp32 inside
PyTorch's kernels for both dtypes. The ablations measure what the fp32 islands of the code are worth:
  sinusoid_bf16   the time/fps/frame sinusoids computed in bf16 instead of fp32 (unet3d.Sinusoid)
  guidance_bf16   guidance and DDIM arithmetic in bf16 instead of fp32 (sampler.denoise_clip)
  batchnorm_bf16  the global encoder's BatchNorms in bf16 instead of fp32 (weights.cast_model)
Resumable: every finished run is kept in OUT (latents as .safetensors, numbers in precision.json).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from . import bench_gpu, unet3d
from .sampler import combine_guidance, denoise_clip, encode_global_context
from .schedulers import DDIMScheduler

aten = torch.ops.aten
MATMULS = {aten.convolution, aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


class GPUStyleAccumulation(TorchDispatchMode):
    """Convolutions and matrix products of `dtype` tensors computed in fp32 and rounded to `dtype`: low
    precision storage between ops, fp32 accumulation inside them, as cuDNN/cuBLAS run fp16 on a GPU."""

    def __init__(self, dtype=torch.float16):
        super().__init__()
        self.dtype = dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMULS:
            low = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == self.dtype]
            if low:
                up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a  # noqa: E731
                return func(*tree_map(up, args), **tree_map(up, kwargs)).to(self.dtype)
        return func(*args, **kwargs)


@contextmanager
def sinusoids_in(dtype):
    """unet3d.Sinusoid computed with positions and frequencies in `dtype` (the code computes it in fp32)."""
    original = unet3d.Sinusoid.forward

    def forward(self, positions):
        half = self.dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=dtype, device=positions.device)
        freqs = torch.exp(exponent / (half - self.shift))
        angles = positions.to(dtype)[:, None] * freqs[None, :]
        parts = [torch.cos(angles), torch.sin(angles)]
        return torch.cat(parts if self.flip else parts[::-1], dim=-1)

    unet3d.Sinusoid.forward = forward
    try:
        yield
    finally:
        unet3d.Sinusoid.forward = original


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double(), ref.double()
    return {"rel_l2": ((got - ref).norm() / ref.norm()).item(),
            "max_over_max_ref": ((got - ref).abs().max() / ref.abs().max()).item()}


def build(config, dtype, seed, batchnorm_fp32=True):
    unet = bench_gpu.build_unet(config, dtype, torch.device("cpu"), seed)
    if not batchnorm_fp32:
        unet.global_img_encoder.to(dtype)
    return unet


def unet_call(unet, inputs, dtype):
    """One sampler step's UNet batch (uu, cu, cc) at t = 961 on the clip's conditioning."""
    cond = inputs["cond"]
    context = encode_global_context(unet, inputs["global"].to(dtype))
    local = torch.cat([torch.cat([cond.uncond_latents, cond.uncond_mask], 1),
                       torch.cat([cond.cond_latents, cond.cond_mask], 1),
                       torch.cat([cond.cond_latents, cond.cond_mask], 1)])
    x = torch.cat([inputs["noise"].expand(3, -1, -1, -1, -1), local], 1).to(dtype)
    tokens = torch.cat([context.zero, context.zero, context.real]).to(dtype)
    return unet(x, torch.tensor(961), torch.tensor([6]), context=tokens).float()


def clip(unet, inputs, dtype, steps, low_guidance=False):
    """One DDIM clip; low_guidance: eps guidance and the DDIM step in `dtype` (the code keeps them fp32)."""
    if not low_guidance:
        context = encode_global_context(unet, inputs["global"].to(dtype))
        return denoise_clip(unet, DDIMScheduler(steps), inputs["start"], inputs["noise"], inputs["cond"], context, 6)
    return _clip_low_guidance(unet, inputs, dtype, steps)


def _clip_low_guidance(unet, inputs, dtype, steps):
    """The same loop as denoise_clip (3 branches, DDIM eta 0), with x, guidance and the update in dtype."""
    from .schedulers import add_noise, alphas_cumprod
    scheduler = DDIMScheduler(steps)
    context = encode_global_context(unet, inputs["global"].to(dtype))
    cond = inputs["cond"]
    local = torch.cat([torch.cat([cond.uncond_latents, cond.uncond_mask], 1),
                       torch.cat([cond.cond_latents, cond.cond_mask], 1),
                       torch.cat([cond.cond_latents, cond.cond_mask], 1)]).to(dtype)
    tokens = torch.cat([context.zero, context.zero, context.real]).to(dtype)
    ts = [int(t) for t in scheduler.timesteps]
    x = add_noise(inputs["start"], inputs["noise"], ts[0], alphas_cumprod()).to(dtype)
    a_all = scheduler.alphas_cumprod.to(dtype)
    for t in ts:
        out = unet(torch.cat([x.expand(3, -1, -1, -1, -1), local], 1), torch.tensor(t), torch.tensor([6]),
                   context=tokens)                                            # dtype, no fp32 cast
        eps = combine_guidance(dict(zip(("uu", "cu", "cc"), out.split(1))), 2.0, 4.0)
        a = a_all[t]
        ap = a_all[t - scheduler.ratio] if t - scheduler.ratio >= 0 else a_all[0]
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps
    return x.float()


RUNS = {   # name: (dtype, options)
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "fp16": (torch.float16, {"emulate": True}),
    "bf16_sinusoid_bf16": (torch.bfloat16, {"sinusoid": True}),
    "bf16_batchnorm_bf16": (torch.bfloat16, {"batchnorm_fp32": False}),
    "fp16_batchnorm_fp16": (torch.float16, {"emulate": True, "batchnorm_fp32": False}),
    "bf16_guidance_bf16": (torch.bfloat16, {"low_guidance": True}),
}


def run_one(name, what, args, inputs):
    dtype, opt = RUNS[name]
    unet = build(args.config, dtype, args.seed, opt.get("batchnorm_fp32", True))
    with torch.no_grad(), (GPUStyleAccumulation(dtype) if opt.get("emulate") else _null()), \
            (sinusoids_in(torch.bfloat16) if opt.get("sinusoid") else _null()):
        if what == "call":
            return unet_call(unet, inputs, dtype)
        if what == "tokens":
            return unet.encode_global(inputs["global"][None].to(dtype)).float()
        return clip(unet, inputs, dtype, args.steps, opt.get("low_guidance", False))


@contextmanager
def _null():
    yield


PLAN = [("call", "fp32"), ("call", "bf16"), ("call", "fp16"), ("call", "bf16_sinusoid_bf16"),
        ("tokens", "fp32"), ("tokens", "bf16"), ("tokens", "bf16_batchnorm_bf16"), ("tokens", "fp16"),
        ("tokens", "fp16_batchnorm_fp16"),
        ("clip", "fp32"), ("clip", "bf16"), ("clip", "fp16"), ("clip", "bf16_guidance_bf16")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ddm.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/precision")
    p.add_argument("--config", default="full", choices=sorted(unet3d.UNET_PRESETS), help="default full (tests: tiny)")
    p.add_argument("--size", type=int, default=64, help="canvas px, multiple of 64 (default 64: 8x8 latents)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the clip (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma-separated subset of what:name, e.g. call:fp32,call:bf16")
    args = p.parse_args(argv)
    if args.size % 64 or args.size < 64:
        print(f"error: --size {args.size} is not a multiple of 64; use 64 or 128.", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "precision.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"runs": {}}
    record["args"] = {k: v for k, v in vars(args).items()}
    ns = argparse.Namespace(seed=args.seed, frames=16, size=args.size)
    inputs = bench_gpu.clip_inputs(ns, torch.device("cpu"))
    plan = [tuple(x.split(":")) for x in args.only.split(",")] if args.only else PLAN
    for what, name in plan:
        path = out / f"{what}_{name}.safetensors"
        if not path.exists():
            t0 = time.perf_counter()
            result = run_one(name, what, args, inputs)
            save_file({"out": result.contiguous()}, str(path))
            record["runs"][f"{what}:{name}"] = {"seconds": round(time.perf_counter() - t0, 1)}
            print(f"[precision] {what} {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        ref = out / f"{what}_fp32.safetensors"
        if name != "fp32" and ref.exists():
            e = errors(load_file(str(path))["out"], load_file(str(ref))["out"])
            record["runs"].setdefault(f"{what}:{name}", {}).update(e)
            print(f"{what:<6} {name:<22} rel L2 {e['rel_l2']:.3e}  max/max {e['max_over_max_ref']:.3e}", flush=True)
        record["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
        tmp = record_path.with_name(record_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, record_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
