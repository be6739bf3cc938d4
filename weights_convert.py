"""Convert official weights, once, into m3ddm safetensors files (run time never needs diffusers).

  python weights_convert.py vae   SRC OUT [--dtype fp32|fp16|bf16] [--config config.json] [--force]
  python weights_convert.py unet  SRC OUT [--dtype ...] [--config config.json] [--force]
  python weights_convert.py lpips ALEXNET_PTH LPIPS_LIN_PTH OUT [--force]
  python weights_convert.py info   FILE
  python weights_convert.py verify FILE

vae SRC: a diffusers VAE folder, a whole SD-1.5 diffusers folder (its vae/ is used), or a single-file
Stable Diffusion checkpoint (.safetensors/.ckpt, `first_stage_model.*` keys).
unet SRC: a diffusers-style M3DDM/M3DDM+ folder, a Lightning checkpoint (`model.unet.*` keys), or a bare
state dict. Pickled files (.bin/.ckpt/.pth) are read with torch.load(weights_only=True) only.
"""
import argparse
import collections
import json
import pickle
import struct
import sys
from pathlib import Path

import torch

from m3ddm import __version__
from m3ddm import weights as W
from m3ddm import cli
from m3ddm.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
CLASS_NAMES = {"unet": "UNet3DConditionModel", "vae": "AutoencoderKL"}
LPIPS_SHAPES = {"features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
                "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
                "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
                "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
                "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
                **{f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def note(message):
    print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Reading sources

def read_tensors(path: Path) -> dict:
    """{name: tensor} of a safetensors file or a torch.save file (state dict, or {"state_dict": ...})."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; check the path.")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip archive / legacy pickle
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" not in str(e).lower() and "weights only" not in str(e).lower():
                raise UserError(f"{path} is damaged or not a PyTorch checkpoint ({e}); download it again.") from None
            raise UserError(f"{path} needs arbitrary unpickling (it stores Python objects besides tensors), which "
                            "m3ddm refuses; re-save only its state dict with torch.save or give a .safetensors "
                            "file.") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{path} is damaged or not a PyTorch checkpoint ({str(e).splitlines()[0]}); "
                            "download it again.") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # Lightning and original LDM checkpoints
        if not isinstance(obj, dict):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; give a file of tensors.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        W.safetensors_header(path)  # clear errors for truncated files before safetensors' own
        from safetensors.torch import load_file
        return load_file(str(path))
    raise UserError(f"{path} is neither a safetensors file nor a PyTorch checkpoint; give the weights file.")


def find_source(src: str, kind: str):
    """(weights file, config.json or None) of a folder or a file."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist; give the downloaded weights folder or file.")
    if src.is_dir():
        sub = src / kind
        if sub.is_dir() and not any((src / n).is_file() for n in WEIGHT_FILES):
            src = sub  # a whole diffusers pipeline folder: take vae/ (or unet/)
        weights = next((src / n for n in WEIGHT_FILES if (src / n).is_file()), None)
        if weights is None:
            raise UserError(f"{src} has no diffusion_pytorch_model.safetensors or .bin; give the {kind} folder.")
        config = src / "config.json"
        return weights, config if config.is_file() else None
    config = src.parent / "config.json"  # e.g. a Lightning checkpoint in the folder train.py writes
    if config.is_file() and read_config_json(config).get("_class_name") == CLASS_NAMES[kind]:
        return src, config
    return src, None


def read_config_json(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable JSON config ({e}); give the model's config.json.") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object; give the model's config.json.")
    return config


def check_kind(sd: dict, kind: str, src):
    """Catch a VAE given as `unet` and the reverse, with the command that would work."""
    is_vae = "encoder.conv_in.weight" in sd or any(k.startswith(W.LDM_VAE_PREFIX) for k in sd)
    is_unet = "conv_in.weight" in sd and any(k.startswith("global_img_encoder.") for k in sd)
    if kind == "unet" and not is_unet and is_vae:
        raise UserError(f"{src} holds VAE weights, not an M3DDM UNet; run `weights_convert.py vae` on it.")
    if kind == "unet" and not is_unet and any(k.startswith("model.diffusion_model.") for k in sd):
        raise UserError(f"{src} is a Stable Diffusion checkpoint, not an M3DDM UNet; give the M3DDM(+) UNet.")
    if kind == "vae" and not is_vae and (is_unet or any(k.startswith(W.LIGHTNING_UNET_PREFIX) for k in sd)):
        raise UserError(f"{src} holds M3DDM UNet weights, not a VAE; run `weights_convert.py unet` on it.")


def check_dtypes(sd: dict, src):
    for k, v in sd.items():
        if v.dtype not in FLOATS and not (k.endswith("num_batches_tracked") and not v.is_floating_point()):
            raise UserError(f"{src} stores {k} as {v.dtype}, which m3ddm does not convert; give fp32/fp16/bf16 "
                            "weights.")


def parse_dtype(name):
    if name not in W.DTYPES:
        raise UserError(f"--dtype {name} is not supported; use one of {', '.join(W.DTYPES)}.")
    return W.DTYPES[name]


def check_out(out, inputs, force):
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name such as {out / 'model.safetensors'}.")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} does not exist; create it first.")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise UserError(f"{out} is one of the inputs; write the output to another file.")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it.")
    return out


def sources(*paths):
    return [{"name": Path(p).name, "sha256": W.sha256_file(p)} for p in paths if p is not None]


# ---------------------------------------------------------------------------------------------------
# Commands

def model_classes(kind):
    if kind == "unet":
        from m3ddm.unet3d import UNet3D, UNet3DConfig
        return UNet3D, UNet3DConfig
    from m3ddm.vae import AutoencoderKL, VAEConfig
    return AutoencoderKL, VAEConfig


def convert(kind, src, out, dtype="fp32", force=False, config_path=None):
    dtype = parse_dtype(dtype)
    weights, config_file = find_source(src, kind)
    config_file = Path(config_path) if config_path else config_file
    out = check_out(out, [weights] + ([config_file] if config_file else []), force)
    raw = read_tensors(weights)
    check_kind(raw, kind, weights)
    sd = W.unet_state_dict(raw) if kind == "unet" else W.vae_state_dict(raw)
    check_dtypes(sd, weights)
    Model, Config = model_classes(kind)
    if config_file is not None:
        config_json = read_config_json(config_file)
        if config_json.get("_class_name", CLASS_NAMES[kind]) != CLASS_NAMES[kind]:
            raise UserError(f"{config_file} describes a {config_json['_class_name']}, not a {CLASS_NAMES[kind]}; "
                            f"give the {kind}'s config.json.")
        config = W.make_config(Config, config_json, strict=False)
    else:
        try:
            inferred = W.infer_unet_config(sd) if kind == "unet" else W.infer_vae_config(sd)
        except (KeyError, StopIteration) as e:
            raise UserError(f"{weights} lacks {e} needed to infer the {kind} config; pass --config config.json "
                            "or check the file.") from None
        config = W.make_config(Config, inferred)
        note(f"no config.json: inferred {json.dumps(inferred)} from the tensor shapes and took the documented "
             "defaults for the rest.")
    try:
        with torch.device("meta"):
            model = Model(config)
    except ValueError as e:
        raise UserError(f"the {kind} config cannot build a model ({e}); fix the config.json.") from None
    W.check_state_dict(model, sd, str(weights))
    sd = {k: sd[k] for k in model.state_dict()}  # the model's own order
    metadata = {"sources": sources(weights, config_file), "converter": f"m3ddm {__version__} weights_convert.py"}
    sha = W.save_model(out, sd, kind, config, metadata=metadata, dtype=dtype)
    print(f"wrote {out}: {kind}, {len(sd)} tensors, {str(dtype).replace('torch.', '')}, sha256 {sha}")
    return out


def convert_lpips(alexnet, lins, out, force=False):
    out = check_out(out, [alexnet, lins], force)
    trunk, heads = read_tensors(Path(alexnet)), read_tensors(Path(lins))
    sd = {k: (trunk if k.startswith("features.") else heads).get(k) for k in LPIPS_SHAPES}
    missing = [k for k, v in sd.items() if v is None]
    if missing:
        raise UserError(f"the LPIPS sources lack {', '.join(missing[:3])}; give torchvision's AlexNet weights and "
                        "lpips' v0.1 alex.pth, in that order.")
    wrong = [k for k, v in sd.items() if tuple(v.shape) != LPIPS_SHAPES[k]]
    if wrong:
        raise UserError(f"{wrong[0]} is {tuple(sd[wrong[0]].shape)}, not {LPIPS_SHAPES[wrong[0]]}; give AlexNet and "
                        "v0.1 alex.pth weights.")
    check_dtypes(sd, f"{alexnet} / {lins}")
    config = {"net": "alex", "version": "0.1", "channels": [64, 192, 384, 256, 256]}
    metadata = {"sources": sources(alexnet, lins), "converter": f"m3ddm {__version__} weights_convert.py"}
    sha = W.save_model(out, sd, "lpips", config, metadata=metadata, dtype=torch.float32)
    print(f"wrote {out}: lpips, {len(sd)} tensors, float32, sha256 {sha}")
    return out


def info(path):
    kind, config, meta = W.read_header(path)
    header = W.safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    numel = {k: int(torch.Size(v["shape"]).numel()) for k, v in tensors.items()}
    params = sum(n for k, n in numel.items() if not k.endswith(buffers))
    dtypes = collections.Counter(v["dtype"] for v in tensors.values())
    print(f"file: {path}\nkind: {kind}\nformat: {meta['format']} {meta['format_version']}")
    print(f"config: {json.dumps(config)}")
    print(f"tensors: {len(tensors)}, parameters: {params:,}, buffer elements: {sum(numel.values()) - params:,}")
    print("dtypes: " + ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items())))
    print(f"sha256: {W.sha256_file(path)}")
    for s in json.loads(meta.get("sources", "[]")):
        print(f"source: {s.get('name')} sha256 {s.get('sha256')}")


@torch.no_grad()
def verify(path):
    kind, _, _ = W.read_header(path)
    if kind == "unet":
        model = W.load_unet(path, dtype=torch.float32)
        x = torch.randn(1, model.config.in_channels, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        y = model(x, 500, 8, global_latents=torch.zeros(1, 1, 4, 8, 8))
    elif kind == "vae":
        model = W.load_vae(path, dtype=torch.float32)
        y = model.decode(model.encode(torch.zeros(1, 3, 16, 16)).mode())
    else:
        from m3ddm.metrics import load_lpips
        model = load_lpips(path)
        y = model(torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64) * 0.5)
    if not torch.isfinite(y).all():
        raise UserError(f"{path} loads but its forward pass gives non-finite values; convert the weights again.")
    n = sum(p.numel() for p in model.parameters())
    print(f"ok: {path} loads strictly as a {kind} ({n:,} parameters); tiny forward -> {tuple(y.shape)}, finite")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for kind in ("vae", "unet"):
        c = sub.add_parser(kind, help=f"convert {kind} weights")
        c.add_argument("src", help="folder or weights file")
        c.add_argument("out", help="output .safetensors file")
        c.add_argument("--dtype", default="fp32", help="fp32 (default), fp16 or bf16")
        c.add_argument("--config", help="config.json to use when SRC has none next to it")
        c.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    c = sub.add_parser("lpips", help="convert torchvision AlexNet + lpips v0.1 alex.pth")
    c.add_argument("alexnet")
    c.add_argument("lins")
    c.add_argument("out")
    c.add_argument("--force", action="store_true")
    for name in ("info", "verify"):
        sub.add_parser(name, help=f"{name} an m3ddm weights file").add_argument("file")
    args = p.parse_args(argv)

    def body():
        if args.command in ("vae", "unet"):
            convert(args.command, args.src, args.out, args.dtype, args.force, args.config)
        elif args.command == "lpips":
            convert_lpips(args.alexnet, args.lins, args.out, args.force)
        else:
            (info if args.command == "info" else verify)(args.file)
    return cli.run(body, interrupted="no partial output was kept")


if __name__ == "__main__":
    sys.exit(main())
