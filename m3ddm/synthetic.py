"""Random weights of any shapes, written as diffusers-style folders one tensor at a time.

For the full-size tests and benchmarks: the released UNet (1.30 B parameters, 5.2 GB in fp32) and the
SD-1.5 VAE as `config.json` + `diffusion_pytorch_model.safetensors`, exactly what a user downloads, so
that `weights_convert.py` and `sample.py` run their real path. The file is written tensor by tensor
(header first, then each tensor generated and appended), so host memory holds one tensor, not the model.

    shapes = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}
    write_random_folder(folder, shapes, config_json, seed=0)
"""
import dataclasses
import json
from pathlib import Path

import torch

CLASS_NAMES = {"unet": "UNet3DConditionModel", "vae": "AutoencoderKL"}


def random_tensor(name: str, shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A seeded random tensor whose scale fits its role: matrices and kernels N(0, 1/fan_in), norm scales
    1 + N(0, 0.1^2), biases and shifts N(0, 0.02^2), BatchNorm variances in [0.5, 1.5], counters 0. Drawn on
    the generator's device in fp32, then cast, so every dtype and device gets the same values.

    Unlike a fresh model (zero attention outputs, identity temporal convolutions) every layer is active."""
    device = gen.device
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if name.endswith("running_var"):
        value = 0.5 + torch.rand(shape, generator=gen, device=device)
    elif len(shape) >= 2:
        fan_in = max(1, int(torch.Size(shape[1:]).numel()))
        value = torch.randn(shape, generator=gen, device=device) / fan_in ** 0.5
    elif name.endswith("weight"):
        value = 1 + 0.1 * torch.randn(shape, generator=gen, device=device)
    else:
        value = 0.02 * torch.randn(shape, generator=gen, device=device)
    return value.to(dtype)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and buffer in place, on its own device (a model made with to_empty on a GPU is
    randomised there, one tensor at a time), with the values random_tensor gives for that seed."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        t.copy_(random_tensor(name, tuple(t.shape), gen, t.dtype))
    return model


def tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if name.endswith("num_batches_tracked") else dtype


def write_random_safetensors(path, shapes: dict, seed: int = 0, dtype=torch.float32, metadata=None):
    """A safetensors file of random tensors {name: shape}, generated and written one at a time."""
    from .weights import write_safetensors
    gen = torch.Generator("cpu").manual_seed(seed)
    specs = {name: (tensor_dtype(name, dtype), tuple(shape)) for name, shape in shapes.items()}
    return write_safetensors(path, specs, lambda name: random_tensor(name, specs[name][1], gen, specs[name][0]),
                             metadata)


def config_json(kind: str, config) -> dict:
    """A diffusers-style config.json dict of a dataclass config (or a dict), with its `_class_name`."""
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"_class_name": CLASS_NAMES[kind], **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


def model_shapes(kind: str, config) -> dict:
    """{state-dict key: shape} of a model, built on the meta device (no memory)."""
    if kind == "unet":
        from .unet3d import UNet3D as Model, UNet3DConfig as Config
    else:
        from .vae import AutoencoderKL as Model, VAEConfig as Config
    if not dataclasses.is_dataclass(config):
        from .weights import make_config
        config = make_config(Config, {k: v for k, v in config.items() if not k.startswith("_")}, strict=False)
    with torch.device("meta"):
        model = Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_random_folder(folder, kind: str, config, shapes: dict = None, seed: int = 0, dtype=torch.float32) -> Path:
    """folder/config.json + folder/diffusion_pytorch_model.safetensors with random weights; returns folder.
    config: a dataclass config or a config.json dict; shapes: {key: shape} (default: the config's model)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, dict) else config_json(kind, config)
    shapes = shapes if shapes is not None else model_shapes(kind, cfg)
    write_random_safetensors(folder / "diffusion_pytorch_model.safetensors", shapes, seed, dtype)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return folder
