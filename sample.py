"""Outpaint videos to new aspect ratios with M3DDM+.

    python sample.py clip.mp4 --ratio 16:9
    python sample.py videos/ --ratio 16:9,9:16 --out results --unet weights/unet.safetensors --vae weights/vae.safetensors

One mp4 per input and ratio (<stem>_<a>-<b>.mp4, the source's frame times and audio; a still image
.png/.jpg gives <stem>_<a>-<b>.png/.jpg), plus <stem>.json (run record) and <stem>_preview.png beside it;
<stem> is the name up to its first dot (take.2.mp4 -> take_16-9.mp4).
Progress on stderr, output paths on stdout.
"""
import argparse
import sys
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
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
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
    return cli.run(lambda: run(args), interrupted="no partial output was kept")


def run(args) -> int:
    import torch
    from m3ddm.canvas import parse_ratios
    from m3ddm.pipeline import OutpaintOptions, outpaint_video, progress_to_stderr
    from m3ddm.schedule import parse_strides
    from m3ddm.weights import load_unet, load_vae
    from m3ddm import UserError

    ratios = parse_ratios(args.ratio)
    args.scheduler, args.steps, args.start_timestep = scheduler_and_steps(args)
    options = OutpaintOptions(size=args.size, strides=parse_strides(args.strides), global_frames=args.global_frames,
                              limit_frames=args.limit_frames, seed=args.seed, scheduler=args.scheduler,
                              steps=args.steps, start_timestep=args.start_timestep, guidance_local=args.guidance_local,
                              guidance_global=args.guidance_global, feather=args.feather,
                              keep_resolution=args.keep_resolution, vae_sample=args.vae_sample,
                              plain=args.plain).check()
    from m3ddm.canvas import check_size
    check_size(args.size)
    videos = find_videos(args.inputs)
    unet_path = weights_path(args.unet, DEFAULT_UNET, "UNet")
    vae_path = weights_path(args.vae, DEFAULT_VAE, "VAE")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.plain:
        if args.dtype not in (None, "fp32"):
            print(f"note: --plain runs the reference-shaped path in fp32; --dtype {args.dtype} is not used.",
                  file=sys.stderr)
        dtype = torch.float32
    say_early(f"loading {unet_path.name} and {vae_path.name} on {device} ({str(dtype).replace('torch.', '')})")
    unet = load_unet(unet_path, device=device, dtype=dtype)
    vae = load_vae(vae_path, device=device, dtype=dtype)

    record_args = {k: v for k, v in vars(args).items()}
    for i, video in enumerate(videos):
        prefix = f"[{video.name}{f' {i + 1}/{len(videos)}' if len(videos) > 1 else ''}] "
        show = progress_to_stderr(prefix)
        say_early(f"{prefix}reading the video (it is decoded once to count its frames)")
        record = outpaint_video(video, args.out, unet, vae, ratios, options, device=device, dtype=dtype,
                                weights={"unet": unet_path, "vae": vae_path}, progress=show, argv=record_args)
        for path in record["outputs"].values():
            print(path, flush=True)
        for ratio, note in record["skipped_ratios"].items():
            show(f"note: {ratio} skipped: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
