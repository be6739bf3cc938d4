"""Outpaint videos to new aspect ratios with M3DDM+.

    python sample.py clip.mp4 --ratio 16:9
    python sample.py videos/ --ratio 16:9,9:16 --out results --unet weights/unet.safetensors --vae weights/vae.safetensors

One mp4 per input and ratio (<stem>_<a>-<b>.mp4, source fps and audio), plus <stem>.json (run record)
and <stem>_preview.png beside it. Progress on stderr, output paths on stdout.
"""
import argparse
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "m3ddm" / "assets"
DEFAULT_UNET = ASSETS / "demo_unet.safetensors"
DEFAULT_VAE = ASSETS / "demo_vae.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Outpaint videos to new aspect ratios with M3DDM+.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, or folders whose videos are all processed")
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
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=["pndm", "ddim"], default="pndm", help="sampler (default pndm, as the reference)")
    p.add_argument("--guidance-local", type=float, default=2.0, help="guidance weight of the masked frames (default 2)")
    p.add_argument("--guidance-global", type=float, default=4.0, help="guidance weight of the global frames (default 4)")
    p.add_argument("--feather", type=int, default=0, help="px over which the source blends into the border (default 0: hard paste)")
    p.add_argument("--keep-resolution", action="store_true", help="output at the source's resolution: source pixels untouched, border upscaled")
    p.add_argument("--vae-sample", action="store_true", help="sample the VAE posterior (seeded) instead of taking its mean")
    p.add_argument("--plain", action="store_true", help="reference-shaped slow path: 4 guidance branches, math attention, fp32")
    return p


def find_videos(inputs) -> list:
    from m3ddm import UserError
    from m3ddm.video import VIDEO_EXTENSIONS
    videos = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                           and not p.name.startswith("."))
            if not found:
                raise UserError(f"Folder {path} holds no video files ({', '.join(VIDEO_EXTENSIONS)}); give a video or another folder.")
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
            raise UserError(f"Inputs {stems[stem]} and {video} would write the same output names ({stem}_*.mp4); "
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from m3ddm import UserError
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no partial output was kept.", file=sys.stderr)
        return 130


def run(args) -> int:
    import torch
    from m3ddm.canvas import parse_ratios
    from m3ddm.pipeline import OutpaintOptions, outpaint_video, progress_to_stderr
    from m3ddm.schedule import parse_strides
    from m3ddm.weights import check_kind, load_unet, load_vae
    from m3ddm import UserError

    ratios = parse_ratios(args.ratio)
    options = OutpaintOptions(size=args.size, strides=parse_strides(args.strides), global_frames=args.global_frames,
                              limit_frames=args.limit_frames, seed=args.seed, scheduler=args.scheduler,
                              steps=args.steps, guidance_local=args.guidance_local,
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
        dtype = torch.float32
    check_kind(unet_path, "unet"), check_kind(vae_path, "vae")   # both, from the headers, before loading either
    unet = load_unet(unet_path, device=device, dtype=dtype)
    vae = load_vae(vae_path, device=device, dtype=dtype)

    record_args = {k: v for k, v in vars(args).items()}
    for i, video in enumerate(videos):
        prefix = f"[{video.name}{f' {i + 1}/{len(videos)}' if len(videos) > 1 else ''}] "
        record = outpaint_video(video, args.out, unet, vae, ratios, options, device=device, dtype=dtype,
                                weights={"unet": unet_path, "vae": vae_path}, progress=progress_to_stderr(prefix),
                                argv=record_args)
        for path in record["outputs"].values():
            print(path, flush=True)
        for ratio, note in record["skipped_ratios"].items():
            print(f"{prefix}note: {ratio} skipped: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
