"""Resumable long videos, and reruns that skip what is done and never clobber silently.

A multi-stage run (N = 60: strides 15, 5, 1, six clips) is cut after clip k by an injected failure, or by a real
SIGTERM, and resumed: the decoded output equals an uninterrupted run's exactly, the work folder is gone after
success, and a changed --seed or weights file refuses to resume, naming what differs."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
from conftest import ROOT, make_clip
import m3ddm.pipeline as pipeline
from m3ddm.errors import UserError
from m3ddm.pipeline import OutpaintOptions, outpaint_video
from m3ddm.resume import WORK_SUFFIX, describe_differences
from m3ddm.video import probe, read_frames_at
from m3ddm.weights import load_tensors, load_unet, load_vae, save_model, read_header

FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "2", "--global-frames", "4"]


@pytest.fixture(scope="module")
def clip60(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "long.mp4", "25", frames=60, size=(32, 24), audio=True)


@pytest.fixture(scope="module")
def models(tiny_weight_files):
    unet_path, vae_path = tiny_weight_files[1], tiny_weight_files[3]
    return load_unet(unet_path), load_vae(vae_path), {"unet": unet_path, "vae": vae_path}


def decoded(path):
    info = probe(path)
    return read_frames_at(path, range(info.num_frames), info)


def fail_after(monkeypatch, k):
    """denoise_clip raises on the call after the k-th: the run dies after k complete clips."""
    real, calls = pipeline.denoise_clip, []

    def counted(*args, **kwargs):
        if len(calls) == k:
            raise RuntimeError(f"injected failure after clip {k}")
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "denoise_clip", counted)


@pytest.mark.parametrize("k,vae_sample", [(1, False), (4, True)], ids=["after-stride-15", "in-stride-1-vae-sample"])
def test_resume_after_clip_k_equals_the_uninterrupted_run(k, vae_sample, clip60, models, tmp_path, monkeypatch):
    """k = 1: only the stride-15 clip is done (guides stored, nothing final); k = 4: two stride-1 clips are done,
    their frames decoded again from the stored latents. --vae-sample also checks the RNG state is restored."""
    unet, vae, weights = models
    opts = OutpaintOptions(size=64, scheduler="ddim", steps=2, global_frames=4, vae_sample=vae_sample)
    whole = outpaint_video(clip60, tmp_path / "whole", unet, vae, [(16, 9)], opts, weights=weights)
    assert whole["num_clips"] == 6 and whole["clips_per_stride"] == {"15": 1, "5": 1, "1": 4}

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        fail_after(m, k)
        with pytest.raises(RuntimeError, match="injected failure"):
            outpaint_video(clip60, out, unet, vae, [(16, 9)], opts, weights=weights)
    work = out / f"long{WORK_SUFFIX}"
    assert sorted(p.name for p in out.iterdir()) == [work.name]          # no output, no temporary file
    assert torch.load(work / "position.pt", weights_only=True)["next_clip"] == k
    resumed = outpaint_video(clip60, out, unet, vae, [(16, 9)], opts, weights=weights)
    assert resumed["resumed_from_clip"] == k and resumed["status"] == "made"
    assert resumed["clips_per_stride"] == whole["clips_per_stride"] and resumed["unet_calls"] == whole["unet_calls"]
    assert not work.exists()
    assert np.array_equal(decoded(resumed["outputs"]["16:9"]), decoded(whole["outputs"]["16:9"]))
    assert (out / "long_preview.png").read_bytes() == (tmp_path / "whole" / "long_preview.png").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["long.json", "long_16-9.mp4", "long_preview.png"]


def test_work_folder_keeps_only_what_a_restart_needs(clip60, models, tmp_path, monkeypatch):
    """After the second stride-1 clip: the final latents of every finished frame, and the state files of clips
    whose guides or inputs a later clip still uses (the stride-1 clips' own state is not needed)."""
    unet, vae, weights = models
    opts = OutpaintOptions(size=64, scheduler="ddim", steps=2, global_frames=4)
    with monkeypatch.context() as m:
        fail_after(m, 4)
        with pytest.raises(RuntimeError):
            outpaint_video(clip60, tmp_path, unet, vae, [(16, 9)], opts, weights=weights)
    work = tmp_path / f"long{WORK_SUFFIX}"
    names = sorted(p.name for p in work.iterdir())
    # clips 0 (stride 15) and 1 (stride 5) hold guides of clips 4-5; the new frames of the stride-1 clips 2 and 3
    # are all used up by the end of their own clip, so their state is never written
    assert names == ["final-000002.pt", "final-000003.pt", "position.pt", "state-000000.pt", "state-000001.pt",
                     "work.json"]
    final = torch.load(work / "final-000002.pt", weights_only=True)
    assert final.shape == (15, 4, 8, 8) and final.dtype == torch.float32 and final.is_contiguous()
    key = json.loads((work / "work.json").read_text())
    assert key["made_with"]["options"]["seed"] == 6 and len(key["made_with"]["weights"]["unet"]) == 64
    assert key["source"]["num_frames"] == 60 and key["device_type"] == "cpu"


def cut_run(clip, out, weights, monkeypatch, k=2):
    with monkeypatch.context() as m:
        fail_after(m, k)
        with pytest.raises(RuntimeError):
            sample.main([str(a) for a in [clip, "--ratio", "16:9", "--out", out, *FAST, *weights]])


def test_changed_seed_or_weights_refuse_to_resume(clip60, tiny_weight_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    cut_run(clip60, out, tiny_weight_files, monkeypatch)
    capsys.readouterr()
    work = out / f"long{WORK_SUFFIX}"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in work.iterdir())

    rc = sample.main([str(a) for a in [clip60, "--ratio", "16:9", "--out", out, *FAST, "--seed", "7",
                                        *tiny_weight_files]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: long.mp4: the unfinished run in") and "--seed 6 (now 7)" in err[0]
    assert "--overwrite" in err[0]

    other = tmp_path / "unet2.safetensors"                      # the same model, one weight changed
    tensors = load_tensors(tiny_weight_files[1])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    _, config, _ = read_header(tiny_weight_files[1])
    save_model(other, tensors, "unet", config)
    rc = sample.main([str(a) for a in [clip60, "--ratio", "16:9", "--out", out, *FAST, "--unet", other,
                                        "--vae", tiny_weight_files[3]]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--unet weights (sha256)" in err[0], err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in work.iterdir()) == before   # left as it was

    # the original settings continue it; --overwrite with other settings starts over
    rc = sample.main([str(a) for a in [clip60, "--ratio", "16:9", "--out", out, *FAST, "--seed", "7", "--overwrite",
                                        *tiny_weight_files]])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    record = json.loads((out / "long.json").read_text())
    assert record["resumed_from_clip"] == 0 and record["made_with"]["options"]["seed"] == 7 and not work.exists()


def test_describe_differences_names_flags():
    old = {"options": {"seed": 6, "strides": [15, 5, 1]}, "weights": {"vae": "a" * 64}, "ratios": ["16:9"]}
    new = {"options": {"seed": 7, "strides": [15, 5, 1]}, "weights": {"vae": "b" * 64}, "ratios": ["16:9", "9:16"]}
    assert describe_differences(old, new) == ("--seed 6 (now 7), --ratio 16:9 (now 16:9,9:16), --vae weights (sha256) "
                                              "aaaaaaaaaaaa... (now bbbbbbbbbbbb...)")
    assert describe_differences(old, old) == "nothing"


# ----------------------------------------------------------------------------------------------------
# skip what is done, never clobber silently


def test_rerun_skips_done_videos_and_refuses_to_replace_other_settings(tiny_weight_files, tmp_path, capsys):
    clip = make_clip(tmp_path / "short.mp4", "25", frames=8, size=(32, 24))
    out = tmp_path / "out"
    argv = [clip, "--ratio", "16:9", "--out", out, *FAST, *tiny_weight_files]
    assert sample.main([str(a) for a in argv]) == 0
    first = capsys.readouterr().out.split()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert sample.main([str(a) for a in argv]) == 0             # done: nothing is redone or rewritten
    captured = capsys.readouterr()
    assert captured.out.split() == first and "done already: short.json matches" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    rc = sample.main([str(a) for a in argv + ["--seed", "7"]])    # other settings: refused, one line
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0] == (f"error: {out / 'short_16-9.mp4'} exists and it was made with other settings: --seed 6 "
                        "(now 7); pass --overwrite to replace it, or choose another --out.")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (out / "short.json").unlink()                                 # no record: cannot tell how it was made
    rc = sample.main([str(a) for a in argv])
    assert rc == 2 and "no run record (short.json) says how it was made" in capsys.readouterr().err

    assert sample.main([str(a) for a in argv + ["--seed", "7", "--overwrite"]]) == 0
    capsys.readouterr()
    assert json.loads((out / "short.json").read_text())["made_with"]["options"]["seed"] == 7
    assert (out / "short_16-9.mp4").stat().st_mtime_ns != stamps["short_16-9.mp4"]


def test_api_without_weights_keeps_no_work_folder_and_refuses_to_replace(clip60, models, tmp_path, monkeypatch):
    unet, vae, _ = models
    opts = OutpaintOptions(size=64, scheduler="ddim", steps=1, global_frames=0, limit_frames=8)
    with monkeypatch.context() as m:
        fail_after(m, 0)
        with pytest.raises(RuntimeError):
            outpaint_video(clip60, tmp_path, unet, vae, [(16, 9)], opts)
    assert list(tmp_path.iterdir()) == []
    outpaint_video(clip60, tmp_path, unet, vae, [(16, 9)], opts)
    with pytest.raises(UserError, match="names no weights files"):
        outpaint_video(clip60, tmp_path, unet, vae, [(16, 9)], opts)
    assert outpaint_video(clip60, tmp_path, unet, vae, [(16, 9)], opts, overwrite=True)["status"] == "made"


# ----------------------------------------------------------------------------------------------------
# a real signal


@pytest.mark.slow
def test_sigterm_mid_run_then_rerun_gives_the_uninterrupted_output(tiny_weight_files, tmp_path, capsys, one_thread):
    """120 frames: 11 clips, so the run is far from done when it is stopped after its second clip."""
    clip = make_clip(tmp_path / "long.mp4", "25", frames=120, size=(32, 24), audio=True)
    args = ["--ratio", "16:9", "--size", "64", "--scheduler", "ddim", "--steps", "10", "--global-frames", "4",
            *tiny_weight_files]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), str(clip), "--out", str(out), *args],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=env)
    position, deadline = out / f"long{WORK_SUFFIX}" / "position.pt", time.time() + 300
    while not (position.exists() and torch.load(position, weights_only=True)["next_clip"] >= 2):
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.time() < deadline, "sample.py never finished two clips"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert err[-1] == f"error: interrupted by SIGTERM; {sample.INTERRUPTED}."
    cut_at = torch.load(position, weights_only=True)["next_clip"]
    assert 2 <= cut_at < 11 and sorted(p.name for p in out.iterdir()) == [f"long{WORK_SUFFIX}"]

    assert sample.main([str(a) for a in [clip, "--out", out, *args]]) == 0
    assert f"resumed after clip {cut_at}/11" in capsys.readouterr().err
    assert sample.main([str(a) for a in [clip, "--out", tmp_path / "whole", *args]]) == 0
    capsys.readouterr()
    assert np.array_equal(decoded(out / "long_16-9.mp4"), decoded(tmp_path / "whole" / "long_16-9.mp4"))
    assert sorted(p.name for p in out.iterdir()) == ["long.json", "long_16-9.mp4", "long_preview.png"]
