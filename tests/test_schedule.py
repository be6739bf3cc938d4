"""The coarse-to-fine clip schedule against the reference fixture (tests/fixtures/clip_schedule.json)."""
import json

import numpy as np
import pytest

from conftest import FIXTURES
from m3ddm.errors import UserError
from m3ddm.schedule import (build_schedule, global_frame_indices, parse_strides, unet_fps)

SCHEDULES = json.loads((FIXTURES / "clip_schedule.json").read_text())


def _clips(schedule):
    return [{"stride": c.stride, "start": c.start, "frames": list(c.frames), "guide": list(c.guide),
             "fps_divisor": c.fps_divisor,
             "guide_source": [list(g) if g is not None else None for g in c.guide_source]}
            for c in schedule.clips]


def _expected(entry):
    keys = ("stride", "start", "frames", "guide", "fps_divisor", "guide_source")
    return [{k: c[k] for k in keys} for c in entry["clips"]]


@pytest.mark.parametrize("n", sorted(SCHEDULES["intended"], key=int))
def test_intended_schedule_matches_fixture(n):
    entry = SCHEDULES["intended"][n]
    schedule = build_schedule(int(n))
    assert list(schedule.strides) == entry["strides_used"]
    assert _clips(schedule) == _expected(entry)
    assert global_frame_indices(int(n), 16) == entry["global_frame_indices"]
    # pixels: last writer wins; the fixture's output frame j comes from (clip, position)
    final = {f: (c.index, k) for c in schedule.clips for f, k in c.final}
    assert schedule.num_output == int(n) == len(final)
    assert final == {j: (clip, pos) for j, src, clip, pos in entry["output_video_frames"]}


@pytest.mark.parametrize("case", sorted(SCHEDULES["limit_cases"]))
def test_limit_cases_run_the_reference_clips(case):
    entry = SCHEDULES["limit_cases"][case]
    schedule = build_schedule(entry["N"], limit_frames=entry["limit"])
    assert _clips(schedule) == _expected(entry)
    # m3ddm outputs exactly L frames (the reference writes every frame of its clips: 31 for L = 20)
    assert schedule.num_output == entry["limit"]
    assert sorted(f for c in schedule.clips for f, _ in c.final) == list(range(entry["limit"]))


def test_limit_fixes_reference_clip_cap():
    # reference: ceil(32/16) = 2 clips cover frames 0..30 only; m3ddm adds a third clip for frame 31
    schedule = build_schedule(100, limit_frames=32)
    assert [c.start for c in schedule.clips] == [0, 15, 30]
    assert schedule.num_output == 32 and schedule.strides == (1,)
    assert build_schedule(100, limit_frames=1).clips[0].frames == tuple(range(16))
    assert len(build_schedule(100, limit_frames=16).clips) == 1
    assert len(build_schedule(100, limit_frames=17).clips) == 2
    assert build_schedule(100, limit_frames=-1).num_output == 100
    assert build_schedule(100, limit_frames=500).num_output == 100


@pytest.mark.parametrize("n", list(range(1, 130)) + [299, 300, 301, 1000, 1571])
def test_schedule_invariants(n):
    schedule = build_schedule(n)
    stored, released, final = {}, set(), []
    for c in schedule.clips:
        assert len(c.frames) == len(c.guide) == 16
        assert all(0 <= f < n for f in c.frames)
        assert not released & set(c.frames), "a released frame is used again"
        for k, f in enumerate(c.frames):
            assert c.guide[k] == (f in stored)
            assert c.guide_source[k] == stored.get(f)
        for k in c.store:
            assert c.frames[k] not in stored and c.frames.index(c.frames[k]) == k
            stored[c.frames[k]] = (c.index, k)
        for f, k in c.final:
            assert c.stride == 1 and c.frames[k] == f
        final += [f for f, _ in c.final]
        released |= set(c.release)
    assert final == list(range(n)), "every frame is output exactly once, in order"
    assert sorted(stored) == list(range(n))
    assert released == set(stored)


def test_global_frame_indices_match_numpy_linspace():
    for n in list(range(1, 200)) + [300, 1571, 10007]:
        for g in (1, 2, 3, 7, 16, 33):
            assert global_frame_indices(n, g) == np.linspace(0, n - 1, g, dtype=int).tolist(), (n, g)
    assert global_frame_indices(100) == [0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]


def test_unet_fps_is_floor_division():
    assert [unet_fps(30.0, s) for s in (15, 5, 1)] == [2, 6, 30]
    assert [unet_fps(30000 / 1001, s) for s in (15, 5, 1)] == [1, 5, 29]
    assert [unet_fps(25.0, s) for s in (15, 5, 1)] == [1, 5, 25]
    assert [unet_fps(24.0, s) for s in (15, 5, 1)] == [1, 4, 24]


def test_strides_and_bad_input():
    assert parse_strides("15,5,1") == (15, 5, 1)
    assert build_schedule(49, strides=(15, 5, 1)).strides == (1,)
    assert build_schedule(100, strides=(5, 3, 1)).strides == (5, 3, 1)
    for bad in ("15,5", "0,1", "a,1", "5,5,1", "-1,1", ""):
        with pytest.raises(UserError):
            parse_strides(bad)
    with pytest.raises(UserError):
        build_schedule(0)
    with pytest.raises(UserError):
        build_schedule(10, limit_frames=0)
    with pytest.raises(UserError):
        global_frame_indices(10, 0)
