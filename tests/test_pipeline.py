"""pipeline.py: the whole-video engine, in memory and on files, with the tiny fixture weights."""
import numpy as np
import pytest
import torch

from m3ddm.canvas import canvas_geometry, frames_to_canvas, frames_to_tensor
from m3ddm.errors import UserError
from m3ddm.pipeline import OutpaintOptions, StreamingFrames, outpaint_frames, outpaint_video
from m3ddm.video import probe, read_frames_at

FAST = dict(size=64, scheduler="ddim", steps=1)


def synthetic(n, h, w):
    t, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    v = 128 + 60 * np.sin((x + 2 * t) / 5.0)[..., None] + 50 * np.cos((y - t)[..., None] / 7.0 + np.arange(3))
    return np.clip(v, 0, 255).astype(np.uint8)


def test_outpaint_frames_coarse_to_fine(tiny_models):
    """N = 50 runs strides 15, 5, 1; every frame comes out once, the kept region is the source exactly."""
    unet, vae = tiny_models
    frames = synthetic(50, 36, 64)                                    # 16:9-ish source -> 1:1
    res = outpaint_frames(frames, unet, vae, ratios=[(1, 1)], fps=30.0,
                          options=OutpaintOptions(global_frames=4, **FAST))
    geom = res.geometry
    assert res.canvas.shape == (50, 64, 64, 3) and res.crops[(1, 1)].shape == (50, 64, 64, 3)
    assert res.stats.clips_per_stride == {15: 1, 5: 1, 1: 4}
    assert res.stats.max_cached_inputs < 50                           # caches are released, not grown to N
    y0, x0, h, w = geom.frame_box
    expected = frames_to_canvas(frames_to_tensor(frames), geom).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(res.canvas[:, y0:y0 + h, x0:x0 + w], expected[:, y0:y0 + h, x0:x0 + w])
    border = res.canvas[:, :y0]
    assert border.std() > 1 and res.mask[:y0].all() and not res.mask[y0:y0 + h].any()


def test_outpaint_frames_no_global_limit_and_keep_resolution(tiny_models):
    """G = 0 (the reference crashes), --limit-frames, the feathered paste and the full-resolution output."""
    unet, vae = tiny_models
    frames = synthetic(20, 40, 30)
    opts = OutpaintOptions(global_frames=0, limit_frames=5, keep_resolution=True, feather=3, **FAST)
    res = outpaint_frames(frames, unet, vae, ratios=[(16, 9)], options=opts)
    assert res.canvas.shape[0] == 5 and res.crops[(16, 9)].shape == (5, 36, 64, 3)
    full = res.full_res[(16, 9)]
    assert full.shape[0] == 5 and full.shape[1] >= 40 and full.shape[2] >= 30
    # the source sits untouched in the middle of the full-resolution frame (away from the feather ramp)
    top, left = (full.shape[1] - 40) // 2, (full.shape[2] - 30) // 2
    assert np.array_equal(full[:, top + 3:top + 37, left + 3:left + 27], frames[:5, 3:37, 3:27])
    geom = canvas_geometry((40, 30), [(16, 9)], 64)
    assert res.geometry == geom


def test_plain_path_and_seeded_vae_sampling(tiny_models):
    """--plain runs the reference's 4-way batch; --vae-sample is seeded, so two runs are identical."""
    unet, vae = tiny_models
    frames = synthetic(6, 36, 64)
    opts = OutpaintOptions(global_frames=2, plain=True, vae_sample=True, **FAST)
    a = outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=opts)
    b = outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=opts)
    mean = outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=OutpaintOptions(global_frames=2, **FAST))
    assert a.stats.unet_batch == 4 and mean.stats.unet_batch == 3
    assert np.array_equal(a.canvas, b.canvas)
    assert not np.array_equal(a.canvas, mean.canvas)


def test_outpaint_frames_rejects_bad_frames(tiny_models):
    unet, vae = tiny_models
    with pytest.raises(UserError):
        outpaint_frames(np.zeros((0, 8, 8, 3), np.uint8), unet, vae, options=OutpaintOptions(**FAST))
    with pytest.raises(UserError):
        outpaint_frames(np.zeros((2, 8, 8, 3), np.float32), unet, vae, options=OutpaintOptions(**FAST))
    with pytest.raises(UserError):
        OutpaintOptions(scheduler="pndm", steps=1).check()


def test_streaming_frames_serves_any_order(real_videos):
    path = real_videos / "kivy_cityCC0.mpg"
    info = probe(path)
    src = StreamingFrames(path, info)
    try:
        for idx in ([0, 15, 30, 30], [30, 45], [3, 5, 5]):             # forward, overlap, then a restart
            got = src.get(idx)
            assert torch.equal(got, frames_to_tensor(read_frames_at(path, idx, info)))
    finally:
        src.close()


def test_failed_run_leaves_no_output(tiny_models, real_videos, tmp_path, monkeypatch):
    """A run that dies mid-way leaves nothing under a final name (and no temporary files)."""
    import m3ddm.pipeline as pipeline
    unet, vae = tiny_models
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "denoise_clip", broken)
    with pytest.raises(RuntimeError, match="boom"):
        outpaint_video(real_videos / "kivy_cityCC0.mpg", tmp_path, unet, vae, [(4, 3)],
                       OutpaintOptions(global_frames=0, limit_frames=5, **FAST))
    assert calls and list(tmp_path.iterdir()) == []


def test_progress_goes_to_stderr_by_default(tiny_models, capsys):
    """The Python API shows its stages and the first clip's steps on stderr unless progress=None (or a callable)."""
    unet, vae = tiny_models
    frames = synthetic(4, 24, 32)
    opts = OutpaintOptions(global_frames=6, size=64, scheduler="ddim", steps=3)
    outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=opts)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: the video has 4 frame(s) but 6 global frames")
    assert err[1:] == ["reading 6 global frames", "encoding 6 global frames", "clip 1/1: reading and encoding its frames",
                       "clip 1/1  step 1/3", "clip 1/1  step 2/3", "clip 1/1  step 3/3"] + err[7:]
    assert len(err) == 8 and err[7].startswith("stride  1  clip 1/1  elapsed ")
    lines = []
    outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=opts, progress=lines.append)
    assert lines[1:7] == err[1:7] and capsys.readouterr().err == ""
    outpaint_frames(frames, unet, vae, ratios=[(1, 1)], options=opts, progress=None)
    assert capsys.readouterr().err == ""
