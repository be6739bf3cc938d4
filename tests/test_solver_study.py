"""solver_study.py: the steps-versus-error study, end to end on a real clip with the tiny fixture weights."""
import builtins
import json

import pytest
import torch

from m3ddm import solver_study
from m3ddm.schedulers import DDIMScheduler, DPMSolverPlusPlusScheduler, PNDMScheduler, make_scheduler


@pytest.fixture(scope="module")
def weights(tiny_weight_files):
    return tiny_weight_files


SMALL_SOLVERS = ("pndm", "ddim", "ddim:same_start", "dpm++", "dpm++:trailing", "dpm++:same_start")


def small_study(real_videos, weights, out, *extra):
    return solver_study.main(["--videos", str(real_videos / "kivy_cityCC0.mpg"), "--size", "64", "--frames", "2",
                              "--global-frames", "2", "--steps", "2,4,50", "--solvers", ",".join(SMALL_SOLVERS),
                              "--reference-steps", "60", "--check-steps", "30", "--out", str(out), *weights, *extra])


@pytest.mark.slow
def test_study_end_to_end_and_resume(real_videos, weights, tmp_path, capsys, monkeypatch):
    assert small_study(real_videos, weights, tmp_path) == 0
    out, err = capsys.readouterr()
    result = json.loads((tmp_path / "solver_study.json").read_text())
    clip = result["clips"][0]
    assert [(r["solver"], r["steps"]) for r in clip["rows"]] == [(s, k) for s in SMALL_SOLVERS for k in (2, 4, 50)]
    rows = {(r["solver"], r["steps"]): r for r in clip["rows"]}
    assert all(rows["dpm++", k]["rel_l2"] == rows["dpm++:trailing", k]["rel_l2"] for k in (2, 4, 50))
    # the two references, their checks (60 / 30 steps over 1000 timesteps -> 58 / 29 over 962), 5 x 3 distinct runs
    assert (clip["reference"]["steps"], clip["convergence_check"]["steps"]) == (60, 30)
    assert (clip["same_start_reference"]["steps"], clip["same_start_check"]["steps"]) == (58, 29)
    assert (clip["reference"]["start"], clip["same_start_reference"]["start"]) == (999, 961)
    assert len(list((tmp_path / "runs").iterdir())) == 4 + 5 * 3
    for r in clip["rows"]:
        assert r["unet_calls"] == r["steps"] and r["wall_s"] > 0
        assert r["end_point"] == ("zero" if r["solver"] in ("dpm++", "dpm++:trailing") else "alpha0")
        if r["solver"].endswith("same_start") or (r["solver"], r["steps"]) == ("pndm", 50):
            assert r["start"] == 961
        if r["solver"] in ("dpm++", "dpm++:trailing"):
            assert r["start"] == 999
        for sfx in ("", "_same_start"):
            assert 0 <= r["rel_l2" + sfx] < 10 and r["psnr_band" + sfx] > 0
    pndm50 = rows["pndm", 50]
    assert pndm50["rel_l2_vs_pndm50"] == 0 and pndm50["psnr_band_vs_pndm50"] == float("inf")
    for solver, sfx in (("ddim", ""), ("dpm++", ""), ("ddim:same_start", "_same_start"),
                        ("dpm++:same_start", "_same_start")):   # more steps, closer to the converged reference
        errs = [rows[solver, k]["rel_l2" + sfx] for k in (2, 4, 50)]
        assert errs[0] > errs[-1], (solver, errs)
    # the same-start solve converges to the same-start reference, the from-999 one does not
    assert rows["dpm++:same_start", 50]["rel_l2_same_start"] < rows["dpm++:same_start", 50]["rel_l2"] / 5
    assert rows["dpm++", 50]["rel_l2"] < rows["dpm++", 50]["rel_l2_same_start"] / 5
    for check, ref in (("convergence_check", ""), ("same_start_check", "_same_start")):
        assert clip[check]["alpha0"]["rel_l2"] < min(r["rel_l2" + ref] for r in clip["rows"] if r["steps"] < 50)
    fast = result["fast"]
    assert set(fast["candidates"]) == {"dpm++", "dpm++:same_start"} and "--quality fast" in out
    if fast["steps"] is not None:
        assert f'"fast": ("dpm++", {fast["steps"]}, {fast["start_timestep"]})' in out
    assert "kivy_cityCC0.mpg" in out and "from t = 961" in out and "ETA" in err
    md = (tmp_path / "solver_study.md").read_text()
    assert "| **pndm (default)** | **961** | **50** |" in md and md.count("\n| ") == len(clip["rows"])  # header first, then one per row
    # a rerun finds every run on disk and computes nothing again
    monkeypatch.setattr(solver_study, "run_solver", lambda *a: pytest.fail("a stored run was recomputed"))
    assert small_study(real_videos, weights, tmp_path) == 0
    again = json.loads((tmp_path / "solver_study.json").read_text())
    assert [r["rel_l2"] for r in again["clips"][0]["rows"]] == [r["rel_l2"] for r in clip["rows"]]
    assert "kept from an earlier run" in capsys.readouterr().err
    # the report again from the JSON alone
    (tmp_path / "solver_study.md").unlink()
    assert solver_study.main(["--report-from", str(tmp_path / "solver_study.json")]) == 0
    assert (tmp_path / "solver_study.md").read_text() == md and "--quality fast" in capsys.readouterr().out
    # other settings in the same folder are refused, not mixed
    assert small_study(real_videos, weights, tmp_path, "--seed", "7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other settings" in err[0]


def test_reference_gives_both_end_points(real_videos, weights, tmp_path):
    """DDIM with steps_offset 0 ends on t = 0 -> alphas_cumprod[0], which leaves the sample as it is; its sigma-0
    end is the data prediction of that last step."""
    from m3ddm.weights import load_unet, load_vae
    args = solver_study.build_parser().parse_args(["--videos", str(real_videos / "kivy_cityCC0.mpg"), "--size", "64",
                                                   "--frames", "2", "--global-frames", "0", "--out", str(tmp_path),
                                                   *weights])
    solver_study.check_args(args)
    unet, vae = load_unet(args.unet), load_vae(args.vae)
    clip = solver_study.load_clip(args.videos[0], unet, vae, args)
    seen = []
    with torch.no_grad():
        result = solver_study.run_solver(unet, clip, DDIMScheduler(20, steps_offset=0), args)
        from m3ddm.sampler import denoise_clip
        denoise_clip(unet, DDIMScheduler(20, steps_offset=0), clip.start, clip.noise, clip.conditioning, clip.context,
                     clip.fps, on_step=lambda i, t, raw, eps, x: seen.append((t, eps, x)))
    (t1, _, x1), (t0, eps0, x_end) = seen[-2:]
    assert (t1, t0) == (50, 0) and result["unet_calls"] == 20
    torch.testing.assert_close(result["alpha0"], x_end, rtol=0, atol=0)
    torch.testing.assert_close(x_end, x1, rtol=1e-5, atol=1e-6)
    a = DDIMScheduler(20).alphas_cumprod[0]
    torch.testing.assert_close(result["zero"], (x1 - (1 - a) ** 0.5 * eps0) / a ** 0.5)


def test_solver_specs_and_end_points():
    assert isinstance(solver_study.build_solver("pndm", 10), PNDMScheduler)
    s = solver_study.build_solver("dpm++:same_start", 20)      # what sample.py --start-timestep 961 runs
    ref = make_scheduler("dpm++", 20, 961)
    assert torch.equal(s.timesteps, ref.timesteps) and torch.equal(s.sigmas, ref.sigmas) and s.euler_at_final
    assert solver_study.run_key(s) == "dpm++-s961-sigma_min-euler_at_final" and solver_study.end_point(s) == "alpha0"
    assert solver_study.run_key(solver_study.build_solver("dpm++:same_start:zero", 20)) == "dpm++-s961"
    assert solver_study.run_key(solver_study.build_solver("dpm++:same_start:no_euler_at_final", 20)) == \
        "dpm++-s961-sigma_min"
    s = solver_study.build_solver("ddim:same_start", 20)
    assert s.start_timestep == 961 and solver_study.run_key(s) == "ddim-s961"
    s = solver_study.build_solver("dpm++:trailing:sigma_min", 10)
    assert isinstance(s, DPMSolverPlusPlusScheduler) and s.spacing == "trailing"
    assert solver_study.end_point(s) == "alpha0" and solver_study.end_point(DDIMScheduler(5)) == "alpha0"
    assert solver_study.end_point(solver_study.build_solver("dpm++:karras", 10)) == "zero"
    with pytest.raises(solver_study.UserError, match="unknown option 'fast'"):
        solver_study.build_solver("dpm++:fast", 10)
    with pytest.raises(solver_study.UserError, match="only dpm\\+\\+ takes options"):
        solver_study.build_solver("ddim:trailing", 10)


def test_fastest_matching_needs_every_clip():
    def clip(name, pndm50, dpm):
        return {"clip": name, "rows": [{"solver": "pndm", "steps": 50, "rel_l2": pndm50}] +
                [{"solver": "dpm++", "steps": k, "rel_l2": e} for k, e in dpm.items()]}
    clips = [clip("a", 0.010, {5: 0.05, 10: 0.009, 20: 0.002}), clip("b", 0.020, {5: 0.04, 10: 0.03, 20: 0.01})]
    assert solver_study.fastest_matching(clips)["steps"] == 20
    assert solver_study.fastest_matching(clips[:1])["steps"] == 10
    assert solver_study.fastest_matching([clip("a", 0.001, {5: 0.05})])["steps"] is None


def test_choose_fast_rules():
    """Rule 1: the fewest steps with same-start error <= PNDM-50's on every clip; rule 2 (only when no candidate
    meets rule 1): the fewest with band PSNR vs PNDM-50 >= the bar on every clip; ties: closer to PNDM-50."""
    def clip(name, pndm50, rows):
        return {"clip": name, "rows": [{"solver": "pndm", "steps": 50, "rel_l2": 0.1, "rel_l2_same_start": pndm50,
                                        "psnr_band_vs_pndm50": float("inf")}] +
                [{"solver": s, "steps": k, "rel_l2": e999, "rel_l2_same_start": e, "psnr_band_vs_pndm50": db}
                 for (s, k), (e999, e, db) in rows.items()]}
    rows = {("dpm++", 10): (0.03, 0.16, 33.0), ("dpm++", 20): (0.01, 0.15, 34.0),
            ("dpm++:same_start", 10): (0.11, 0.024, 48.8), ("dpm++:same_start", 20): (0.12, 0.008, 54.5)}
    fast = solver_study.choose_fast([clip("a", 0.0035, rows)])
    assert (fast["solver"], fast["steps"], fast["quality"]) == ("dpm++:same_start", 10, ["dpm++", 10, 961])
    assert fast["rule"].startswith("band PSNR against PNDM-50's frames >= 45 dB")
    assert fast["candidates"]["dpm++"]["from_999"]["steps"] == 10      # the old rule would pick the from-999 one
    assert solver_study.choose_fast([clip("a", 0.0035, rows)], min_db=50)["steps"] == 20
    assert solver_study.choose_fast([clip("a", 0.0035, rows)], min_db=60)["steps"] is None
    fast = solver_study.choose_fast([clip("a", 0.01, rows)])            # rule 1 met at 20 steps
    assert (fast["solver"], fast["steps"]) == ("dpm++:same_start", 20) and fast["rule"].startswith("error to")
    assert fast["psnr_band_vs_pndm50"] == {"a": 54.5} and fast["pndm50_rel_l2_same_start"] == {"a": 0.01}
    two = [clip("a", 0.01, rows), clip("b", 0.01, {**rows, ("dpm++:same_start", 20): (0.1, 0.02, 47.0)})]
    assert solver_study.choose_fast(two)["steps"] == 10 and "45 dB" in solver_study.choose_fast(two)["rule"]
    tie = {("dpm++", 10): (0.03, 0.016, 46.0), ("dpm++:same_start", 10): (0.11, 0.016, 48.8)}
    assert solver_study.choose_fast([clip("a", 0.02, tie)])["solver"] == "dpm++:same_start"


def test_plot_is_optional(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "solver_study.json"
    path.write_text(json.dumps({"summary": [], "clips": []}))
    assert solver_study.main(["--plot-from", str(path)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err and not path.with_suffix(".png").exists()
    assert solver_study.main(["--plot-from", str(tmp_path / "nope.json")]) == 2
