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


# ---------------------------------------------------------------------------------------------------------
# generated clips (the project's ffmpeg makes each in well under a second)

CONTAINER_CODECS = {   # container -> video encoder options
    "mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "mov": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "mkv": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "ts": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "webm": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-pix_fmt", "yuv420p"],
    "avi": ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p"],
}
AUDIO_CODECS = {"mp4": "aac", "mov": "aac", "mkv": "aac", "ts": "aac", "webm": "libopus", "avi": "pcm_s16le"}


def make_clip(path, rate="30", frames=12, size=(32, 24), audio=False, setpts=None) -> Path:
    """A small test clip: ffmpeg's testsrc2 at `rate` (e.g. "30000/1001"), `frames` frames of size (W, H), in
    the container given by the suffix; audio: a sine track; setpts: an ffmpeg setpts expression (VFR clips)."""
    from m3ddm.video import ffmpeg_exe
    path = Path(path)
    fmt = path.suffix[1:]
    cmd = [ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
           "-i", f"testsrc2=size={size[0]}x{size[1]}:rate={rate}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-c:a", AUDIO_CODECS[fmt], "-shortest"]
    if setpts:
        cmd += ["-vf", f"setpts='{setpts}'", "-fps_mode", "passthrough"]
    cmd += ["-frames:v", str(frames), *CONTAINER_CODECS[fmt], str(path)]
    subprocess.run(cmd, check=True)
    return path


def packet_times(path):
    """(timebase, [(pts, duration)] sorted) of a file's video packets, straight from ffmpeg (no m3ddm code)."""
    from fractions import Fraction
    from m3ddm.video import ffmpeg_exe
    r = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "framecrc",
                        "-"], capture_output=True, text=True, check=True)
    tb = Fraction(next(line for line in r.stdout.splitlines() if line.startswith("#tb 0:")).split(":", 1)[1].strip())
    rows = [line.split(",") for line in r.stdout.splitlines() if line and not line.startswith("#")]
    return tb, sorted((int(row[2]), int(row[3])) for row in rows if "F=0x4" not in line_flags(row))


def line_flags(row):
    return row[6].strip() if len(row) > 6 else ""


def span_seconds(path):
    """Seconds from the first frame's start to the last frame's end, by the file's own packet timestamps: the
    pts span plus the median packet duration (with B-frames, mp4 packet durations are dts steps)."""
    import statistics
    tb, packets = packet_times(path)
    return (packets[-1][0] - packets[0][0] + statistics.median_low(d for _, d in packets)) * tb


@pytest.fixture(scope="session")
def tiny_weight_files(tmp_path_factory):
    """The reference fixture's tiny UNet and VAE as m3ddm files: sample.py's --unet/--vae arguments."""
    from safetensors.torch import load_file
    from m3ddm.unet3d import UNET_PRESETS
    from m3ddm.vae import VAE_PRESETS
    from m3ddm.weights import save_model
    d = tmp_path_factory.mktemp("tiny_weights")
    save_model(d / "unet.safetensors", load_file(str(FIXTURES / "unet3d_tiny" / "diffusion_pytorch_model.safetensors")),
               "unet", UNET_PRESETS["tiny"])
    save_model(d / "vae.safetensors", load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors")),
               "vae", VAE_PRESETS["tiny"])
    return ["--unet", str(d / "unet.safetensors"), "--vae", str(d / "vae.safetensors")]


def ffmpeg_exe_path() -> str:
    from m3ddm.video import ffmpeg_exe
    return ffmpeg_exe()


@pytest.fixture
def one_thread():
    """One intra-op thread: the computation a killed single-thread subprocess ran, whatever CI's thread count,
    and on a shared 2-core machine faster than two oversubscribed threads."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
