"""GPU hazards checked on the CPU: what would be a host-to-device copy per step, per-call tensor creation."""
import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m3ddm import bench
from m3ddm.sampler import denoise_clip, encode_global_context
from m3ddm.schedulers import DDIMScheduler


class CountNewTensors(TorchDispatchMode):
    """Counts tensors made from Python data (torch.tensor -> aten.lift_fresh): on CUDA each is a host-to-device
    copy, and under torch.compile a value baked into the graph."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy):
            self.count += 1
        return func(*args, **(kwargs or {}))


def new_tensors_in_clip(unet, inputs, steps, plain):
    context = encode_global_context(unet, inputs.global_latents)
    with CountNewTensors() as mode, torch.no_grad():
        denoise_clip(unet, DDIMScheduler(steps), inputs.start, inputs.noise, inputs.conditioning, context, 4,
                     plain=plain)
    return mode.count


def test_timesteps_and_fps_are_made_once_per_clip_not_per_step():
    """t and fps reach the UNet as device tensors built before the loop, on the fast and the plain path:
    the number of tensors made from Python values does not grow with the number of steps."""
    args = argparse.Namespace(config="tiny", seed=0, frames=4, size=64)
    unet = bench.build_unet("tiny", seed=0, device=torch.device("cpu"))
    inputs = bench.make_clip_inputs(args, torch.device("cpu"))
    for plain in (False, True):
        counts = [new_tensors_in_clip(unet, inputs, steps, plain) for steps in (2, 5)]
        assert counts[0] == counts[1], (plain, counts)
