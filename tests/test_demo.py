"""The embedded demo model (m3ddm/assets): committed weights, their metadata, the bundled clips, a sampling smoke run."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from m3ddm.unet3d import UNet3D
from m3ddm.vae import VAE_PRESETS, AutoencoderKL
from m3ddm.video import probe
from m3ddm.weights import load_unet, load_vae, read_header

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "m3ddm" / "assets"
DEMO_VAE, DEMO_UNET = ASSETS / "demo_vae.safetensors", ASSETS / "demo_unet.safetensors"
CLIP_4X3, CLIP_TRUTH = ASSETS / "kivy_city_4x3.mp4", ASSETS / "kivy_city_16x9_truth.mp4"
HELD_OUT = {"kivy_cityCC0.mpg", "opencv_cup.mp4"}
MAX_TOTAL_BYTES = 25 * 1000 * 1000


def test_demo_preview_png_is_small():
    png = ASSETS / "demo_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size <= 300 * 1000


def test_demo_vae_preset_shape():
    cfg = VAE_PRESETS["demo"]
    assert len(cfg.block_out_channels) == 4 and cfg.latent_channels == 4 and cfg.layers_per_block == 1
    vae = AutoencoderKL(cfg)
    assert vae.factor == 8
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).mean
    assert z.shape == (1, 4, 8, 8)


def test_demo_weights_total_size():
    total = DEMO_VAE.stat().st_size + DEMO_UNET.stat().st_size
    assert total <= MAX_TOTAL_BYTES, f"demo weights are {total / 1e6:.1f} MB, the budget is 25 MB"


@pytest.mark.parametrize("path", [DEMO_VAE, DEMO_UNET], ids=["vae", "unet"])
def test_demo_weights_are_fp16(path):
    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and not dtypes & {"F32", "F64", "BF16"}, dtypes  # integer buffers stay integer


@pytest.mark.parametrize("path,kind", [(DEMO_VAE, "vae"), (DEMO_UNET, "unet")], ids=["vae", "unet"])
def test_demo_weights_metadata(path, kind):
    file_kind, config, meta = read_header(path)
    assert file_kind == kind and config
    assert "train.py" in meta["training_command"] and f"--target {kind}" in meta["training_command"]
    assert int(meta["steps"]) > 0
    assert 0 < float(meta["final_loss"]) < 10
    assert int(meta["demo_weights_wall_s"]) > 0
    data, held_out = json.loads(meta["data"]), json.loads(meta["held_out"])
    assert len(data) >= 4 and {d["name"] for d in held_out} == HELD_OUT
    assert not HELD_OUT & {d["name"] for d in data}
    assert all(len(d["sha256"]) == 64 for d in data + held_out)
    assert "not the official M3DDM+" in meta["demo"]


def test_demo_weights_load():
    vae, unet = load_vae(DEMO_VAE), load_unet(DEMO_UNET)
    assert isinstance(vae, AutoencoderKL) and isinstance(unet, UNet3D)
    assert vae.factor == 8 and vae.config.latent_channels == 4 and unet.config.in_channels == 9
    assert next(vae.parameters()).dtype == torch.float32  # loaded for the CPU in fp32
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        z = vae.encode_latents(x)
        assert torch.isfinite(z).all() and torch.isfinite(vae.decode_latents(z)).all()


@pytest.mark.parametrize("path,width,height", [(CLIP_4X3, 320, 240), (CLIP_TRUTH, 426, 240)], ids=["4x3", "truth"])
def test_bundled_clips_probe(path, width, height):
    info = probe(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (width, height, 100, 25.0)


def test_demo_sampling_smoke(tmp_path, capsys):
    """sample.py with its default (demo) weights on the first 16 frames of the bundled clip."""
    sys.path.insert(0, str(ROOT))
    import sample
    rc = sample.main([str(CLIP_4X3), "--ratio", "16:9", "--size", "128", "--limit-frames", "16", "--steps", "2",
                      "--scheduler", "ddim", "--global-frames", "4", "--out", str(tmp_path)])
    assert rc == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.fps) == (128, 72, 16, 25.0)
