"""python -m m3ddm.bench_fullsize: the released configuration through the user's path, on the CPU, measured.

Random weights of the released shapes (UNet 1.30 B parameters, SD-1.5 VAE) are written as diffusers-style
folders, converted with `weights_convert.py` (fp32, fp16, bf16), loaded, and run through `sample.py` on a
short real clip (one 16-frame clip, 128 px, 2 DDIM steps). Every step is its own process, so its wall time
and peak RSS (the child's ru_maxrss from wait4) are its own:

    python -m m3ddm.bench_fullsize --video clip.mp4 --out out/fullsize [--sample-dtypes fp32,bf16]

Writes OUT/fullsize_cpu.json and prints a table. Needs about 20 GB of disk (sources, 3 conversions) and
one process of up to ~6.5 GiB at a time. tests/test_full_size.py runs the same functions.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import UserError
from .synthetic import model_shapes, write_random_folder
from .unet3d import UNET_PRESETS
from .vae import VAE_PRESETS

ROOT = Path(__file__).resolve().parent.parent
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def run_measured(cmd, env=None, cwd=None) -> dict:
    """Run cmd to completion: {cmd, rc, wall_s, peak_rss_bytes, stdout, stderr} (peak RSS of that process)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env, cwd=cwd or ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"cmd": [str(c) for c in cmd], "rc": proc.returncode, "wall_s": round(wall, 2),
                "peak_rss_bytes": int(peak), "stdout": out.read(), "stderr": err.read()}


def write_sources(folder, seed=0, unet_shapes=None, unet_config=None) -> tuple:
    """(unet folder, vae folder) of random fp32 weights, diffusers-style. unet_shapes/unet_config default
    to the `full` preset's; tests pass the released checkpoint's key manifest and config.json."""
    folder = Path(folder)
    unet = write_random_folder(folder / "unet", "unet", unet_config or UNET_PRESETS["full"], unet_shapes, seed)
    vae_shapes = model_shapes("vae", VAE_PRESETS["sd15"])
    vae = write_random_folder(folder / "vae", "vae", VAE_PRESETS["sd15"], vae_shapes, seed + 1)
    return unet, vae


def convert(kind, src, out, dtype="fp32") -> dict:
    return run_measured([sys.executable, ROOT / "weights_convert.py", kind, src, out, "--dtype", dtype, "--force"])


def measure_load(path, dtype) -> dict:
    """load_unet/load_vae of one file in a fresh process: {load_s, peak_rss_bytes, ...}."""
    r = run_measured([sys.executable, "-m", "m3ddm.bench_fullsize", "load", path, "--dtype", dtype])
    if r["rc"] == 0:
        r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def sample(video, unet, vae, out, dtype, size=128, steps=2, frames=16, extra=()) -> dict:
    """sample.py on the first `frames` frames of video (one clip), DDIM, --ratio 1:1, CPU."""
    return run_measured([sys.executable, ROOT / "sample.py", video, "--ratio", "1:1", "--out", out,
                         "--unet", unet, "--vae", vae, "--size", size, "--scheduler", "ddim", "--steps", steps,
                         "--limit-frames", frames, "--device", "cpu", "--dtype", dtype, *extra])


def _load_main(path, dtype):
    from .weights import DTYPES, load_unet, load_vae, read_header
    kind = read_header(path)[0]
    t0 = time.perf_counter()
    model = (load_unet if kind == "unet" else load_vae)(path, "cpu", DTYPES[dtype])
    seconds = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    dtypes = {}
    for t in model.state_dict().values():
        if t.is_floating_point():
            name = str(t.dtype).replace("torch.", "")
            dtypes[name] = dtypes.get(name, 0) + t.numel()
    print(json.dumps({"kind": kind, "load_s": round(seconds, 2), "parameters": n, "dtypes": dtypes}))


# ----------------------------------------------------------------------------------------------------


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


def summary(name, r) -> dict:
    keep = {k: v for k, v in r.items() if k not in ("stdout", "stderr")}
    keep["name"] = name
    if r["rc"] != 0:
        keep["error"] = r["stderr"].strip().splitlines()[-1:] if r["stderr"].strip() else ["no output"]
    return keep


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, files = [], {}

    def step(name, r):
        rows.append(summary(name, r))
        print(f"[fullsize] {name}: rc {r['rc']}, {r['wall_s']:.1f} s, peak RSS {gib(r['peak_rss_bytes'])}",
              file=sys.stderr, flush=True)
        if r["rc"] != 0:
            raise UserError(f"{name} failed: {rows[-1]['error'][0]}")
        return r

    t0 = time.perf_counter()
    unet_src, vae_src = write_sources(out / "sources", args.seed)
    rows.append({"name": "write random diffusers folders", "rc": 0, "wall_s": round(time.perf_counter() - t0, 2)})
    step("convert vae fp32", convert("vae", vae_src, out / "vae_fp32.safetensors", "fp32"))
    for dtype in args.convert_dtypes:
        step(f"convert unet {dtype}", convert("unet", unet_src, out / f"unet_{dtype}.safetensors", dtype))
        files[dtype] = out / f"unet_{dtype}.safetensors"
    if not args.keep_sources:
        for f in (unet_src / "diffusion_pytorch_model.safetensors", vae_src / "diffusion_pytorch_model.safetensors"):
            f.unlink()
    sizes = {f"unet_{d}": p.stat().st_size for d, p in files.items()}
    sizes["vae_fp32"] = (out / "vae_fp32.safetensors").stat().st_size
    loads = {}
    for dtype, path in files.items():
        r = step(f"load unet {dtype} file as {dtype}", measure_load(path, dtype))
        loads[dtype] = r.get("load_s")
    for dtype in args.sample_dtypes:
        source = files.get(dtype) or files["fp32"]
        step(f"sample {dtype} ({source.name})", sample(args.video, source, out / "vae_fp32.safetensors",
                                                     out / f"sample_{dtype}", dtype, args.size, args.steps))
    return {"machine": {"torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()]},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "command"},
            "file_bytes": sizes, "load_s": loads, "steps": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m3ddm.bench_fullsize", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    load = sub.add_parser("load", help="time one load_unet/load_vae (used by the benchmark)")
    load.add_argument("file")
    load.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    p.add_argument("--video", help="a real clip of at least 16 frames (default: the cached pyfeat_single_face.mp4)")
    p.add_argument("--out", default="out/fullsize", help="work and result folder (default out/fullsize)")
    p.add_argument("--convert-dtypes", default="fp32,fp16,bf16")
    p.add_argument("--sample-dtypes", default="fp32,bf16")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-sources", action="store_true", help="keep the 5.5 GB random diffusers folders")
    args = p.parse_args(argv)
    try:
        if args.command == "load":
            _load_main(args.file, args.dtype)
            return 0
        args.convert_dtypes = [d for d in args.convert_dtypes.split(",") if d]
        args.sample_dtypes = [d for d in args.sample_dtypes.split(",") if d]
        if "fp32" not in args.convert_dtypes or not set(args.convert_dtypes + args.sample_dtypes) <= set(DTYPE_NAMES):
            raise UserError(f"--convert-dtypes must include fp32 and both lists use {', '.join(DTYPE_NAMES)}.")
        args.video = Path(args.video or Path.home() / ".cache" / "m3ddm" / "real_videos" / "pyfeat_single_face.mp4")
        if not args.video.is_file():
            raise UserError(f"--video {args.video} does not exist; give a clip of at least 16 frames "
                            "(or fetch the test clips: make videos).")
        result = run_all(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) / "fullsize_cpu.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    for row in result["steps"]:
        rss = gib(row["peak_rss_bytes"]) if "peak_rss_bytes" in row else "-"
        print(f"{row['name']:<44} {row['wall_s']:>8.1f} s  {rss:>10}")
    for name, n in result["file_bytes"].items():
        print(f"{name + ' file':<44} {n / 1e9:>8.2f} GB")
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
