"""sample.py and evaluate.py under torchrun: 2 CPU processes (gloo) give what one process gives.

Both sides run as subprocesses with one intra-op thread each (torchrun's default for its workers), so every
video is computed the same way whichever process takes it: the outputs are compared exactly."""
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_clip
from m3ddm import distributed
from m3ddm import metrics as M
from m3ddm.video import probe, read_frames_at
from test_evaluate import _lpips_file, _model_files
from test_metrics import _StandInI3D

FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "1", "--global-frames", "2", "--ratio", "16:9"]
LENGTHS = {"v1": 8, "v2": 60, "v3": 12, "v4": 20, "v5": 30}    # frames; clips 1, 6, 1, 2, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def one_process(script, args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600, cwd=cwd)


def two_processes(script, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *map(str, args), "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=cwd)


def decoded(path):
    info = probe(path)
    return read_frames_at(path, range(info.num_frames), info)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five clips of different lengths and, in the middle, a file that is not a video."""
    d = tmp_path_factory.mktemp("videos")
    for name, n in LENGTHS.items():
        make_clip(d / f"{name}.mp4", "25", frames=n, size=(32, 24))
    (d / "v3b.mp4").write_text("not a video\n" * 50)
    return d


@pytest.mark.slow
def test_sample_two_ranks_equal_one_process_and_a_bad_video_is_reported(folder, tiny_weight_files, tmp_path):
    one = one_process("sample.py", [folder, "--out", tmp_path / "one", *FAST, *tiny_weight_files], tmp_path)
    assert one.returncode == 2, one.stderr[-3000:]
    assert "error: 1 of 6 videos failed (v3b.mp4); the others are done." in one.stderr
    two = two_processes("sample.py", [folder, "--out", tmp_path / "two", *FAST, *tiny_weight_files], tmp_path)
    assert two.returncode == 1, two.stderr[-3000:]           # torchrun: a worker failed: rank 0, with 2
    assert two.stderr.count("exitcode  : 2") == 1
    assert "error: 1 of 6 videos failed (v3b.mp4); the others are done." in two.stderr

    names = sorted(LENGTHS)
    expected = [str(tmp_path / "two" / f"{n}_16-9.mp4") for n in names]
    assert two.stdout.split() == expected                            # rank 0 prints every output, in input order
    assert one.stdout.split() == [p.replace("/two/", "/one/") for p in expected]
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one") + ["run.json"])
    for n in names:
        a, b = decoded(tmp_path / "one" / f"{n}_16-9.mp4"), decoded(tmp_path / "two" / f"{n}_16-9.mp4")
        assert a.shape[0] == LENGTHS[n] and np.array_equal(a, b), n

    summary = json.loads((tmp_path / "two" / "run.json").read_text())
    videos = summary["videos"]
    assert summary["world_size"] == 2 and summary["failed"] == 1
    assert [Path(v["input"]).name for v in videos] == ["v1.mp4", "v2.mp4", "v3.mp4", "v3b.mp4", "v4.mp4", "v5.mp4"]
    bad = videos[3]
    assert bad["status"] == "failed" and "v3b.mp4" in bad["error"] and bad["bad_input"]
    assert all(v["status"] == "made" and v["seconds"] > 0 for i, v in enumerate(videos) if i != 3)
    # split by cost (1 + 16 x clips), not by name: the 60-frame clip alone on one rank, the rest on the other
    costs = [v["expected_cost"] for v in videos]
    assert costs == [17, 97, 17, 1, 33, 33]
    shards = distributed.shard_by_cost(costs, 2)
    assert shards == [[1, 3], [0, 2, 4, 5]]
    assert [v["rank"] for v in videos] == [0 if i in shards[0] else 1 for i in range(6)]
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]

    # a restart after a crash redoes only what is unfinished: v5 lost its outputs, the rest is skipped
    (tmp_path / "two" / "v5_16-9.mp4").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("v[1-4]*")}
    again = two_processes("sample.py", [folder, "--out", tmp_path / "two", *FAST, *tiny_weight_files], tmp_path)
    assert again.returncode == 1, again.stderr[-3000:]
    statuses = [v["status"] for v in json.loads((tmp_path / "two" / "run.json").read_text())["videos"]]
    assert statuses == ["skipped", "skipped", "skipped", "failed", "skipped", "made"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert np.array_equal(decoded(tmp_path / "two" / "v5_16-9.mp4"), decoded(tmp_path / "one" / "v5_16-9.mp4"))


@pytest.mark.slow
def test_evaluate_two_ranks_write_the_same_reports(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, n in (("c1", 12), ("c2", 20), ("c3", 14)):
        make_clip(clips / f"{name}.mp4", "25", frames=n, size=(32, 24))
    unet, vae = _model_files(tmp_path)
    i3d = tmp_path / "i3d_standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(0)
        torch.jit.script(_StandInI3D()).save(str(i3d))
    args = [clips, "--method", "model", "fill", "zero", "--size", "64", "--frames", "12", "--crop-ratio", "0.25", "0.5",
            "--steps", "2", "--unet", unet, "--vae", vae, "--lpips", _lpips_file(tmp_path), "--i3d", i3d,
            "--i3d-sha256", M.sha256_file(i3d), "--previews", "1"]
    one = one_process("evaluate.py", [*args, "--out", tmp_path / "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = two_processes("evaluate.py", [*args, "--out", tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and "| model | average |" in one.stdout

    def rows(d):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(d / "per_video.csv"))]
    assert rows(tmp_path / "two") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 3 * 2 * 3
    for name in ("summary.json", "summary.md"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["methods"]["model"]["0.25"]["fvd"] > 0                # FVD over the gathered features
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


# ----------------------------------------------------------------------------------------------------
# the split itself (no processes)


def test_shard_by_cost_balances_and_is_deterministic():
    costs = [5, 3, 3, 2, 2, 2, 1]
    shards = distributed.shard_by_cost(costs, 2)
    assert shards == [[0, 3, 5], [1, 2, 4, 6]]                     # totals 9 and 9 (LPT)
    assert sorted(i for s in shards for i in s) == list(range(7))
    assert distributed.shard_by_cost(costs, 2) == shards           # the same on every call (every rank)
    assert distributed.shard_by_cost([4, 4, 4], 5) == [[0], [1], [2], [], []]
    assert distributed.shard_by_cost([], 3) == [[], [], []]
    assert distributed.shard_by_cost([1] * 6, 3) == [[0, 3], [1, 4], [2, 5]]   # equal costs: round robin
    # one long video and many short ones: the long one alone on a rank
    assert distributed.shard_by_cost([100] + [10] * 10, 2) == [[0], list(range(1, 11))]
    with pytest.raises(ValueError):
        distributed.shard_by_cost([1], 0)


def test_collectives_of_a_plain_process():
    world = distributed.setup_sharding("cpu", env={})
    assert world.size == 1 and not torch.distributed.is_initialized()
    assert distributed.map_over_ranks(world, lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.gather_to_main(world, {"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_from_main(world, 5) == 5
    distributed.barrier(world)
