"""m3ddm/training.py: a training run's checkpoints, EMA and log (metrics.jsonl, the progress line)."""
import json

import pytest
import torch

from m3ddm import training as C
from m3ddm.training import EMA, RunLog
from m3ddm.unet3d import UNET_PRESETS, UNet3D
from m3ddm.weights import load_unet, read_header


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet3D(UNET_PRESETS["tiny"])


def test_checkpoints_are_complete_pruned_and_found_again(tmp_path, tiny_unet):
    sd, config = tiny_unet.state_dict(), tiny_unet.config
    ema = EMA(tiny_unet, 0.9)
    for step in (2, 4, 6):
        path = C.save_checkpoint(tmp_path, step, "unet", sd, config, {"step": step, "args": {"lr": 1e-3}},
                                 {"sources": [], "step": str(step)}, ema=ema, keep=2)
        assert path == tmp_path / f"checkpoint-{step:07d}"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000004", "checkpoint-0000006"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder or file is left
    assert sorted(p.name for p in (tmp_path / "checkpoint-0000006").iterdir()) == [
        C.STATE_FILE, "unet.safetensors", "unet_ema.safetensors"]
    assert C.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-0000006"
    assert C.latest_checkpoint(tmp_path / "checkpoint-0000004") == tmp_path / "checkpoint-0000004"
    assert C.load_state(C.latest_checkpoint(tmp_path)) == {"step": 6, "args": {"lr": 1e-3}}
    kind, _, meta = read_header(tmp_path / "unet_ema.safetensors")  # the newest copied to the top level
    assert kind == "unet" and meta["step"] == "6" and meta["ema_decay"] == "0.9"
    top = load_unet(tmp_path / "unet.safetensors").state_dict()
    assert all(torch.equal(top[k], sd[k]) for k in sd)
    assert C.weights_filename("vae") == "vae.safetensors"


def test_no_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "checkpoint-0000001").mkdir()  # a folder without trainer_state.pt (an interrupted save)
    with pytest.raises(C.UserError, match="holds no checkpoint"):
        C.latest_checkpoint(tmp_path)


def test_run_log_drops_a_crashed_runs_tail_and_shows_progress(tmp_path, capsys):
    log = RunLog(tmp_path, True, 10)
    for step in (1, 2, 3):
        log.record(step=step, loss=float(step))
    log.record(step=3, done=True)
    resumed = RunLog(tmp_path, True, 10, resume_step=2)  # resuming from a checkpoint of step 2
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed.progress(4, "loss 0.5000")
    resumed.message("checkpoint x")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("step 4/10 loss 0.5000 ETA ") and err[1] == "checkpoint x"
    assert resumed.lap() >= 0 and resumed.elapsed() >= 0
    quiet = RunLog(tmp_path / "other", False, 10)  # ranks > 0: nothing written, nothing shown
    quiet.record(step=1)
    quiet.progress(1, "x")
    quiet.message("y")
    assert not (tmp_path / "other").exists() and capsys.readouterr().err == ""


def test_ema_follows_the_weights_in_fp32(tiny_unet):
    model = torch.nn.Linear(2, 2)
    model.register_buffer("count", torch.tensor(3))
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
        model.count += 1
    before = ema.shadow["weight"].clone()
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], before + 1.0) and ema.shadow["count"] == 4
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if k != "count")


def test_run_log_step_records_and_shows_progress_every_n(tmp_path, capsys):
    log = RunLog(tmp_path, True, 4)
    for step in range(1, 5):
        log.step(step, 0.5, 1e-3, 2.0, 8, 0, every=3, data=[[["a.mp4", 0, 1]]] if step == 2 else None)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and "data" in recs[1] and "data" not in recs[0]
    assert set(recs[0]) == {"step", "loss", "lr", "grad_norm", "clips_per_s", "elapsed_s", "skipped_videos"}
    shown = [line.split()[1] for line in capsys.readouterr().err.splitlines()]
    assert shown == ["1/4", "3/4", "4/4"]  # the first, every 3rd and the last step
