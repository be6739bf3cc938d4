"""The embedded demo model (m3ddm/assets): committed weights, their metadata, the bundled clips, a sampling smoke run."""
import hashlib
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
MAX_TOTAL_BYTES = 40 * 1000 * 1000  # issue 16: bundled clips + assets + weights


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


def test_demo_assets_total_size():
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total <= MAX_TOTAL_BYTES, f"m3ddm/assets holds {total / 1e6:.1f} MB, the budget is 40 MB"


@pytest.mark.parametrize("path", [DEMO_VAE, DEMO_UNET], ids=["vae", "unet"])
def test_demo_weights_are_fp16(path):
    from m3ddm.weights import batchnorm_names
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        fp32_kept = batchnorm_names(keys)           # the global encoder's BatchNorms stay fp32 in fp16 files
        dtypes = {f.get_slice(k).get_dtype() for k in keys if k not in fp32_kept}
        kept = {f.get_slice(k).get_dtype() for k in fp32_kept}
    assert "F16" in dtypes and not dtypes & {"F32", "F64", "BF16"}, dtypes  # integer buffers stay integer
    assert kept <= {"F32", "I64"}, kept


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
    if kind == "unet":   # the best evaluated checkpoint, v-prediction (README "Demo model")
        assert config["prediction_type"] == "v_prediction" and int(meta["selected_step"]) > 0
        assert json.loads(meta["selected_eval"])["psnr_band"] > 0
        assert "guidance 1.0 / 1.0" in meta["selected_by"]  # scored as make sample samples
        assert any(d["name"].startswith("synth_blur") for d in data)  # steps 7-8's low-passed clips are listed
    else:
        assert json.loads(meta["held_out_l1"])["mean"] > 0


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


# ---------------------------------------------------------------------------------------------------
# the recipe's steps: synth, split --extra, vae-l1, best-checkpoint export, sample.py --truth

import math  # noqa: E402

import numpy as np  # noqa: E402

from m3ddm import demo  # noqa: E402


def test_synth_render_samples_the_photo_at_subpixel_positions():
    """A ramp photo (value = x): an upright view centred at x = 127.5 reads exactly 0..255 across; shifting the
    centre by 0.25 px moves every bilinear sample by 0.25 (sub-pixel motion, no rounding to whole pixels)."""
    ramp = torch.arange(300, dtype=torch.float32).expand(3, 200, 300).clone()
    cx, cy, half_h, angle = (torch.tensor([v], dtype=torch.float64) for v in (127.5, 100.0, demo.SYNTH_H / 2, 0.0))
    frame = demo.render_view(ramp, cx, cy, half_h, angle)[0]
    assert frame.shape == (demo.SYNTH_H, demo.SYNTH_W, 3)
    assert (frame[:, :, 0] == np.arange(256)[None]).all()
    a = demo.render_view(ramp * 4, cx, cy, half_h, angle)[0].astype(int)  # values 4 x: 0.25 px is one level
    b = demo.render_view(ramp * 4, cx + 0.25, cy, half_h, angle)[0].astype(int)
    assert (a[:, :60, 0] == 4 * np.arange(60)).all() and (b[:, :60, 0] - a[:, :60, 0] == 1).all()


@pytest.mark.parametrize("seed", range(12))
def test_synth_trajectory_stays_inside_the_photo(seed):
    g = torch.Generator().manual_seed(seed)
    motion, (cx, cy, half_h, angle) = demo.draw_trajectory(300, 500, 64, g)
    assert motion in demo.MOTIONS and len(cx) == 64
    corners = demo.view_corners(cx, cy, half_h, angle)
    assert corners[..., 0].min() >= 0 and corners[..., 0].max() <= 499
    assert corners[..., 1].min() >= 0 and corners[..., 1].max() <= 299
    step = torch.hypot(cx.diff(), cy.diff()) / (half_h[0] / (demo.SYNTH_H / 2))  # output pixels per frame
    assert step.max() < 6 and abs(angle).max() < math.radians(5)  # smooth, slow camera


def test_synth_writes_deterministic_clips(tmp_path):
    import imageio.v3 as iio
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    iio.imwrite(photos / "grey.png", rng.integers(0, 256, (240, 400), dtype=np.uint8))
    iio.imwrite(photos / "rgba.png", rng.integers(0, 256, (300, 360, 4), dtype=np.uint8))
    (photos / "notes.txt").write_text("not a photo")
    assert demo.load_photo(photos / "grey.png").shape == (3, 240, 400)
    assert demo.load_photo(photos / "rgba.png").shape == (3, 300, 360)
    first = demo.synth_clip(photos / "rgba.png", 8, seed=0)
    again = demo.synth_clip(photos / "rgba.png", 8, seed=0)
    other = demo.synth_clip(photos / "rgba.png", 8, seed=1)
    assert first[0] == again[0] and (first[1] == again[1]).all() and not np.array_equal(first[1], other[1])
    assert demo.main(["synth", str(photos), str(tmp_path / "out"), "--frames", "8"]) == 0
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == ["synth_grey.mp4", "synth_rgba.mp4"]
    info = probe(tmp_path / "out" / "synth_grey.mp4")
    assert (info.width, info.height, info.num_frames, info.fps) == (demo.SYNTH_W, demo.SYNTH_H, 8, 25.0)
    assert demo.main(["synth", str(tmp_path / "out"), str(tmp_path / "o2")]) == 2  # no photographs: one error


def test_synth_blur_low_passes_the_photograph(tmp_path):
    import imageio.v3 as iio
    flat = torch.full((3, 50, 60), 7.0)
    assert torch.allclose(demo.gaussian_blur(flat, 2.0), flat)        # weights sum to 1, borders reflected
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1
    blurred = demo.gaussian_blur(impulse, 3.0)[0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5) and blurred[20, 20] == blurred.max()
    assert blurred[20, 23].item() == pytest.approx(blurred[20, 20].item() * math.exp(-0.5), rel=1e-4)  # sigma 3
    photos = tmp_path / "photos"
    photos.mkdir()
    iio.imwrite(photos / "noise.png", np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert demo.main(["synth", str(photos), str(tmp_path / "out"), "--frames", "4"]) == 0
    assert demo.main(["synth", str(photos), str(tmp_path / "out"), "--frames", "4", "--blur", "4"]) == 0
    sharp, smooth = (np.abs(np.diff(iio.imread(tmp_path / "out" / name).astype(float), axis=2)).mean()
                     for name in ("synth_noise.mp4", "synth_blur4_noise.mp4"))  # mean change between columns
    assert smooth < 0.1 * sharp
    assert demo.main(["synth", str(photos), str(tmp_path / "o2"), "--blur", "-1"]) == 2
    assert not (tmp_path / "o2").exists()


def test_split_links_extra_clips_into_train_only(tmp_path):
    cache, extra = tmp_path / "cache", tmp_path / "extra"
    for folder, names in ((cache, ["a.mp4", *HELD_OUT]), (extra, ["b.avi", "opencv_cup.mp4", "readme.txt"])):
        folder.mkdir()
        for n in names:
            (folder / n).write_bytes(b"x")
    demo.split(cache, tmp_path / "data", [extra])
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == ["a.mp4", "b.avi"]
    assert sorted(p.name for p in (tmp_path / "data" / "val").iterdir()) == sorted(HELD_OUT)
    assert (tmp_path / "data" / "val" / "opencv_cup.mp4").resolve() == (cache / "opencv_cup.mp4").resolve()


def test_vae_l1_frames_are_evaluate_ground_truth(real_videos):
    """vae-l1 scores exactly the frames evaluate.py uses as ground truth (long side 128, first 16 frames)."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    from m3ddm.video import read_frames_at
    path = real_videos / "kivy_cityCC0.mpg"
    ours = demo.eval_frames(path, 128, 16)
    frames = torch.from_numpy(read_frames_at(path, list(range(16)))).permute(0, 3, 1, 2)
    width, height = evaluate.eval_size(frames.shape[-1], frames.shape[-2], 128)
    gt = evaluate.resize_center_crop(frames, width, height)
    assert ours.shape == (16, 3, 72, 128) and torch.equal(((ours + 1) * 127.5).round().to(torch.uint8), gt)


def test_best_checkpoint_takes_the_highest_logged_band_psnr_on_disk(tmp_path):
    run = tmp_path / "run"
    for step in (250, 500, 750):
        (run / f"checkpoint-{step:07d}").mkdir(parents=True)
        (run / f"checkpoint-{step:07d}" / "unet_ema.safetensors").write_bytes(b"x")
    records = [{"step": 1, "loss": 1.0}]
    for step, psnr in ((250, 14.0), (500, 16.5), (750, 15.0), (1000, 18.0)):  # 1000 was not kept on disk
        records.append({"step": step, "eval": {"psnr_band": psnr, "ssim_band": 0.4}, "eval_weights": "unet_ema.safetensors"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path, record = demo.best_checkpoint(run)
    assert path == run / "checkpoint-0000500" / "unet_ema.safetensors" and record["step"] == 500
    (run / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(demo.UserError, match="no evaluated checkpoint"):
        demo.best_checkpoint(run)


def test_training_clips_adds_extra_folders_once_by_name(tmp_path):
    for sub, name, body in (("data/train", "a.mp4", b"a"), ("data/val", "held.mp4", b"h"), ("smooth", "b.mp4", b"b")):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / name).write_bytes(body)
    (tmp_path / "smooth" / "a.mp4").symlink_to(tmp_path / "data/train/a.mp4")
    (tmp_path / "smooth" / "notes.txt").write_text("not a clip")
    clips = demo.training_clips(tmp_path / "data", [tmp_path / "smooth"])
    assert [c["name"] for c in clips] == ["a.mp4", "b.mp4"]
    assert clips[1]["sha256"] == hashlib.sha256(b"b").hexdigest()
    assert demo.training_clips(tmp_path / "data", []) == clips[:1]


def test_eval_sampler_reads_how_the_evaluation_sampled(tmp_path):
    summary = tmp_path / "run" / "eval" / "step-0000500" / "summary.json"
    summary.parent.mkdir(parents=True)
    options = {"scheduler": "pndm", "steps": 20, "guidance_local": 1.0, "guidance_global": 3.5}
    summary.write_text(json.dumps({"model": {"options": options}}))
    assert demo.eval_sampler(tmp_path / "run", 500) == "pndm 20 steps, guidance 1.0 / 3.5"
    assert demo.eval_sampler(tmp_path / "run", 250) == "sampler not recorded"


def test_sample_truth_draws_truth_input_output_preview(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import imageio.v3 as iio
    import sample
    from m3ddm import pipeline
    monkeypatch.setattr(pipeline, "_preview", None)  # with --truth the built-in preview is never drawn
    args = [str(CLIP_4X3), "--ratio", "16:9", "--size", "128", "--limit-frames", "8", "--steps", "1",
            "--scheduler", "ddim", "--global-frames", "2", "--out", str(tmp_path)]
    assert sample.main([*args, "--truth", str(CLIP_TRUTH)]) == 0
    png = iio.imread(tmp_path / "kivy_city_4x3_preview.png")
    width = 192  # demo.preview's panel width; 3 panels and 2 gaps of 4 px
    assert png.shape[1] == 3 * width + 8 and png.shape[0] == 3 * 108 + 8
    truth = demo.fit_panel(demo.read_frames_at(CLIP_TRUTH, [2]), width, 108)[0]  # frames at linspace(0, 7, 5)[1:-1]
    assert np.abs(png[:108, :width].astype(int) - truth.astype(int)).max() == 0
    assert (png[:108, width + 4:width + 4 + 24] == 0).all()  # the 4:3 input sits on black in the 16:9 panel
    record = json.loads((tmp_path / "kivy_city_4x3.json").read_text())
    assert record["preview"] == str(tmp_path / "kivy_city_4x3_preview.png")
    capsys.readouterr()
    assert sample.main([*args, "--ratio", "16:9,9:16", "--truth", str(CLIP_TRUTH)]) == 2
    assert "--truth" in capsys.readouterr().err


def test_rescale_is_exact_and_gives_unit_std_posterior_samples(tmp_path):
    """scale_latents changes only the latent units: decode(encode_mean(x)) is unchanged and the posterior
    samples (means and their noise) times 0.18215 have unit std per channel on the frames it measured."""
    from m3ddm.vae import LATENT_SCALE
    from m3ddm.video import VideoWriter
    rng = np.random.default_rng(0)
    clip = tmp_path / "clip.mp4"
    frames = np.repeat(np.repeat(rng.integers(0, 256, (12, 18, 24, 3), dtype=np.uint8), 8, 1), 8, 2)
    with VideoWriter(clip, 192, 144, 25) as w:
        w.write(frames)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    x = demo.centre_frames(clip)
    with torch.no_grad():
        before = vae.decode(vae.encode(x).mean)
        demo.scale_latents(vae, 1.0 / (LATENT_SCALE * demo.latent_std(vae, [clip])))
        after = vae.decode(vae.encode(x).mean)
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(demo.latent_std(vae, [clip]) * LATENT_SCALE, torch.ones(4), atol=1e-4)


from test_data import small_videos  # noqa: E402,F401  (a fixture)


def test_demo_weights_gpu_target_runs_on_cpu_tiny(tmp_path, small_videos, tiny_weight_files):
    """make demo-weights-gpu (prepared for a GPU; none was lent) end to end on the CPU with the tiny config:
    a time-limited v-prediction run, every checkpoint evaluated, the best EMA weights copied to OUT."""
    import os
    import shutil
    import subprocess
    demo_dir, out = tmp_path / "demo", tmp_path / "out"
    for sub, names in (("train", ["bikes8.mp4", "city40.mp4"]), ("val", ["city40.mp4"])):
        (demo_dir / "data" / sub).mkdir(parents=True)
        for n in names:
            os.symlink(small_videos / n, demo_dir / "data" / sub / n)
    shutil.copy(tiny_weight_files[3], demo_dir / "vae_scaled.safetensors")
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "demo-weights-gpu", f"PYTHON={sys.executable}", f"DEMO={demo_dir}",
                        f"OUT={out}", "DEMO_GPU_CONFIG=tiny", "DEMO_GPU_DEVICE=cpu", "DEMO_GPU_PRECISION=fp32",
                        "DEMO_GPU_BATCH=1", "DEMO_GPU_SIZE=64", "DEMO_GPU_MINUTES=0.01"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    unet = load_unet(out / "demo_gpu_unet.safetensors")
    assert unet.config.prediction_type == "v_prediction"
    records = [json.loads(line) for line in open(out / "demo_gpu_metrics.jsonl")]
    assert any("eval" in rec for rec in records) and records[-1]["done"]
    assert "--max-minutes 0.01 reached" in r.stderr
