"""Still images (.png, .jpg) in, an image of the same format out: <stem>_<a>-<b>.png / .jpg."""
import json

import imageio.v2 as imageio
import numpy as np

import sample
from conftest import make_clip
from m3ddm.canvas import canvas_geometry, full_res_layout
from m3ddm.video import probe

FAST = ["--size", "64", "--scheduler", "ddim", "--steps", "1", "--global-frames", "0"]


def picture(h=30, w=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def run(argv, capsys):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.split()


def test_png_gives_png_with_untouched_source_pixels(tmp_path, tiny_weight_files, capsys):
    src = tmp_path / "photo.png"
    imageio.imwrite(src, picture())
    out_dir = tmp_path / "out"
    [out] = run([src, "--ratio", "16:9", "--out", out_dir, *FAST, *tiny_weight_files], capsys)
    assert out == str(out_dir / "photo_16-9.png") and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    geom = canvas_geometry((30, 40), [(16, 9)], 64)
    assert imageio.imread(out).shape == (geom.crops[(16, 9)][3], geom.crops[(16, 9)][2], 3)
    assert sorted(p.name for p in out_dir.iterdir()) == ["photo.json", "photo_16-9.png", "photo_preview.png"]
    record = json.loads((out_dir / "photo.json").read_text())
    assert record["num_output_frames"] == 1 and record["outputs"] == {"16:9": out}
    # --keep-resolution: the source's own pixels, exactly (PNG is lossless), on a 16:9 image
    [full] = run([src, "--ratio", "16:9", "--out", tmp_path / "full", "--keep-resolution", *FAST,
                  *tiny_weight_files], capsys)
    layout = full_res_layout(geom, (16, 9))
    image = imageio.imread(full)
    (top, left), (h, w) = layout.offset, layout.out_hw
    assert image.shape == (h, w, 3) and (h, w) == (30, 54)
    assert np.array_equal(image[top:top + 30, left:left + 40], picture())


def test_jpg_gives_jpg_and_folders_take_images(tmp_path, tiny_weight_files, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    imageio.imwrite(folder / "shot.JPG", picture(40, 30), format="jpeg", quality=95)
    make_clip(folder / "clip.mp4", "25", frames=4, size=(32, 24))
    out_dir = tmp_path / "out"
    outs = run([folder, "--ratio", "1:1", "--out", out_dir, *FAST, *tiny_weight_files], capsys)
    assert outs == [str(out_dir / "clip_1-1.mp4"), str(out_dir / "shot_1-1.jpg")]
    assert open(outs[1], "rb").read(3) == b"\xff\xd8\xff"
    assert imageio.imread(outs[1]).shape == (64, 64, 3)
    assert probe(outs[0]).num_frames == 4
