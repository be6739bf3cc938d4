"""m3ddm.bench: the fast and plain clip paths agree, FLOPs include fused attention, a tiny run writes
valid JSON with every section. Correctness only: speed is measured by `make bench`, never asserted."""
import argparse
import json

import pytest
import torch

from m3ddm import bench
from m3ddm.unet3d import Attention

TINY = ["--config", "tiny", "--size", "64", "--frames", "16", "--steps", "2", "--repeats", "1",
        "--warmup", "0", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """The shared CPU is oversubscribed; one torch thread avoids OpenMP spin-waits (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_and_plain_clip_paths_agree_tiny():
    """3 branches, tokens once, SDPA vs 4 branches, global latents re-encoded per step, per-frame keys/values,
    math attention: final latents within 1e-4 x max|plain| (fp32, CPU, same inputs and noise)."""
    args = argparse.Namespace(config="tiny", seed=0, frames=16, size=64)
    unet = bench.build_unet("tiny", seed=0, device=torch.device("cpu"))
    inputs = bench.make_clip_inputs(args, torch.device("cpu"))
    with torch.no_grad():
        assert bench.compare_clip_paths(unet, inputs, steps=2) <= 1e-4


def test_plain_attention_switch_is_restored():
    unet = bench.build_unet("tiny", seed=0, device=torch.device("cpu"))
    impls = lambda: {m.impl for m in unet.modules() if isinstance(m, Attention)}  # noqa: E731
    with bench.plain_attention(unet):
        assert impls() == {"math"}
    assert impls() == {"sdpa"}


def test_randomized_weights_make_attention_and_temporal_layers_active():
    unet = bench.build_unet("tiny", seed=0, device=torch.device("cpu"))
    attn = next(m for m in unet.modules() if isinstance(m, Attention))
    assert attn.to_out[0].weight.abs().sum() > 0        # a fresh UNet zero-initialises it
    again = bench.build_unet("tiny", seed=0, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))


def test_flop_count_includes_cpu_fused_attention():
    """FlopCounterMode alone counts 0 for the CPU SDPA kernel; the bench's formula equals the math path."""
    attn = Attention(32, heads=4)
    x = torch.randn(2, 10, 32)
    counts = {}
    for impl in ("sdpa", "math"):
        attn.impl = impl
        with torch.no_grad():
            counts[impl] = bench.count_flops(lambda: attn(x))
    assert counts["sdpa"] == counts["math"]
    projections = 4 * 2 * 2 * 10 * 32 * 32           # q, k, v, out: 2 * N * L * C * C each
    assert counts["math"] == projections + 2 * 2 * 2 * 4 * 10 * 10 * 8


def test_spread_statistics():
    assert bench.spread([3.0]) == (3.0, 3.0, 3.0, 0.0)
    med, lo, hi, iqr = bench.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (med, lo, hi, iqr) == (3.0, 1.0, 5.0, 2.0)


def test_tiny_bench_writes_json_with_every_section(tmp_path, capsys):
    path = tmp_path / "b.json"
    rc = bench.main(TINY + ["--video-frames", "1", "--scaling", "1,17", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(path.read_text())
    assert set(result["sections"]) == {"unet", "clip", "vae", "video", "scaling"}
    for name, section in result["sections"].items():
        assert section["rows"], name
        for row in section["rows"]:
            assert len(row["times_s"]) == 1 and row["median_s"] > 0, row["name"]
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["peak_mem_bytes"] > 0 and row["mem_kind"]
            assert row["flops"] > 0 and row["tflops_per_s"] > 0, row["name"]
    unet_rows = result["sections"]["unet"]["rows"]
    assert unet_rows[0]["flops"] < unet_rows[1]["flops"]        # 3 branches, shared keys/values < plain
    calls = result["unet_call_flops"]                             # counted on the meta device, no compute
    assert (calls["fast"], calls["plain"]) == (unet_rows[0]["flops"], unet_rows[1]["flops"])
    clip = result["sections"]["clip"]
    assert clip["max_rel_diff"] <= 1e-4 and clip["speedup_fast_over_plain"] > 0
    scaling = result["sections"]["scaling"]["rows"]
    assert [r["info"]["frames"] for r in scaling] == [1, 17]
    assert [r["info"]["clips"] for r in scaling] == [1, 2]
    assert scaling[1]["flops"] > scaling[0]["flops"]
    last = out.strip().splitlines()[-1]
    assert last.startswith("fast/plain per-clip speedup: ") and "max rel diff" in last


@pytest.mark.parametrize("bad", [["--size", "100"], ["--scaling", "20,x"], ["--sections", "unet,gpu"],
                                 ["--repeats", "0"], ["--steps", "1"], ["--video", "/nonexistent/clip.mp4"]])
def test_bad_input_is_a_user_error(bad, capsys):
    assert bench.main(TINY + bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_threads_and_unwritable_outputs_are_user_errors(tmp_path, capsys):
    """Checked before the run (--threads -1 was a traceback; an unwritable --json failed after the whole run)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    threads = torch.get_num_threads()
    for bad, words in ((["--threads", "-1"], "--threads is -1"), (["--json", str(tmp_path)], "is a folder"),
                       (["--out", str(blocker / "sub")], "is a file")):
        assert bench.main(TINY + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert torch.get_num_threads() == threads and not list(tmp_path.glob(".m3ddm-write-test*"))
