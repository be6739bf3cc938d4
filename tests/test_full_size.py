"""The released configuration through the user's path on the CPU: random weights of the released shapes
(the checkpoint's key manifest and config.json; SD-1.5 VAE) as diffusers-style folders -> weights_convert.py
(fp32, fp16) -> sample.py on a real clip (one 16-frame clip, 128 px, 2 DDIM steps, fp32), and the bad
inputs a user with 5 GB files meets. The converted files are made once for the module (about 1.5 minutes
on 2 cores, 8 GB of disk) and reused by every case. bf16 sampling at full size is measured by
`python -m m3ddm.bench_fullsize` (on a CPU without native bf16 it takes hours: see the README).

Peak host memory (RSS of each process, from wait4) is bounded by what was measured on the development
machine plus a margin: conversion 5.07 GiB (fp32), sampling 6.33 GiB (fp32).
"""
import json
import shutil
import sys

import pytest

from conftest import FIXTURES
from m3ddm import bench_fullsize as B
from m3ddm.video import probe

pytestmark = pytest.mark.slow
GiB = 2 ** 30
KEYS = FIXTURES / "keys"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{"unet_fp32", "unet_fp16", "vae"}: files converted from random diffusers-style folders, plus the
    conversion runs (wall time, peak RSS)."""
    folder = tmp_path_factory.mktemp("full_size")
    shapes = json.loads((KEYS / "m3ddm_unet_keys.json").read_text())
    config = json.loads((KEYS / "m3ddm_unet_config.json").read_text())
    unet_src, vae_src = B.write_sources(folder / "sources", seed=0, unet_shapes=shapes, unet_config=config)
    runs = {"vae": B.convert("vae", vae_src, folder / "vae.safetensors", "fp32")}
    for dtype in ("fp32", "fp16"):
        runs[f"unet_{dtype}"] = B.convert("unet", unet_src, folder / f"unet_{dtype}.safetensors", dtype)
    shutil.rmtree(folder / "sources")          # 5.5 GB of sources are not needed any more
    for name, r in runs.items():
        assert r["rc"] == 0, (name, r["stderr"][-2000:])
    files = {"vae": folder / "vae.safetensors", "unet_fp32": folder / "unet_fp32.safetensors",
             "unet_fp16": folder / "unet_fp16.safetensors"}
    yield {"files": files, "runs": runs, "folder": folder}
    shutil.rmtree(folder, ignore_errors=True)


def test_conversion_sizes_dtypes_and_memory(converted):
    files, runs = converted["files"], converted["runs"]
    assert files["unet_fp32"].stat().st_size == pytest.approx(5.197e9, rel=1e-3)   # 1,299,279,320 fp32 parameters
    assert files["unet_fp16"].stat().st_size == pytest.approx(2.599e9, rel=1e-3)
    info = B.run_measured([sys.executable, B.ROOT / "weights_convert.py", "info", files["unet_fp16"]])
    assert info["rc"] == 0 and "parameters: 1,299,279,320" in info["stdout"]
    assert "F16 x1341" in info["stdout"] and "F32 x140" in info["stdout"]     # BatchNorms stay fp32
    # the source is memory-mapped (its pages count in RSS), the output written one tensor at a time
    assert runs["unet_fp32"]["peak_rss_bytes"] < 5.6 * GiB
    assert runs["unet_fp16"]["peak_rss_bytes"] < 5.6 * GiB


def test_sample_full_size_fp32_on_a_real_clip(converted, real_videos, tmp_path):
    """sample.py with the converted files: 16 frames at 128x128 (1:1 from a 16:9 clip), audio copied, a run
    record, and peak host memory under 7 GiB (measured 6.33 GiB: 4.84 GiB of UNet weights)."""
    files = converted["files"]
    r = B.sample(real_videos / "pyfeat_single_face.mp4", files["unet_fp32"], files["vae"], tmp_path, "fp32")
    assert r["rc"] == 0, r["stderr"][-2000:]
    out = tmp_path / "pyfeat_single_face_1-1.mp4"
    assert r["stdout"].split() == [str(out)]
    info = probe(out)
    assert (info.num_frames, info.width, info.height) == (16, 128, 128) and info.has_audio
    record = json.loads((tmp_path / "pyfeat_single_face.json").read_text())
    assert record["num_clips"] == 1 and record["unet_calls"] == 2 and record["dtype"] == "float32"
    assert r["peak_rss_bytes"] < 7 * GiB


def test_fp16_file_loads_as_bf16(converted):
    """--dtype bf16 with a fp16 file casts while loading: bf16 everywhere but the fp32 BatchNorms, host memory
    about one bf16 copy of the model (2.42 GiB)."""
    r = B.measure_load(converted["files"]["unet_fp16"], "bf16")
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert r["parameters"] == 1_299_279_320
    assert set(r["dtypes"]) == {"bfloat16", "float32"} and r["dtypes"]["float32"] < 10_000
    assert r["peak_rss_bytes"] < 3.2 * GiB


def expect_exit_2(r, *words):
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r["stderr"][-1000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_inputs_at_full_size(converted, real_videos, tmp_path):
    """A UNet file given to --vae; a download cut short (the header says 5.2 GB, the file has 64 MiB): one
    line, exit 2, checked from the headers before loading anything (so in seconds), no output."""
    files, clip = converted["files"], real_videos / "pyfeat_single_face.mp4"
    r = B.sample(clip, files["unet_fp32"], files["unet_fp32"], tmp_path / "a", "fp32")
    expect_exit_2(r, "holds a unet, not a vae")
    assert r["wall_s"] < 60 and r["peak_rss_bytes"] < 1 * GiB
    cut = tmp_path / "unet_cut.safetensors"
    with open(files["unet_fp32"], "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(64 * 2 ** 20))
    r = B.sample(clip, cut, files["vae"], tmp_path / "b", "fp32")
    expect_exit_2(r, "truncated", str(64 * 2 ** 20))
    assert r["peak_rss_bytes"] < 1 * GiB
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
