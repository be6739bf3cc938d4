"""train.py: options, condition dropout, overfitting, exact resume, torchrun, VAE target (the data: test_data.py)."""
import json
import math
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT

sys.path.insert(0, str(ROOT))
import train as T  # noqa: E402
from m3ddm import data as D  # noqa: E402
from m3ddm.weights import load_unet, load_vae, read_header, save_model, strict_load  # noqa: E402
from m3ddm.schedulers import alphas_cumprod  # noqa: E402
from test_data import small_videos  # noqa: E402,F401  (a fixture: short clips cut from the real videos)


# ---------------------------------------------------------------------------------------------------
# helpers


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


def data_dir(tmp_path, small_videos, names, sub=None):
    d = tmp_path / "data"
    target = d / sub if sub else d
    target.mkdir(parents=True)
    for n in names:
        os.symlink(small_videos / n, target / n)
    return d


def eval_videos_dir(tmp_path, video):
    """A --eval-videos folder holding one link to `video`."""
    d = tmp_path / "eval_videos"
    d.mkdir()
    os.symlink(video, d / video.name)
    return d


TINY = ["--config", "tiny", "--size", "64", "--frames", "8", "--global-frames", "2", "--num-workers", "0",
        "--cache-videos", "--log-every", "1000"]


def run_train(argv):
    return T.main([str(a) for a in argv])


def losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


# ---------------------------------------------------------------------------------------------------
# options -> data, condition dropout


def make_args(vae_file, extra=()):
    args = T.parse_args(["--data", "x", "--out", "y", "--vae", str(vae_file), *TINY, *extra])
    T.check_args(args)
    args.p_uncond_local = args.p_uncond_local if args.p_uncond_local is not None else 0.0
    args.p_uncond_global = args.p_uncond_global if args.p_uncond_global is not None else 0.0
    return args


def test_data_options_become_the_clip_spec(vae_file):
    args = make_args(vae_file, ["--crop", "center", "--max-stride", "4", "--p-uncond-local", "0.2", "--decode-short-side", "96"])
    assert T.clip_spec(args) == D.ClipSpec(
        size=64, frames=8, global_frames=2, max_stride=4, crop="center", crop_scale=(0.08, 1.0),
        mask_strategy="m3ddm_plus", mask_global_frames="all", p_uncond_local=0.2, p_uncond_global=0.0, seed=6,
        decode_short_side=96, cache_videos=True)


def test_condition_dropout_inputs(small_videos, vae_file, one_thread):
    args = make_args(vae_file, ["--global-frames", "2"])
    vae = load_vae(vae_file).requires_grad_(False)
    obj = T.UNetObjective(vae, args, torch.device("cpu"))
    ds = D.ClipDataset([str(small_videos / "city40.mp4")], T.clip_spec(args))
    item = ds[0]
    item["guides"] = torch.zeros(args.frames, dtype=torch.bool)
    item["guides"][0] = True
    item["mask"][0] = 0
    plain = D.collate([dict(item, skipped=[])])
    x, t, fps, glob, noise = obj.inputs(plain)
    assert x.shape == (1, 9, args.frames, 8, 8) and glob.shape == (1, 2, 4, 8, 8) and noise.shape == (1, 4, 8, 8, 8)
    assert 0 <= int(t) < 1000 and glob.abs().sum() > 0
    dropped = D.collate([dict(item, drop_local=True, drop_global=True, skipped=[])])
    xd, td, _, globd, noised = obj.inputs(dropped)
    assert torch.equal(td, t) and torch.equal(noised, noise)        # the same draws
    assert torch.equal(xd[:, :4], x[:, :4])                          # same noisy latents
    assert globd.abs().sum() == 0                                    # zero global latents
    assert torch.all(xd[0, 8, 1:] == 1) and torch.all(xd[0, 8, 0] == 0)  # all-ones mask except the guide
    black = obj.black[:, None].expand(4, args.frames - 1, 8, 8)
    assert torch.allclose(xd[0, 4:8, 1:], black)                     # black latents for generated frames
    assert torch.equal(xd[0, 4:8, 0], x[0, 4:8, 0])                  # the guide keeps its latent


def test_v_prediction_target(small_videos, vae_file, one_thread):
    """--prediction-type v_prediction: the same draws, and the target v = sqrt(a) eps - sqrt(1 - a) x0."""
    args = make_args(vae_file)
    vae = load_vae(vae_file).requires_grad_(False)
    item = D.ClipDataset([str(small_videos / "city40.mp4")], T.clip_spec(args))[0]
    batch = D.collate([dict(item, skipped=[])])
    x, t, _, _, eps = T.UNetObjective(vae, args, torch.device("cpu")).inputs(batch)
    xv, tv, _, _, v = T.UNetObjective(vae, args, torch.device("cpu"), "v_prediction").inputs(batch)
    assert torch.equal(xv, x) and torch.equal(tv, t)
    a = alphas_cumprod()[int(t)].double()
    x_t, eps = x[:, :4].double(), eps.double()
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(v.double(), a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=0, atol=1e-5)
    assert (v.double() - eps).abs().max() > 1e-3                   # a different target


def test_temporal_weight_costs_errors_the_frames_do_not_share(small_videos, vae_file, one_thread):
    """loss = MSE + w * MSE(error[f + 1] - error[f]): an error common to all frames adds nothing, one that changes
    from frame to frame adds w times its squared change."""
    args = make_args(vae_file, ["--temporal-weight", "2"])
    vae = load_vae(vae_file).requires_grad_(False)
    item = D.ClipDataset([str(small_videos / "city40.mp4")], T.clip_spec(args))[0]
    batch = D.collate([dict(item, skipped=[])])
    obj = T.UNetObjective(vae, args, torch.device("cpu"))
    target = obj.inputs(batch)[-1]
    common = 0.1 * torch.randn(target[:, :, :1].shape, generator=torch.Generator().manual_seed(0))
    own = 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    for error, extra in ((common.expand_as(target), 0.0), (own, float(own.diff(dim=2).pow(2).mean()))):
        loss = obj.loss(lambda *a, **k: target + error, batch, nullcontext())
        assert math.isclose(float(loss), float(error.pow(2).mean()) + 2 * extra, rel_tol=1e-5)


def test_prediction_type_is_saved_and_kept_on_resume(tmp_path, small_videos, vae_file, one_thread):
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4"])
    out = tmp_path / "out"
    common = ["--data", data, "--out", out, "--vae", vae_file, *TINY, "--save-every", "1"]
    assert run_train([*common, "--max-steps", "1", "--prediction-type", "v_prediction"]) == 0
    assert load_unet(out / "unet.safetensors").config.prediction_type == "v_prediction"
    assert run_train([*common, "--max-steps", "2", "--resume", out]) == 0
    assert load_unet(out / "unet.safetensors").config.prediction_type == "v_prediction"
    tuned = tmp_path / "tuned"
    assert run_train(["--data", data, "--out", tuned, "--vae", vae_file, *TINY[2:], "--init", out / "unet.safetensors",
                      "--max-steps", "1", "--prediction-type", "epsilon"]) == 0
    assert load_unet(tuned / "unet.safetensors").config.prediction_type == "epsilon"


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
    from m3ddm.training import STATE_FILE
    state = torch.load(split / "checkpoint-0000020" / STATE_FILE, weights_only=True)
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


@pytest.mark.slow
def test_torchrun_two_nodes_of_one_process(tmp_path, small_videos, vae_file):
    """Two torchrun "machines" on localhost (--nnodes 2, static rendezvous): both ranks have LOCAL_RANK 0, so
    only RANK may decide who writes; rank 1 writes nothing and both ranks train the same steps."""
    import socket
    data = data_dir(tmp_path, small_videos, ["city40.mp4", "cup24.mp4", "bikes8.mp4"])
    out = tmp_path / "out"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py"),
         "--data", str(data), "--out", str(out), "--vae", str(vae_file), *[str(a) for a in TINY], "--frames", "4",
         "--max-steps", "2", "--log-data", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path)) for node in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert results[0][0].strip().splitlines() == [str(out / "unet.safetensors")] and results[1][0].strip() == ""
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"data"' in line]
    assert len(records) == 2 and all(r["data"][0] != r["data"][1] for r in records)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0000002", "metrics.jsonl", "unet.safetensors"]


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


def test_freeze_encoder_trains_the_decoder_only_and_keeps_the_rescale(tmp_path, small_videos, one_thread):
    """--init VAE --freeze-encoder: encoder and quant_conv bit-identical (so are the latents), decoder changed, the
    latent rescale carried into the new files; resumed, it stays frozen."""
    from m3ddm.weights import save_model
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    common = ["--data", data, "--target", "vae", "--size", "64", "--frames", "2", "--num-workers", "0",
              "--cache-videos", "--lr", "1e-3", "--save-every", "1", "--weight-decay", "0.1"]
    assert run_train([*common, "--out", tmp_path / "base", "--vae-config", "tiny", "--max-steps", "1"]) == 0
    start = tmp_path / "start.safetensors"
    base = load_vae(tmp_path / "base" / "vae.safetensors")
    save_model(start, base.state_dict(), "vae", base.config, metadata={"latent_rescale": "[1.5, 2, 3, 4]"})
    out = tmp_path / "dec"
    assert run_train([*common, "--out", out, "--init", start, "--freeze-encoder", "--max-steps", "2"]) == 0
    assert run_train([*common, "--out", out, "--init", start, "--freeze-encoder", "--max-steps", "3",
                      "--resume", out]) == 0
    before, after = base.state_dict(), load_vae(out / "vae.safetensors").state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in ("post_quant_conv.weight", "decoder.conv_out.weight"))
    assert read_header(out / "vae.safetensors")[2]["latent_rescale"] == "[1.5, 2, 3, 4]"
    assert len(losses(out)) == 3


@pytest.mark.parametrize("target", [["--target", "vae"], ["--target", "unet", "--config", "tiny"]])
def test_freeze_encoder_needs_a_vae_to_start_from(tmp_path, small_videos, vae_file, capsys, target):
    argv = ["--data", str(small_videos), "--out", str(tmp_path / "o"), "--vae", str(vae_file), "--freeze-encoder",
            *target]
    assert T.main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --freeze-encoder")
    assert not (tmp_path / "o").exists()


def test_init_of_the_wrong_kind_is_refused(tmp_path, small_videos, vae_file, tiny_weight_files, capsys):
    argv = ["--data", str(small_videos), "--out", str(tmp_path / "o"), "--target", "unet", "--vae", str(vae_file),
            "--init", str(vae_file)]
    assert T.main(argv) == 2 and "holds a vae, not a unet" in capsys.readouterr().err
    unet_file = tiny_weight_files[1]
    argv = ["--data", str(small_videos), "--out", str(tmp_path / "o"), "--target", "vae", "--init", unet_file]
    assert T.main(argv) == 2 and "holds a unet, not a vae" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_videos_logs_evaluate_metrics_at_each_checkpoint(tmp_path, small_videos, vae_file, real_videos,
                                                             one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # evaluate.py looks for weights/lpips.safetensors here: none, so LPIPS is skipped
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    evals = eval_videos_dir(tmp_path, real_videos / "pyfeat_single_face.mp4")
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--frames", "4", "--max-steps", "2",
                      "--save-every", "1", "--eval-videos", evals, "--eval-steps", "2", "--eval-guidance", "1",
                      "1.5"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [r["step"] for r in records] == [1, 2]  # after each checkpoint, the last one included
    for r in records:
        assert sorted(r["eval"]) == ["flicker_band", "psnr", "psnr_band", "ssim", "ssim_band"]
        assert all(isinstance(v, float) and np.isfinite(v) for v in r["eval"].values()), r
    summary = json.loads((out / "eval" / "step-0000002" / "summary.json").read_text())
    assert summary["weights"]["unet"] == str(out / "checkpoint-0000002" / "unet.safetensors")
    options = summary["model"]["options"]
    assert (options["guidance_local"], options["guidance_global"], options["steps"]) == (1.0, 1.5, 2)
    assert (out / "eval" / "step-0000001" / "summary.json").is_file()


def test_eval_videos_scores_the_ema_weights_with_ema(tmp_path, small_videos, vae_file, real_videos, one_thread,
                                                    monkeypatch):
    """With --ema the checkpoint's EMA file is what evaluate.py scores (the weights one would ship)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = data_dir(tmp_path, small_videos, ["city40.mp4"])
    evals = eval_videos_dir(tmp_path, real_videos / "pyfeat_single_face.mp4")
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
    evals = eval_videos_dir(tmp_path, small_videos / "bikes8.mp4")  # 8 frames < --eval-frames 16: evaluate.py fails
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


# one CLI test per bad value: one `error:` line naming the option, exit 2, before anything is loaded or written
BAD_VALUES = [("--log-every", "0"), ("--device", "foo"), ("--lr", "-1"), ("--lr", "nan"), ("--weight-decay", "-1"),
              ("--ema", "1.5"), ("--ema", "-0.5"), ("--keep-checkpoints", "-1"), ("--save-every", "-1"),
              ("--val-every", "-1"), ("--val-clips", "0"), ("--sample-every", "-1"), ("--sample-steps", "1"),
              ("--max-stride", "0"), ("--decode-short-side", "-5"), ("--warmup-steps", "-3"), ("--grad-clip", "-1"),
              ("--kl-weight", "-1"), ("--eval-steps", "1"), ("--size", "0"), ("--size", "-64"), ("--size", "96"),
              ("--frames", "1"), ("--global-frames", "-1"), ("--num-workers", "-1"), ("--vae-batch", "0"),
              ("--p-uncond-local", "1.5"), ("--temporal-weight", "-1"), ("--p-uncond-global", "-0.1"), ("--val-data", "/nonexistent/val"),
              ("--vae", "/nonexistent/vae.safetensors"), ("--config", "nope"), ("--resume", "/nonexistent/run"),
              ("--eval-guidance", "1 -1"), ("--eval-guidance", "nan 1")]   # a value with a space: several words


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_cli_bad_value(tmp_path, small_videos, vae_file, capsys, option, value):
    out = tmp_path / "o"
    argv = ["--data", str(small_videos), "--out", str(out), "--vae", str(vae_file), *TINY, option, *value.split()]
    assert T.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {option}"), err
    assert not out.exists()  # --out is never created for a run that cannot start


def test_max_minutes_stops_with_a_checkpoint_and_resume_goes_on(tmp_path, small_videos, vae_file, capsys, one_thread):
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4"])
    out = tmp_path / "out"
    common = ["--data", data, "--out", out, "--vae", vae_file, *TINY, "--max-steps", "50", "--save-every", "0"]
    assert run_train([*common, "--max-minutes", "0.0001"]) == 0          # 6 ms: the first step is already late
    assert "--max-minutes 0.0001 reached" in capsys.readouterr().err
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["done"] and records[-1]["step"] == 1 and (out / "checkpoint-0000001").is_dir()
    assert run_train([*common, "--max-steps", "3", "--resume", out]) == 0
    assert losses(out)[-1] is not None and len(losses(out)) == 3


def test_cosine_lr_decay_falls_to_zero_at_max_steps_and_resume_keeps_them(tmp_path, small_videos, vae_file, capsys,
                                                                           one_thread):
    assert [T.lr_factor(s, 2, "none", 6) for s in range(6)] == [0.5, 1, 1, 1, 1, 1]
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert [T.lr_factor(s, 2, "cosine", 6) for s in range(6)] == pytest.approx(expected, abs=1e-12)
    assert T.lr_factor(6, 2, "cosine", 6) == 0.0
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4"])
    out = tmp_path / "out"
    common = ["--data", data, "--out", out, "--vae", vae_file, *TINY, "--lr", "1e-3", "--warmup-steps", "2",
              "--lr-decay", "cosine", "--save-every", "3"]
    assert run_train([*common, "--max-steps", "6", "--max-minutes", "0.0001"]) == 0   # stops after step 1
    assert run_train([*common, "--max-steps", "6", "--resume", out]) == 0
    lrs = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    assert lrs == pytest.approx([1e-3 * f for f in expected], rel=1e-9)   # the lr each step trained with
    capsys.readouterr()
    assert run_train([*common, "--max-steps", "8", "--resume", out]) == 2  # another end would bend the cosine
    assert "--max-steps" in capsys.readouterr().err


def test_guide_case_weights_bad_values_and_old_checkpoints(tmp_path, small_videos, vae_file, capsys, one_thread):
    common = ["--data", str(small_videos), "--vae", str(vae_file), *TINY]
    for bad in (["-1", "1", "1"], ["0", "0", "0"]):
        assert T.main([*common, "--out", str(tmp_path / "o"), "--guide-case-weights", *bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: --guide-case-weights"), err
    assert not (tmp_path / "o").exists()
    # a checkpoint written before the option existed resumes with the default odds, and only with them
    from m3ddm.training import STATE_FILE
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4"])
    run = ["--data", data, "--out", tmp_path / "run", "--vae", vae_file, *TINY, "--save-every", "1"]
    assert run_train([*run, "--max-steps", "1"]) == 0
    state_file = tmp_path / "run" / "checkpoint-0000001" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["args"]["guide_case_weights"]
    torch.save(state, state_file)
    assert run_train([*run, "--max-steps", "2", "--resume", tmp_path / "run", "--guide-case-weights", "1", "0", "0"]) == 2
    assert "--guide-case-weights differ" in capsys.readouterr().err
    assert run_train([*run, "--max-steps", "2", "--resume", tmp_path / "run"]) == 0


def test_init_that_is_not_a_file_and_out_that_is_a_file(tmp_path, small_videos, vae_file, capsys):
    common = ["--data", str(small_videos), "--vae", str(vae_file), *TINY[2:]]  # TINY without --config
    assert T.main([*common, "--out", str(tmp_path / "o"), "--init", str(tmp_path / "none.safetensors")]) == 2
    assert capsys.readouterr().err.strip().endswith("--init " + str(tmp_path / "none.safetensors") +
                                                    " does not exist; give an m3ddm .safetensors file.")
    (tmp_path / "file").write_text("x")
    assert T.main([*common, "--config", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert "error: --out" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"
    assert not (tmp_path / "o").exists()


def test_start_line_counts_video_files_not_usable_videos(tmp_path, small_videos, vae_file, capsys, one_thread):
    """The corrupt file is one of the files found, not a video trained on: it is skipped with a warning."""
    data = data_dir(tmp_path, small_videos, ["bikes8.mp4", "corrupt.mp4"])
    out = tmp_path / "out"
    assert run_train(["--data", data, "--out", out, "--vae", vae_file, *TINY, "--max-steps", "2",
                      "--frames", "4"]) == 0
    err = capsys.readouterr().err
    start = next(line for line in err.splitlines() if line.startswith("training unet"))
    assert f"on the 2 video files of {data} (unusable ones are skipped with a warning)" in start
    assert f"warning: skipped {data / 'corrupt.mp4'}" in err
