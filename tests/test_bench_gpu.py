"""m3ddm.bench_gpu, the prepared GPU script, run through the same code path on the CPU with the tiny config.
The compile section uses torch.compile's `eager` backend here (dynamo capture, guards and the recompilation
counters, without inductor's C++ build, which takes minutes on 2 cores; the inductor run on CPU is
measured by `make bench-gpu BENCH_GPU_ARGS="--config small --device cpu ..."`, see the README)."""
import json

import pytest
import torch

from m3ddm import bench_gpu

TINY = ["--config", "tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--repeats", "2", "--threads", "1",
        "--compile-backend", "eager", "--video-frames", "17"]


@pytest.mark.slow
def test_tiny_cpu_run_fills_every_section(tmp_path, capsys):
    assert bench_gpu.main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["errors"] == {} and result["skipped"] == {}
    s = result["sections"]
    assert s["flops"]["unet_call_flops"] > 0 and s["flops"]["clip_flops"] == s["flops"]["unet_call_flops"]
    for name in ("eager", "compile"):
        r = s[name]
        assert len(r["clip_times_s"]) == 2 and r["clip_median_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["tflops_per_s_unet_call"] > 0 and r["unet_calls_per_clip"] == 1
    c = s["compile"]
    assert c["recompiled_after_first_clip"] is False and c["counters_after_first_clip"]["unique_graphs"] >= 1
    assert c["clip_fps_values"] == [2, 6, 30]            # other fps values on later clips, same graphs
    assert c["agreement_clip"]["rel_l2"] < 1e-5 and c["agreement_unet_call"]["finite"]
    p = s["precision"]
    assert p["fp16_vs_fp32"]["rel_l2"] < p["bf16_vs_fp32"]["rel_l2"] < 0.1    # fp16 has 3 more mantissa bits
    v = s["video"]
    assert (v["frames"], v["clips"]) == (17, 2) and all(o.endswith(".mp4") for o in v["outputs"].values())
    assert "compiled/eager clip speedup" in out and "targets:" in out


def test_budget_skips_sections_with_a_note(tmp_path):
    result = bench_gpu.run(bench_gpu.build_parser().parse_args(TINY + ["--out", str(tmp_path), "--budget-s", "0"]))
    assert set(result["sections"]) == {"flops"}
    assert set(result["skipped"]) == {"eager", "compile", "precision", "video"}
    assert "budget" in result["skipped"]["eager"] and "needs the eager" in result["skipped"]["video"]
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["skipped"] == result["skipped"]
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("bad", [["--sections", "eager,gpu"], ["--size", "100"], ["--steps", "1"],
                                 ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--video", "/no/such.mp4"]])
def test_bad_input_is_one_line_exit_2(bad, capsys, tmp_path):
    assert bench_gpu.main(TINY + ["--out", str(tmp_path)] + bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
