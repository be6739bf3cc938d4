"""Frame timing for every container and rate, variable frame rates, and sample.py's output timing.

Clips are generated with the project's ffmpeg (tiny frames, few frames); the probe level covers the whole
matrix, sample.py end to end a representative subset. Durations are measured from the files' own packet
timestamps (conftest.span_seconds), not with m3ddm's probe."""
from fractions import Fraction

import numpy as np
import pytest

import sample
from conftest import CONTAINER_CODECS, make_clip, packet_times, span_seconds
from m3ddm.video import STANDARD_RATES, frame_timing, probe

RATES = ["24000/1001", "24", "25", "30000/1001", "30", "50", "60000/1001", "60"]
FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "1", "--global-frames", "0"]


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("container", sorted(CONTAINER_CODECS))
def test_probe_rate_every_container(container, rate, tmp_path):
    """Matroska/WebM store 1 ms timestamps (a 30 fps clip's packets last 33 ms = 30.303 fps): the rate must
    still come out exact, from the timestamps, the declared rate and the timebase's rounding."""
    clip = make_clip(tmp_path / f"clip.{container}", rate, frames=12)
    info = probe(clip)
    r = Fraction(rate)
    assert info.fps_fraction == r and info.num_frames == 12 and not info.vfr
    assert abs(info.duration - 12 / r) < 1e-9
    assert abs(span_seconds(clip) - 12 / r) < 1 / r             # the file itself agrees within a frame


def ms(times):
    return [round(t * 1000) for t in times]


def test_frame_timing_rules():
    tb_ms = Fraction(1, 1000)
    for r in STANDARD_RATES:
        # 300 frames of millisecond timestamps: the rate is exact without any declared rate
        pts = ms([i / r for i in range(300)])
        assert frame_timing(pts, tb_ms, []) == (r, pytest.approx(max(abs(p / 1000 - i / r) for i, p in enumerate(pts))),
                                                False)
        # 12 frames: 30 and 30000/1001 both fit 1 ms timestamps; the declared rate (2 decimals) decides
        pts = ms([i / r for i in range(12)])
        assert frame_timing(pts, tb_ms, [round(float(r), 2)])[0] == r
    # a rate no standard fits is the exact average: opencv_cup.mp4 counts frames of 1000 ticks at 1/26777
    assert frame_timing([1000 * i for i in range(217)], Fraction(1, 26777), [26.78])[0] == Fraction(26777, 1000)
    # the declared rate never overrides the timestamps: 25 fps timestamps declared "30"
    assert frame_timing([3600 * i for i in range(50)], Fraction(1, 90000), [30.0])[0] == 25
    # ms timestamps stored in a us timebase are trusted to their 1 ms granularity
    pts = [1000 * p for p in ms([i * 1001 / 30000 for i in range(300)])]
    assert frame_timing(pts, Fraction(1, 10 ** 6), [])[0] == Fraction(30000, 1001)
    # jitter below half a frame: constant rate (the exact average), drift reported, not VFR
    rng = np.random.default_rng(0)
    pts = [round((i / 30 + rng.uniform(-0.005, 0.005)) * 90000) for i in range(100)]
    pts[0] = 0
    rate, drift, vfr = frame_timing(pts, Fraction(1, 90000), [30.0])
    assert rate == Fraction(99) / Fraction(pts[-1], 90000) and 0.004 < drift < 0.5 / 30 and not vfr
    # a gap: variable frame rate
    times = [i / 30 for i in range(10)] + [0.8 + i / 30 for i in range(10)]
    assert frame_timing(ms(times), tb_ms, [30.0])[2]
    # one frame (a still image): the declared rate
    assert frame_timing([0], Fraction(1, 25), [25.0]) == (25, 0.0, False)


def run_sample(argv, capsys):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.split()


@pytest.mark.parametrize("container,rate", [("mkv", "30000/1001"), ("webm", "30"), ("avi", "24000/1001"),
                                            ("ts", "60000/1001"), ("mov", "25"), ("mp4", "60")])
def test_sample_output_keeps_the_rate(container, rate, tiny_weight_files, tmp_path, capsys):
    clip = make_clip(tmp_path / f"clip.{container}", rate, frames=8, audio=container in ("webm", "mkv"))
    [out] = run_sample([clip, "--ratio", "16:9", "--out", tmp_path / "out", *FAST, *tiny_weight_files], capsys)
    got, r = probe(out), Fraction(rate)
    assert got.fps_fraction == r and got.num_frames == 8 and not got.vfr
    assert abs(span_seconds(out) - span_seconds(clip)) < 1 / r
    assert got.has_audio == (container in ("webm", "mkv"))


GAPS = "PTS + if(gte(N,5), 0.4/TB, 0) + if(gte(N,11), 0.25/TB, 0)"   # 30 fps with two gaps (0.4 s, 0.25 s)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_vfr_source_times_are_kept(container, tiny_weight_files, tmp_path, capsys):
    """Output frame i is shown when source frame i was (phone clips with gaps); duration within one frame."""
    clip = make_clip(tmp_path / f"vfr.{container}", "30", frames=16, setpts=GAPS)
    info = probe(clip)
    assert info.vfr and info.num_frames == 16 and info.max_drift > 0.1     # average-rate output: 5 frames off
    tb, packets = packet_times(clip)
    source_times = [(p - packets[0][0]) * tb for p, _ in packets]
    assert [t * info.time_base for t in info.timestamps] == source_times
    [out] = run_sample([clip, "--ratio", "16:9", "--out", tmp_path / "out", *FAST, *tiny_weight_files], capsys)
    otb, opackets = packet_times(out)
    assert [(p - opackets[0][0]) * otb for p, _ in opackets] == source_times          # exactly the source's times
    assert abs(span_seconds(out) - span_seconds(clip)) < 1 / info.fps_fraction
    assert probe(out).vfr


def test_audio_stays_in_sync_when_video_starts_late(tiny_weight_files, tmp_path, capsys):
    """A camera clip whose audio starts 0.5 s before its video (silence, then a tone from the first frame on):
    the output's audio must begin where frame 0 was shown, i.e. with the tone, not with the silence."""
    from conftest import ffmpeg_exe_path
    import subprocess
    clip = tmp_path / "late.mp4"
    subprocess.run([ffmpeg_exe_path(), "-v", "error", "-y", "-f", "lavfi",
                    "-i", "aevalsrc='if(gte(t,0.5),0.5*sin(2*PI*440*t),0)':s=48000:d=2",
                    "-itsoffset", "0.5", "-f", "lavfi", "-i", "testsrc2=size=32x24:rate=25",
                    "-map", "1:v", "-map", "0:a", "-frames:v", "25", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(clip)], check=True)
    assert abs(probe(clip).start_time - 0.5) < 0.03
    [out] = run_sample([clip, "--ratio", "16:9", "--out", tmp_path / "out", *FAST, *tiny_weight_files], capsys)
    pcm = subprocess.run([ffmpeg_exe_path(), "-v", "error", "-i", out, "-map", "0:a", "-f", "s16le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True, check=True).stdout
    audio = np.frombuffer(pcm, np.int16).astype(np.float64) / 32768
    first = audio[int(0.05 * 48000):int(0.3 * 48000)]              # past the codec's priming
    assert np.sqrt(np.mean(first ** 2)) > 0.2                      # the tone (rms 0.35), not the silence
    assert abs(len(audio) / 48000 - 1.0) < 0.05                    # trimmed to the video's 25 frames
