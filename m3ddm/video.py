"""Video I/O on the ffmpeg binary of imageio-ffmpeg: probe, streaming reader, H.264 writer with audio copy.

- `probe(path)` decodes the video stream once to get the TRUE frame count (container headers and packet
  counts can be off: nodeopencv_motion.mov has 243 packets but 242 frames) and reads the packet
  timestamps (no decode) for the exact average frame rate as a Fraction (26777/1000, 30000/1001, ...).
- `iter_frames(path)` / `iter_batches(path, n)` stream uint8 RGB frames (H, W, 3); only one frame or
  batch is in memory at a time. `read_frames_at(path, indices)` decodes sequentially and keeps only the
  wanted frames (stopping after the last one), for the global frames.
- `VideoWriter` encodes H.264 yuv420p mp4 (crf 17, preset medium) at the exact source frame rate into a
  temporary file next to the target, copies the source audio in a second ffmpeg call (video stream
  copied, audio copied when it is aac/mp3, else re-encoded to aac) and renames on success.

Frames are decoded with `-fps_mode passthrough`: every decoded frame is delivered once, none is
duplicated or dropped to make the rate constant. Rotation metadata is applied by ffmpeg (autorotate),
and the reported width/height are those of the delivered frames. Pixels are treated as square.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import imageio_ffmpeg
import numpy as np

from .errors import UserError

MP4_AUDIO_COPY = ("aac", "mp3")   # audio codecs copied as they are into the mp4; others -> aac
DEFAULT_CRF = 17
DEFAULT_PRESET = "medium"
_STANDARD_RATES = [Fraction(k) for k in (12, 15, 24, 25, 30, 48, 50, 60, 90, 100, 120)] + \
                  [Fraction(k * 1000, 1001) for k in (24, 30, 48, 60, 120)]

PathLike = Union[str, os.PathLike]


# file suffixes taken as videos when a folder is scanned (sample, evaluate, train, demo)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".mpg", ".mpeg", ".webm", ".m4v", ".wmv", ".flv", ".ts")


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` found. width/height are those of the decoded frames; num_frames is the true
    decoded count; fps is the average frame rate (fps_fraction exactly)."""
    path: str
    width: int
    height: int
    num_frames: int
    fps: float
    fps_fraction: Fraction
    codec: str
    has_audio: bool
    audio_codec: Optional[str]
    duration: float          # num_frames / fps, seconds

    @property
    def hw(self) -> tuple:
        return (self.height, self.width)


def _check_input(path: PathLike) -> str:
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"Input video {path} does not exist; check the path.")
    if os.path.isdir(path):
        raise UserError(f"Input video {path} is a folder; give the path of a video file.")
    return path


def _run_ffmpeg(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", *args],
                          capture_output=True, text=True, errors="replace")


def _stream_lines(log: str, section: str) -> list:
    """Stream description lines of the 'Input #0' or 'Output #0' section of an ffmpeg log."""
    lines, inside = [], False
    for line in log.splitlines():
        if line.startswith("Input #") or line.startswith("Output #"):
            inside = line.startswith(section)
        elif inside and line.lstrip().startswith("Stream #"):
            lines.append(line)
    return lines


def _codec_of(line: str, kind: str) -> str:
    return line.split(f"{kind}: ", 1)[1].split()[0].rstrip(",")


def _size_of(line: str) -> tuple:
    m = re.search(r"[ ,](\d{1,6})x(\d{1,6})[ ,\[]", line + " ")
    if not m:
        raise UserError(f"Could not read the frame size from ffmpeg's stream line {line.strip()!r}; "
                        "re-encode the video with ffmpeg and try again.")
    return int(m.group(1)), int(m.group(2))


def _packet_fps(path: str) -> Optional[Fraction]:
    """Average frame rate from the video packets' timestamps (stream copy, no decoding)."""
    r = _run_ffmpeg(["-v", "error", "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"])
    tb, pts, durations = None, [], []
    for line in r.stdout.splitlines():
        if line.startswith("#tb 0:"):
            tb = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [x.strip() for x in line.split(",")]
            pts.append(int(fields[2]))
            durations.append(int(fields[3]))
    if tb is None or not pts:
        return None
    if sum(durations) > 0:
        return Fraction(len(durations)) / (sum(durations) * tb)
    if len(pts) > 1 and max(pts) > min(pts):
        return Fraction(len(pts) - 1) / ((max(pts) - min(pts)) * tb)
    return None


def _nice_rate(rate: Fraction) -> Fraction:
    """Snap a measured rate to a standard one within 0.02 % (29.9665 -> 30000/1001), else keep it
    with a denominator of at most 1001 (26.777 -> 26777/1000)."""
    for standard in _STANDARD_RATES:
        if abs(rate / standard - 1) < 2e-4:
            return standard
    return rate.limit_denominator(1001)


def probe(path: PathLike) -> VideoInfo:
    """Inspect a video file: true frame count (by decoding), exact average fps, size, codecs, audio.

    Raises UserError for a missing file, a file ffmpeg cannot read, a file without a video stream and
    a video with no decodable frame."""
    path = _check_input(path)
    r = _run_ffmpeg(["-i", path, "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "null", "-"])
    inputs = _stream_lines(r.stderr, "Input #0")
    video_lines = [line for line in inputs if " Video: " in line]
    if not inputs or not video_lines:
        if "Invalid data" in r.stderr or not inputs:
            raise UserError(f"{path} could not be read as a video by ffmpeg; give an mp4/mov/avi/mkv/mpg file.")
        raise UserError(f"{path} has no video stream; give a file that contains video.")
    counts = re.findall(r"frame=\s*(\d+)", r.stderr)
    num_frames = int(counts[-1]) if counts else 0
    if num_frames == 0:
        raise UserError(f"{path} has no decodable video frames; check that the file is complete.")
    outputs = [line for line in _stream_lines(r.stderr, "Output #0") if " Video: " in line]
    width, height = _size_of(outputs[0] if outputs else video_lines[0])
    audio_lines = [line for line in inputs if " Audio: " in line]
    audio_codec = _codec_of(audio_lines[0], "Audio") if audio_lines else None

    rate = _packet_fps(path)
    if rate is None:                       # fall back on the rate ffmpeg prints (2 decimals)
        m = re.search(r"([\d.]+) (?:fps|tbr)", video_lines[0])
        if not m or float(m.group(1)) <= 0:
            raise UserError(f"{path} has no usable frame rate; re-encode it with a constant frame rate.")
        rate = Fraction(m.group(1))
    rate = _nice_rate(rate)
    return VideoInfo(path=path, width=width, height=height, num_frames=num_frames, fps=float(rate),
                     fps_fraction=rate, codec=_codec_of(video_lines[0], "Video"),
                     has_audio=audio_codec is not None, audio_codec=audio_codec,
                     duration=float(num_frames / rate))


def iter_frames(path: PathLike, info: Optional[VideoInfo] = None) -> Iterator[np.ndarray]:
    """Yield every frame of the video in order as a uint8 RGB array (H, W, 3), one at a time.

    The ffmpeg process is stopped when the generator is closed or garbage-collected early."""
    path = _check_input(path)
    info = info or probe(path)
    frame_bytes = info.width * info.height * 3
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0",
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        count = 0
        try:
            while True:
                buf = bytearray(frame_bytes)   # a fresh writable buffer per frame
                view, got = memoryview(buf), 0
                while got < frame_bytes:
                    n = proc.stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got < frame_bytes:
                    break
                count += 1
                yield np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if count == 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise UserError(f"{path} gave no frames when decoded ({msg[0]}); check that the file is complete.")


def iter_batches(path: PathLike, batch: int, info: Optional[VideoInfo] = None) -> Iterator[np.ndarray]:
    """Yield the video in order as uint8 batches (n, H, W, 3) with n = batch (the last may be shorter)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    frames = []
    for frame in iter_frames(path, info):
        frames.append(frame)
        if len(frames) == batch:
            yield np.stack(frames)
            frames = []
    if frames:
        yield np.stack(frames)


def read_frames_at(path: PathLike, indices: Sequence[int], info: Optional[VideoInfo] = None) -> np.ndarray:
    """Frames at the given indices (any order, repeats allowed) as uint8 (len(indices), H, W, 3).

    Decodes sequentially up to the largest index and keeps only the wanted frames."""
    info = info or probe(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return np.zeros((0, info.height, info.width, 3), np.uint8)
    if wanted[0] < 0 or wanted[-1] >= info.num_frames:
        raise ValueError(f"frame indices must be in [0, {info.num_frames - 1}], got {wanted[0]}..{wanted[-1]}")
    wanted_set, kept = set(wanted), {}
    frames = iter_frames(path, info)
    try:
        for i, frame in enumerate(frames):
            if i in wanted_set:
                kept[i] = frame
            if i >= wanted[-1]:
                break
    finally:
        frames.close()
    missing = [i for i in wanted if i not in kept]
    if missing:
        raise UserError(f"{info.path} ended before frame {missing[0]} (probe counted {info.num_frames}); "
                        "re-encode the video with ffmpeg and try again.")
    return np.stack([kept[int(i)] for i in indices])


def _audio_codec_args(audio_codec: str) -> list:
    if audio_codec in MP4_AUDIO_COPY:
        return ["-c:a", "copy"]
    return ["-c:a", "aac", "-b:a", "192k"]


class VideoWriter:
    """H.264 (libx264, yuv420p) mp4 writer; use as a context manager or call close().

    path: final file name; nothing exists under it until close() succeeds.
    width, height: frame size, both even (yuv420p needs it).
    fps: frame rate (float or Fraction; floats are turned into the nearest simple fraction).
    audio_from: optional source video whose first audio track is copied into the output (trimmed to
        the video's length). If that copy fails, the video is kept without audio and a warning says why.
    crf, preset: x264 quality (17 = visually lossless) and speed.

    write(frames) takes uint8 (H, W, 3) or (n, H, W, 3) RGB numpy arrays. On an exception inside the
    `with` block, or abort(), the temporary files are deleted and the target is left untouched.
    """

    def __init__(self, path: PathLike, width: int, height: int, fps, audio_from: Optional[PathLike] = None,
                 crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET):
        if width % 2 or height % 2 or width < 2 or height < 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
        self.path = Path(path)
        if audio_from is not None and self.path.exists() and os.path.samefile(self.path, audio_from):
            raise UserError(f"Output {self.path} is the input video; choose another output name.")
        if not self.path.parent.is_dir():
            raise UserError(f"Output folder {self.path.parent} does not exist; create it first.")
        self.width, self.height = int(width), int(height)
        self.fps = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(100000)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.audio_from = None if audio_from is None else str(audio_from)
        self.num_frames = 0
        self.audio_note = None       # why the audio was not copied, if it was not
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".part.mp4")
        os.close(fd)
        self._err = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
               "-r", str(self.fps), "-i", "-",
               "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-movflags", "+faststart", "-f", "mp4", self._tmp]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err)
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames (n, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError:
            raise RuntimeError(f"ffmpeg stopped while writing {self.path}: {self._stderr()}") from None
        self.num_frames += len(frames)

    def _stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()[-2000:]

    def abort(self) -> None:
        """Stop ffmpeg and delete the temporary files; the target file is not touched."""
        if self._closed:
            return
        self._closed = True
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._err.close()
        _remove(self._tmp)

    def close(self) -> Path:
        """Finish encoding, copy the audio, rename to the final name; returns the final path."""
        if self._closed:
            return self.path
        if self.num_frames == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        self._proc.stdin.close()
        rc = self._proc.wait()
        self._closed = True
        if rc != 0:
            msg = self._stderr()
            self._err.close()
            _remove(self._tmp)
            raise RuntimeError(f"ffmpeg failed to encode {self.path}: {msg}")
        self._err.close()
        result = self._tmp
        if self.audio_from is not None:
            result = self._mux_audio()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(result, 0o666 & ~umask)  # mkstemp creates 0600; give the output the usual permissions
        os.replace(result, self.path)
        return self.path

    def _mux_audio(self) -> str:
        """Second ffmpeg call: stream-copy the video, copy or re-encode the audio. Returns the file to keep."""
        try:
            info = probe(self.audio_from)
        except UserError as e:
            self.audio_note = f"audio not copied: {e}"
            warnings.warn(self.audio_note)
            return self._tmp
        if not info.has_audio:
            return self._tmp
        fd, muxed = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".mux.mp4")
        os.close(fd)
        duration = f"{float(self.num_frames / self.fps):.6f}"
        r = _run_ffmpeg(["-v", "error", "-y", "-i", self._tmp, "-i", self.audio_from,
                         "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *_audio_codec_args(info.audio_codec),
                         "-t", duration, "-movflags", "+faststart", "-f", "mp4", muxed])
        if r.returncode != 0:
            _remove(muxed)
            self.audio_note = f"audio not copied: ffmpeg failed: {r.stderr.strip()[-300:]}"
            warnings.warn(self.audio_note)
            return self._tmp
        _remove(self._tmp)
        return muxed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.abort()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
