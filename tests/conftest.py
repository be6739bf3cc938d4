"""Shared test helpers: fixture paths, the real-video cache, deterministic torch settings."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VIDEO_CACHE = Path(os.environ.get("M3DDM_VIDEO_CACHE", Path.home() / ".cache" / "m3ddm" / "real_videos"))

torch.manual_seed(0)
if not os.environ.get("CI"):
    torch.set_num_threads(1)  # a shared dev machine: threads only fight each other


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def real_videos() -> Path:
    """The eight real clips of tests/fetch_videos.sh, fetched once into a cache folder.

    Skips (loudly, with the reason) when they cannot be fetched; never passes silently.
    """
    probe = VIDEO_CACHE / "kivy_cityCC0.mpg"
    if not probe.exists() or not (VIDEO_CACHE / "opencv_cup.mp4").exists():
        r = subprocess.run(["bash", str(ROOT / "tests" / "fetch_videos.sh"), str(VIDEO_CACHE)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"REAL VIDEOS UNAVAILABLE: tests/fetch_videos.sh failed: {r.stderr.strip()[-300:]}")
    return VIDEO_CACHE


def require_diffusers():
    """Import diffusers for a parity test, or skip LOUDLY (CI installs it, so it never skips there)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("PARITY NOT CHECKED: diffusers is not installed (pip install -e '.[test]')")
    return diffusers


@pytest.fixture(scope="module")
def tiny_models():
    """The reference fixture's tiny UNet and VAE (random weights), loaded strictly, in eval mode."""
    from safetensors.torch import load_file
    from m3ddm.unet3d import UNET_PRESETS, UNet3D
    from m3ddm.vae import VAE_PRESETS, AutoencoderKL
    unet = UNet3D(UNET_PRESETS["tiny"]).eval()
    unet.load_state_dict(load_file(str(FIXTURES / "unet3d_tiny" / "diffusion_pytorch_model.safetensors")), strict=True)
    vae = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    vae.load_state_dict(load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors")), strict=True)
    return unet, vae
