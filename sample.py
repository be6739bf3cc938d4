"""Outpaint videos to new aspect ratios with M3DDM+.

    python sample.py clip.mp4 --ratio 16:9
    python sample.py videos/ --ratio 16:9,9:16 --out results --unet weights/unet.safetensors --vae weights/vae.safetensors

    torchrun --nproc_per_node 8 sample.py videos/ --out results ...   # the videos split over 8 GPUs

One mp4 per input and ratio (<stem>_<a>-<b>.mp4, the source's frame times and audio; a still image
.png/.jpg gives <stem>_<a>-<b>.png/.jpg), plus <stem>.json (run record) and <stem>_preview.png beside it;
<stem> is the name up to its first dot (take.2.mp4 -> take_16-9.mp4). With --truth VIDEO (the uncropped
shot of a single input, one ratio) the preview shows ground truth | input | output instead.
Progress on stderr, output paths on stdout. A rerun skips the videos whose outputs were made with the same
settings and weights, continues the unfinished ones from their work folder (<stem>.m3ddm-work/), and
replaces outputs made otherwise only with --overwrite. Under torchrun each rank takes cuda:LOCAL_RANK (or
the CPU), the videos are split by expected cost, and rank 0 writes run.json (every input: its outputs or its
error, time, rank). A video that fails is reported and the others go on; the exit code is then non-zero.
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "m3ddm" / "assets"
DEFAULT_UNET = ASSETS / "demo_unet.safetensors"
DEFAULT_VAE = ASSETS / "demo_vae.safetensors"


def build_parser() -> argparse.ArgumentParser:
    from m3ddm.schedulers import QUALITY, REFERENCE_START, SCHEDULERS
    p = argparse.ArgumentParser(description="Outpaint videos to new aspect ratios with M3DDM+.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video or image files, or folders whose videos and images are all processed")
    p.add_argument("--ratio", default="16:9", help="target aspect ratios W:H, comma-separated (default 16:9)")
    p.add_argument("--out", default="out", help="output folder (created if missing; default ./out)")
    p.add_argument("--unet", default=None, help=f"UNet weights, an m3ddm file (default {DEFAULT_UNET.name} when present)")
    p.add_argument("--vae", default=None, help=f"VAE weights, an m3ddm file (default {DEFAULT_VAE.name} when present)")
    p.add_argument("--size", type=int, default=256, help="side of the square working canvas in px, multiple of 64 (default 256)")
    p.add_argument("--strides", default="15,5,1", help="coarse-to-fine strides, used when the video has >= 50 frames (default 15,5,1)")
    p.add_argument("--global-frames", type=int, default=16, help="global frames spread over the video; 0 = none (default 16)")
    p.add_argument("--limit-frames", type=int, default=None, help="outpaint only the first L frames (default: all)")
    p.add_argument("--seed", type=int, default=6, help="noise seed, the same for every clip (default 6)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available; under torchrun "
                   "rank r takes cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (default pndm, as the reference)")
    p.add_argument("--start-timestep", type=int, default=None,
                   help=f"ddim/dpm++: start there and spread --steps down to the end, {REFERENCE_START} = the segment of "
                        "the default pndm 50 (default: the scheduler's own grid)")
    p.add_argument("--quality", choices=sorted(QUALITY), default=None,
                   help="; ".join(f"{k}: {quality_flags(*v)}" for k, v in QUALITY.items())
                   + " (instead of --scheduler/--steps/--start-timestep; default reference)")
    p.add_argument("--guidance-local", type=float, default=2.0, help="guidance weight of the masked frames (default 2)")
    p.add_argument("--guidance-global", type=float, default=4.0, help="guidance weight of the global frames (default 4)")
    p.add_argument("--feather", type=int, default=0, help="px over which the source blends into the border (default 0: hard paste)")
    p.add_argument("--keep-resolution", action="store_true", help="output at the source's resolution: source pixels untouched, border upscaled")
    p.add_argument("--vae-sample", action="store_true", help="sample the VAE posterior (seeded) instead of taking its mean")
    p.add_argument("--plain", action="store_true", help="reference-shaped slow path: 4 guidance branches, math attention, fp32")
    p.add_argument("--truth", default=None, metavar="VIDEO",
                   help="ground-truth video of the (single) input: the preview becomes truth | input | output")
    p.add_argument("--overwrite", action="store_true", help="replace outputs (and discard unfinished work folders) "
                   "made with other settings; without it they are refused")
    return p


def find_videos(inputs) -> list:
    from m3ddm import UserError
    from m3ddm.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    videos = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"Folder {path} holds no video files ({', '.join(VIDEO_EXTENSIONS)}) or images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); give a video or another folder.")
            videos += found
        elif path.exists():
            videos.append(path)
        else:
            raise UserError(f"Input {path} does not exist; check the path.")
    videos = list({v.resolve(): v for v in videos}.values())   # the same file given twice runs once
    stems = {}
    for video in videos:
        stem = video.name.split(".")[0]
        if stem in stems:
            raise UserError(f"Inputs {stems[stem]} and {video} would write the same output names ({stem}_*); "
                            "rename one of them or run them separately.")
        stems[stem] = video
    return videos


def weights_path(given, default: Path, kind: str) -> Path:
    from m3ddm import UserError
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"{kind} weights {given} do not exist; check the --{kind.lower()} path.")
        return Path(given)
    if default.is_file():
        return default
    raise UserError(f"No {kind} weights: pass --{kind.lower()} FILE (an m3ddm .safetensors made with "
                    f"weights_convert.py); the default {default} does not exist.")


INTERRUPTED = ("no partial output was kept; rerun the same command to continue from the finished clips "
               "(kept in <stem>.m3ddm-work/)")
SUMMARY = "run.json"          # written by rank 0 of a torchrun job


def say(text: str):
    from m3ddm import cli
    cli.progress_line(text)


def say_early(text: str):
    """A progress line from before a video is checked: to a terminal only, so that a bad input gets its one
    `error:` line and nothing else in logs (the stage lines that follow the checks always go to stderr)."""
    from m3ddm import cli
    if sys.stderr.isatty():
        cli.progress_line(text)


def quality_flags(scheduler: str, steps: int, start_timestep) -> str:
    return f"--scheduler {scheduler} --steps {steps}" + ("" if start_timestep is None else
                                                         f" --start-timestep {start_timestep}")


def scheduler_and_steps(args) -> tuple:
    """(scheduler, steps, start_timestep) from --quality, or from --scheduler/--steps/--start-timestep (defaults
    pndm, 50, None); not both."""
    from m3ddm import UserError
    from m3ddm.schedulers import QUALITY
    if args.quality is None:
        return args.scheduler or "pndm", 50 if args.steps is None else args.steps, args.start_timestep
    if args.scheduler is not None or args.steps is not None or args.start_timestep is not None:
        raise UserError(f"--quality {args.quality} already means {quality_flags(*QUALITY[args.quality])}; "
                        "give either --quality or --scheduler/--steps/--start-timestep.")
    return QUALITY[args.quality]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from m3ddm import cli
    return cli.run(lambda: run(args), interrupted=INTERRUPTED)


def options_from_args(args):
    from m3ddm.canvas import check_size
    from m3ddm.pipeline import OutpaintOptions
    from m3ddm.schedule import parse_strides

    args.scheduler, args.steps, args.start_timestep = scheduler_and_steps(args)
    options = OutpaintOptions(size=args.size, strides=parse_strides(args.strides), global_frames=args.global_frames,
                              limit_frames=args.limit_frames, seed=args.seed, scheduler=args.scheduler,
                              steps=args.steps, start_timestep=args.start_timestep, guidance_local=args.guidance_local,
                              guidance_global=args.guidance_global, feather=args.feather,
                              keep_resolution=args.keep_resolution, vae_sample=args.vae_sample,
                              plain=args.plain).check()
    check_size(args.size)
    return options


def run(args) -> int:
    from m3ddm import distributed
    from m3ddm.canvas import parse_ratios
    ratios = parse_ratios(args.ratio)
    options = options_from_args(args)
    videos = find_videos(args.inputs)
    from m3ddm import UserError
    if args.truth is not None and (len(videos) != 1 or len(ratios) != 1 or not Path(args.truth).is_file()):
        raise UserError(f"--truth {args.truth} needs an existing video and exactly one input and one --ratio "
                        f"(got {len(videos)} input(s), {len(ratios)} ratio(s)); check the path or split the run.")
    weights = {"unet": weights_path(args.unet, DEFAULT_UNET, "UNet"), "vae": weights_path(args.vae, DEFAULT_VAE, "VAE")}
    from m3ddm.weights import check_kind
    check_kind(weights["unet"], "unet"), check_kind(weights["vae"], "vae")  # both, from the headers, before loading either
    world = distributed.setup_sharding(args.device)
    try:
        videos = distributed.broadcast_from_main(world, videos)   # one list, even if the folder changes meanwhile
        if world.size > 1:
            check_summary_name(videos)
        return Sampling(args, world, ratios, options, weights).run(videos)
    finally:
        distributed.cleanup()


def check_summary_name(videos):
    from m3ddm import UserError
    from m3ddm.pipeline import output_stem
    for video in videos:
        if output_stem(video) == Path(SUMMARY).stem:
            raise UserError(f"Input {video} would write its run record to {SUMMARY}, the name of the torchrun job's "
                            "summary; rename the video or run it on its own.")


class Sampling:
    """One sample.py run over a list of videos, on this rank's share of them (all of them without torchrun)."""

    def __init__(self, args, world, ratios, options, weights):
        import torch
        from m3ddm.weights import load_unet, load_vae
        self.args, self.world, self.ratios, self.options, self.weights = args, world, ratios, options, weights
        self.device = world.device
        from m3ddm.weights import DTYPES
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if args.plain and args.dtype not in (None, "fp32"):
            say(f"note: --plain runs the reference-shaped path in fp32; --dtype {args.dtype} is not used.")
        self.dtype = torch.float32 if args.plain else dtype
        say_early(f"loading {weights['unet'].name} and {weights['vae'].name} on {self.device} "
                  f"({str(self.dtype).replace('torch.', '')})")
        self.unet = load_unet(weights["unet"], device=self.device, dtype=self.dtype)
        self.vae = load_vae(weights["vae"], device=self.device, dtype=self.dtype)
        self.start = time.perf_counter()

    def run(self, videos: list) -> int:
        from m3ddm import distributed
        mine, infos, costs = self.my_share(videos)
        results = [self.one(i, videos, infos.get(i)) for i in mine]
        parts = distributed.gather_to_main(self.world, {"rank": self.world.rank, "device": str(self.device),
                                                         "seconds": round(time.perf_counter() - self.start, 3),
                                                         "videos": results})
        code = self.report(parts, videos, costs) if self.world.is_main else 0
        distributed.barrier(self.world)          # rank 0 has written run.json before any rank exits
        return code                              # rank 0 alone says how the job went (0, 1 or 2)

    def my_share(self, videos: list) -> tuple:
        """(this rank's video indices, {index: VideoInfo} of those already probed, every video's cost). Under
        torchrun the videos are probed round robin, shared, and split by the clips left to run."""
        from m3ddm import distributed
        if self.world.size == 1:
            return list(range(len(videos))), {}, None
        say_early(f"[rank {self.world.rank}] reading {len(videos[self.world.rank::self.world.size])} of the "
                  f"{len(videos)} videos, to split them by cost")
        looked = distributed.map_over_ranks(self.world, self.look, videos)
        costs = [cost for _, cost in looked]
        mine = distributed.shard_by_cost(costs, self.world.size)[self.world.rank]
        return mine, {i: looked[i][0] for i in mine if looked[i][0] is not None}, costs

    def look(self, video) -> tuple:
        """(VideoInfo or None, expected cost: 1 + 16 x the clips still to run) of one video."""
        from m3ddm import UserError
        from m3ddm.pipeline import CLIP_LEN, check_existing, plan_video, remaining_clips
        from m3ddm.video import probe
        try:
            info = probe(video)
            job = plan_video(video, self.args.out, self.ratios, self.options, self.unet, self.vae, self.dtype,
                             self.weights, info)
            if check_existing(job, self.args.overwrite) is not None:
                return info, 1
            return info, 1 + CLIP_LEN * remaining_clips(job)
        except UserError:
            return None, 1                        # reported by the rank that takes it

    def truth_preview(self, video):
        """With --truth: the pipeline's preview writer for truth | input | output (one input, one ratio)."""
        if self.args.truth is None:
            return None
        from m3ddm.demo import preview
        return lambda png, outputs: preview(self.args.truth, video, next(iter(outputs.values())), png, quiet=True)

    def one(self, i: int, videos: list, info) -> dict:
        """Outpaint video i; a failure is reported and recorded, and the run goes on (a single video in a plain
        process raises, as before)."""
        from m3ddm import UserError
        from m3ddm.pipeline import outpaint_video, progress_to_stderr
        video, n = videos[i], len(videos)
        rank = f"[rank {self.world.rank}] " if self.world.size > 1 else ""
        prefix = f"{rank}[{video.name}{f' {i + 1}/{n}' if n > 1 else ''}] "
        entry, t0, show = {"index": i, "input": str(video), "rank": self.world.rank}, time.perf_counter(), \
            progress_to_stderr(prefix)
        if info is None:
            say_early(f"{prefix}reading the video (it is decoded once to count its frames)")
        try:
            record = outpaint_video(video, self.args.out, self.unet, self.vae, self.ratios, self.options,
                                    device=self.device, dtype=self.dtype, weights=self.weights, progress=show,
                                    argv=dict(vars(self.args)), overwrite=self.args.overwrite, info=info,
                                    preview=self.truth_preview(video))
        except Exception as e:
            if self.world.size == 1 and n == 1:
                raise
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
            show(f"error: {e}")
            from m3ddm.distributed import free_cached_memory
            free_cached_memory(self.device)       # e.g. after running out of GPU memory on a long video
            return {**entry, "status": "failed", "error": str(e), "bad_input": isinstance(e, UserError),
                    "seconds": round(time.perf_counter() - t0, 3)}
        if record["status"] == "skipped":
            show(f"done already: {Path(record['record']).name} matches these settings and weights; skipped")
        for ratio, note in record["skipped_ratios"].items():
            show(f"note: {ratio} skipped: {note}")
        if self.world.size == 1:
            for path in record["outputs"].values():
                print(path, flush=True)
        return {**entry, "status": record["status"], "outputs": record["outputs"], "record": record["record"],
                "resumed_from_clip": record.get("resumed_from_clip", 0), "seconds": round(time.perf_counter() - t0, 3)}

    def report(self, parts: list, videos: list, costs) -> int:
        """Rank 0: under torchrun run.json and the output paths in input order; a last line when videos failed.
        Returns the exit code: 0; 2 when videos failed on bad input; 1 when one failed otherwise (a bug)."""
        from m3ddm import __version__
        from m3ddm.files import write_atomic
        entries = sorted((e for part in parts for e in part["videos"]), key=lambda e: e["index"])
        failed = [e for e in entries if e["status"] == "failed"]
        if self.world.size > 1:
            summary = {"m3ddm_version": __version__, "world_size": self.world.size, "arguments": dict(vars(self.args)),
                       "seconds": round(time.perf_counter() - self.start, 3), "failed": len(failed),
                       "ranks": [{k: part[k] for k in ("rank", "device", "seconds")} for part in parts],
                       "videos": [{**e, "expected_cost": costs[e["index"]]} for e in entries]}
            target = Path(self.args.out) / SUMMARY
            write_atomic(target, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1, default=str) + "\n"))
            for e in entries:
                for path in e.get("outputs", {}).values():
                    print(path, flush=True)
            say(f"{SUMMARY}: {target}")
        if not failed:
            return 0
        names = ", ".join(Path(e["input"]).name for e in failed[:5]) + (", ..." if len(failed) > 5 else "")
        rest = "; the others are done" if len(failed) < len(entries) else ""
        say(f"error: {len(failed)} of {len(entries)} videos failed ({names}){rest}.")
        return 2 if all(e["bad_input"] for e in failed) else 1


if __name__ == "__main__":
    sys.exit(main())
