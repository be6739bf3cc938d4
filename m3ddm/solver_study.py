"""python -m m3ddm.solver_study: steps versus error of PNDM, DDIM and DPM-Solver++ on real clips.

Every solver integrates the same probability-flow ODE (same UNet, guidance, conditioning and per-clip
noise), each from the noised border fill at its own first timestep, as `sample.py` runs it. The study
measures how far each (solver, K steps) lands from two converged solutions, both DDIM at a step of 1 in t
(--reference-steps 1000 over 1000 timesteps), each checked against a run at half the steps (--check-steps):
  - from 999: timesteps 999 .. 0, the limit the default grids tend to (trailing DPM++ starts there);
  - same start: timesteps 961 .. 0 (962 steps, check 481) from the fill noised at 961: the segment of the
    reference implementation's PNDM-50 (schedulers.REFERENCE_START). The `same_start` solvers
    (`ddim:same_start`, `dpm++:same_start`: sample.py's --start-timestep 961) spread their K steps over it.
PNDM-50 itself is the third yardstick: what a user who wants the reference's video compares with.

Two end points: PNDM and DDIM stop at alphas_cumprod[0] (set_alpha_to_one False, a little noise left),
as does DPM-Solver++ with final_sigmas_type "sigma_min" (so `dpm++:same_start`); with "zero" (the
default) it stops at sigma 0 (its last data prediction). The references give both from their last step
(the state, and the data prediction there), and each solver is scored against a reference at its own end
point. Metrics per run: relative L2 of the final latents, PSNR of the decoded frames (generated band and
whole canvas) against each reference's decoded frames and against PNDM-50's, UNet calls and wall time.

Clips: the first clip of the coarse-to-fine schedule (stride 15, no guides) of each video, on a square
canvas of --size px outpainted to --ratio. Finished runs are kept under OUT/runs/ (latents, safetensors)
so an interrupted study resumes where it stopped. Results: a table, the `--quality fast` choice and its
QUALITY line on stdout; OUT/solver_study.json, OUT/solver_study.md (README table rows and the QUALITY
line) and, if matplotlib is installed (an optional extra, never a dependency), OUT/solver_study.png.

    python -m m3ddm.solver_study --unet m3ddm/assets/demo_unet.safetensors --vae m3ddm/assets/demo_vae.safetensors
    python -m m3ddm.solver_study --report-from out/solver_study/solver_study.json  # table, .md, plot again
    python -m m3ddm.solver_study --plot-from out/solver_study/solver_study.json    # only redraw the plot
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .canvas import (border_fill, canvas_geometry, frames_to_canvas, frames_to_tensor, from_model,
                     global_frames_to_model, parse_ratios, pixel_mask, to_model)
from .errors import UserError
from .masks import latent_mask
from .sampler import assemble_conditioning, clip_noise, denoise_clip, encode_global_context, sampling_timesteps
from .schedule import build_schedule, global_frame_indices, unet_fps
from .schedulers import (NUM_TRAIN_TIMESTEPS, REFERENCE_START, DDIMScheduler, DPMSolverPlusPlusScheduler,
                         PNDMScheduler, make_scheduler)

ASSETS = Path(__file__).resolve().parent / "assets"
VIDEO_CACHE = Path(os.environ.get("M3DDM_VIDEO_CACHE", Path.home() / ".cache" / "m3ddm" / "real_videos"))
DEFAULT_VIDEOS = ("kivy_cityCC0.mpg", "opencv_cup.mp4")        # held out of the demo model's training
DEFAULT_SOLVERS = "pndm,ddim,ddim:same_start,dpm++,dpm++:same_start,dpm++:leading,dpm++:karras"  # dpm++: trailing
DEFAULT_STEPS = "5,10,15,20,25,50"
DPM_OPTIONS = {"leading": {"spacing": "leading"}, "trailing": {"spacing": "trailing"},
               "linspace": {"spacing": "linspace"}, "karras": {"use_karras_sigmas": True},
               "sigma_min": {"final_sigmas_type": "sigma_min"}, "zero": {"final_sigmas_type": "zero"},
               "euler_at_final": {"euler_at_final": True}, "no_euler_at_final": {"euler_at_final": False},
               "same_start": {"start_timestep": REFERENCE_START, "final_sigmas_type": "sigma_min",
                              "euler_at_final": True}}
# the two converged references: name -> first timestep; and the suffix of their scores in a row
REFERENCES = {"from_999": NUM_TRAIN_TIMESTEPS - 1, "same_start": REFERENCE_START}
SUFFIX = {"from_999": "", "same_start": "_same_start"}
END_POINTS = ("alpha0", "zero")
# --quality fast candidates: the DPM++ settings sample.py offers, study spec -> the preset's start_timestep
FAST_CANDIDATES = {"dpm++": None, "dpm++:same_start": REFERENCE_START}
FAST_PSNR_DB = 45.0    # choose_fast's second rule: band PSNR against PNDM-50's frames (--fast-psnr)


def progress(line: str):
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Solvers by name


def build_solver(spec: str, steps: int):
    """'pndm', 'ddim[:same_start]', 'dpm++' or 'dpm++:OPT[:OPT]' (OPT in DPM_OPTIONS, applied in order) -> a
    fresh scheduler. same_start = PNDM-50's segment (REFERENCE_START -> alphas_cumprod[0]), as
    make_scheduler(name, steps, REFERENCE_START) and sample.py --start-timestep build it."""
    name, *opts = spec.split(":")
    if name == "ddim" and opts == ["same_start"]:
        return make_scheduler(name, steps, REFERENCE_START)
    if name != "dpm++" or not opts:
        if opts:
            raise UserError(f"solver {spec!r}: only dpm++ takes options (and ddim same_start); "
                            "use e.g. dpm++:trailing.")
        return make_scheduler(name, steps)
    kwargs = {}
    for opt in opts:
        if opt not in DPM_OPTIONS:
            raise UserError(f"solver {spec!r}: unknown option {opt!r}; use one of {', '.join(DPM_OPTIONS)}.")
        kwargs.update(DPM_OPTIONS[opt])
    return DPMSolverPlusPlusScheduler(steps, **kwargs)


def run_key(scheduler) -> str:
    """A file-name-safe name of what a scheduler does (so 'dpm++' and 'dpm++:trailing' share their stored runs)."""
    start = getattr(scheduler, "start_timestep", None)
    if isinstance(scheduler, PNDMScheduler):
        return "pndm"
    if isinstance(scheduler, DDIMScheduler):
        return "ddim" if start is None else f"ddim-s{start}"
    key = "dpm++-" + ("karras" if scheduler.use_karras_sigmas else scheduler.spacing if start is None else f"s{start}")
    key += "-sigma_min" if scheduler.final_sigmas_type == "sigma_min" else ""
    return key + ("-euler_at_final" if scheduler.euler_at_final and scheduler.final_sigmas_type != "zero" else "")


def end_point(scheduler) -> str:
    """'zero' when the solver ends at sigma 0, else 'alpha0' (alphas_cumprod[0], PNDM's and DDIM's end)."""
    return "zero" if getattr(scheduler, "final_sigmas_type", None) == "zero" else "alpha0"


# ----------------------------------------------------------------------------------------------------
# One clip's inputs


@dataclass
class StudyClip:
    name: str
    start: torch.Tensor        # (1, 4, F, h, w) latents of the border-filled frames
    noise: torch.Tensor        # (1, 4, F, h, w) the per-clip noise
    conditioning: object       # sampler.ClipConditioning
    context: object            # sampler.GlobalContext
    fps: int                   # the UNet's fps input
    band: torch.Tensor         # (S, S) 1 = generated pixels


@torch.no_grad()
def load_clip(path: Path, unet, vae, args) -> StudyClip:
    """The first schedule clip of `path` (stride 15 when the video has >= 50 frames), as sample.py builds it."""
    from .video import probe, read_frames_at
    info = probe(path)
    clip = build_schedule(info.num_frames).clips[0]
    frames = list(clip.frames)[:args.frames]
    geom = canvas_geometry(info.hw, [args.ratio], args.size)
    masked = frames_to_canvas(frames_to_tensor(read_frames_at(path, frames, info)), geom)   # (F, 3, S, S)
    band = pixel_mask(geom)
    filled = border_fill(masked, band)
    lat = vae.encode_latents(torch.cat([to_model(masked), to_model(filled)]))              # (2F, 4, h, w)
    f, h = len(frames), geom.latent_size
    masked_lat, start = lat[:f].permute(1, 0, 2, 3)[None], lat[f:].permute(1, 0, 2, 3)[None]
    black = vae.encode_latents(torch.full((1, 3, geom.size, geom.size), -1.0))
    cond = assemble_conditioning(masked_lat, black, latent_mask(band), [None] * f)
    gidx = global_frame_indices(info.num_frames, args.global_frames) if args.global_frames else []
    gpx = global_frames_to_model(frames_to_tensor(read_frames_at(path, gidx, info)), args.size) if gidx else None
    glat = vae.encode_latents(gpx) if gidx else torch.zeros(0, 4, h, h)
    context = encode_global_context(unet, glat)
    noise = clip_noise(args.seed, (1, 4, f, h, h))
    return StudyClip(path.name, start, noise, cond, context, unet_fps(info.fps, clip.stride), band)


# ----------------------------------------------------------------------------------------------------
# Runs (kept on disk so that the study resumes)


@torch.no_grad()
def run_solver(unet, clip: StudyClip, scheduler, args) -> dict:
    """One trajectory. Returns {"alpha0" or "zero": final latents, "wall_s", "unet_calls"}; a DDIM run also
    gives "zero": the data prediction at its last timestep (where it would land with alpha 1)."""
    loop = sampling_timesteps(scheduler)[1]
    seen = {}

    def hook(i, t, out, eps, x):
        if i == len(loop) - 2:
            seen["x"] = x.clone()
        if i == len(loop) - 1:
            seen["eps"], seen["t"] = eps.clone(), t

    t0 = time.perf_counter()
    final = denoise_clip(unet, scheduler, clip.start, clip.noise, clip.conditioning, clip.context, clip.fps,
                         args.guidance_local, args.guidance_global, on_step=hook)
    result = {end_point(scheduler): final, "wall_s": time.perf_counter() - t0, "unet_calls": len(loop)}
    if isinstance(scheduler, DDIMScheduler) and "x" in seen:
        a = scheduler.alphas_cumprod[seen["t"]]
        result["zero"] = (seen["x"] - (1 - a) ** 0.5 * seen["eps"]) / a ** 0.5
    return result


def cached_run(out: Path, key: str, compute) -> dict:
    """compute() once; its tensors and numbers are stored at OUT/runs/KEY.safetensors (written atomically)."""
    path = out / "runs" / f"{key}.safetensors"
    if path.exists():
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        result = dict(load_file(str(path)))
        result.update({k: json.loads(v) for k, v in meta.items()})
        return result
    result = compute()
    result = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in result.items()}  # as loaded back
    tensors = {k: v for k, v in result.items() if torch.is_tensor(v)}
    meta = {k: json.dumps(v) for k, v in result.items() if not torch.is_tensor(v)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------------------------
# Scoring


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def psnr_db(a: torch.Tensor, b: torch.Tensor, band=None) -> float:
    """PSNR of uint8 frames (F, 3, S, S), over the whole canvas or the pixels where band is 1 (inf if equal)."""
    d2 = ((a.double() - b.double()) / 255) ** 2
    mse = d2.mean() if band is None else (d2 * band).sum() / (band.sum() * d2.shape[0] * d2.shape[1])
    return float("inf") if mse == 0 else (10 * torch.log10(1 / mse)).item()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """(1, 4, F, h, w) -> uint8 (F, 3, S, S)."""
    return from_model(vae.decode_latents(latents[0].permute(1, 0, 2, 3)))


def compare(ours: torch.Tensor, frames: torch.Tensor, ref: torch.Tensor, ref_frames: torch.Tensor,
            band: torch.Tensor) -> dict:
    """Latent relative L2 and decoded PSNR (band / whole canvas) of `ours` (decoded: frames) against `ref`."""
    return {"rel_l2": rel_l2(ours, ref), "psnr_band": psnr_db(frames, ref_frames, band),
            "psnr": psnr_db(frames, ref_frames)}


def reference_steps(steps: int, start: int) -> int:
    """Steps over [start -> 0] at the gap in t of `steps` over all T timesteps: 1000 -> 962 from 961."""
    return max(1, round(steps * (start + 1) / NUM_TRAIN_TIMESTEPS))


# ----------------------------------------------------------------------------------------------------
# The study


class Progress:
    """Elapsed time and ETA by UNet calls done (the runs' cost is nearly all UNet calls)."""

    def __init__(self, total_calls: int):
        self.total, self.done, self.start = total_calls, 0, time.perf_counter()

    def report(self, label: str, calls: int, result: dict):
        self.done += calls
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        progress(f"{label}: {calls} UNet calls, {result['wall_s']:.1f} s  |  {self.done}/{self.total} calls, "
                 f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")


def converged_reference(run, vae, clip: StudyClip, start: int, args) -> dict:
    """DDIM over [start -> 0] at --reference-steps' gap, and its convergence check at --check-steps' gap.
    Returns {"latents", "frames": per end point, "about": what the JSON keeps}."""
    k_ref, k_check = reference_steps(args.reference_steps, start), reference_steps(args.check_steps, start)
    ref = run("ddim", k_ref, DDIMScheduler(k_ref, start_timestep=start))
    check = run("ddim", k_check, DDIMScheduler(k_check, start_timestep=start))
    frames = {e: decode(vae, ref[e]) for e in END_POINTS}
    converged = {e: compare(check[e], decode(vae, check[e]), ref[e], frames[e], clip.band) for e in END_POINTS}
    return {"latents": ref, "frames": frames,
            "about": ({"start": start, "steps": k_ref, "wall_s": round(ref["wall_s"], 3)},
                      {"steps": k_check, "wall_s": round(check["wall_s"], 3), **converged})}


def add_vs_pndm50(rows: list, finals: dict, band: torch.Tensor):
    """Scores against PNDM-50's result (the reference implementation's video), when PNDM-50 is in the study."""
    if ("pndm", 50) not in finals:
        return
    pndm50, pndm50_frames = finals["pndm", 50]
    for r in rows:
        vs = compare(*finals[r["solver"], r["steps"]], pndm50, pndm50_frames, band)
        r.update({f"{k}_vs_pndm50": v for k, v in vs.items()})


def study_clip(unet, vae, clip: StudyClip, args, bar: Progress) -> dict:
    """Both converged references, their convergence checks and every (solver, K) on one clip."""
    def run(spec, steps, solver):
        key = f"{clip.name}__{run_key(solver)}__{steps}"
        done_before = (args.out / "runs" / f"{key}.safetensors").exists()
        result = cached_run(args.out, key, lambda: run_solver(unet, clip, solver, args))
        bar.report(f"[{clip.name}] {spec} {steps}" + (" (kept from an earlier run)" if done_before else ""),
                   len(sampling_timesteps(solver)[1]), result)
        return result

    refs = {name: converged_reference(run, vae, clip, start, args) for name, start in REFERENCES.items()}
    rows, finals = [], {}
    for spec in args.solvers:
        for steps in args.steps:
            solver = build_solver(spec, steps)
            result = run(spec, steps, solver)
            e = end_point(solver)
            finals[spec, steps] = result[e], decode(vae, result[e])
            row = {"solver": spec, "steps": steps, "start": sampling_timesteps(solver)[0],
                   "unet_calls": result["unet_calls"], "wall_s": round(result["wall_s"], 3), "end_point": e}
            for name, ref in refs.items():
                scores = compare(*finals[spec, steps], ref["latents"][e], ref["frames"][e], clip.band)
                row.update({k + SUFFIX[name]: v for k, v in scores.items()})
            rows.append(row)
    add_vs_pndm50(rows, finals, clip.band)
    (ref, check), (same, same_check) = refs["from_999"]["about"], refs["same_start"]["about"]
    return {"clip": clip.name, "reference": ref, "convergence_check": check, "same_start_reference": same,
            "same_start_check": same_check, "rows": rows}


def fastest_matching(clips: list, solver: str = "dpm++", error: str = "rel_l2") -> dict:
    """Smallest K of `solver` whose `error` (a row key: rel_l2 to the from-999 reference, rel_l2_same_start
    to the same-start one) is no worse than PNDM-50's on every clip, or None."""
    rows = [r for c in clips for r in c["rows"]]
    solver = solver if any(r["solver"] == solver for r in rows) else None
    bar = {c["clip"]: next((r.get(error) for r in c["rows"] if r["solver"] == "pndm" and r["steps"] == 50), None)
           for c in clips}
    if solver is None or None in bar.values():
        return {"solver": solver, "steps": None, "error": error,
                "note": f"needs pndm at 50 steps and {solver or 'the solver'} in the study"}
    for steps in sorted({r["steps"] for r in rows if r["solver"] == solver}):
        errs = {c["clip"]: next(r[error] for r in c["rows"] if r["solver"] == solver and r["steps"] == steps)
                for c in clips}
        if all(errs[c] <= bar[c] for c in bar):
            return {"solver": solver, "steps": steps, "error": error, "rel_l2": errs, "pndm50_rel_l2": bar}
    return {"solver": solver, "steps": None, "error": error, "pndm50_rel_l2": bar,
            "note": f"no {solver} step count in the study reached PNDM-50's {error}"}


def row_of(clip: dict, solver: str, steps: int):
    return next((r for r in clip["rows"] if (r["solver"], r["steps"]) == (solver, steps)), None)


def fastest_close_to_pndm50(clips: list, solver: str, min_db: float):
    """Smallest K of `solver` whose band PSNR against PNDM-50's frames is >= min_db on every clip, or None."""
    for steps in sorted({r["steps"] for c in clips for r in c["rows"] if r["solver"] == solver}):
        rows = [row_of(c, solver, steps) for c in clips]
        if all(r is not None and r.get("psnr_band_vs_pndm50", 0) >= min_db for r in rows):
            return steps
    return None


def choose_fast(clips: list, min_db: float = FAST_PSNR_DB) -> dict:
    """--quality fast, among FAST_CANDIDATES (the dpm++ settings sample.py offers), by the first rule that
    some candidate meets: (1) the fewest steps whose error to the SAME-START converged solve is no worse than
    PNDM-50's on every clip; (2) the fewest steps whose band PSNR against PNDM-50's frames is >= min_db on
    every clip. Ties go to the candidate closer to PNDM-50's frames. "candidates" keeps, per candidate, its
    K by each rule and by the from-999 reference (the rule before the same-start reference existed)."""
    candidates = {spec: {"same_start": fastest_matching(clips, spec, "rel_l2_same_start"),
                         "from_999": fastest_matching(clips, spec, "rel_l2"),
                         "close_to_pndm50": fastest_close_to_pndm50(clips, spec, min_db)} for spec in FAST_CANDIDATES}
    rules = (("error to the same-start converged solve <= PNDM-50's on every clip",
              lambda c: c["same_start"]["steps"]),
             (f"band PSNR against PNDM-50's frames >= {min_db:g} dB on every clip (no setting met the first rule: "
              "error to the same-start converged solve <= PNDM-50's)", lambda c: c["close_to_pndm50"]))
    for rule, steps_of in rules:
        found = [describe_fast(clips, spec, steps_of(candidates[spec]), rule) for spec in FAST_CANDIDATES
                 if steps_of(candidates[spec]) is not None]
        if found:
            best = min(found, key=lambda f: (f["steps"], -sum(f["psnr_band_vs_pndm50"].values())))
            return {**best, "candidates": candidates}
    has_same = any("rel_l2_same_start" in r for c in clips for r in c["rows"])
    return {"solver": None, "steps": None, "candidates": candidates,
            "note": f"no dpm++ setting in the study met either rule (same-start error <= PNDM-50's, or >= {min_db:g} "
                    "dB band PSNR against PNDM-50)" if has_same else
                    "the study has no same-start reference (a JSON from before it); rerun the study"}


def describe_fast(clips: list, spec: str, steps: int, rule: str) -> dict:
    rows = {c["clip"]: row_of(c, spec, steps) for c in clips}
    pndm50 = {c["clip"]: row_of(c, "pndm", 50) for c in clips}
    start = FAST_CANDIDATES[spec]
    return {"solver": spec, "steps": steps, "start_timestep": start, "quality": ["dpm++", steps, start], "rule": rule,
            "rel_l2_same_start": {c: r["rel_l2_same_start"] for c, r in rows.items()},
            "pndm50_rel_l2_same_start": {c: r["rel_l2_same_start"] for c, r in pndm50.items()},
            "psnr_band_vs_pndm50": {c: r["psnr_band_vs_pndm50"] for c, r in rows.items()}}


def summarise(clips: list) -> list:
    """Rows averaged over clips: one per (solver, K), in study order."""
    keys = list(dict.fromkeys((r["solver"], r["steps"]) for c in clips for r in c["rows"]))
    fields = ("unet_calls", "wall_s") + tuple(f"{m}{sfx}" for sfx in ("", "_same_start", "_vs_pndm50")
                                                for m in ("rel_l2", "psnr_band", "psnr"))
    out = []
    for solver, steps in keys:
        rows = [r for c in clips for r in c["rows"] if (r["solver"], r["steps"]) == (solver, steps)]
        mean = {f: sum(r[f] for r in rows) / len(rows) for f in fields if all(f in r for r in rows)}
        out.append({"solver": solver, "steps": steps, "start": rows[0].get("start"),
                    "end_point": rows[0]["end_point"], **mean})
    return out


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    w = max([len("solver")] + [len(r["solver"]) for r in result["summary"]])
    head = (f"{'solver':<{w}} {'start':>5} {'K':>3} {'calls':>5} | {'from 999: rel L2':>16} {'band dB':>7} | "
            f"{'same start: rel L2':>18} {'band dB':>7} | {'vs PNDM-50 band dB':>18} | {'wall s':>6}")
    lines = [head, "-" * len(head)]
    for r in result["summary"]:
        lines.append(f"{r['solver']:<{w}} {_num(r.get('start'), 'd'):>5} {r['steps']:>3} {r['unet_calls']:>5.0f} | "
                     f"{r['rel_l2']:>16.2e} {r['psnr_band']:>7.2f} | {_num(r.get('rel_l2_same_start'), '.2e'):>18} "
                     f"{_num(r.get('psnr_band_same_start'), '.2f'):>7} | "
                     f"{_num(r.get('psnr_band_vs_pndm50'), '.2f'):>18} | {r['wall_s']:>6.1f}")
    lines += reference_lines(result)
    fast = result["fast"]
    lines.append(fast_line(fast))
    if fast.get("steps") is not None:
        lines.append("schedulers.py: " + quality_line(fast))
    lines.append(f"this run {result['wall_s'] / 60:.1f} min; the UNet runs took {result['runs_wall_s'] / 60:.1f} min "
                 f"when computed (runs kept from an earlier invocation are not recomputed); load average before/after "
                 f"{result['load_before']} / {result['load_after']}")
    return "\n".join(lines)


def reference_lines(result: dict) -> list:
    """One line per clip and converged reference: how well it has converged, and what it cost."""
    lines = []
    for c in result["clips"]:
        for ref_key, check_key in (("reference", "convergence_check"), ("same_start_reference", "same_start_check")):
            ref, cc = c.get(ref_key), c.get(check_key)
            if ref is None:
                continue
            lines.append(f"reference {c['clip']}: DDIM {ref['steps']} vs {cc['steps']} steps from t = "
                         f"{ref.get('start', NUM_TRAIN_TIMESTEPS - 1)}: rel L2 {cc['alpha0']['rel_l2']:.2e} (alpha0 "
                         f"end) / {cc['zero']['rel_l2']:.2e} (sigma-0 end), PSNR band {cc['alpha0']['psnr_band']:.1f}"
                         f" dB; DDIM-{ref['steps']} took {ref['wall_s']:.0f} s")
    return lines


def fast_line(fast: dict) -> str:
    if fast.get("steps") is None:
        return f"--quality fast: {fast.get('note', 'not measured')}"
    errs, bar, psnr = fast_numbers(fast)
    start = "from t = 999 (trailing)" if fast["start_timestep"] is None else f"from t = {fast['start_timestep']}"
    return (f"--quality fast = {fast['solver']} {fast['steps']} steps {start}, by the rule: {fast['rule']}. "
            f"Rel L2 to the same-start converged solve {errs} (PNDM-50: {bar}); band PSNR against PNDM-50's frames "
            f"{psnr} dB")


def fast_numbers(fast: dict) -> tuple:
    """Per-clip numbers of the fast choice, 'a / b' over clips: its error, PNDM-50's, its PSNR vs PNDM-50."""
    return (" / ".join(f"{v:.2e}" for v in fast["rel_l2_same_start"].values()),
            " / ".join(f"{v:.2e}" for v in fast["pndm50_rel_l2_same_start"].values()),
            " / ".join(f"{v:.1f}" for v in fast["psnr_band_vs_pndm50"].values()))


def quality_line(fast: dict) -> str:
    return f'QUALITY = {{"reference": ("pndm", 50, None), "fast": ("dpm++", {fast["steps"]}, {fast["start_timestep"]})}}'


def quality_comment(result: dict) -> str:
    """The measurement behind the QUALITY line, as the comment above it in schedulers.py."""
    fast, clips = result["fast"], len(result["clips"])
    errs, bar, psnr = fast_numbers(fast)
    start = "from t = 999" if fast["start_timestep"] is None else f"from t = {fast['start_timestep']}"
    return (f"# measured on {result['settings']['unet']} ({clips} clip{'s' if clips > 1 else ''}): {fast['steps']} "
            f"steps {start}; relative L2 to the same-start converged solve {errs} (PNDM-50's: {bar}); band PSNR "
            f"against PNDM-50's frames {psnr} dB. Rule: {fast['rule']}.")


def markdown(result: dict) -> str:
    """The README's study table rows (averages over clips), the references' convergence and the QUALITY line."""
    fast = result["fast"]
    lines = ["| solver | start t | K = UNet calls | rel. L2 to converged from 999 | PSNR band (dB) | "
             "rel. L2 to converged from 961 | PSNR band (dB) | PSNR band vs PNDM-50 (dB) | wall s / clip |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        name = r["solver"]
        bold = (name, r["steps"]) in (("pndm", 50), (fast.get("solver"), fast.get("steps")))
        name += " (default)" if (name, r["steps"]) == ("pndm", 50) else " (`--quality fast`)" if bold else ""
        cells = [name, _num(r.get("start"), "d"), str(r["steps"]), _num(r.get("rel_l2"), ".3g"),
                 _num(r.get("psnr_band"), ".1f"), _num(r.get("rel_l2_same_start"), ".3g"),
                 _num(r.get("psnr_band_same_start"), ".1f"),
                 "—" if r.get("psnr_band_vs_pndm50") == float("inf") else _num(r.get("psnr_band_vs_pndm50"), ".1f")]
        cells = [f"**{v}**" for v in cells] if bold else cells
        lines.append("| " + " | ".join(cells + [f"{r['wall_s']:.1f}"]) + " |")
    lines += ["", *reference_lines(result), "", fast_line(fast)]
    if fast.get("steps") is not None:
        lines += ["", "m3ddm/schedulers.py:", "", "    " + quality_comment(result), "    " + quality_line(fast)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Plot (optional: matplotlib is not a dependency)


def plot_panel(ax, summary: list, key: str, check: list):
    """One panel: `key` (a summary field) vs UNet calls per solver, log-log for errors (with PNDM-50's level and
    the reference's convergence), log-linear for the PSNR against PNDM-50 (PNDM-50's own infinite one left out)."""
    for solver in dict.fromkeys(r["solver"] for r in summary):
        rows = sorted((r for r in summary if r["solver"] == solver and math.isfinite(r.get(key, math.inf))),
                      key=lambda r: r["unet_calls"])
        label = "dpm++ (trailing, from 999)" if solver == "dpm++" else solver
        ax.plot([r["unet_calls"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("UNet calls per clip (each a batch of the guidance branches)")
    ax.grid(True, which="both", alpha=0.3)
    if key.startswith("psnr"):
        ax.set_ylabel("band PSNR against PNDM-50's frames (dB)")
        ax.legend(fontsize=7)
        return
    bar = next((r[key] for r in summary if r["solver"] == "pndm" and r["steps"] == 50), None)
    if bar is not None:
        ax.axhline(bar, color="grey", linestyle="--", linewidth=1, label="PNDM-50's error")
    if check:
        ax.axhline(sum(check) / len(check), color="black", linestyle=":", linewidth=1,
                   label="reference vs half its steps")
    ax.set_yscale("log")
    ax.set_ylabel("final-latent relative L2")
    ax.legend(fontsize=7)


def plot(result: dict, path: Path) -> bool:
    """Error vs UNet calls, log-log, one line per solver, from the JSON result. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("note: matplotlib is not installed, so no plot was drawn (the table and JSON are complete); "
                 f"pip install matplotlib, then: python -m m3ddm.solver_study --plot-from {path.with_suffix('.json')}")
        return False
    summary = result["summary"]
    panels = [("rel_l2", "to the solve converged from t = 999", "convergence_check")]
    if summary and "rel_l2_same_start" in summary[0]:
        panels.append(("rel_l2_same_start", f"to the solve converged from t = {REFERENCE_START} (PNDM-50's start)",
                       "same_start_check"))
    if summary and "psnr_band_vs_pndm50" in summary[0]:
        panels.append(("psnr_band_vs_pndm50", "closeness to PNDM-50's video (the reference implementation's)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, (key, title, check_key) in zip(axes[0], panels):
        plot_panel(ax, summary, key, [c[check_key]["alpha0"]["rel_l2"] for c in result["clips"]] if check_key else [])
        ax.set_title(title, fontsize=9)
    clips = len(result["clips"])
    fig.suptitle(f"steps vs error, {clips} real clip{'s' if clips != 1 else ''}, {result['settings']['unet']}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_list(text: str, option: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{option} {text!r} is not a comma-separated list; use e.g. {option} 5,10,20.")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m3ddm.solver_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", default=str(ASSETS / "demo_unet.safetensors"), help="UNet weights (default: the demo)")
    p.add_argument("--vae", default=str(ASSETS / "demo_vae.safetensors"), help="VAE weights (default: the demo)")
    p.add_argument("--videos", nargs="+", default=[str(VIDEO_CACHE / v) for v in DEFAULT_VIDEOS],
                   help=f"real videos, one clip each (default: {' '.join(DEFAULT_VIDEOS)} from {VIDEO_CACHE})")
    p.add_argument("--ratio", default="1:1", help="target ratio W:H of the outpainting (default 1:1)")
    p.add_argument("--size", type=int, default=128, help="square canvas side in px (default 128)")
    p.add_argument("--frames", type=int, default=16, help="frames of the clip, at most 16 (default 16)")
    p.add_argument("--global-frames", type=int, default=8, help="global frames (default 8)")
    p.add_argument("--solvers", default=DEFAULT_SOLVERS,
                   help=f"pndm, ddim, dpm++[:{'|'.join(DPM_OPTIONS)}] (default {DEFAULT_SOLVERS})")
    p.add_argument("--steps", default=DEFAULT_STEPS, help=f"step counts K (default {DEFAULT_STEPS})")
    p.add_argument("--reference-steps", type=int, default=1000, help="DDIM steps of the reference (default 1000)")
    p.add_argument("--check-steps", type=int, default=500, help="DDIM steps of the convergence check (default 500)")
    p.add_argument("--guidance-local", type=float, default=2.0)
    p.add_argument("--guidance-global", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=6, help="per-clip noise seed (default 6, as sample.py)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", default="out/solver_study", help="output folder (default out/solver_study)")
    p.add_argument("--plot-from", help="only draw the plot from an existing solver_study.json")
    p.add_argument("--fast-psnr", type=float, default=FAST_PSNR_DB,
                   help="--quality fast's second rule, used when no setting is as close to the same-start converged "
                        f"solve as PNDM-50: band PSNR in dB against PNDM-50's frames (default {FAST_PSNR_DB:g})")
    p.add_argument("--report-from", help="from an existing solver_study.json: print the table, write the .md "
                                         "(README rows, QUALITY line) and draw the plot; no UNet runs")
    return p


def check_args(args):
    args.ratio = parse_ratios(args.ratio)[0]
    args.solvers = parse_list(args.solvers, "--solvers")
    args.steps = parse_list(args.steps, "--steps", int)
    for spec in args.solvers:
        for steps in args.steps:
            try:
                build_solver(spec, steps)
            except ValueError as e:
                raise UserError(f"--solvers {spec} with --steps {steps} does not work ({e}).") from None
    if not 2 <= args.check_steps < args.reference_steps <= 1000:
        raise UserError(f"--check-steps {args.check_steps} / --reference-steps {args.reference_steps}: use "
                        "2 <= check < reference <= 1000 (default 500 and 1000).")
    same = [reference_steps(k, REFERENCE_START) for k in (args.check_steps, args.reference_steps)]
    if same[0] >= same[1]:
        raise UserError(f"--check-steps {args.check_steps} / --reference-steps {args.reference_steps} give the same "
                        f"{same[0]} steps from t = {REFERENCE_START}; use check steps further below the reference's.")
    if not 1 <= args.frames <= 16:
        raise UserError(f"--frames {args.frames} is out of range; use 1 to 16.")
    if args.size < 64 or args.size % 64:
        raise UserError(f"--size {args.size} is not a multiple of 64; use e.g. 128.")
    for kind in ("unet", "vae"):
        if not Path(getattr(args, kind)).is_file():
            raise UserError(f"--{kind} {getattr(args, kind)} does not exist; give an m3ddm weights file.")
    args.videos = [Path(v) for v in args.videos]
    for v in args.videos:
        if not v.is_file():
            raise UserError(f"video {v} does not exist; fetch the real clips with `make videos` or pass --videos.")
    args.out = Path(args.out)


def settings_of(args) -> dict:
    """What the stored runs depend on; a study folder with other settings is refused rather than mixed."""
    from .weights import sha256_file
    return {"unet": Path(args.unet).name, "unet_sha256": sha256_file(args.unet), "vae_sha256": sha256_file(args.vae),
            "videos": [v.name for v in args.videos], "ratio": list(args.ratio), "size": args.size,
            "frames": args.frames, "global_frames": args.global_frames, "seed": args.seed,
            "guidance_local": args.guidance_local, "guidance_global": args.guidance_global,
            "reference_steps": args.reference_steps, "check_steps": args.check_steps}


def check_settings(out: Path, settings: dict):
    path = out / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        raise UserError(f"{out} holds a study with other settings (see {path}); choose another --out or delete it.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def run_study(args) -> dict:
    from .weights import load_unet, load_vae
    settings = settings_of(args)
    check_settings(args.out, settings)
    load_before = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    unet, vae = load_unet(args.unet), load_vae(args.vae)
    per_clip = sum(reference_steps(k, start) for k in (args.reference_steps, args.check_steps)
                   for start in REFERENCES.values()) + sum(
        len(sampling_timesteps(build_solver(s, k))[1]) for s in args.solvers for k in args.steps)
    bar = Progress(per_clip * len(args.videos))
    progress(f"solver study: {len(args.videos)} clips x {per_clip} UNet calls ({args.size} px, {args.frames} frames)")
    clips = [study_clip(unet, vae, load_clip(v, unet, vae, args), args, bar) for v in args.videos]
    result = {"settings": settings, "solvers": args.solvers, "steps": args.steps, "clips": clips,
              "summary": summarise(clips), "fast": choose_fast(clips, args.fast_psnr),
              "wall_s": round(time.perf_counter() - t0, 1), "runs_wall_s": round(sum(
                  sum(c[k]["wall_s"] for k in ("reference", "convergence_check", "same_start_reference",
                                                "same_start_check")) + sum(r["wall_s"] for r in c["rows"])
                  for c in clips), 1), "torch_threads": torch.get_num_threads(),
              "load_before": load_before,
              "load_after": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    return result


def write_text(path: Path, text: str):
    """Written to a temporary name beside `path`, then renamed."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def report(result: dict, path: Path) -> int:
    """The table on stdout, the README rows beside `path` (the JSON) and the plot if matplotlib is there."""
    print(format_table(result))
    write_text(path.with_suffix(".md"), markdown(result))
    print(f"json: {path}\nmarkdown (README rows, QUALITY line): {path.with_suffix('.md')}")
    if plot(result, path.with_suffix(".png")):
        print(f"plot: {path.with_suffix('.png')}")
    return 0


def read_result(option: str, given: str) -> dict:
    path = Path(given)
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist; give the solver_study.json of a study.")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        if args.plot_from:
            if not plot(read_result("--plot-from", args.plot_from), Path(args.plot_from).with_suffix(".png")):
                return 1
            print(f"plot: {Path(args.plot_from).with_suffix('.png')}")
            return 0
        if args.report_from:   # "fast" again from the rows (a JSON from before the same-start study has none)
            result = read_result("--report-from", args.report_from)
            return report({**result, "fast": choose_fast(result["clips"], args.fast_psnr)}, Path(args.report_from))
        check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)
        result = run_study(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:   # main() may run in-process (tests): leave torch's global settings as they were
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    path = args.out / "solver_study.json"
    write_text(path, json.dumps(result, indent=1, allow_nan=True) + "\n")
    return report(result, path)


if __name__ == "__main__":
    sys.exit(main())
