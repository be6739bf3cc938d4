"""Video I/O on the ffmpeg binary of imageio-ffmpeg: probe, streaming reader, H.264 writer with audio copy.

- `probe(path)` decodes the video stream once to get the TRUE frame count (container headers and packet
  counts can be off: nodeopencv_motion.mov has 243 packets but 242 frames, its last one flagged discard)
  and reads the packet timestamps (no decode) for the frame timing (`frame_timing`, below).
- `iter_frames(path)` / `iter_batches(path, n)` stream uint8 RGB frames (H, W, 3); only one frame or
  batch is in memory at a time. `read_frames_at(path, indices)` decodes sequentially and keeps only the
  wanted frames (stopping after the last one), for the global frames.
- `VideoWriter` encodes H.264 yuv420p mp4 (crf 17, preset medium) into a temporary file next to the
  target, copies the source audio in a second ffmpeg call (video stream copied, audio copied when it is
  aac/mp3, else re-encoded to aac) and renames on success. `ImageWriter` writes a still image (.png, .jpg).

Timing. The frame rate is what the timestamps say, not what a header or the packet durations say
(Matroska/WebM store durations rounded to whole milliseconds: 33 ms = 30.303 fps for a 30 fps clip):
- the frame times t_i (packet pts, sorted, discarded packets dropped, relative to the first frame) are
  compared with the uniform grid i / r of each standard rate r (24000/1001, 24, 25, 30000/1001, 30, 50,
  60000/1001, 60, ...). A rate is accepted when every t_i lies within the timebase's rounding of its grid:
  one tick, or the timestamps' own granularity up to 1 ms (ms timestamps stored in a us timebase).
  Among the accepted rates, one that agrees with the stream's declared rates (ffmpeg's `fps` / `tbr`,
  printed to 2 decimals) wins, then the one closest to the timestamps.
- no standard rate fits: the exact average (N - 1) / (t_last - t_0) (opencv_cup.mp4: 26777/1000; opencv_box.mp4,
  whose millisecond timestamps jitter 2.8 ms off the 30000/1001 grid: 454 / 15.151 s); one frame: the
  declared rate.
- variable frame rate: when some t_i is more than half a frame from its grid time i / r, the video is
  VFR and `VideoInfo.timestamps` keeps every frame's time; VideoWriter then gives frame i the source's
  time of frame i (not i / r). Otherwise the output is constant-rate at r and no frame is shown more
  than half a frame away from its source time (`VideoInfo.max_drift` says how far, at most).

Frames are decoded with `-fps_mode passthrough`: every decoded frame is delivered once, none is
duplicated or dropped to make the rate constant. Rotation metadata is applied by ffmpeg (autorotate),
and the reported width/height are those of the delivered frames. Pixels are treated as square.
ffmpeg runs in its own session, so that a Ctrl-C or SIGHUP reaches only Python, which stops it and
removes the temporary files (m3ddm/cli.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import imageio_ffmpeg
import numpy as np

from .cli import signals_deferred
from .errors import UserError
from .files import create_temp, write_atomic

MP4_AUDIO_COPY = ("aac", "mp3")   # audio codecs copied as they are into the mp4; others -> aac
DEFAULT_CRF = 17
DEFAULT_PRESET = "medium"
STANDARD_RATES = tuple(sorted([Fraction(k) for k in (8, 10, 12, 15, 16, 20, 24, 25, 30, 48, 50, 60, 72, 90, 96,
                                                     100, 120, 144, 240)] +
                              [Fraction(k * 1000, 1001) for k in (15, 24, 30, 48, 60, 120, 240)]))
MAX_TICK = Fraction(1, 1000)   # timestamps coarser than their timebase are trusted to 1 ms at most

PathLike = Union[str, os.PathLike]


# file suffixes taken as videos when a folder is scanned (sample, evaluate, train, demo)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".mpg", ".mpeg", ".webm", ".m4v", ".wmv", ".flv", ".ts")
# still images: sample.py outpaints them as one-frame videos and writes an image of the same format
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def is_image(path: PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` found. width/height are those of the decoded frames; num_frames is the true
    decoded count; fps is the frame rate (fps_fraction exactly, see the module doc).

    time_base: the stream's timebase. timestamps: for a variable-frame-rate video, every frame's time in
    time_base ticks from the first frame (a tuple of num_frames ints), else None (frame i at i / fps).
    max_drift: seconds, the largest distance of a source frame time from i / fps (0 for exact CFR).
    duration: seconds from the first frame's start to the last frame's end.
    start_time: seconds from the file's start (its earliest stream) to the first frame: where the audio
    that plays with frame 0 begins (a camera's audio often starts before its video)."""
    path: str
    width: int
    height: int
    num_frames: int
    fps: float
    fps_fraction: Fraction
    codec: str
    has_audio: bool
    audio_codec: Optional[str]
    duration: float
    time_base: Fraction = Fraction(0)
    timestamps: Optional[tuple] = None
    max_drift: float = 0.0
    start_time: float = 0.0

    @property
    def hw(self) -> tuple:
        return (self.height, self.width)

    @property
    def vfr(self) -> bool:
        return self.timestamps is not None


def _check_input(path: PathLike) -> str:
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"Input video {path} does not exist; check the path.")
    if os.path.isdir(path):
        raise UserError(f"Input video {path} is a folder; give the path of a video file.")
    return path


def _run_ffmpeg(args: list) -> subprocess.CompletedProcess:
    """subprocess.run of ffmpeg, whose child is stopped on any exception, a signal included (see VideoWriter)."""
    proc = None
    try:
        with signals_deferred():
            proc = subprocess.Popen([ffmpeg_exe(), "-hide_banner", "-nostdin", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        out, err = proc.communicate()
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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


def _packet_times(path: str) -> tuple:
    """(timebase, sorted pts of the video packets that are not flagged discard), from a stream copy (no
    decoding); (None, []) when ffmpeg gives none."""
    r = _run_ffmpeg(["-v", "error", "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "-"])
    tb, packets = None, []
    for line in r.stdout.splitlines():
        if line.startswith("#tb 0:"):
            tb = Fraction(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            fields = [x.strip() for x in line.split(",")]
            flags = int(fields[6][2:], 16) if len(fields) > 6 and fields[6].startswith("F=") else 1
            pts = int(fields[2])
            if not flags & 4 and pts != -2 ** 63:                     # AV_PKT_FLAG_DISCARD, AV_NOPTS_VALUE
                packets.append(pts)
    if tb is None or not packets or tb <= 0:
        return None, []
    return tb, sorted(packets)


def typical_interval(pts: Sequence[int]) -> int:
    """The median distance between consecutive frame times (ticks): how long a VFR video's last frame lasts."""
    return max(1, int(np.median(np.diff(np.asarray(pts, dtype=np.int64))))) if len(pts) > 1 else 1


def _grid_error(t: np.ndarray, rate: Fraction) -> float:
    """Seconds: the largest distance of the frame times t (from the first frame) from the grid i / rate."""
    return float(np.abs(t - np.arange(len(t)) / float(rate)).max())


def _agrees(rate: Fraction, declared: Sequence[float]) -> bool:
    return any(abs(float(rate) - d) <= 0.005 + 1e-9 for d in declared)     # ffmpeg prints 2 decimals


def frame_timing(pts: Sequence[int], time_base: Fraction, declared: Sequence[float] = ()) -> tuple:
    """(rate, max_drift, vfr) of frames at pts (sorted ints, in time_base) given the stream's declared rates
    (floats as ffmpeg prints them); the rule is in the module doc. rate is a Fraction, max_drift seconds."""
    if len(pts) < 2 or pts[-1] == pts[0]:
        rates = [r for r in STANDARD_RATES if _agrees(r, declared)] or \
                [Fraction(d).limit_denominator(1001) for d in declared if d > 0]
        if not rates:
            raise UserError("the video has no usable frame rate; re-encode it with a constant frame rate.")
        return rates[0], 0.0, False
    ticks = np.asarray(pts, dtype=np.int64) - int(pts[0])
    t = ticks * float(time_base)
    granule = Fraction(int(np.gcd.reduce(ticks[1:]))) * time_base
    tol = float(max(time_base, min(granule, MAX_TICK))) * (1 + 1e-9)
    errors = {r: _grid_error(t, r) for r in STANDARD_RATES}
    fitting = sorted((e, r) for r, e in errors.items() if e <= tol)
    preferred = [(e, r) for e, r in fitting if _agrees(r, declared)] or fitting
    if preferred:
        rate = preferred[0][1]
    else:
        rate = Fraction(len(pts) - 1) / (Fraction(int(ticks[-1])) * time_base)
    drift = _grid_error(t, rate)
    increasing = bool(np.all(np.diff(ticks) > 0))      # repeated times cannot be kept: written at the rate
    return rate, drift, drift > 0.5 / float(rate) and increasing


def _declared_rates(video_line: str) -> list:
    return [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) (?:fps|tbr)\b", video_line) if float(x) > 0]


def probe(path: PathLike) -> VideoInfo:
    """Inspect a video file: true frame count (by decoding), frame rate and timing, size, codecs, audio.

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

    tb, pts = _packet_times(path)
    try:
        rate, drift, vfr = frame_timing(pts, tb or Fraction(1, 1000), _declared_rates(video_lines[0]))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    vfr = vfr and len(pts) == num_frames    # times that do not pair up with the frames cannot be kept
    if vfr:
        duration = float((pts[-1] - pts[0] + typical_interval(pts)) * tb)
    else:
        duration = float(num_frames / rate)
    return VideoInfo(path=path, width=width, height=height, num_frames=num_frames, fps=float(rate),
                     fps_fraction=rate, codec=_codec_of(video_lines[0], "Video"),
                     has_audio=audio_codec is not None, audio_codec=audio_codec, duration=duration,
                     time_base=tb, timestamps=tuple(p - pts[0] for p in pts) if vfr else None,
                     max_drift=drift, start_time=max(0.0, float(pts[0] * tb)) if pts else 0.0)


def iter_frames(path: PathLike, info: Optional[VideoInfo] = None) -> Iterator[np.ndarray]:
    """Yield every frame of the video in order as a uint8 RGB array (H, W, 3), one at a time.

    The ffmpeg process is stopped when the generator is closed or garbage-collected early."""
    path = _check_input(path)
    info = info or probe(path)
    frame_bytes = info.width * info.height * 3
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0",
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
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


_OPEN_WRITERS = weakref.WeakSet()     # VideoWriters neither closed nor aborted yet


def abort_open_writers() -> None:
    """Abort every VideoWriter still open: what a command line calls when it was cut short (m3ddm/cli.py)."""
    for writer in list(_OPEN_WRITERS):
        writer.abort()


class VideoWriter:
    """H.264 (libx264, yuv420p) mp4 writer; use as a context manager or call close().

    path: final file name; nothing exists under it until close() succeeds.
    width, height: frame size, both even (yuv420p needs it).
    fps: frame rate (float or Fraction; floats are turned into the nearest simple fraction).
    audio_from: optional source video whose first audio track is copied into the output (trimmed to
        the video's length). If that copy fails, the video is kept without audio and a warning says why.
    crf, preset: x264 quality (17 = visually lossless) and speed.
    timestamps, time_base: for a variable-frame-rate source (VideoInfo.timestamps / .time_base): frame i
        is given the time timestamps[i] * time_base (ticks from the first frame) instead of i / fps.
    audio_start: seconds into audio_from's timeline at which frame 0 was shown (VideoInfo.start_time): the
        audio is cut from there, so that it stays in sync when the source's video starts after its audio.

    write(frames) takes uint8 (H, W, 3) or (n, H, W, 3) RGB numpy arrays. On an exception inside the
    `with` block, or abort(), the temporary files are deleted and the target is left untouched.
    """

    def __init__(self, path: PathLike, width: int, height: int, fps, audio_from: Optional[PathLike] = None,
                 crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET, timestamps: Optional[Sequence[int]] = None,
                 time_base: Optional[Fraction] = None, audio_start: float = 0.0):
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
        if timestamps is not None and (time_base is None or time_base <= 0):
            raise ValueError("timestamps need their time_base")
        self.timestamps = None if timestamps is None else [int(t) for t in timestamps]
        self.time_base = time_base
        # how long each frame lasts: 1 / fps, or for given timestamps their typical interval (the last frame's)
        self.frame_time = 1 / self.fps if timestamps is None else typical_interval(self.timestamps) * time_base
        self.audio_from = None if audio_from is None else str(audio_from)
        self.audio_start = max(0.0, float(audio_start))
        self.num_frames = 0
        self.audio_note = None       # why the audio was not copied, if it was not
        self._closed, self._script, self._proc, self._tmp = False, None, None, None
        _OPEN_WRITERS.add(self)          # before anything exists: abort_open_writers() can always undo it
        try:
            # a signal here is raised after the block, when the files and the child are known to the cleanup
            # below (a child started but not yet assigned would write its file after the cleanup ran)
            with signals_deferred():
                self._tmp = create_temp(self.path, "part", ".mp4")
                cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
                       "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
                       "-r", str(1 / self.frame_time), "-i", "-", *self._timing_args(),
                       "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
                       "-movflags", "+faststart", "-f", "mp4", str(self._tmp)]
                self._err = tempfile.TemporaryFile()
                self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                              stderr=self._err, start_new_session=True)
        except BaseException:
            self.abort()                 # stops the child too, when it was started
            raise

    def _timing_args(self) -> list:
        """ffmpeg options that give frame i the source's time (VFR); none for a constant rate."""
        if self.timestamps is None:
            return []
        num, den = self.time_base.numerator, self.time_base.denominator
        # a balanced if-tree over the frame number N: log2(n) comparisons per frame, any length
        expr = _pts_expression([t * num for t in self.timestamps], 0, len(self.timestamps))
        self._script = create_temp(self.path, "vf", ".txt")
        self._script.write_text(f"settb=1/{den},setpts='{expr}'\n")
        return ["-/vf", str(self._script), "-fps_mode", "passthrough", "-enc_time_base:v", f"1/{den}",
                "-video_track_timescale", str(den)]

    @property
    def duration(self) -> Fraction:
        """Seconds of video written so far."""
        if self.num_frames == 0:
            return Fraction(0)
        if self.timestamps is None:
            return self.num_frames / self.fps
        return self.timestamps[self.num_frames - 1] * self.time_base + self.frame_time

    def _remove_temps(self):
        for tmp in (self._tmp, self._script):
            if tmp is not None:
                _remove(str(tmp))

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames (n, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        if self.timestamps is not None and self.num_frames + len(frames) > len(self.timestamps):
            raise ValueError(f"only {len(self.timestamps)} timestamps were given for {self.path}")
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
        _OPEN_WRITERS.discard(self)
        if self._proc is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._err.close()
        self._remove_temps()

    def close(self) -> Path:
        """Finish encoding, copy the audio, rename to the final name; returns the final path."""
        if self._closed:
            return self.path
        if self.num_frames == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}")
        try:
            self._proc.stdin.close()
            rc = self._proc.wait()
            self._closed = True
            if rc != 0:
                raise RuntimeError(f"ffmpeg failed to encode {self.path}: {self._stderr()}")
            self._err.close()
            result = self._tmp
            if self.audio_from is not None:
                result = self._mux_audio()
            os.replace(result, self.path)
            _OPEN_WRITERS.discard(self)
        except BaseException:
            self._closed = False
            self.abort()
            raise
        finally:
            if self._script is not None:
                _remove(str(self._script))
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
        tmp = self._tmp
        try:
            with signals_deferred():               # abort() removes the muxed file from here on; tmp is ours
                self._tmp = muxed = str(create_temp(self.path, "mux", ".mp4"))
            seek = ["-ss", f"{self.audio_start:.6f}"] if self.audio_start > 0 else []
            r = _run_ffmpeg(["-v", "error", "-y", "-i", str(tmp), *seek, "-i", self.audio_from,
                             "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *_audio_codec_args(info.audio_codec),
                             "-t", f"{float(self.duration):.6f}", "-movflags", "+faststart", "-f", "mp4", muxed])
            if r.returncode != 0:
                self.audio_note = f"audio not copied: ffmpeg failed: {r.stderr.strip()[-300:]}"
                warnings.warn(self.audio_note)
                self._tmp, tmp = tmp, muxed
        finally:
            _remove(str(tmp))
        return self._tmp

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


class ImageWriter:
    """A still image writer with VideoWriter's interface, for one-frame outputs of image inputs.

    The format follows the target's suffix (.png: lossless; .jpg/.jpeg: quality 95); the image is written
    to a temporary name beside the target and renamed by close()."""

    FORMATS = {".png": ("png", {}), ".jpg": ("jpeg", {"quality": 95}), ".jpeg": ("jpeg", {"quality": 95})}

    def __init__(self, path: PathLike, width: int, height: int):
        self.path = Path(path)
        if self.path.suffix.lower() not in self.FORMATS:
            raise ValueError(f"ImageWriter writes {', '.join(self.FORMATS)}, not {self.path.suffix}")
        if not self.path.parent.is_dir():
            raise UserError(f"Output folder {self.path.parent} does not exist; create it first.")
        self.width, self.height = int(width), int(height)
        self.num_frames, self.audio_note, self._frame = 0, None, None

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"expected uint8 frames (n, {self.height}, {self.width}, 3), "
                             f"got {frames.dtype} {tuple(frames.shape)}")
        if self.num_frames + len(frames) > 1:
            raise ValueError(f"{self.path} is a still image: it takes one frame")
        self._frame, self.num_frames = frames[0], self.num_frames + len(frames)

    def abort(self) -> None:
        self._frame = None

    def close(self) -> Path:
        if self._frame is None:
            raise ValueError(f"no frame was written to {self.path}")
        import imageio.v2 as imageio
        fmt, options = self.FORMATS[self.path.suffix.lower()]
        write_atomic(self.path, lambda tmp: imageio.imwrite(tmp, self._frame, format=fmt, **options))
        self._frame = None
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type is not None else self.close()
        return False


def _pts_expression(values: list, lo: int, hi: int) -> str:
    """setpts expression giving frame N (lo <= N < hi) the time values[N]."""
    if hi - lo == 1:
        return str(values[lo])
    mid = (lo + hi) // 2
    return f"if(lt(N,{mid}),{_pts_expression(values, lo, mid)},{_pts_expression(values, mid, hi)})"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
