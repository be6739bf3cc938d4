"""m3ddm/checkpoint.py and m3ddm/runlog.py: a training run's folder (checkpoints, metrics.jsonl, progress)."""
import json

import pytest
import torch

from m3ddm import checkpoint as C
from m3ddm.runlog import RunLog
from m3ddm.unet3d import UNET_PRESETS, UNet3D
from m3ddm.weights import load_unet, read_header


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet3D(UNET_PRESETS["tiny"])


def test_checkpoints_are_complete_pruned_and_found_again(tmp_path, tiny_unet):
    sd, config = tiny_unet.state_dict(), tiny_unet.config
    ema = {k: v.float() + 1 for k, v in sd.items()}
    for step in (2, 4, 6):
        path = C.save_checkpoint(tmp_path, step, "unet", sd, config, {"step": step, "args": {"lr": 1e-3}},
                                 {"sources": [], "step": str(step)}, ema=(ema, 0.9), keep=2)
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
