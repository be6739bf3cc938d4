"""The issue's three bad weights inputs through sample.py, in miniature (tests/test_full_size.py repeats them at
full size): a UNet file given to --vae, a fp16 file run with --dtype bf16 (works: cast while loading), and a file
whose header promises more bytes than it has (a 5 GB download cut short): one line, exit 2, no output."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

import sample
from conftest import FIXTURES
from m3ddm.unet3d import UNET_PRESETS
from m3ddm.vae import VAE_PRESETS
from m3ddm.video import probe
from m3ddm.weights import save_model

FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "1", "--limit-frames", "4", "--global-frames", "2",
        "--ratio", "1:1", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    unet_sd = load_file(str(FIXTURES / "unet3d_tiny" / "diffusion_pytorch_model.safetensors"))
    save_model(d / "unet16.safetensors", unet_sd, "unet", UNET_PRESETS["tiny"], dtype=torch.float16)
    save_model(d / "vae.safetensors", load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors")),
               "vae", VAE_PRESETS["tiny"])
    return d


def run(argv, capsys):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, out, err, *words):
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]


def test_fp16_file_with_dtype_bf16_is_cast_and_works(real_videos, files, tmp_path, capsys):
    rc, out, err = run([real_videos / "pyfeat_single_face.mp4", "--out", tmp_path, "--unet", files / "unet16.safetensors",
                        "--vae", files / "vae.safetensors", "--dtype", "bf16", *FAST], capsys)
    assert rc == 0, err
    assert probe(out.split()[0]).num_frames == 4
    assert json.loads((tmp_path / "pyfeat_single_face.json").read_text())["dtype"] == "bfloat16"


def test_unet_given_as_vae(real_videos, files, tmp_path, capsys):
    unet = files / "unet16.safetensors"
    one_error_line(*run([real_videos / "pyfeat_single_face.mp4", "--out", tmp_path / "o", "--unet", unet,
                         "--vae", unet, *FAST], capsys), "holds a unet, not a vae", "vae weights")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_header_promising_5_gb(real_videos, files, tmp_path, capsys):
    header = json.dumps({"__metadata__": {"format": "m3ddm", "format_version": "1", "kind": "unet", "config": "{}"},
                         "w": {"dtype": "F32", "shape": [1300000000], "data_offsets": [0, 5200000000]}}).encode()
    cut = tmp_path / "unet.safetensors"
    cut.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4096)
    one_error_line(*run([real_videos / "pyfeat_single_face.mp4", "--out", tmp_path / "o", "--unet", cut,
                         "--vae", files / "vae.safetensors", *FAST], capsys), "truncated", "download or convert it again")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
