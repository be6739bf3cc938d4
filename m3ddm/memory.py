"""python -m m3ddm.memory: peak device memory of the per-clip sampler, estimated without the device.

Method: the real model code runs on the meta device (shapes and dtypes, no data, no compute) under a
TorchDispatchMode that follows every storage: each op output's storage counts, rounded up to the CUDA
caching allocator's 512-byte blocks, from the op that creates it until Python drops its last reference
(a weakref finalizer on the storage). The peak of that sum is what `torch.cuda.max_memory_allocated`
reports for the same sequence of allocations, except kernel workspaces (cuDNN / cuBLAS scratch), which
the estimate adds as a stated margin. On meta, F.scaled_dot_product_attention takes the fused path
(output + log-sum-exp, no score matrix), as FlashAttention does on a GPU for bf16 and these head sizes.

    python -m m3ddm.memory estimate --config full --size 256 --dtype bf16      # the sampler on a GPU
    python -m m3ddm.memory validate --config small --size 256                  # the method vs CPU peak RSS
    python -m m3ddm.memory autocast --config small --size 128                  # bf16 model vs fp32 + autocast

`validate` runs one UNet call of the sampler for real on the CPU (fp32) in this process and compares the
measured rise of the peak RSS with the tracker's count on real tensors and on meta tensors.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .errors import UserError
from .unet3d import UNET_PRESETS, UNet3D
from .vae import VAE_PRESETS, AutoencoderKL
from .weights import DTYPES, cast_model

BLOCK = 512                 # the CUDA caching allocator rounds every allocation up to 512 bytes
WORKSPACE_MARGIN = 256 * 2 ** 20   # cuDNN convolution / cuBLAS workspaces (not torch tensors), a stated guess
CLIP_FRAMES, GLOBAL_FRAMES = 16, 16


def rounded(nbytes: int, block: int = BLOCK) -> int:
    return -(-nbytes // block) * block


class LiveMemory(TorchDispatchMode):
    """Bytes held by live storages: those registered with track() and every op output made under the mode.

    peak: the highest total; at_peak: the largest live storages at the peak (bytes, shape, dtype, op)."""

    def __init__(self, block: int = BLOCK, snapshot_top: int = 12):
        super().__init__()
        self.block, self.snapshot_top = block, snapshot_top
        self.live, self.peak, self.at_peak = 0, 0, []
        self._storages = WeakIdKeyDictionary()
        self._entries = {}          # id -> (bytes, description) of live storages
        self._next = 0

    def track(self, t: torch.Tensor, what: str = "input"):
        storage = t.untyped_storage()
        if storage in self._storages or storage.nbytes() == 0:
            return
        n, key = rounded(storage.nbytes(), self.block), self._next
        self._next += 1
        self._storages[storage] = key
        self._entries[key] = (n, f"{what} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        weakref.finalize(storage, self._free, key)
        self.live += n
        if self.live > self.peak:
            grew = self.live > self.peak * 1.002
            self.peak = self.live
            if grew:
                self.at_peak = sorted(self._entries.values(), reverse=True)[: self.snapshot_top]

    def _free(self, key):
        n, _ = self._entries.pop(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, str(func.overloadpacket.__name__))
        return out


class FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as a GPU runs it for these shapes and dtypes (FlashAttention: output and
    log-sum-exp, no score matrix), also on meta tensors, where PyTorch would take the math path (fp32 scores)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and not kwargs:
            q, k, v = args
            if q.device.type == "cpu":
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        return func(*args, **kwargs)


def model_bytes(model, block: int = BLOCK) -> int:
    return sum(rounded(t.untyped_storage().nbytes(), block) for t in list(model.parameters()) + list(model.buffers()))


def build(config: str, dtype: torch.dtype, device: str):
    """The UNet of a preset in dtype (BatchNorms fp32, as loaded) and the SD-1.5 VAE, on device (uninitialised
    values: memory does not depend on them)."""
    with torch.device("meta"):
        unet = UNet3D(copy.deepcopy(UNET_PRESETS[config])).eval()
        vae = AutoencoderKL(copy.deepcopy(VAE_PRESETS["sd15" if config == "full" else "tiny"])).eval()
    unet, vae = unet.to_empty(device=device), vae.to_empty(device=device)
    return cast_model(unet, dtype), vae.to(dtype)


def sampler_step(unet, size: int, branches: int, dtype, device):
    """One step of sampler.denoise_clip with its resident state: context tokens of the branches, the
    conditioning batch, x, the scheduler's 4 stored eps, then the UNet call and the guidance arithmetic."""
    h = size // 8
    z = lambda *shape, dt=torch.float32: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
    state = {"x": z(1, 4, CLIP_FRAMES, h, h), "eps_history": [z(1, 4, CLIP_FRAMES, h, h) for _ in range(4)],
             "cond_part": z(branches, 5, CLIP_FRAMES, h, h, dt=dtype)}
    real = unet.encode_global(z(1, GLOBAL_FRAMES, 4, h, h, dt=dtype))
    zero = unet.encode_global(z(1, GLOBAL_FRAMES, 4, h, h, dt=dtype))
    state["tokens"] = torch.cat([zero] + [real] * (branches - 1))[:branches]           # (B, T, 320)
    del real, zero
    t, fps = torch.tensor(961, device=device), torch.tensor([4], device=device)
    x_in = torch.cat([state["x"].to(dtype).expand(branches, -1, -1, -1, -1), state["cond_part"]], dim=1)
    out = unet(x_in, t, fps, context=state["tokens"]).float()                          # (B, 4, F, h, w)
    del x_in
    parts = out.split(1)
    eps = parts[0] + 2.0 * (parts[1] - parts[0]) + 4.0 * (parts[-1] - parts[1])
    return eps, state


def vae_decode(vae, size: int, batch: int, dtype, device):
    """The pipeline's decode of the frames that are final after a clip, `batch` images per VAE call."""
    z = torch.zeros(batch, 4, size // 8, size // 8, dtype=dtype, device=device)
    return vae.decode_latents(z, batch=batch)


@dataclass
class Estimate:
    unet_weights: int
    vae_weights: int
    unet_step_peak: int         # everything live at the sampler step's peak, weights included
    vae_decode_peak: int
    at_peak: list

    @property
    def total(self):
        return max(self.unet_step_peak, self.vae_decode_peak) + WORKSPACE_MARGIN


@torch.no_grad()
def estimate(config="full", size=256, dtype=torch.bfloat16, branches=3, vae_batch=8, device="meta") -> Estimate:
    """Peak memory of the per-clip sampler with both models resident on `device` (meta: no memory used)."""
    unet, vae = build(config, dtype, device)
    with FusedAttention(), LiveMemory() as mode:
        for model in (unet, vae):
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                mode.track(t, "weights")
        eps, state = sampler_step(unet, size, branches, dtype, device)
        step_peak, at_peak = mode.peak, mode.at_peak
        del eps
        mode.peak = mode.live
        images = vae_decode(vae, size, vae_batch, dtype, device)
        vae_peak = mode.peak
        del images, state
    return Estimate(model_bytes(unet), model_bytes(vae), step_peak, vae_peak, at_peak)


# ----------------------------------------------------------------------------------------------------
# Validation against the CPU


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def validate(config="small", size=256, branches=3) -> dict:
    """One sampler step for real on the CPU (fp32): the measured rise of the peak RSS over the RSS before the
    step vs the tracker's count of the same step on real and on meta tensors (both without the weights)."""
    counted = {}
    for device in ("meta", "cpu"):
        unet, _ = build(config, torch.float32, device)
        with FusedAttention(), LiveMemory(block=1) as mode:
            for t in list(unet.parameters()) + list(unet.buffers()):
                mode.track(t, "weights")   # so that views of the weights (a Linear's w.t()) are not counted anew
            base = mode.live
            sampler_step(unet, size, branches, torch.float32, device)
            counted[device] = mode.peak - base
        del unet
    unet, _ = build(config, torch.float32, "cpu")
    unet.requires_grad_(False)
    sampler_step(unet, size, branches, torch.float32, "cpu")   # warm-up: allocator arenas, oneDNN caches
    before = _rss_now()
    _reset_peak_rss()
    sampler_step(unet, size, branches, torch.float32, "cpu")
    measured = _peak_rss() - before
    return {"config": config, "size": size, "branches": branches, "dtype": "fp32",
            "tracked_meta_bytes": counted["meta"], "tracked_cpu_bytes": counted["cpu"],
            "measured_peak_rss_rise_bytes": measured, "measured_over_tracked": measured / counted["cpu"]}


def autocast_cost(config="small", size=128, branches=3) -> dict:
    """Activation bytes of one UNet call (CPU tensors, counted): a bf16 model vs an fp32 model under bf16
    autocast (with and without autocast's weight-cast cache), without and with autograd. Under autocast
    GroupNorm/LayerNorm run in fp32 (autocast's fp32 list): their inputs are upcast copies, and with
    autograd those copies are what they save for the backward."""
    with torch.device("meta"):
        meta = UNet3D(copy.deepcopy(UNET_PRESETS[config]))
    fp32 = meta.to_empty(device="cpu")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    h, result = size // 8, {}
    tokens = GLOBAL_FRAMES * ((h + 1) // 2 - 2) ** 2
    for name, model, autocast, cache in (("bf16 model", bf16, False, False),
                                         ("fp32 model, bf16 autocast", fp32, True, True),
                                         ("fp32 model, bf16 autocast, no weight-cast cache", fp32, True, False)):
        dtype = next(model.parameters()).dtype
        for grad in (False, True):
            with torch.set_grad_enabled(grad), FusedAttention(), LiveMemory(block=1) as mode:
                for t in list(model.parameters()) + list(model.buffers()):
                    mode.track(t, "weights")
                base = mode.live
                x = torch.zeros(branches, 9, CLIP_FRAMES, h, h, dtype=dtype)
                context = torch.zeros(branches, tokens, 320, dtype=dtype)
                with torch.autocast("cpu", torch.bfloat16, enabled=autocast, cache_enabled=cache):
                    out = model(x, torch.tensor(961), torch.tensor([4]), context=context)
                held = mode.live - base
                del out, x, context
            result[f"{name}, {'autograd' if grad else 'no_grad'}"] = {"peak_bytes": mode.peak - base,
                                                                      "held_after_forward_bytes": held}
    return {"config": config, "size": size, "branches": branches, "rows": result}


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ddm.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("estimate", "validate", "autocast"))
    p.add_argument("--config", default=None, choices=sorted(UNET_PRESETS), help="default full (estimate), small (validate)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="estimate only (validate runs fp32)")
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    try:
        if args.size % 64 or args.size < 64:
            raise UserError(f"--size {args.size} is not a multiple of 64; use e.g. 256.")
        torch.set_grad_enabled(False)
        if args.what == "estimate":
            e = estimate(args.config or "full", args.size, DTYPES[args.dtype], args.branches, args.vae_batch)
            result = {"config": args.config or "full", "size": args.size, "dtype": args.dtype,
                      "branches": args.branches, "vae_batch": args.vae_batch, "unet_weights_bytes": e.unet_weights,
                      "vae_weights_bytes": e.vae_weights, "unet_step_peak_bytes": e.unet_step_peak,
                      "vae_decode_peak_bytes": e.vae_decode_peak, "workspace_margin_bytes": WORKSPACE_MARGIN,
                      "total_bytes": e.total, "largest_live_at_step_peak": [[n, d] for n, d in e.at_peak]}
            print(f"weights: UNet {gib(e.unet_weights)}, VAE {gib(e.vae_weights)}; sampler step peak "
                  f"{gib(e.unet_step_peak)} (activations {gib(e.unet_step_peak - e.unet_weights - e.vae_weights)}); "
                  f"VAE decode peak {gib(e.vae_decode_peak)}; + {gib(WORKSPACE_MARGIN)} workspaces = "
                  f"{gib(e.total)} estimated peak")
            for n, d in e.at_peak:
                print(f"  {n / 2 ** 20:9.1f} MiB  {d}")
        elif args.what == "autocast":
            result = autocast_cost(args.config or "small", args.size, args.branches)
            for name, r in result["rows"].items():
                print(f"{name:<62} peak {r['peak_bytes'] / 2 ** 20:8.0f} MiB, held after the forward "
                      f"{r['held_after_forward_bytes'] / 2 ** 20:8.0f} MiB")
        elif "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            # glibc keeps freed blocks in its heap (its mmap threshold grows with each freed large block), so a
            # second step would reuse resident pages and the RSS would under-count: a fixed 64 KiB threshold
            # maps and unmaps every large tensor, and the RSS follows the live bytes
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            return subprocess.run([sys.executable, "-m", "m3ddm.memory", *(argv if argv is not None else sys.argv[1:])],
                                  env=env).returncode
        else:
            result = validate(args.config or "small", args.size, args.branches)
            print(f"{result['config']} {result['size']} px, one sampler step, fp32: tracked "
                  f"{gib(result['tracked_cpu_bytes'])} (cpu) / {gib(result['tracked_meta_bytes'])} (meta); measured "
                  f"peak RSS rise {gib(result['measured_peak_rss_rise_bytes'])} "
                  f"({result['measured_over_tracked']:.2f}x tracked)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
