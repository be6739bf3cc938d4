"""Killed runs: real signals sent to a sample.py subprocess in the middle of writing its output.

SIGTERM, SIGHUP and SIGINT (to the process alone, as `timeout` and `docker stop` do, or to its whole process
group, as a terminal and a batch scheduler do) end it like Ctrl-C: temporaries removed, one line, exit code
128 + signal; only the video's work folder stays, for a rerun to continue from (tests/test_resume.py). A SIGKILL
cannot be handled: its leftovers are removed by the next run over the folder, and only those (a live sibling's
temporary file is left alone)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import sample
from conftest import ROOT, make_clip
from m3ddm import files

FAST = ["--size", "64", "--scheduler", "ddim", "--global-frames", "0"]


def start_sample(clip, out, weights, tmp_path):
    err = open(tmp_path / "stderr.txt", "w")
    cmd = [sys.executable, str(ROOT / "sample.py"), str(clip), "--ratio", "16:9", "--out", str(out), *FAST,
           "--steps", "50", *weights]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
    deadline = time.time() + 180
    while not list(out.glob(".*.part.mp4")):                    # the writer is open: sampling has started
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        assert time.time() < deadline, "sample.py never started writing"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "long.mp4", "25", frames=120, audio=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum,group", [(signal.SIGTERM, False), (signal.SIGHUP, True), (signal.SIGINT, True)],
                         ids=["SIGTERM-process", "SIGHUP-group", "SIGINT-group"])
def test_signal_cleans_up_with_one_line(signum, group, long_clip, tiny_weight_files, tmp_path):
    out = tmp_path / "out"
    proc = start_sample(long_clip, out, tiny_weight_files, tmp_path)
    (os.killpg if group else os.kill)(proc.pid, signum)
    assert proc.wait(timeout=60) == 128 + signum
    err = (tmp_path / "stderr.txt").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: interrupted by {signal.Signals(signum).name}; {sample.INTERRUPTED}."], err
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err
    assert proc.stdout.read() == b""
    assert sorted(os.listdir(out)) == ["long.m3ddm-work"]       # no output, no temporary file: the work folder
    assert all(re.fullmatch(r"work\.json|position\.pt|(state|final)-\d{6}\.pt", name)
               for name in os.listdir(out / "long.m3ddm-work"))


@pytest.mark.slow
def test_sigkill_debris_is_removed_by_the_next_run(long_clip, tiny_weight_files, tmp_path, capsys):
    out = tmp_path / "out"
    proc = start_sample(long_clip, out, tiny_weight_files, tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    debris = sorted(p.name for p in out.iterdir() if p.name != "long.m3ddm-work")    # the work folder stays
    assert debris and all(f"-{proc.pid}-" in name for name in debris) and (out / "long.m3ddm-work").is_dir()
    # a sibling run that is still writing (same host), and one on another machine of a shared filesystem
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = out / f".other_16-9.m3ddm-{files.host_tag()}-{files.pid_namespace()}-{sibling.pid}-0123abcd.part.mp4"
        remote = out / f".other_16-9.m3ddm-elsewhere_0badc0de-{files.pid_namespace()}-{proc.pid}-0123abcd.part.mp4"
        live.write_bytes(b"x")
        remote.write_bytes(b"x")
        short = make_clip(tmp_path / "short.mp4", "25", frames=8)
        rc = sample.main([str(a) for a in [short, "--ratio", "16:9", "--out", out, *FAST, "--steps", "1",
                                            *tiny_weight_files]])
        _, err = capsys.readouterr()
        assert rc == 0, err
        assert f"removed {len(debris)} temporary file(s) left by a killed run" in err
        assert sorted(os.listdir(out)) == sorted(["short_16-9.mp4", "short.json", "short_preview.png",
                                                  live.name, remote.name, "long.m3ddm-work"])
        assert sorted(json.loads((out / "short.json").read_text())["removed_stale_temps"]) == debris
    finally:
        sibling.kill()
        sibling.wait()
