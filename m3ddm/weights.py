"""The m3ddm weights format, strict loading with a readable report, and the key maps of the converters.

An m3ddm file is a plain safetensors file, one model per file, whose header metadata holds
{"format": "m3ddm", "format_version": "1", "kind": "unet"|"vae"|"lpips", "config": JSON of the model's
dataclass config, "sources": JSON list of {name, sha256}} plus free-form extra keys. Run time reads
these files only; weights_convert.py makes them from diffusers folders, single-file Stable Diffusion
checkpoints and Lightning checkpoints, using the key maps and config inference below.
"""
import dataclasses
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch

from .errors import UserError

FORMAT, FORMAT_VERSION = "m3ddm", "1"
KINDS = ("unet", "vae", "lpips")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# File format

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_header(path) -> dict:
    """The parsed JSON header of a safetensors file, checked against the file size (truncation)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; check the path.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 1 < n < 100_000_000 else b""
    if raw[:1] == b"{" and len(raw) < n:
        raise UserError(f"{path} is truncated inside its header; download or convert it again.")
    try:
        header = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{path} is not a safetensors file (unreadable header); give a .safetensors file.") from None
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated ({size} bytes, the header needs {8 + n + end}); "
                        "download or convert it again.")
    return header


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def batchnorm_names(names) -> set:
    """The keys of BatchNorm modules (weight, bias, running statistics) among state-dict keys: every key
    whose module also has a `running_var`. They stay fp32 when the rest of a model is bf16/fp16."""
    names = list(names)
    modules = {k[: -len("running_var")] for k in names if k.endswith(".running_var") or k == "running_var"}
    return {k for k in names if k[: k.rfind(".") + 1] in modules}


def _tensor_plan(path, header):
    """[(name, stored dtype, shape, begin, end)] of a parsed header, checked (dtype known, sizes match)."""
    plan = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        stored = SAFETENSORS_DTYPES.get(info["dtype"])
        if stored is None:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which m3ddm does not read; "
                            "convert the original weights again.")
        begin, end = info["data_offsets"]
        numel = int(torch.Size(info["shape"]).numel())
        if numel * torch.empty(0, dtype=stored).element_size() != end - begin:
            raise UserError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']}; "
                            "the file is damaged, convert it again.")
        plan.append((name, stored, info["shape"], begin, end))
    return plan


def _read_exact(f, path, name, buffer: torch.Tensor, offset: int):
    """Read buffer's bytes from the file at offset (UserError if the file ends first)."""
    nbytes = buffer.numel() * buffer.element_size()
    f.seek(offset)
    if nbytes and f.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise UserError(f"{path} is truncated inside tensor {name}; download or convert it again.")


class _Staging:
    """Two reusable host buffers (pinned for CUDA) that tensors pass through on their way to a device:
    one tensor's read overlaps the previous tensor's asynchronous copy. Host memory: 2 x the largest tensor."""

    def __init__(self, nbytes: int, device: torch.device):
        pin = device.type == "cuda"
        self.buffers = [torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events = [None, None]
        self.next = 0

    def take(self, nbytes: int) -> tuple:
        i, self.next = self.next, 1 - self.next
        if self.events[i] is not None:
            self.events[i].synchronize()   # the copy out of this buffer has finished
            self.events[i] = None
        return i, self.buffers[i][:nbytes]

    def copied(self, i: int, device: torch.device):
        if device.type == "cuda":
            self.events[i] = torch.cuda.Event()
            self.events[i].record()


def load_tensors(path, device="cpu", dtype=None, keep_fp32=(), staged=None) -> dict:
    """Every tensor of a safetensors file, each read straight from the file into its own fresh tensor on
    `device`; floating tensors are cast to `dtype` when given, except the names in `keep_fp32`, which
    become float32 (BatchNorm statistics of a bf16/fp16 model).

    Why not safetensors' load_file: it returns views into a memory map of the file, so a tensor's address
    depends on the header's length. MKL's matrix-vector kernel (a Linear on one row, e.g. the time
    embedding at batch 1) sums in an order that depends on the weight's alignment, so the same weights
    gave different last bits depending on the metadata (and broke bit-exact resume). Fresh tensors are
    64-byte aligned. The file is read once, tensor by tensor, with no memory map: on CPU host memory holds
    the model once (plus one tensor while it is cast); for another device (or staged=True) each tensor
    passes through two reusable staging buffers (pinned for CUDA) and is copied asynchronously, so host
    memory holds two of the largest tensor, never the model.
    """
    header = safetensors_header(path)
    device = torch.device(device)
    plan = _tensor_plan(path, header)
    staged = device.type != "cpu" if staged is None else staged
    staging = _Staging(max((e - b for *_, b, e in plan), default=0), device) if staged else None
    keep_fp32 = set(keep_fp32)
    out = {}
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, stored, shape, begin, end in plan:
            cast = stored
            if stored.is_floating_point:
                cast = torch.float32 if name in keep_fp32 else dtype or stored
            if staging is None:
                t = torch.empty(shape, dtype=stored)
                _read_exact(f, path, name, t, start + begin)
                out[name] = t.to(device, cast)    # no copy when nothing changes
                continue
            i, buffer = staging.take(end - begin)
            _read_exact(f, path, name, buffer, start + begin)
            host = buffer.view(stored).view(shape) if end > begin else torch.empty(shape, dtype=stored)
            t = torch.empty(shape, dtype=cast, device=device)
            t.copy_(host, non_blocking=device.type == "cuda")
            staging.copied(i, device)
            out[name] = t
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def read_header(path):
    """(kind, config dict, metadata dict of strings) of an m3ddm file, without loading tensors."""
    meta = safetensors_header(path).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not an m3ddm weights file; convert it first with "
                        "`python weights_convert.py unet|vae SRC OUT`.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has m3ddm format version {meta.get('format_version')!r}, this m3ddm reads "
                        f"version {FORMAT_VERSION}; convert the original weights again.")
    if meta.get("kind") not in KINDS:
        raise UserError(f"{path} has unknown kind {meta.get('kind')!r}; convert the original weights again.")
    return meta["kind"], json.loads(meta.get("config", "{}")), meta


def _config_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, specs: dict, produce, metadata=None):
    """Write a safetensors file one tensor at a time (temporary name in the same folder, then rename).

    specs: {name: (dtype, shape)} in file order; produce(name) -> that tensor (any device), called once per
    name while writing, so host memory holds one tensor, never the model (safetensors' save_file makes a
    bytes copy of every tensor first: 2x the model). Standard format: little-endian u64 header length,
    JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back.
    """
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, (dtype, shape) in specs.items():
                t = produce(name).detach().to("cpu", dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced shape {tuple(t.shape)}, expected {tuple(shape)}")
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual permissions, not a temporary file's 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model(path, state_dict, kind, config, metadata=None, dtype=None) -> str:
    """Write one model as an m3ddm file (temporary name in the same folder, then rename); its sha256.

    Tensors are cast and written one at a time (write_safetensors): host memory holds one tensor beyond the
    state dict, also for a model on a GPU. dtype (torch dtype or None) casts floating tensors only, so
    BatchNorm counters stay int64, and not the BatchNorm weights and statistics (`batchnorm_names`), which
    stay fp32: rounding the global encoder's statistics to fp16 raised its fp16 error from 1.5 % to 2.3 %
    (tiny fixture), for 4 KB of file. metadata: extra keys; non-string values are stored as JSON
    ("sources" should be a list of {name, sha256}).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("sources", "[]")
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, kind=kind,
                config=json.dumps(_config_dict(config)))
    keep = batchnorm_names(state_dict)
    specs = {name: (dtype if dtype is not None and t.is_floating_point() and name not in keep else t.dtype,
                    tuple(t.shape)) for name, t in state_dict.items()}
    write_safetensors(path, specs, lambda name: state_dict[name], meta)
    return sha256_file(path)


def make_config(cls, config: dict, strict=True):
    """A dataclass config from a dict: lists become tuples; unknown keys are an error if strict."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if strict and unknown:
        raise UserError(f"the config has fields {unknown} that this m3ddm does not know; "
                        "update m3ddm or convert the original weights again.")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})
    except (TypeError, ValueError) as e:
        raise UserError(f"the config is not valid for this model ({e}); fix or replace the config.json.") from None


def config_from(arg, presets, cls, flag):
    """A preset name or a JSON file -> a model config (e.g. UNet3DConfig or VAEConfig); flag names the option."""
    if arg in presets:
        return presets[arg]
    path = Path(arg)
    if path.suffix != ".json" or not path.is_file():
        raise UserError(f"{flag} {arg} is neither a preset ({', '.join(sorted(presets))}) nor a JSON "
                        "file; give a preset name or an existing .json config.")
    try:
        return make_config(cls, json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise UserError(f"{flag} {arg} is not a valid config ({e}); fix the JSON file.") from None


# ---------------------------------------------------------------------------------------------------
# Strict loading

def mismatch_report(expected: dict, state_dict: dict) -> str:
    """'' when state_dict has exactly the expected keys and shapes, else a one-line summary."""
    def some(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    shapes = [f"{k} is {tuple(state_dict[k].shape)} but the model needs {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & state_dict.keys())
              if tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    parts = ([f"{len(missing)} missing ({some(missing)})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected ({some(unexpected)})"] if unexpected else []) + \
            ([f"{len(shapes)} of the wrong shape ({'; '.join(shapes[:2])})"] if shapes else [])
    return "; ".join(parts)


def check_state_dict(model, state_dict, what="the checkpoint"):
    """Raise UserError unless state_dict matches model's keys and shapes exactly (model may be on meta)."""
    report = mismatch_report(model.state_dict(), state_dict)
    if report:
        raise UserError(f"{what} does not match the model: {report}; check that the file is the right "
                        "model and its config, or convert the original weights again.")


def strict_load(model, state_dict, what="the checkpoint"):
    """load_state_dict(strict=True) preceded by a readable key/shape check (UserError on mismatch)."""
    check_state_dict(model, state_dict, what)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_kind(path, kind) -> dict:
    """The config of an m3ddm file after checking, from its header alone, that it is complete and holds a
    `kind` (so a command line can check every weights file before loading 5 GB of any of them)."""
    file_kind, config, _ = read_header(path)
    if file_kind != kind:
        raise UserError(f"{path} holds a {file_kind}, not a {kind}; give the {kind} weights file.")
    return config


def _load_model(path, kind, device, dtype):
    config = check_kind(path, kind)
    if kind == "unet":
        from .unet3d import UNet3D as Model, UNet3DConfig as Config
    else:
        from .vae import AutoencoderKL as Model, VAEConfig as Config
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = make_config(Config, config)
    names = [k for k in safetensors_header(path) if k != "__metadata__"]
    state = load_tensors(path, device, dtype, keep_fp32=batchnorm_names(names))
    with torch.device("meta"):  # no random init of 1.3 B parameters that are overwritten anyway
        model = Model(config)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = cast_model(Model(config).to(device), dtype)  # plain fallback: a non-persistent buffer needs real init
        model.load_state_dict(state, strict=True)
    return model.eval()


def cast_model(model, dtype):
    """model.to(dtype), except that BatchNorm modules stay float32 (the global encoder's running statistics:
    a variance rounded to bf16's 8 bits moves every normalised value by up to 0.4 %)."""
    for m in model.modules():
        keep = torch.float32 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else dtype
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != keep:
                t.data = t.data.to(keep)
    return model


def load_unet(path, device="cpu", dtype=None):
    """An eval-mode UNet3D from an m3ddm unet file, loaded straight to `device` one tensor at a time.
    dtype None: fp32 on CPU, bf16 on CUDA; the global encoder's BatchNorms stay fp32 in any dtype."""
    return _load_model(path, "unet", device, dtype)


def load_vae(path, device="cpu", dtype=None):
    """An eval-mode AutoencoderKL from an m3ddm vae file. dtype None: fp32 on CPU, bf16 on CUDA."""
    return _load_model(path, "vae", device, dtype)


# ---------------------------------------------------------------------------------------------------
# Key maps (they work on real or meta tensors alike)

LIGHTNING_UNET_PREFIX = "model.unet."
LDM_VAE_PREFIX = "first_stage_model."

# original LDM (CompVis) VAE names -> diffusers AutoencoderKL names; {up} is the reversed level index
_LDM_VAE_RULES = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", "encoder.down_blocks.{0}.resnets.{1}."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", "encoder.down_blocks.{0}.downsamplers.0.conv."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", "decoder.up_blocks.{up}.resnets.{1}."),
    (r"^decoder\.up\.(\d+)\.upsample\.conv\.", "decoder.up_blocks.{up}.upsamplers.0.conv."),
    (r"^(encoder|decoder)\.mid\.block_1\.", "{0}.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", "{0}.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", "{0}.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", "{0}.mid_block.attentions.0.to_{1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", "{0}.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", "{0}.conv_norm_out."),
]
# diffusers < 0.14 saved the VAE attention as query/key/value/proj_attn (SD-1.5's own vae/ files do)
_OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_key_from_ldm(key: str, num_levels: int) -> str:
    for pattern, template in _LDM_VAE_RULES:
        m = re.match(pattern, key)
        if m:
            up = num_levels - 1 - int(m.group(1)) if "{up}" in template else None
            key = template.format(*m.groups(), up=up) + key[m.end():]
            break
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def vae_state_dict(state_dict: dict) -> dict:
    """A diffusers-named VAE state dict from diffusers (new or old attention names) or LDM names.

    LDM: only `first_stage_model.*` is kept (a whole SD checkpoint also holds the 2D UNet and CLIP),
    and the 1x1-conv attention weights (C, C, 1, 1) become Linear weights (C, C).
    """
    if any(k.startswith(LDM_VAE_PREFIX) for k in state_dict):
        vae = {k[len(LDM_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_VAE_PREFIX)}
        levels = len({k.split(".")[2] for k in vae if k.startswith("decoder.up.")})
        state_dict = {vae_key_from_ldm(k, levels): v for k, v in vae.items()}
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(.*)$", k)
        if m:
            k = m.group(1) + _OLD_DIFFUSERS_ATTENTION[m.group(2)] + "." + m.group(3)
        if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") and v.dim() == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v
    return out


def unet_state_dict(state_dict: dict) -> dict:
    """The UNet's own keys: a Lightning `model.unet.*` dict is filtered and stripped, else unchanged."""
    if any(k.startswith(LIGHTNING_UNET_PREFIX) for k in state_dict):
        n = len(LIGHTNING_UNET_PREFIX)
        return {k[n:]: v for k, v in state_dict.items() if k.startswith(LIGHTNING_UNET_PREFIX)}
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------
# Config inference when a config.json is missing: the shapes fix the widths and depths, the rest is
# the documented default (norm_num_groups 32, attention_head_dim 8, norm_eps 1e-5, ...).

def _count(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _check_groups(widths, groups, kind):
    if any(c % groups for c in widths):
        raise UserError(f"the {kind} widths {tuple(widths)} are not divisible by the default norm_num_groups "
                        f"{groups}; pass its config.json with --config.")


def infer_unet_config(sd: dict) -> dict:
    levels = _count(sd, "down_blocks.")
    widths = [sd[f"down_blocks.{i}.resnets.0.conv1.spatial_conv.weight"].shape[0] for i in range(levels)]
    attn = [_count(sd, f"down_blocks.{i}.attentions.") > 0 for i in range(levels)]
    up_attn = [_count(sd, f"up_blocks.{i}.attentions.") > 0 for i in range(levels)]
    cross = next(v.shape[1] for k, v in sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    _check_groups(widths, 32, "UNet")
    return dict(in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.spatial_conv.weight"].shape[0],
                block_out_channels=tuple(widths), layers_per_block=_count(sd, "down_blocks.0.resnets."),
                cross_attention_dim=cross,
                down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlockP3D" for a in attn),
                up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlockP3D" for a in up_attn))


def infer_vae_config(sd: dict) -> dict:
    levels = _count(sd, "encoder.down_blocks.")
    widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    _check_groups(widths, 32, "VAE")
    return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                block_out_channels=tuple(widths), layers_per_block=_count(sd, "encoder.down_blocks.0.resnets."),
                latent_channels=sd["post_quant_conv.weight"].shape[0])
