"""Video clips for training: the video folder, clip sampling, crops, decoding, the clip dataset, its sampler;
the video lists and centre crops that evaluate.py and the demo recipe share.

    train, val = split_videos("DATA")          # DATA/train and DATA/val, or everything is train
    spec = ClipSpec(size=128, frames=16, global_frames=16, seed=6)
    loader = clip_loader(ClipDataset(train, spec), batch_size=1, start=0, count=1000)

Randomness: every sample n of rank r draws everything (video order aside) from its own generator, seeded
from (seed, stream, n * world_size + r): stride, start, crop, masks, guide case, condition dropout, and the
item's "seed" from which the trainer draws the VAE posterior sample, timestep and noise. A stream is thus a
pure function of the seed and the sample counter, whatever the number of DataLoader workers, and resuming
from a sample number is exact.

Fixed reference bugs (spec training.md 1.3, 1.4): clips are `start + k * stride` with room for every frame
(never padded copies of the last frame); global frames can be masked so they never show the region to
generate (mask_global_frames "all").
"""
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from . import masks as M
from . import video
from .errors import UserError
from .schedule import global_frame_indices

TRAIN_STREAM, VAL_STREAM = 0, 1


@dataclass
class ClipSpec:
    """What one training sample is: square size, clip and global frame counts, clip sampling, crop, masks,
    condition-dropout probabilities, the seed, and how videos are decoded (train.py's options of the same name)."""
    size: int = 128
    frames: int = 16
    global_frames: int = 16
    max_stride: int = 30
    crop: str = "random"                 # "random" (resized crop shared by the clip's frames) or "center"
    crop_scale: tuple = (0.08, 1.0)
    mask_strategy: str = "m3ddm_plus"
    guide_case_weights: tuple = M.MaskSpec().guide_case_weights   # all masked / first and last raw / random raw
    mask_global_frames: str = "all"
    p_uncond_local: float = 0.0
    p_uncond_global: float = 0.0
    seed: int = 6
    decode_short_side: int = 0           # ffmpeg downscales to this short side while decoding (0 = native)
    cache_videos: bool = False           # decode each video once and keep it in memory (per worker)


# ---------------------------------------------------------------------------------------------------
# Videos


def find_videos(folder) -> list:
    """Video files under folder, searched recursively, sorted."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in video.VIDEO_EXTENSIONS and p.is_file())


def list_videos(inputs, option=None) -> list:
    """Video files named, or found (not recursively) in named folders, as Paths: what evaluate.py and
    train.py --eval-videos take. `option` (e.g. "--eval-videos") prefixes the error messages."""
    where = f"{option} " if option else ""
    videos = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in video.VIDEO_EXTENSIONS)
            if not found:
                raise UserError(f"{where}folder {p} holds no videos ({', '.join(video.VIDEO_EXTENSIONS)}); "
                                "point to a folder of video files.")
            videos += found
        elif p.is_file():
            videos.append(p)
        else:
            raise UserError(f"{where}{p} does not exist; give video files or folders of videos.")
    return videos


def split_videos(data, val_data=None):
    """(train videos, val videos): DATA/train and DATA/val when DATA/train exists, else everything is train;
    the videos under val_data (when given) are the validation videos."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder; give a folder of videos (or with train/ and val/).")
    if (data / "train").is_dir():
        train, val = find_videos(data / "train"), find_videos(data / "val") if (data / "val").is_dir() else []
    else:
        train, val = find_videos(data), []
    if not train:
        raise UserError(f"no video files ({', '.join(video.VIDEO_EXTENSIONS)}) found under {data}; "
                        "give a folder that holds videos.")
    return train, find_videos(val_data) if val_data else val


# ---------------------------------------------------------------------------------------------------
# Clip sampling, crops


def clip_indices(num_video_frames: int, clip_frames: int, max_stride: int, generator):
    """(indices, stride): `clip_frames` distinct real frames start + k*stride (the reference's intended rule).

    stride ~ U{1 .. min(max_stride, (N-1) // (F-1))}, start ~ U{0 .. N-1 - (F-1)*stride}; needs N >= F.
    """
    n, f = num_video_frames, clip_frames
    if n < f:
        raise ValueError(f"a clip of {f} frames needs a video of at least {f} frames, received {n}")
    top = max(1, min(max_stride, (n - 1) // max(f - 1, 1)))
    stride = int(torch.randint(1, top + 1, (), generator=generator))
    start = int(torch.randint(0, n - (f - 1) * stride, (), generator=generator))
    return [start + k * stride for k in range(f)], stride


def global_indices(num_video_frames: int, count: int) -> list:
    """np.linspace(0, N-1, G, dtype=int) over the whole video, as the reference and the pipeline."""
    return global_frame_indices(num_video_frames, count) if count else []


def random_resized_crop_box(height, width, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) as RandomResizedCrop chooses it: area fraction ~ U(scale), log aspect ~ U(log ratio),
    up to 10 tries, then a centre crop clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item())
        aspect = math.exp(log_lo + (log_hi - log_lo) * torch.rand((), generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_square_box(height, width):
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(frames: np.ndarray, box, size: int) -> torch.Tensor:
    """uint8 (K, H, W, 3) -> float (K, 3, size, size) in [-1, 1]: crop, then antialiased bilinear resize."""
    top, left, h, w = box
    x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + h, left:left + w])).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Decoding (m3ddm.video; only the needed frames are kept)


def _scaled_frames(path, info, short_side, last=None):
    """Frames 0..last (all if None) as uint8 (K, h, w, 3), downscaled by ffmpeg to a short side <= short_side."""
    import imageio_ffmpeg
    s = int(short_side)
    scale = ["-vf", f"scale='if(gt(iw,ih),-2,min({s},iw))':'if(gt(iw,ih),min({s},ih),-2)'"]
    quiet = logging.getLogger("imageio_ffmpeg")  # it warns that the scale filter changes the frame size
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-fps_mode", "passthrough", *scale])
        w, h = next(reader)["size"]
    finally:
        quiet.setLevel(level)
    frames = []
    try:
        for raw in reader:
            frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
            if last is not None and len(frames) > last:
                break
    finally:
        reader.close()
    if last is not None and len(frames) <= last:
        raise RuntimeError(f"the video ended before frame {last} (probe counted {info.num_frames})")
    return np.stack(frames)


class VideoSource:
    """Frames of the videos of one split, through m3ddm.video (true frame count and exact fps from `probe`).

    Without a cache, each sample decodes its video sequentially up to its last needed frame and keeps only the
    needed ones; since the last global frame is the video's last frame that is in practice the whole video, so
    `--decode-short-side` (ffmpeg downscales while decoding) matters for large videos. Probes are remembered per
    process. With cache=True each video is decoded once (downscaled if asked) and kept in memory, per DataLoader
    worker: for small datasets only."""

    def __init__(self, short_side=0, cache=False):
        self.short_side, self.cache = short_side, cache
        self.info, self.frames = {}, {}

    def length(self, path):
        """(number of frames, fps)."""
        if path not in self.info:
            self.info[path] = video.probe(path)
        if self.cache and path not in self.frames:
            info = self.info[path]
            self.frames[path] = (_scaled_frames(path, info, self.short_side) if self.short_side
                                 else np.stack(list(video.iter_frames(path, info))))
        info = self.info[path]
        return (len(self.frames[path]) if self.cache else info.num_frames), info.fps

    def read(self, path, indices):
        """uint8 (len(indices), H, W, 3)."""
        if self.cache:
            return self.frames[path][indices]
        if self.short_side:
            return _scaled_frames(path, self.info[path], self.short_side, max(indices))[indices]
        return video.read_frames_at(path, indices, self.info[path])


# ---------------------------------------------------------------------------------------------------
# One training sample


def sample_seed(seed: int, stream: int, n: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919_000_003 + int(n) * 2_654_435_761) % (2 ** 63 - 1)


class ClipDataset(Dataset):
    """Item n -> one clip of sample number n (an index into an endless stream, see ClipSampler).

    A video that cannot be decoded or is shorter than the clip is skipped (the next video of the epoch's order
    is used) and reported in the item's "skipped" list; if no video is usable the item carries "error"."""

    def __init__(self, videos, spec: ClipSpec, stream=TRAIN_STREAM, rank=0, world_size=1):
        self.videos, self.o, self.stream = list(videos), spec, stream
        self.rank, self.world_size = rank, world_size
        self.source = VideoSource(spec.decode_short_side, spec.cache_videos)
        self.bad = {}

    def __len__(self):
        return 2 ** 62  # an endless stream; ClipSampler decides which sample numbers are drawn

    def _order(self, epoch):
        g = torch.Generator().manual_seed(sample_seed(self.o.seed, self.stream + 100, epoch))
        return torch.randperm(len(self.videos), generator=g).tolist()

    def __getitem__(self, n):
        n_global = n * self.world_size + self.rank
        v = len(self.videos)
        order = self._order(n_global // v) if self.stream == TRAIN_STREAM else list(range(v))
        skipped = []
        for attempt in range(v):
            path = self.videos[order[(n_global + attempt) % v]]
            if path in self.bad:
                continue
            try:
                item = self._make(path, n_global)
                item["skipped"] = skipped
                return item
            except (ValueError, OSError, RuntimeError) as e:  # unreadable or short: skip, never stop the run
                self.bad[path] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                skipped.append((path, self.bad[path]))
        return {"error": f"none of the {v} videos could be used ({len(self.bad)} unreadable or shorter than "
                         f"{self.o.frames} frames); add readable videos of at least {self.o.frames} frames",
                "skipped": skipped}

    def _make(self, path, n_global):
        o = self.o
        g = torch.Generator().manual_seed(sample_seed(o.seed, self.stream, n_global))
        num, fps = self.source.length(path)
        if num < o.frames:
            raise ValueError(f"only {num} frames, a clip needs {o.frames}")
        clip_idx, stride = clip_indices(num, o.frames, o.max_stride, g)
        glob_idx = global_indices(num, o.global_frames)
        wanted = sorted(set(clip_idx) | set(glob_idx))
        frames = self.source.read(path, wanted)  # uint8 (K, H, W, 3)
        where = {src: k for k, src in enumerate(wanted)}
        height, width = frames.shape[1:3]
        if o.crop == "random":
            box = random_resized_crop_box(height, width, g, tuple(o.crop_scale))
        else:
            box = center_square_box(height, width)
        clip = crop_resize(frames[[where[i] for i in clip_idx]], box, o.size)  # (F, 3, S, S)
        masks = M.sample_clip_masks(o.frames, o.size, o.size, g, o.mask_strategy,
                                    M.MaskSpec(guide_case_weights=tuple(o.guide_case_weights)))
        m = masks.masks[:, None]  # (F, 1, S, S)
        cond = clip * (1 - m) - m  # masked pixels are black (-1); guide frames stay raw
        item = {"clip": clip, "cond": cond, "mask": masks.masks, "guides": masks.guides,
                "fps": int(fps // stride), "seed": int(torch.randint(0, 2 ** 62, (), generator=g)),
                "drop_local": bool(torch.rand((), generator=g) < o.p_uncond_local),
                "drop_global": bool(torch.rand((), generator=g) < o.p_uncond_global),
                "video": os.path.basename(path), "start": clip_idx[0], "stride": stride}
        if glob_idx:
            gm = M.global_frame_masks(o.mask_global_frames, masks, clip_idx, glob_idx)[:, None]  # (G, 1, S, S)
            glob = crop_resize(frames[[where[i] for i in glob_idx]], box, o.size)  # same crop: masks align
            item["global"] = glob * (1 - gm) - gm
        else:
            item["global"] = torch.zeros(0, 3, o.size, o.size)
        return item


def collate(items):
    errors = [it["error"] for it in items if "error" in it]
    skipped = [s for it in items for s in it["skipped"]]
    if errors:
        return {"error": errors[0], "skipped": skipped}
    out = {k: torch.stack([it[k] for it in items]) for k in ("clip", "cond", "mask", "guides", "global")}
    for k in ("fps", "seed", "start", "stride"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.long)
    for k in ("drop_local", "drop_global"):
        out[k] = torch.tensor([it[k] for it in items], dtype=torch.bool)
    out["video"] = [it["video"] for it in items]
    out["skipped"] = skipped
    return out


class ClipSampler(Sampler):
    """Sample numbers start, start+1, ..., start+count-1 (per rank): resuming restarts at the right sample."""

    def __init__(self, start, count):
        self.start, self.count = start, count

    def __iter__(self):
        return iter(range(self.start, self.start + self.count))

    def __len__(self):
        return self.count


def clip_loader(dataset, batch_size, start, count, num_workers=0, pin_memory=False):
    """Batches of `count` samples from sample number `start` on (collated; see ClipSampler)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ClipSampler(start, count), num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)
