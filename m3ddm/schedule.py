"""The coarse-to-fine clip schedule of M3DDM+ (spec pipeline.md section 4), in plain Python.

A video of N frames is outpainted in 16-frame clips. When N >= 50 the stages use strides 15, 5, 1:
the stride-15 stage generates keyframes over the whole video, later stages fill in between them,
reusing every frame that already has a stored latent as a *guide*. Consecutive clips of a stage start
15 grid units apart, so they share one frame. Short clips are padded with the last video frame N-1.

Rules (reference behaviour, with its frame-limit counter bug fixed):
- Latents: first writer wins. A frame's stored latent is the one from the first clip that generates it
  (the first occurrence inside that clip); any later clip containing the frame uses it as a guide.
- Pixels: last writer wins. A frame's output pixels come from the last clip that contains it (always a
  stride-1 clip), at its first position in that clip.
- Every frame gets its stride-1 pass and the output has exactly N frames. (The reference counts
  stride-1 clips in steps of 16 while they advance by 15 and stops early, which drops or corrupts tail
  frames for most N, e.g. N = 300 gives 299 frames; that counter is not reproduced.)
- N = 1: one clip of frame 0 padded to 16, stride 1, no guides (the reference crashes).
- `limit_frames=L` with L < N: strides [1]; clips are added until frames 0..L-1 are all covered and
  exactly L frames are output. The clips are the reference's clips (frames of the real video, padded
  with N-1); the reference runs ceil(L/16) clips instead, which misses frames for some L (e.g. L = 32
  outputs only frames 0..30 in the reference; here it runs a third clip). L >= N means no limit.

Each `Clip` also says which frames become final after it (`final`: the pipeline can decode, composite
and write them right away) and which stored latents / cached inputs no later clip needs (`release`), so
host memory stays bounded on long videos.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import UserError

CLIP_LEN = 16             # frames per clip
CLIP_STEP = 15            # clip start step in grid units (consecutive clips share one frame)
MIN_FRAMES_FOR_COARSE = 50  # below this only the stride-1 stage runs
DEFAULT_STRIDES = (15, 5, 1)


@dataclass(frozen=True)
class Clip:
    """One 16-frame clip of the schedule.

    index: position in execution order.
    stride: grid stride s of its stage; also the fps divisor (UNet fps = int(fps // s), see `unet_fps`).
    start: start position in grid units (the clip begins at source frame start*s).
    frames: the 16 source frame indices, grid[start:start+16] padded with N-1.
    guide: 16 bools; True = the frame already has a stored latent (mask 0, stored latent as conditioning).
    guide_source: per position, (clip index, position) of the stored latent a guide reuses, else None.
    store: positions whose final latent becomes the stored latent of frames[k] (first writer wins;
        only the first occurrence of a padded duplicate).
    final: (frame, position) pairs, in frame order: output frames whose pixels are final after this
        clip, taken from that position of this clip's decoded output.
    release: frames that no later clip uses (neither as guide nor as input): their stored latent and
        any cached per-frame inputs can be dropped after this clip.
    """
    index: int
    stride: int
    start: int
    frames: tuple
    guide: tuple
    guide_source: tuple
    store: tuple
    final: tuple
    release: tuple

    @property
    def fps_divisor(self) -> int:
        return self.stride


@dataclass(frozen=True)
class Schedule:
    """The whole run: `num_frames` source frames, `num_output` output frames (N, or L with a limit),
    the strides actually used, and the clips in execution order."""
    num_frames: int
    num_output: int
    strides: tuple
    clips: tuple

    def frames_needed(self) -> list:
        """Sorted source frame indices that appear in any clip (the frames the pipeline must read)."""
        return sorted({f for clip in self.clips for f in clip.frames})


def unet_fps(fps: float, stride: int) -> int:
    """The UNet fps conditioning of a clip: the reference passes `fps // stride` (float floor
    division of the average fps), later cast to int. 29.97 fps gives 1 / 5 / 29 at strides 15 / 5 / 1."""
    return int(fps // stride)


def global_frame_indices(num_frames: int, num_global: int = 16) -> list:
    """`np.linspace(0, N-1, G, dtype=int)` in plain Python: G indices spread over the video, floored.

    Matches numpy bit for bit: numpy computes i * ((N-1)/(G-1)) and sets the last value to N-1."""
    if num_frames < 1:
        raise UserError(f"The video has {num_frames} frames; it needs at least 1 frame.")
    if num_global < 1:
        raise UserError(f"num_global_frames is {num_global}; use 1 or more (16 is the default).")
    if num_global == 1:
        return [0]
    step = (num_frames - 1) / (num_global - 1)
    return [int(i * step) for i in range(num_global - 1)] + [num_frames - 1]


def parse_strides(text: str) -> tuple:
    """'15,5,1' -> (15, 5, 1). Positive whole numbers ending with 1, without repeats."""
    try:
        strides = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise UserError(f"--strides {text!r} is not a comma-separated list of whole numbers; "
                        "use e.g. 15,5,1.") from None
    return _check_strides(strides)


def _check_strides(strides: Sequence[int]) -> tuple:
    strides = tuple(int(s) for s in strides)
    if not strides or any(s < 1 for s in strides) or strides[-1] != 1 or len(set(strides)) != len(strides):
        raise UserError(f"strides {list(strides)} are invalid; use distinct positive whole numbers "
                        "ending with 1, e.g. 15,5,1.")
    return strides


def build_schedule(num_frames: int, strides: Sequence[int] = DEFAULT_STRIDES,
                   limit_frames: Optional[int] = None) -> Schedule:
    """The intended M3DDM+ schedule for a video of `num_frames` frames.

    strides: coarse-to-fine grid strides, used only when N >= 50 and no limit applies (else [1]).
    limit_frames: None or -1 = all frames; L >= 1 with L < N = output only frames 0..L-1 (stride 1).
    """
    n = int(num_frames)
    if n < 1:
        raise UserError(f"The video has {n} frames; it needs at least 1 frame.")
    strides = _check_strides(strides)
    if limit_frames is None or limit_frames == -1 or limit_frames >= n:
        num_output = n
    elif limit_frames < 1:
        raise UserError(f"limit_frames is {limit_frames}; use a positive number of frames, or -1 for all.")
    else:
        num_output = int(limit_frames)
    if n < MIN_FRAMES_FOR_COARSE or num_output < n:
        strides = (1,)

    raw = []                         # (stride, start, frames) in execution order
    for s in strides:
        grid = list(range(0, n, s))
        # stride 1 must cover frames 0..num_output-1; coarser stages use the reference's range
        stop = max(num_output - 1, 1) if s == 1 else n // s - 1
        for start in range(0, stop, CLIP_STEP):
            frames = grid[start:start + CLIP_LEN]
            frames += [n - 1] * (CLIP_LEN - len(frames))
            raw.append((s, start, tuple(frames)))

    last_clip = {}                   # frame -> index of the last clip containing it
    for c, (_, _, frames) in enumerate(raw):
        for f in frames:
            last_clip[f] = c

    stored = {}                      # frame -> (clip index, position) of its stored latent
    clips = []
    for c, (s, start, frames) in enumerate(raw):
        guide = tuple(f in stored for f in frames)
        guide_source = tuple(stored.get(f) for f in frames)
        store = []
        for k, f in enumerate(frames):
            if f not in stored:
                stored[f] = (c, k)
                store.append(k)
        first_pos = {}
        for k, f in enumerate(frames):
            first_pos.setdefault(f, k)
        done = sorted(f for f in first_pos if last_clip[f] == c)
        final = tuple((f, first_pos[f]) for f in done if f < num_output)
        clips.append(Clip(index=c, stride=s, start=start, frames=frames, guide=guide,
                          guide_source=guide_source, store=tuple(store), final=final,
                          release=tuple(done)))
    return Schedule(num_frames=n, num_output=num_output, strides=tuple(strides), clips=tuple(clips))
