"""python -m m3ddm.solver_study: steps versus error of PNDM, DDIM and DPM-Solver++ on real clips.

Every solver integrates the same probability-flow ODE (same UNet, guidance, conditioning and per-clip
noise), each from the noised border fill at its own first timestep, as `sample.py` runs it. The study
measures how far each (solver, K steps) lands from the converged solution: a 1000-step DDIM run
(timesteps 999 .. 0, the limit every solver's grid tends to), checked against a 500-step one.

Two end points: PNDM and DDIM stop at alphas_cumprod[0] (set_alpha_to_one False, a little noise left);
DPM-Solver++ with final_sigmas_type "zero" stops at sigma 0 (its last data prediction). The reference
run gives both from its last step (its state, and its data prediction there), and each solver is
scored against the reference at its own end point. Metrics per run: relative L2 of the final latents,
PSNR of the decoded frames against the reference's decoded frames (generated band and whole canvas),
the same two against PNDM-50 (the reference implementation's result), UNet calls and wall time.

Clips: the first clip of the coarse-to-fine schedule (stride 15, no guides) of each video, on a square
canvas of --size px outpainted to --ratio. Finished runs are kept under OUT/runs/ (latents, safetensors)
so an interrupted study resumes where it stopped. Results: a table on stdout, OUT/solver_study.json and,
if matplotlib is installed (an optional extra, never a dependency), OUT/solver_study.png.

    python -m m3ddm.solver_study --unet m3ddm/assets/demo_unet.safetensors --vae m3ddm/assets/demo_vae.safetensors
    python -m m3ddm.solver_study --plot-from out/solver_study/solver_study.json    # only redraw the plot
"""
import argparse
import json
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
from .schedulers import DDIMScheduler, DPMSolverPlusPlusScheduler, PNDMScheduler, make_scheduler

ASSETS = Path(__file__).resolve().parent / "assets"
VIDEO_CACHE = Path(os.environ.get("M3DDM_VIDEO_CACHE", Path.home() / ".cache" / "m3ddm" / "real_videos"))
DEFAULT_VIDEOS = ("kivy_cityCC0.mpg", "opencv_cup.mp4")        # held out of the demo model's training
DEFAULT_SOLVERS = "pndm,ddim,dpm++,dpm++:leading,dpm++:karras"     # dpm++ alone: the default, trailing
DEFAULT_STEPS = "5,10,15,20,25,50"
DPM_OPTIONS = {"leading": {"spacing": "leading"}, "trailing": {"spacing": "trailing"},
               "linspace": {"spacing": "linspace"}, "karras": {"use_karras_sigmas": True},
               "sigma_min": {"final_sigmas_type": "sigma_min"}}


def progress(line: str):
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Solvers by name


def build_solver(spec: str, steps: int):
    """'pndm', 'ddim', 'dpm++' or 'dpm++:OPT[:OPT]' (OPT in DPM_OPTIONS) -> a fresh scheduler."""
    name, *opts = spec.split(":")
    if name != "dpm++" or not opts:
        if opts:
            raise UserError(f"solver {spec!r}: only dpm++ takes options; use e.g. dpm++:trailing.")
        return make_scheduler(name, steps)
    kwargs = {}
    for opt in opts:
        if opt not in DPM_OPTIONS:
            raise UserError(f"solver {spec!r}: unknown option {opt!r}; use one of {', '.join(DPM_OPTIONS)}.")
        kwargs.update(DPM_OPTIONS[opt])
    return DPMSolverPlusPlusScheduler(steps, **kwargs)


def run_key(scheduler) -> str:
    """A file-name-safe name of what a scheduler does (so 'dpm++' and 'dpm++:trailing' share their stored runs)."""
    if not isinstance(scheduler, DPMSolverPlusPlusScheduler):
        return "pndm" if isinstance(scheduler, PNDMScheduler) else "ddim"
    key = "dpm++-" + ("karras" if scheduler.use_karras_sigmas else scheduler.spacing)
    return key + ("-sigma_min" if scheduler.final_sigmas_type == "sigma_min" else "")


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


def compare(vae, ours: torch.Tensor, ref: torch.Tensor, ref_frames: torch.Tensor, band: torch.Tensor) -> dict:
    """Latent relative L2 and decoded PSNR (band / whole canvas) of `ours` against `ref` (decoded: ref_frames)."""
    frames = decode(vae, ours)
    return {"rel_l2": rel_l2(ours, ref), "psnr_band": psnr_db(frames, ref_frames, band),
            "psnr": psnr_db(frames, ref_frames)}


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


def study_clip(unet, vae, clip: StudyClip, args, bar: Progress) -> dict:
    """The reference, its convergence check and every (solver, K) on one clip."""
    def run(spec, steps, solver):
        key = f"{clip.name}__{run_key(solver)}__{steps}"
        done_before = (args.out / "runs" / f"{key}.safetensors").exists()
        result = cached_run(args.out, key, lambda: run_solver(unet, clip, solver, args))
        bar.report(f"[{clip.name}] {spec} {steps}" + (" (kept from an earlier run)" if done_before else ""),
                   len(sampling_timesteps(solver)[1]), result)
        return result

    ref = run("ddim", args.reference_steps, DDIMScheduler(args.reference_steps, steps_offset=0))
    check = run("ddim", args.check_steps, DDIMScheduler(args.check_steps))
    ref_frames = {e: decode(vae, ref[e]) for e in ("alpha0", "zero")}
    converged = {e: compare(vae, check[e], ref[e], ref_frames[e], clip.band) for e in ("alpha0", "zero")}
    rows, finals = [], {}
    for spec in args.solvers:
        for steps in args.steps:
            solver = build_solver(spec, steps)
            result = run(spec, steps, solver)
            e = end_point(solver)
            finals[spec, steps] = result[e]
            rows.append({"solver": spec, "steps": steps, "unet_calls": result["unet_calls"],
                         "wall_s": round(result["wall_s"], 3), "end_point": e,
                         **compare(vae, result[e], ref[e], ref_frames[e], clip.band)})
    if ("pndm", 50) in finals:                                       # the reference implementation's result
        pndm50 = finals["pndm", 50]
        pndm50_frames = decode(vae, pndm50)
        for r in rows:
            vs = compare(vae, finals[r["solver"], r["steps"]], pndm50, pndm50_frames, clip.band)
            r.update({"rel_l2_vs_pndm50": vs["rel_l2"], "psnr_band_vs_pndm50": vs["psnr_band"]})
    return {"clip": clip.name, "reference": {"steps": args.reference_steps, "wall_s": round(ref["wall_s"], 3)},
            "convergence_check": {"steps": args.check_steps, "wall_s": round(check["wall_s"], 3), **converged},
            "rows": rows}


def fastest_matching(clips: list, solver: str = "dpm++") -> dict:
    """Smallest K of `solver` (default dpm++, what --quality fast runs) whose error to the reference is no
    worse than PNDM-50's on every clip, or None."""
    rows = [r for c in clips for r in c["rows"]]
    solver = solver if any(r["solver"] == solver for r in rows) else None
    bar = {c["clip"]: next((r["rel_l2"] for r in c["rows"] if r["solver"] == "pndm" and r["steps"] == 50), None)
           for c in clips}
    if solver is None or None in bar.values():
        return {"solver": solver, "steps": None, "note": "needs pndm at 50 steps and a dpm++ solver in the study"}
    for steps in sorted({r["steps"] for r in rows if r["solver"] == solver}):
        errs = {c["clip"]: next(r["rel_l2"] for r in c["rows"] if r["solver"] == solver and r["steps"] == steps)
                for c in clips}
        if all(errs[c] <= bar[c] for c in bar):
            return {"solver": solver, "steps": steps, "rel_l2": errs, "pndm50_rel_l2": bar}
    return {"solver": solver, "steps": None, "pndm50_rel_l2": bar,
            "note": f"no {solver} step count in the study reached PNDM-50's error"}


def summarise(clips: list) -> list:
    """Rows averaged over clips: one per (solver, K), in study order."""
    keys = list(dict.fromkeys((r["solver"], r["steps"]) for c in clips for r in c["rows"]))
    fields = ("unet_calls", "wall_s", "rel_l2", "psnr_band", "psnr", "rel_l2_vs_pndm50", "psnr_band_vs_pndm50")
    out = []
    for solver, steps in keys:
        rows = [r for c in clips for r in c["rows"] if (r["solver"], r["steps"]) == (solver, steps)]
        mean = {f: sum(r[f] for r in rows) / len(rows) for f in fields if all(f in r for r in rows)}
        out.append({"solver": solver, "steps": steps, "end_point": rows[0]["end_point"], **mean})
    return out


def format_table(result: dict) -> str:
    head = (f"{'solver':<16} {'K':>3} {'UNet calls':>10} {'rel L2 to ref':>13} {'PSNR band dB':>12} "
            f"{'PSNR dB':>8} {'PSNR band vs PNDM-50':>20} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in result["summary"]:
        vs = r.get("psnr_band_vs_pndm50")
        lines.append(f"{r['solver']:<16} {r['steps']:>3} {r['unet_calls']:>10.0f} {r['rel_l2']:>13.2e} "
                     f"{r['psnr_band']:>12.2f} {r['psnr']:>8.2f} {'-' if vs is None else f'{vs:.2f}':>20} "
                     f"{r['wall_s']:>7.1f}")
    for c in result["clips"]:
        cc = c["convergence_check"]
        lines.append(f"reference {c['clip']}: DDIM {c['reference']['steps']} vs {cc['steps']} steps: rel L2 "
                     f"{cc['alpha0']['rel_l2']:.2e} (alpha0 end) / {cc['zero']['rel_l2']:.2e} (sigma-0 end), "
                     f"PSNR band {cc['alpha0']['psnr_band']:.1f} dB; DDIM-{c['reference']['steps']} took "
                     f"{c['reference']['wall_s']:.0f} s")
    fast = result["fast"]
    lines.append(f"fewest {fast['solver']} steps with error <= PNDM-50's on every clip: {fast['steps']}"
                 if fast["solver"] else f"--quality fast: {fast['note']}")
    lines.append(f"this run {result['wall_s'] / 60:.1f} min; the UNet runs took {result['runs_wall_s'] / 60:.1f} min "
                 f"when computed (runs kept from an earlier invocation are not recomputed); load average before/after "
                 f"{result['load_before']} / {result['load_after']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Plot (optional: matplotlib is not a dependency)


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
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    summary = result["summary"]
    for solver in dict.fromkeys(r["solver"] for r in summary):
        rows = sorted((r for r in summary if r["solver"] == solver), key=lambda r: r["unet_calls"])
        label = "dpm++ (trailing, the default)" if solver == "dpm++" else solver
        ax.plot([r["unet_calls"] for r in rows], [r["rel_l2"] for r in rows], marker="o", label=label)
    bar = next((r["rel_l2"] for r in summary if r["solver"] == "pndm" and r["steps"] == 50), None)
    if bar is not None:
        ax.axhline(bar, color="grey", linestyle="--", linewidth=1, label="PNDM-50's error")
    check = [c["convergence_check"]["alpha0"]["rel_l2"] for c in result["clips"]]
    ax.axhline(sum(check) / len(check), color="black", linestyle=":", linewidth=1,
               label=f"DDIM {result['settings']['check_steps']} vs {result['settings']['reference_steps']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("UNet calls per clip (each a batch of the guidance branches)")
    ax.set_ylabel("final-latent relative L2 to the converged reference")
    ax.set_title(f"steps vs error, {len(result['clips'])} real clips, {result['settings']['unet']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
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
    per_clip = args.reference_steps + args.check_steps + sum(
        len(sampling_timesteps(build_solver(s, k))[1]) for s in args.solvers for k in args.steps)
    bar = Progress(per_clip * len(args.videos))
    progress(f"solver study: {len(args.videos)} clips x {per_clip} UNet calls ({args.size} px, {args.frames} frames)")
    clips = [study_clip(unet, vae, load_clip(v, unet, vae, args), args, bar) for v in args.videos]
    result = {"settings": settings, "solvers": args.solvers, "steps": args.steps, "clips": clips,
              "summary": summarise(clips), "fast": fastest_matching(clips),
              "wall_s": round(time.perf_counter() - t0, 1), "runs_wall_s": round(sum(
                  c["reference"]["wall_s"] + c["convergence_check"]["wall_s"] + sum(r["wall_s"] for r in c["rows"])
                  for c in clips), 1), "torch_threads": torch.get_num_threads(),
              "load_before": load_before,
              "load_after": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    return result


def write_json(result: dict, path: Path):
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        if args.plot_from:
            path = Path(args.plot_from)
            if not path.is_file():
                raise UserError(f"--plot-from {path} does not exist; give the solver_study.json of a study.")
            if not plot(json.loads(path.read_text()), path.with_suffix(".png")):
                return 1
            print(f"plot: {path.with_suffix('.png')}")
            return 0
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
    write_json(result, path)
    print(format_table(result))
    print(f"json: {path}")
    if plot(result, path.with_suffix(".png")):
        print(f"plot: {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
