"""sample.py end to end on real clips with the tiny fixture weights, and every bad-input path."""
import json
import shutil

import numpy as np
import pytest

import sample
from m3ddm.canvas import canvas_geometry, frames_to_canvas, frames_to_tensor, full_res_layout
from m3ddm.video import VideoWriter, probe, read_frames_at

FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "1"]


@pytest.fixture(scope="module")
def weights(tiny_weight_files):
    return tiny_weight_files


def run_cli(argv, capsys):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_cli_full_video_with_audio(real_videos, weights, tmp_path, capsys):
    """pyfeat_single_face.mp4: 72 frames at 30 fps with mp3 audio, two ratios, the full coarse-to-fine run."""
    src = real_videos / "pyfeat_single_face.mp4"
    rc, out, err = run_cli([src, "--ratio", "1:1,9:16", "--out", tmp_path, "--global-frames", "4", *FAST, *weights], capsys)
    assert rc == 0, err
    paths = out.split()
    assert [p.split("/")[-1] for p in paths] == ["pyfeat_single_face_1-1.mp4", "pyfeat_single_face_9-16.mp4"]
    assert "stride 15  clip 1/7" in err and "ETA" in err
    info = probe(src)
    geom = canvas_geometry(info.hw, [(1, 1), (9, 16)], 64)
    source = frames_to_canvas(frames_to_tensor(read_frames_at(src, range(info.num_frames), info)), geom)
    source = source.permute(0, 2, 3, 1).numpy()                       # (N, 64, 64, 3) the input on its canvas
    y0, x0, h, w = geom.frame_box
    for path, ratio in zip(paths, [(1, 1), (9, 16)]):
        got = probe(path)
        cx, cy, cw, ch = geom.crops[ratio]
        assert (got.num_frames, got.fps, got.width, got.height) == (72, 30.0, cw, ch)
        assert got.has_audio and got.audio_codec == "mp3"
        frames = read_frames_at(path, range(72), got)
        kept = frames[:, y0 - cy:y0 - cy + h, x0 - cx:x0 - cx + w]
        truth = source[:, y0:y0 + h, x0:x0 + w]
        # the source on its canvas after one H.264 pass on its own: the codec's loss at this tiny size
        # (~35 dB at 64 px, crf 17), which bounds what any output can reach
        with VideoWriter(tmp_path / "baseline.mp4", cw, ch, 30) as writer:
            writer.write(np.ascontiguousarray(source[:, cy:cy + ch, cx:cx + cw]))
        base = read_frames_at(tmp_path / "baseline.mp4", range(72))[:, y0 - cy:y0 - cy + h, x0 - cx:x0 - cx + w]
        assert psnr(kept, truth) > min(40, psnr(base, truth) - 0.5)
        assert psnr(kept[:, 2:-2, 2:-2], source[:, y0 + 2:y0 + h - 2, x0 + 3:x0 + w - 1]) < psnr(kept, truth) - 5
    record = json.loads((tmp_path / "pyfeat_single_face.json").read_text())
    assert record["video"]["num_frames"] == 72 and record["num_output_frames"] == 72
    assert record["clips_per_stride"] == {"15": 1, "5": 1, "1": 5}
    assert len(record["weights"]["unet"]["sha256"]) == 64 and record["m3ddm_version"]
    assert record["global_frame_indices"] == [0, 23, 47, 71]
    assert (tmp_path / "pyfeat_single_face_preview.png").stat().st_size > 0


def test_cli_folder_input_keep_resolution(real_videos, weights, tmp_path, capsys):
    """A folder as input (only its videos are taken), --limit-frames, --keep-resolution, no audio."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(real_videos / "kivy_cityCC0.mpg", folder / "city.mpg")
    (folder / "notes.txt").write_text("not a video")
    out_dir = tmp_path / "out"
    rc, out, err = run_cli([folder, "--ratio", "4:3", "--out", out_dir, "--limit-frames", "20", "--global-frames", "0",
                            "--keep-resolution", *FAST, *weights], capsys)
    assert rc == 0, err
    assert out.split() == [str(out_dir / "city_4-3.mp4")]
    info = probe(folder / "city.mpg")
    got = probe(out.split()[0])
    layout = full_res_layout(canvas_geometry(info.hw, [(4, 3)], 64), (4, 3))
    assert (got.num_frames, got.fps, got.has_audio) == (20, 25.0, False)
    assert (got.height, got.width) == layout.out_hw and got.width == 720
    top, left = layout.offset
    frames = read_frames_at(out.split()[0], range(20), got)
    source = read_frames_at(folder / "city.mpg", range(20), info)
    centre = frames[:, top + 8:top + info.height - 8, left + 8:left + info.width - 8]
    # "untouched up to codec loss": as close to the source as the source itself after one H.264 pass
    # (kivy's grainy MPEG-2 frames lose ~34 dB to x264 crf 17 on their own)
    with VideoWriter(tmp_path / "baseline.mp4", info.width, info.height // 2 * 2, info.fps) as w:
        w.write(source[:, :info.height // 2 * 2])
    baseline = read_frames_at(tmp_path / "baseline.mp4", range(20))[:, 8:info.height - 8, 8:-8]
    codec_psnr = psnr(baseline, source[:, 8:-8, 8:-8])
    assert psnr(centre, source[:, 8:-8, 8:-8]) > codec_psnr - 0.5
    assert sorted(p.name for p in out_dir.iterdir()) == ["city.json", "city_4-3.mp4", "city_preview.png"]


def test_cli_kept_region_above_40db_at_source_resolution(real_videos, weights, tmp_path, capsys):
    """The issue's bound, stated at a real resolution: with --keep-resolution the source pixels of a 640x360
    clip come back above 40 dB (only H.264 crf 17 touches them; at the 64 px test canvas above, 4:2:0 chroma
    alone costs more than that, hence the codec-relative bound there)."""
    src = real_videos / "pyfeat_single_face.mp4"
    rc, out, err = run_cli([src, "--ratio", "1:1", "--out", tmp_path, "--limit-frames", "16", "--global-frames", "0",
                            "--keep-resolution", *FAST, *weights], capsys)
    assert rc == 0, err
    info, got = probe(src), probe(out.split()[0])
    top, left = full_res_layout(canvas_geometry(info.hw, [(1, 1)], 64), (1, 1)).offset
    frames = read_frames_at(out.split()[0], range(16), got)
    source = read_frames_at(src, range(16), info)
    assert got.num_frames == 16 and (got.width, got.height) == (640, 640)
    assert psnr(frames[:, top:top + info.height, left:left + info.width], source) > 40


# ----------------------------------------------------------------------------------------------------
# bad input: one `error:` line, exit code 2, nothing under a final name


def expect_error(argv, capsys, words, out_dir=None):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    if out_dir is not None and out_dir.exists():
        assert [p for p in out_dir.iterdir() if not p.name.startswith(".")] == []


def test_missing_and_non_video_inputs(tmp_path, weights, capsys):
    out = tmp_path / "out"
    expect_error([tmp_path / "nope.mp4", "--out", out, *weights], capsys, ["nope.mp4", "does not exist"], out)
    text = tmp_path / "text.mp4"
    text.write_text("hello, this is not a video\n" * 100)
    expect_error([text, "--out", out, *FAST, *weights], capsys, ["text.mp4"], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error([empty, "--out", out, *weights], capsys, ["no video files"], out)
    for d in ("a", "b"):                       # two inputs whose outputs would overwrite each other
        (tmp_path / d).mkdir()
        (tmp_path / d / "clip.mp4").write_bytes(b"x")
    expect_error([tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4", "--out", out, *weights], capsys,
                 ["same output names"], out)


def test_truncated_video(real_videos, tmp_path, weights, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes((real_videos / "pyfeat_single_face.mp4").read_bytes()[:3000])
    out = tmp_path / "out"
    expect_error([broken, "--out", out, *FAST, *weights], capsys, ["broken.mp4"], out)


@pytest.mark.parametrize("ratio", ["16-9", "0:1", "abc", "16:9,"])
def test_bad_ratio(real_videos, tmp_path, weights, capsys, ratio):
    expect_error([real_videos / "pyfeat_single_face.mp4", "--ratio", ratio, "--out", tmp_path / "o", *weights],
                 capsys, ["ratio", "W:H"], tmp_path / "o")


def test_ratio_needing_no_outpainting(real_videos, tmp_path, weights, capsys):
    """pyfeat_single_face.mp4 is already 16:9: a clear error, no output (documented decision)."""
    out = tmp_path / "o"
    expect_error([real_videos / "pyfeat_single_face.mp4", "--ratio", "16:9", "--out", out, *FAST, *weights],
                 capsys, ["already 16:9", "--ratio"], out)


def test_unwritable_output_and_output_equal_to_input(real_videos, tmp_path, weights, capsys):
    src = real_videos / "pyfeat_single_face.mp4"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error([src, "--ratio", "1:1", "--out", blocker, *FAST, *weights], capsys, ["not a folder"])
    expect_error([src, "--ratio", "1:1", "--out", blocker / "sub", *FAST, *weights], capsys, ["cannot be created"])
    # an output name that resolves to the input (a link in the output folder) is refused, input untouched
    clip = tmp_path / "clip.mp4"
    shutil.copy(src, clip)
    before = clip.read_bytes()
    out = tmp_path / "o"
    out.mkdir()
    (out / "clip_1-1.mp4").symlink_to(clip)
    expect_error([clip, "--ratio", "1:1", "--out", out, *FAST, *weights], capsys, ["is the input video"])
    assert clip.read_bytes() == before


def test_weights_missing_or_wrong_kind(real_videos, tmp_path, weights, capsys, monkeypatch):
    src = real_videos / "pyfeat_single_face.mp4"
    out = tmp_path / "o"
    unet, vae = weights[1], weights[3]
    expect_error([src, "--out", out, "--unet", tmp_path / "no.safetensors", "--vae", vae], capsys,
                 ["no.safetensors", "--unet"], out)
    expect_error([src, "--ratio", "1:1", "--out", out, "--unet", vae, "--vae", vae], capsys, ["vae", "unet"], out)
    monkeypatch.setattr(sample, "DEFAULT_UNET", tmp_path / "demo_unet.safetensors")
    monkeypatch.setattr(sample, "DEFAULT_VAE", tmp_path / "demo_vae.safetensors")
    expect_error([src, "--out", out], capsys, ["No UNet weights", "--unet", "demo_unet.safetensors"], out)
    expect_error([src, "--out", out, "--unet", unet], capsys, ["No VAE weights", "--vae", "demo_vae.safetensors"], out)


# ----------------------------------------------------------------------------------------------------
# options named in messages, notes, progress before the first clip is done


def test_size_error_names_the_option(real_videos, tmp_path, weights, capsys):
    expect_error([real_videos / "pyfeat_single_face.mp4", "--ratio", "1:1", "--size", "100", "--out", tmp_path / "o",
                  *weights], capsys, ["--size 100", "multiple of 64"], tmp_path / "o")
    assert "multiple of 64" in " ".join(sample.build_parser().format_help().split())


def test_scheduler_choices_are_the_one_list():
    from m3ddm.schedulers import SCHEDULERS
    action = next(a for a in sample.build_parser()._actions if a.dest == "scheduler")
    assert tuple(action.choices) == SCHEDULERS and sample.scheduler_and_steps(sample.build_parser().parse_args(
        ["x.mp4"]))[0] == SCHEDULERS[0]  # the default (None on the parser, so that --quality can tell) is the first


def test_notes_and_progress_before_the_first_clip_is_done(real_videos, tmp_path, weights, capsys, monkeypatch):
    """--plain --dtype bf16 and --global-frames above the frame count each give one note; the stages and the
    first clip's steps are shown (weights and probing too, on a terminal)."""
    src = tmp_path / "short.mp4"
    with VideoWriter(src, 48, 36, 10) as writer:                        # 4:3, 6 frames
        writer.write(read_frames_at(real_videos / "opencv_cup.mp4", range(6))[:, ::10, ::10][:, :36, :48])
    monkeypatch.setattr(sample.sys.stderr, "isatty", lambda: True)
    rc, out, err = run_cli([src, "--out", tmp_path / "o", "--size", "64", "--scheduler", "ddim", "--steps", "10",
                            "--global-frames", "8", "--plain", "--dtype", "bf16", *weights], capsys)
    assert rc == 0, err
    lines = err.strip().splitlines()
    notes = [line for line in lines if "note: " in line]
    assert len(notes) == 2, err
    assert notes[0] == "note: --plain runs the reference-shaped path in fp32; --dtype bf16 is not used."
    assert notes[1].startswith("[short.mp4] note: ") and "6 frame(s)" in notes[1] and "8 global frames" in notes[1]
    assert lines[1].startswith("loading unet.safetensors and vae.safetensors on cpu (float32)")
    for stage in ("reading the video", "reading 8 global frames", "encoding 8 global frames",
                  "clip 1/1: reading and encoding its frames", "clip 1/1  step 1/10", "clip 1/1  step 10/10",
                  "stride  1  clip 1/1"):
        assert any(stage in line for line in lines), (stage, err)
    steps = [line for line in lines if "  step " in line]
    assert len(steps) == 10  # every step of 10 (at most about ten lines for any step count)
    record = json.loads((tmp_path / "o" / "short.json").read_text())
    assert record["notes"] == [notes[1][len("[short.mp4] "):]] and record["options"]["plain"]
    assert record["dtype"] == "float32"
    rc, out, err = run_cli([src, "--out", tmp_path / "o2", "--size", "64", "--scheduler", "ddim", "--steps", "2",
                            "--global-frames", "6", *weights], capsys)
    assert rc == 0 and "note:" not in err  # as many global frames as frames: nothing to say


# DPM-Solver++ and --quality


def test_cli_dpm_solver_20_steps(real_videos, weights, tmp_path, capsys):
    """--scheduler dpm++ --steps 20 end to end on a real clip: N frames at the crop size, 20 UNet calls per clip,
    the kept region exact in the lossless preview and within codec loss in the mp4."""
    import imageio.v2 as imageio
    src = real_videos / "kivy_cityCC0.mpg"                            # 720x405, 25 fps
    rc, out, err = run_cli([src, "--ratio", "1:1", "--out", tmp_path, "--limit-frames", "20", "--global-frames", "4",
                            "--size", "64", "--scheduler", "dpm++", "--steps", "20", *weights], capsys)
    assert rc == 0, err
    info, got = probe(src), probe(out.split()[0])
    geom = canvas_geometry(info.hw, [(1, 1)], 64)
    cx, cy, cw, ch = geom.crops[(1, 1)]
    assert (got.num_frames, got.fps, got.width, got.height) == (20, 25.0, cw, ch)
    record = json.loads((tmp_path / "kivy_cityCC0.json").read_text())
    assert (record["options"]["scheduler"], record["options"]["steps"]) == ("dpm++", 20)
    assert record["num_clips"] == 2 and record["unet_calls"] == 2 * 20
    y0, x0, h, w = geom.frame_box
    preview = imageio.imread(tmp_path / "kivy_cityCC0_preview.png")    # rows: frames; columns: input | mask | output
    for row in range(preview.shape[0] // 64):
        masked, output = (preview[row * 64:(row + 1) * 64, k * 64:(k + 1) * 64] for k in (0, 2))
        assert np.array_equal(output[y0:y0 + h, x0:x0 + w], masked[y0:y0 + h, x0:x0 + w])
        assert output[:y0].std() > 1                                   # the band is generated, not left black
    source = frames_to_canvas(frames_to_tensor(read_frames_at(src, range(20), info)), geom).permute(0, 2, 3, 1).numpy()
    kept = read_frames_at(out.split()[0], range(20), got)[:, y0 - cy:y0 - cy + h, x0 - cx:x0 - cx + w]
    with VideoWriter(tmp_path / "baseline.mp4", cw, ch, 25) as writer:  # the codec's own loss on the source
        writer.write(np.ascontiguousarray(source[:, cy:cy + ch, cx:cx + cw]))
    base = read_frames_at(tmp_path / "baseline.mp4", range(20))[:, y0 - cy:y0 - cy + h, x0 - cx:x0 - cx + w]
    truth = source[:, y0:y0 + h, x0:x0 + w]
    assert psnr(kept, truth) > min(40, psnr(base, truth) - 0.5)


def test_cli_quality_presets(real_videos, weights, tmp_path, capsys):
    """--quality fast runs the preset's scheduler and steps; --quality with --scheduler or --steps is refused."""
    from m3ddm.schedulers import QUALITY
    src = real_videos / "pyfeat_single_face.mp4"
    rc, out, err = run_cli([src, "--ratio", "1:1", "--out", tmp_path, "--limit-frames", "4", "--global-frames", "0",
                            "--size", "64", "--quality", "fast", *weights], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "pyfeat_single_face.json").read_text())
    assert tuple(record["options"][k] for k in ("scheduler", "steps", "start_timestep")) == QUALITY["fast"]
    assert record["unet_calls"] == QUALITY["fast"][1] * record["num_clips"]
    for extra in (["--steps", "10"], ["--scheduler", "ddim"], ["--start-timestep", "961"]):
        expect_error([src, "--ratio", "1:1", "--out", tmp_path / "o", "--size", "64", "--quality", "fast", *extra,
                      *weights], capsys,
                     ["--quality fast", "either --quality or --scheduler/--steps"], tmp_path / "o")
    expect_error([src, "--ratio", "1:1", "--out", tmp_path / "o", "--size", "64", "--scheduler", "dpm++", "--steps",
                  "1000", *weights], capsys, ["--steps 1000", "1 to 999"], tmp_path / "o")


def test_cli_start_timestep(real_videos, weights, tmp_path, capsys):
    """--start-timestep 961 (PNDM-50's segment) with dpm++: the run record keeps it, each clip takes --steps UNet
    calls; pndm, an out-of-range start and more steps than timesteps are refused before anything is written."""
    src = real_videos / "pyfeat_single_face.mp4"
    rc, out, err = run_cli([src, "--ratio", "1:1", "--out", tmp_path, "--limit-frames", "4", "--global-frames", "0",
                            "--size", "64", "--scheduler", "dpm++", "--steps", "3", "--start-timestep", "961",
                            *weights], capsys)
    assert rc == 0, err
    record = json.loads((tmp_path / "pyfeat_single_face.json").read_text())
    assert tuple(record["options"][k] for k in ("scheduler", "steps", "start_timestep")) == ("dpm++", 3, 961)
    assert record["unet_calls"] == 3 * record["num_clips"]
    base = [src, "--ratio", "1:1", "--out", tmp_path / "o", "--size", "64", *weights]
    for extra, words in ((["--start-timestep", "961"], ["--start-timestep 961", "ddim or dpm++"]),
                         (["--scheduler", "ddim", "--start-timestep", "1000"], ["--start-timestep 1000", "1 to 999"]),
                         (["--scheduler", "ddim", "--start-timestep", "0"], ["--start-timestep 0", "1 to 999"]),
                         (["--scheduler", "dpm++", "--start-timestep", "9", "--steps", "11"],
                          ["--steps 11", "10 timesteps", "--steps 10 or fewer"])):
        expect_error(base + extra, capsys, words, tmp_path / "o")
