"""evaluate.py: geometry, baselines, scoring, bad input, and the whole harness on real clips."""
import csv
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT

sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
from m3ddm import metrics as M  # noqa: E402
from m3ddm import video, weights  # noqa: E402
from test_metrics import _StandInI3D  # noqa: E402

CLIPS = ("kivy_cityCC0.mpg", "nodeopencv_motion.mov")


def _frames(f=2, h=6, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (f, 3, h, w), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------- geometry


def test_geometry_follows_the_reference():
    assert E.eval_size(1920, 1080, 256) == (256, 144)  # DAVIS 1080p, spec training.md 3.2
    assert E.eval_size(1080, 1920, 256) == (144, 256)
    assert E.eval_size(640, 272, 128) == (128, 48)
    assert E.border_cut(256, 144, 0.25, "horizontal") == 32
    assert E.border_cut(256, 144, 0.66, "horizontal") == 84
    assert E.border_cut(256, 144, 0.25, "vertical") == 18
    band = E.band_mask(4, 10, 2, "horizontal")
    assert band.sum() == 16 and band[:, :2].all() and band[:, 8:].all() and not band[:, 2:8].any()
    x = _frames(h=4, w=10)
    assert torch.equal(E.crop_input(x, 2, "horizontal"), x[..., 2:8])
    assert torch.equal(E.crop_input(x, 1, "vertical"), x[..., 1:3, :])
    assert E.band_strip(x, 2, "horizontal").shape == (2, 3, 4, 4)
    assert E.band_strip(x, 1, "vertical").shape == (2, 3, 2, 10)
    with pytest.raises(E.UserError):
        E.border_cut(16, 16, 0.05, "horizontal")  # removes nothing


def test_resize_center_crop_covers_and_crops():
    x = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    x[..., 10:30] = 200  # centre half of the width
    y = E.resize_center_crop(x, 16, 16)  # scale 0.8 -> 16x32, crop the middle 16 columns
    assert y.shape == (1, 3, 16, 16) and y.dtype == torch.uint8
    assert (y[..., 2:14] == 200).all()


# ---------------------------------------------------------------------------------------- baselines


def test_pad_baselines():
    row = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    rep = E.pad_baseline(row, 2, "horizontal", "replicate")[0, 0, 0].tolist()
    ref = E.pad_baseline(row, 2, "horizontal", "reflect")[0, 0, 0].tolist()
    zero = E.pad_baseline(row, 2, "horizontal", "zero")[0, 0, 0].tolist()
    assert rep == [10, 10, 10, 20, 30, 30, 30]
    assert ref == [30, 20, 10, 20, 30, 20, 10]
    assert zero == [128, 128, 10, 20, 30, 128, 128]
    # reflection wider than the input keeps mirroring
    assert E.pad_baseline(row, 5, "horizontal", "reflect")[0, 0, 0].tolist() == \
        [20, 10, 20, 30, 20, 10, 20, 30, 20, 10, 20, 30, 20]
    col = row.transpose(-1, -2)
    assert E.pad_baseline(col, 2, "vertical", "replicate")[0, 0, :, 0].tolist() == rep


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
@pytest.mark.parametrize("method", E.BASELINES)
def test_baselines_keep_the_known_region(method, axis):
    gt = _frames(f=3, h=24, w=24, seed=1)
    cut = 5
    inp = E.crop_input(gt, cut, axis)
    out = E.fill_baseline(inp, cut, axis) if method == "fill" else E.pad_baseline(inp, cut, axis, method)
    assert out.shape == gt.shape and out.dtype == torch.uint8
    band = E.band_mask(24, 24, cut, axis)
    assert torch.equal(out[..., ~band], gt[..., ~band])


def test_missing_weights_are_reported_not_guessed(tmp_path, capsys, monkeypatch):
    clip = _tiny_video(tmp_path / "clip.mp4", 4)
    out = tmp_path / "out"
    rc = E.main([str(clip), "--out", str(out), "--frames", "4", "--size", "48", "--method", "zero",
                 "--lpips", str(tmp_path / "absent.safetensors")])
    assert rc == 2 and "LPIPS weights" in capsys.readouterr().err  # an explicit path must exist
    monkeypatch.setattr(E, "DEFAULT_LPIPS", str(tmp_path / "default_lpips.safetensors"))  # absent default
    rc = E.main([str(clip), "--out", str(out), "--frames", "-1", "--size", "48", "--method", "zero", "replicate",
                 "--crop-ratio", "0.5"])
    assert rc == 0
    row = next(csv.DictReader(open(out / "per_video.csv")))
    assert row["lpips"] == row["lpips_band"] == "not computed: weights missing"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["zero"]["0.5"]["fvd"] == "not computed: weights missing"
    assert summary["methods"]["zero"]["0.5"]["psnr"] > 0 and summary["methods"]["zero"]["0.5"]["videos"] == 1
    assert "LPIPS: not computed: weights missing" in (out / "summary.md").read_text()


def test_score_of_a_perfect_output():
    gt = _frames(f=3, h=24, w=32, seed=2)
    band = E.band_mask(24, 32, 8, "horizontal")
    row = E.score(gt, gt.clone(), band, None)
    assert row["psnr"] == math.inf and row["psnr_band"] == math.inf
    assert row["ssim"] == 1.0 and row["ssim_band"] == 1.0 and row["ssim_gauss_band"] == 1.0
    assert row["flicker_band"] == 1.0 and row["known_exact"]
    assert row["lpips"] == E.NOT_COMPUTED


# ---------------------------------------------------------------------------------------- bad input


def _run(capsys, argv):
    rc = E.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def _tiny_video(path, n):
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    frames[..., 0] = np.arange(n, dtype=np.uint8)[:, None, None] * 20
    with video.VideoWriter(path, 48, 32, 10) as w:
        w.write(frames)
    return path


def test_bad_input(tmp_path, capsys):
    short = _tiny_video(tmp_path / "short.mp4", 4)
    out = tmp_path / "out"
    rc, err = _run(capsys, [short, "--out", out, "--frames", "16", "--size", "32"])
    assert rc == 2 and err.startswith("error: ") and "fewer than --frames 16" in err
    for bad in ("1.2", "0"):
        rc, err = _run(capsys, [short, "--out", out, "--crop-ratio", "0.25", bad])
        assert rc == 2 and err.startswith("error: crop ratio") and "(0, 1)" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here")
    rc, err = _run(capsys, [empty, "--out", out])
    assert rc == 2 and err.startswith("error: folder") and "holds no videos" in err
    rc, err = _run(capsys, [short, "--out", out, "--method", "model"])
    assert rc == 2 and "--method model needs the model weights" in err and "--unet is not given" in err
    rc, err = _run(capsys, [short, "--out", out, "--method", "model", "--unet", tmp_path / "u.safetensors",
                            "--vae", tmp_path / "v.safetensors"])
    assert rc == 2 and "does not exist" in err
    rc, err = _run(capsys, [short, "--out", out, "--i3d", short])
    assert rc == 2 and "--i3d-sha256" in err
    victim = _tiny_video(tmp_path / "preview_clip.mp4", 2)
    rc, err = _run(capsys, [victim, "--out", tmp_path, "--frames", "2", "--size", "48"])
    assert rc == 2 and "would overwrite the input" in err
    assert not (out / "per_video.csv").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------- end to end


def _lpips_file(tmp_path):
    d = load_file(str(FIXTURES / "metrics" / "lpips_alex.safetensors"))
    sd = {k: v.float() for k, v in d.items() if k.startswith(("features.", "lin"))}
    path = tmp_path / "lpips.safetensors"
    weights.save_model(path, sd, "lpips", {})
    return path


def _model_files(tmp_path):
    import weights_convert

    unet, vae = tmp_path / "unet.safetensors", tmp_path / "vae.safetensors"
    weights_convert.convert("unet", str(FIXTURES / "unet3d_tiny"), unet)
    weights_convert.convert("vae", str(FIXTURES / "vae_tiny"), vae)
    return unet, vae


@pytest.mark.slow
def test_model_and_baselines_end_to_end_on_real_clips(real_videos, tmp_path, capsys):
    """The tiny fixture model (2 steps, 64 px canvas) and every baseline on two real clips."""
    out = tmp_path / "eval"
    clips = [real_videos / c for c in CLIPS]
    unet, vae = _model_files(tmp_path)
    i3d = tmp_path / "i3d_standin.pt"  # FVD plumbing only: a stand-in with the I3D call signature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_StandInI3D()).save(str(i3d))
    rc = E.main([*map(str, clips), "--out", str(out), "--method", *E.METHODS, "--size", "64", "--frames", "16",
                 "--steps", "2", "--unet", str(unet), "--vae", str(vae), "--lpips", str(_lpips_file(tmp_path)),
                 "--i3d", str(i3d), "--i3d-sha256", M.sha256_file(i3d), "--previews", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| model | average |" in captured.out and "| fill | average |" in captured.out

    rows = list(csv.DictReader(open(out / "per_video.csv")))
    assert len(rows) == len(clips) * 2 * len(E.METHODS)
    for row in rows:
        psnr, psnr_band = float(row["psnr"]), float(row["psnr_band"])
        if row["method"] != "model":  # the random tiny model's numbers mean nothing
            assert 10 < psnr < 60, row
        assert psnr_band < psnr, row
        assert row["known_exact"] == "True", row
        assert 0 < float(row["lpips"]) and 0 < float(row["lpips_band"])
        assert float(row["ssim_band"]) < float(row["ssim"])
        assert (row["width"], row["height"], row["frames"]) == ("64", "32", "16")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"]["i3d"]["sha256"] == M.sha256_file(i3d)
    for method in E.METHODS:
        per = summary["methods"][method]
        assert set(per) == {"0.25", "0.66", "average"}
        assert per["average"]["psnr"] == pytest.approx((per["0.25"]["psnr"] + per["0.66"]["psnr"]) / 2)
        assert per["0.25"]["videos"] == 2
        for key in ("0.25", "0.66", "average"):
            assert per[key]["fvd"] > 0 and per[key]["fvd_band"] > 0
    for method in E.BASELINES:
        assert summary["methods"][method]["0.25"]["psnr"] > summary["methods"][method]["0.66"]["psnr"]
    md = (out / "summary.md").read_text()
    assert "| method | crop | PSNR |" in md and "| replicate | 0.66 |" in md
    previews = sorted(p.name for p in out.glob("preview_*.mp4"))
    assert len(previews) == 2 * len(E.METHODS)
    info = video.probe(out / previews[0])
    assert (info.width, info.height, info.num_frames) == (3 * 64, 32, 16)


# ---------------------------------------------------------------------------------------- options, provenance


def test_option_rules_are_stated_and_checked(tmp_path, capsys):
    clip = _tiny_video(tmp_path / "clip.mp4", 4)
    out = tmp_path / "out"
    unet, vae = _model_files(tmp_path)
    model = ["--method", "model", "--unet", unet, "--vae", vae, "--frames", "4"]
    rc, err = _run(capsys, [clip, "--out", out, *model, "--size", "96"])
    assert rc == 2 and err.startswith("error: --size 96 with --method model") and "multiple of 64" in err
    rc, err = _run(capsys, [clip, "--out", out, "--previews", "-1", "--size", "48"])
    assert rc == 2 and err.startswith("error: --previews -1")
    rc, err = _run(capsys, [clip, "--out", out, "--device", "foo", "--size", "48"])
    assert rc == 2 and err.startswith("error: --device 'foo' is not a device name")
    rc, err = _run(capsys, [clip, "--out", out, *model, "--size", "64", "--steps", "1"])  # PNDM needs 2 steps:
    assert rc == 2 and "--scheduler ddim" in err                                         # the advice given ...
    assert not out.exists()
    help_text = " ".join(E.build_parser().format_help().split())
    assert "with --method model a multiple of 64" in help_text and "(default: cuda when available)" in help_text


def test_scheduler_device_and_provenance_of_the_model_rows(tmp_path, capsys):
    """... and works: --scheduler ddim --steps 1; summary.json says how the model rows were made."""
    from m3ddm.schedulers import SCHEDULERS
    from m3ddm.version import __version__
    clip = _tiny_video(tmp_path / "clip.mp4", 4)
    out = tmp_path / "out"
    unet, vae = _model_files(tmp_path)
    rc = E.main([str(clip), "--out", str(out), "--method", "model", "--unet", str(unet), "--vae", str(vae),
                 "--size", "64", "--frames", "4", "--crop-ratio", "0.5", "--scheduler", "ddim", "--steps", "1",
                 "--seed", "3", "--previews", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["m3ddm_version"] == __version__
    made = summary["model"]
    assert made["m3ddm_version"] == __version__ and made["device"] == "cpu" and made["dtype"] == "float32"
    assert {k: made["options"][k] for k in ("scheduler", "steps", "seed", "guidance_local", "guidance_global")} == {
        "scheduler": "ddim", "steps": 1, "seed": 3, "guidance_local": 2.0, "guidance_global": 4.0}
    assert made["weights"]["unet"] == {"path": str(unet), "sha256": M.sha256_file(unet)}
    assert made["weights"]["vae"]["sha256"] == M.sha256_file(vae)
    assert summary["weights"]["unet"] == str(unet)
    steps = err.replace("\r", "\n")
    assert "loading the scorers and the model on cpu" in steps and "crop 0.5, model: clip 1/1  step 1/1" in steps
    assert steps.count("note: the video has 4 frame(s) but 16 global frames") == 1  # once, on its own line
    action = next(a for a in E.build_parser()._actions if a.dest == "scheduler")
    assert tuple(action.choices) == SCHEDULERS
    baselines = E.main([str(clip), "--out", str(tmp_path / "b"), "--method", "zero", "--size", "48", "--frames", "2"])
    assert baselines == 0 and json.loads((tmp_path / "b" / "summary.json").read_text())["model"] is None


def test_model_dtype_and_guidance_are_options_and_recorded(tmp_path, capsys):
    """evaluate.py scores in fp32 on every device unless --dtype says otherwise; summary.json records it."""
    clip = _tiny_video(tmp_path / "clip.mp4", 4)
    unet, vae = _model_files(tmp_path)
    common = [str(clip), "--method", "model", "--unet", str(unet), "--vae", str(vae), "--size", "64", "--frames",
              "4", "--crop-ratio", "0.5", "--scheduler", "ddim", "--steps", "1", "--previews", "0"]
    assert E.main([*common, "--out", str(tmp_path / "bf16"), "--dtype", "bf16", "--guidance-local", "1.5",
                   "--guidance-global", "1"]) == 0, capsys.readouterr().err
    made = json.loads((tmp_path / "bf16" / "summary.json").read_text())["model"]
    assert made["dtype"] == "bfloat16" and (made["options"]["guidance_local"], made["options"]["guidance_global"]) == (1.5, 1)
    assert "(default fp32 on every device" in " ".join(E.build_parser().format_help().split())
