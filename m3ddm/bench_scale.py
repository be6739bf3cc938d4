"""python -m m3ddm.bench_scale: how sharded sampling scales, and what a long video costs in memory and disk.

    python -m m3ddm.bench_scale sharding [--procs 2] [--videos 6] [--frames 40] [--size 128]
    python -m m3ddm.bench_scale long-video [--frames 500,2000] [--size 256]

sharding: one folder of synthetic videos of different lengths, outpainted by sample.py in one process and then
by torchrun with --procs processes (gloo on the CPU, or one GPU each), one intra-op thread per process on the
CPU; wall times and their ratio, measured in one run. long-video: one synthetic video of each length, each
outpainted in its own process (so that each peak is its own): peak RSS of that process, wall time, and the
work folder's largest size during the run, also per 1,000 frames. Both use the tiny model presets with random
weights (speed and memory do not depend on the weights) and write under --out (default out/bench_scale).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import cli
from .errors import UserError
from .files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
STEP_ARGS = ["--scheduler", "ddim", "--steps", "2", "--global-frames", "4", "--ratio", "1:1"]


def progress(message: str):
    print(f"[bench_scale] {message}", file=sys.stderr, flush=True)


def tiny_weights(folder: Path) -> list:
    """--unet/--vae arguments: the tiny presets with seeded random weights, as m3ddm files."""
    from .bench import build_unet, build_vae
    from .unet3d import UNET_PRESETS
    from .vae import VAE_PRESETS
    from .weights import save_model
    folder.mkdir(parents=True, exist_ok=True)
    unet, vae = folder / "unet.safetensors", folder / "vae.safetensors"
    save_model(unet, build_unet("tiny", 0, torch.device("cpu")).state_dict(), "unet", UNET_PRESETS["tiny"])
    save_model(vae, build_vae("tiny", 0, torch.device("cpu"), torch.float32).state_dict(), "vae", VAE_PRESETS["tiny"])
    return ["--unet", str(unet), "--vae", str(vae)]


def synthetic_video(path: Path, frames: int, width: int = 160) -> Path:
    from .bench import synthetic_frames
    from .video import VideoWriter
    if not path.exists():
        pixels = synthetic_frames(frames, width, seed=frames)
        with VideoWriter(path, pixels.shape[2], pixels.shape[1], 30) as writer:
            for i in range(0, frames, 100):
                writer.write(pixels[i:i + 100])
    return path


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def timed(cmd: list) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# sharding


def bench_sharding(args) -> dict:
    """The same folder through 1 process and through torchrun with args.procs processes."""
    out = Path(args.out) / "sharding"
    weights = tiny_weights(out / "weights")
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    lengths = [max(8, args.frames * (k % 3 + 1) // 2) for k in range(args.videos)]    # different lengths
    for k, n in enumerate(lengths):
        synthetic_video(videos / f"v{k:02d}_{n}f.mp4", n)
    common = [str(videos), *STEP_ARGS, "--size", str(args.size), *weights, "--device", args.device]
    progress(f"{args.videos} videos ({sum(lengths)} frames), 1 process")
    one = timed([sys.executable, "sample.py", *common, "--out", str(out / "one")])
    progress(f"the same, torchrun --nproc_per_node {args.procs}")
    many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
                  "sample.py", *common, "--out", str(out / "many")])
    summary = json.loads((out / "many" / "run.json").read_text())
    return {"videos": args.videos, "frames": lengths, "size": args.size, "procs": args.procs,
            "one_process_s": round(one, 2), "sharded_s": round(many, 2), "speedup": round(one / many, 3),
            "rank_seconds": [r["seconds"] for r in summary["ranks"]]}


# ----------------------------------------------------------------------------------------------------
# long video


def one_video(args) -> dict:
    """In this process: outpaint one video with a work folder; its peak RSS and the work folder's peak size."""
    from .pipeline import OutpaintOptions, outpaint_video
    from .weights import load_unet, load_vae
    weights = {"unet": args.weights[0], "vae": args.weights[1]}
    unet, vae = load_unet(weights["unet"]), load_vae(weights["vae"])
    options = OutpaintOptions(size=args.size, scheduler="ddim", steps=2, global_frames=4)
    t0 = time.perf_counter()
    record = outpaint_video(args.video, args.out, unet, vae, [(1, 1)], options, weights=weights, overwrite=True)
    frames = record["num_output_frames"]
    return {"frames": frames, "clips": record["num_clips"], "size": args.size,
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "work_folder_peak_mib": round(record["work_folder_peak_bytes"] / 2 ** 20, 2),
            "work_folder_mib_per_1000_frames": round(record["work_folder_peak_bytes"] / 2 ** 20 / frames * 1000, 2)}


def bench_long_video(args) -> list:
    out = Path(args.out) / "long_video"
    weights = tiny_weights(out / "weights")
    rows = []
    for n in args.frames_list:
        video = synthetic_video(out / f"synthetic_{n}f.mp4", n)
        progress(f"{n} frames at --size {args.size} in its own process")
        r = subprocess.run([sys.executable, "-m", "m3ddm.bench_scale", "_one-video", str(video), "--size",
                            str(args.size), "--out", str(out / f"out_{n}"), "--weights", weights[1], weights[3]],
                           cwd=ROOT, env=child_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the {n}-frame run failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(description="Sharded sampling and long-video memory/disk on the tiny model.")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sharding", help="1 process vs torchrun --nproc_per_node PROCS on one folder")
    s.add_argument("--procs", type=int, default=2, help="torchrun processes (default 2)")
    s.add_argument("--videos", type=int, default=6, help="synthetic videos (default 6)")
    s.add_argument("--frames", type=int, default=40, help="frames of the shortest-but-one video (default 40)")
    s.add_argument("--size", type=int, default=128, help="--size of sample.py (default 128)")
    s.add_argument("--device", default="cpu", help="cpu (gloo, default) or cuda (one GPU per process)")
    v = sub.add_parser("long-video", help="peak RSS and work-folder size of long synthetic videos")
    v.add_argument("--frames", default="500,2000", help="comma-separated video lengths (default 500,2000)")
    v.add_argument("--size", type=int, default=256, help="--size of the run (default 256)")
    o = sub.add_parser("_one-video")            # the child process of long-video
    o.add_argument("video")
    o.add_argument("--size", type=int, required=True)
    o.add_argument("--weights", nargs=2, required=True)
    for q in (s, v, o):
        q.add_argument("--out", default="out/bench_scale", help="output folder (default out/bench_scale)")
    args = p.parse_args(argv)
    if args.what == "long-video":
        try:
            args.frames_list = [int(x) for x in args.frames.split(",")]
        except ValueError:
            raise UserError(f"--frames {args.frames!r} is not a comma-separated list of frame counts; "
                            "use e.g. 500,2000.") from None
    if args.what == "sharding" and (args.procs < 2 or args.videos < 1):
        raise UserError("sharding needs --procs 2 or more and --videos 1 or more.")
    return args


def run(argv) -> int:
    args = parse_args(argv)
    if args.what == "_one-video":
        print(json.dumps(one_video(args)))
        return 0
    result = bench_sharding(args) if args.what == "sharding" else {"rows": bench_long_video(args)}
    result["load_average"] = os.getloadavg()
    path = Path(args.out) / f"{args.what}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    print(json.dumps(result, indent=1))
    return 0


def main(argv=None) -> int:
    return cli.run(lambda: run(argv), interrupted="partial results were not kept")


if __name__ == "__main__":
    sys.exit(main())
