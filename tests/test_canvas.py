"""Canvas geometry against the reference fixture, masks, resize, border fill and composites."""
import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from m3ddm.canvas import (FullResLayout, border_fill, canvas_geometry, composite_full_res, crop, frames_to_canvas,
                          frames_to_tensor, from_model, full_res_layout, global_frames_to_model,
                          needs_outpainting, parse_ratios, paste_known, pixel_mask,
                          tensor_to_frames, to_model)
from m3ddm.errors import UserError
from m3ddm.masks import latent_mask

CASES = json.loads((FIXTURES / "canvas_geometry.json").read_text())["cases"]


def _ratio(key):
    a, b = key.split(":")
    return int(a), int(b)


def test_parse_ratios():
    assert parse_ratios("16:9,9:16") == [(16, 9), (9, 16)]
    assert parse_ratios(" 1:1 , 4:3,1:1") == [(1, 1), (4, 3)]
    for bad in ("16-9", "0:1", "1:0", "abc", "-16:9", "16:-9", "1.5:1", "", "16:9,", ":9"):
        with pytest.raises(UserError):
            parse_ratios(bad)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['W']}x{c['H']}-{c['ratios']}-S{c['S']}")
def test_geometry_matches_reference(case):
    ratios = parse_ratios(case["ratios"])
    geom = canvas_geometry((case["H"], case["W"]), ratios, case["S"])
    assert geom.side == case["S"]
    assert list(geom.union_hw) == pytest.approx(case["union_target_hw"], rel=1e-12)
    assert geom.scale == case["scale"]
    assert list(geom.resized_hw) == case["resized_hw"]
    rh, rw = geom.resized_hw
    if not case["crashes_side_not_multiple_of_8"]:
        assert case["side"] == case["S"]
        assert list(geom.pad) == [case["pad_h"], case["pad_w"]]
    else:
        # the reference side is 255/254 (511/510) and crashes; m3ddm keeps S and centres the frame in it
        assert case["side"] in (case["S"] - 1, case["S"] - 2)
        assert geom.pad == ((case["S"] - rh) // 2, (case["S"] - rw) // 2)
    for key, (x0, y0, w, h) in case["crops"].items():
        gx0, gy0, gw, gh = geom.crops[_ratio(key)]
        assert gw % 2 == 0 and gh % 2 == 0
        if case["side"] == case["S"]:
            # same crop, except that an odd size is rounded up to even (and re-centred)
            assert (gw, gh) == (w + w % 2, h + h % 2)
            assert (gx0, gy0) == ((case["S"] - gw) // 2, (case["S"] - gh) // 2)
        # the crop always contains the whole frame
        assert gx0 <= geom.pad[1] and geom.pad[1] + rw <= gx0 + gw
        assert gy0 <= geom.pad[0] and geom.pad[0] + rh <= gy0 + gh


def test_size_must_be_multiple_of_64():
    for bad in (0, 100, 255, -256):
        with pytest.raises(UserError):
            canvas_geometry((720, 1280), [(1, 1)], bad)
    assert canvas_geometry((720, 1280), [(2, 3)], 256).side == 256   # the reference gives 255 and crashes


def test_needs_outpainting():
    assert not needs_outpainting((1080, 1920), (16, 9))
    assert not needs_outpainting((480, 854), (16, 9))      # 0.375 px short: the source is the output
    assert needs_outpainting((1080, 1920), (9, 16))
    assert needs_outpainting((480, 640), (16, 9))
    assert not needs_outpainting((1080, 1080), (1, 1))


def test_canvas_masks_and_resize():
    geom = canvas_geometry((405, 720), [(9, 16)], 64)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 405, 720), dtype=torch.uint8, generator=gen)
    canvas = frames_to_canvas(frames, geom)
    mask = pixel_mask(geom)
    y0, x0, h, w = geom.frame_box
    assert canvas.shape == (2, 3, 64, 64) and canvas.dtype == torch.uint8
    assert (canvas[:, :, mask == 1] == 0).all()
    assert mask.sum() == 64 * 64 - h * w
    assert torch.equal(latent_mask(mask), mask[::8, ::8])
    assert torch.equal(latent_mask(mask[None, None]), mask[None, None, ::8, ::8])
    # a constant frame stays constant through the antialiased resize
    flat = torch.full((1, 3, 405, 720), 200, dtype=torch.uint8)
    assert (frames_to_canvas(flat, geom)[:, :, mask == 0] == 200).all()


def test_resize_matches_pil_antialiased_bilinear():
    """torch's antialiased bilinear is PIL's reducing BILINEAR filter (torchvision Resize semantics)."""
    Image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 3, 96, 160), dtype=torch.uint8, generator=gen)
    geom = canvas_geometry((96, 160), [(1, 1)], 64)
    y0, x0, h, w = geom.frame_box
    ours = frames_to_canvas(img, geom)[0, :, y0:y0 + h, x0:x0 + w].permute(1, 2, 0).numpy().astype(int)
    pil = np.asarray(Image.fromarray(img[0].permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)).astype(int)
    assert np.abs(ours - pil).max() <= 1     # PIL rounds, the reference truncates


def test_global_frames_and_pixel_ranges():
    frames = torch.randint(0, 256, (3, 3, 50, 90), dtype=torch.uint8)
    x = global_frames_to_model(frames, 64)
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(from_model(to_model(u8)), u8)
    np_frames = np.zeros((2, 5, 7, 3), np.uint8)
    assert frames_to_tensor(np_frames).shape == (2, 3, 5, 7)
    assert tensor_to_frames(frames_to_tensor(np_frames)).shape == (2, 5, 7, 3)


def test_border_fill_onion_peel():
    geom = canvas_geometry((72, 128), [(1, 1)], 128)
    mask = pixel_mask(geom)
    gen = torch.Generator().manual_seed(2)
    frames = torch.randint(30, 220, (2, 3, 72, 128), dtype=torch.uint8, generator=gen)
    canvas = frames_to_canvas(frames, geom)
    filled = border_fill(canvas, mask)
    known = mask == 0
    assert torch.equal(filled[:, :, known], canvas[:, :, known]), "known region untouched"
    for i in range(2):
        for c in range(3):
            vals, ref = filled[i, c][mask == 1], canvas[i, c][known]
            assert vals.min() >= ref.min() and vals.max() <= ref.max(), "within the known range"
            assert (vals > 0).all(), "no black holes left"
    # a smooth frame extends smoothly: a constant-per-column frame keeps its columns in the border
    ramp = torch.linspace(40, 200, 128).round().to(torch.uint8).expand(1, 3, 72, 128).contiguous()
    out = border_fill(frames_to_canvas(ramp, geom), mask).float()
    y0, x0, h, w = geom.frame_box
    assert (out[0, :, 0, 32:-32] - out[0, :, y0, 32:-32]).abs().max() <= 1   # away from the corners
    assert (out[0, :, 0, :] - out[0, :, y0, :]).abs().max() <= 6
    # float input stays float and keeps values
    f = border_fill(canvas.float(), mask)
    assert f.dtype == torch.float32 and torch.equal(f[:, :, known], canvas.float()[:, :, known])


def test_paste_known_hard_and_feathered():
    geom = canvas_geometry((36, 64), [(1, 1)], 64)
    canvas = frames_to_canvas(torch.full((1, 3, 36, 64), 100, dtype=torch.uint8), geom)
    generated = torch.full((1, 3, 64, 64), 20, dtype=torch.uint8)
    mask = pixel_mask(geom)
    hard = paste_known(generated, canvas, geom)
    assert (hard[:, :, mask == 0] == 100).all() and (hard[:, :, mask == 1] == 20).all()
    soft = paste_known(generated, canvas, geom, feather=4)
    y0, x0, h, w = geom.frame_box
    assert (soft[:, :, y0 + 4:y0 + h - 4] == 100).all() and (soft[:, :, mask == 1] == 20).all()
    assert 20 < soft[0, 0, y0, 10] < 100
    # frame touches the left/right canvas edges: no ramp there
    assert soft[0, 0, y0 + 10, 0] == 100


def test_crop_and_full_res_composite_alignment():
    """A linear gradient drawn consistently at both scales must come out as the same gradient."""
    H, W = 90, 160
    geom = canvas_geometry((H, W), [(9, 16), (1, 1)], 64)
    assert crop(torch.zeros(2, 3, 64, 64), geom, (9, 16)).shape[-2:] == (64, 36)
    for ratio in ((9, 16), (1, 1)):
        layout = full_res_layout(geom, ratio)
        (oh, ow), (top, left) = layout.out_hw, layout.offset
        assert oh % 2 == 0 and ow % 2 == 0 and oh >= H and ow >= W
        rh, rw = geom.resized_hw

        def f(yy, xx):  # values in output pixel coordinates
            return 30 + 0.4 * yy + 0.5 * xx

        jj = torch.arange(64, dtype=torch.float32) + 0.5
        cx = left + (jj - geom.pad[1]) * W / rw - 0.5
        cy = top + (jj - geom.pad[0]) * H / rh - 0.5
        canvas = f(cy[:, None], cx[None, :]).clamp(0, 255).round().to(torch.uint8).expand(1, 3, 64, 64)
        ys, xs = torch.arange(H, dtype=torch.float32) + top, torch.arange(W, dtype=torch.float32) + left
        source = f(ys[:, None], xs[None, :]).round().to(torch.uint8).expand(1, 3, H, W).contiguous()
        out = composite_full_res(source, canvas, geom, ratio)
        assert out.shape == (1, 3, oh, ow)
        assert torch.equal(out[:, :, top:top + H, left:left + W], source), "source pixels untouched"
        oy, ox = torch.arange(oh, dtype=torch.float32), torch.arange(ow, dtype=torch.float32)
        want = f(oy[:, None], ox[None, :]).clamp(0, 255)
        inner = (slice(4, oh - 4), slice(4, ow - 4))          # away from the clamped canvas edge
        assert (out[0, 0][inner].float() - want[inner]).abs().max() <= 2.0
        soft = composite_full_res(source, canvas, geom, ratio, feather=6)
        assert (soft[0, 0][inner].float() - want[inner]).abs().max() <= 2.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['W']}x{c['H']}-{c['ratios']}-S{c['S']}")
def test_working_crop_rule(case):
    """Every ratio's canvas crop: long side S, short side the even integer nearest S*b/a (an odd integer goes
    up), within 1 px of it; centred exactly; the whole frame inside."""
    geom = canvas_geometry((case["H"], case["W"]), parse_ratios(case["ratios"]), case["S"])
    S, (rh, rw) = geom.size, geom.resized_hw
    for (a, b), (x0, y0, w, h) in geom.crops.items():
        long_side, short_side, exact = (w, h, S * b / a) if a >= b else (h, w, S * a / b)
        assert long_side == S and short_side % 2 == 0 and abs(short_side - exact) <= 1
        assert short_side == 2 * int(exact // 2) + (2 if int(exact) % 2 else 0)
        assert (x0, y0) == ((S - w) // 2, (S - h) // 2) and (S - w) % 2 == 0 and (S - h) % 2 == 0
        assert x0 <= geom.pad[1] and geom.pad[1] + rw <= x0 + w and y0 <= geom.pad[0] and geom.pad[0] + rh <= y0 + h


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['W']}x{c['H']}-{c['ratios']}-S{c['S']}")
def test_full_resolution_has_the_ratio(case):
    """--keep-resolution: the ratio exactly up to rounding to even pixels, at least the source, source centred
    within 1 px; one ratio: the source extended to the ratio, nothing more."""
    H, W = case["H"], case["W"]
    ratios = parse_ratios(case["ratios"])
    geom = canvas_geometry((H, W), ratios, case["S"])
    for a, b in ratios:
        layout = full_res_layout(geom, (a, b))
        (oh, ow), (top, left) = layout.out_hw, layout.offset
        assert oh % 2 == 0 and ow % 2 == 0 and oh >= H and ow >= W
        assert min(abs(ow - oh * a / b), abs(oh - ow * b / a)) <= 1          # the ratio, up to even rounding
        assert abs(top - (oh - H - top)) <= 1 and abs(left - (ow - W - left)) <= 1
        if len(ratios) == 1:                     # one side is the source's (rounded up to even)
            assert oh == H + H % 2 or ow == W + W % 2


def test_full_resolution_21_9_from_1080p():
    geom = canvas_geometry((1080, 1920), [(21, 9)], 256)
    assert full_res_layout(geom, (21, 9)) == FullResLayout(out_hw=(1080, 2520), offset=(0, 300))
    assert full_res_layout(canvas_geometry((1080, 1920), [(21, 9)], 512), (21, 9)).out_hw == (1080, 2520)
    assert full_res_layout(canvas_geometry((480, 640), [(16, 9)], 256), (16, 9)).out_hw == (480, 854)


@pytest.mark.parametrize("hw,ratios,size", [((90, 160), [(9, 16), (1, 1)], 64), ((1080, 1920), [(21, 9)], 256),
                                            ((405, 720), [(4, 3), (2, 3)], 128), ((999, 1000), [(16, 9)], 64)])
def test_full_resolution_border_follows_the_canvas(hw, ratios, size):
    """A linear gradient drawn consistently on the canvas and the source comes out as the same gradient over the
    whole full-resolution output: the border is mapped from the canvas through the frame rectangle."""
    H, W = hw
    geom = canvas_geometry(hw, ratios, size)
    rh, rw = geom.resized_hw
    for ratio in ratios:
        (oh, ow), (top, left) = full_res_layout(geom, ratio).out_hw, full_res_layout(geom, ratio).offset
        gy, gx = 60 / oh, 80 / ow                        # the gradient spans 0..140 over the output

        def f(yy, xx):
            return 40 + gy * yy + gx * xx

        jj = torch.arange(size, dtype=torch.float32) + 0.5
        cx = left + (jj - geom.pad[1]) * W / rw - 0.5
        cy = top + (jj - geom.pad[0]) * H / rh - 0.5
        canvas = f(cy[:, None], cx[None, :]).clamp(0, 255).round().to(torch.uint8).expand(1, 3, size, size)
        ys, xs = torch.arange(H, dtype=torch.float32) + top, torch.arange(W, dtype=torch.float32) + left
        source = f(ys[:, None], xs[None, :]).round().to(torch.uint8).expand(1, 3, H, W).contiguous()
        out = composite_full_res(source, canvas, geom, ratio)
        assert out.shape == (1, 3, oh, ow) and torch.equal(out[:, :, top:top + H, left:left + W], source)
        oy, ox = torch.arange(oh, dtype=torch.float32), torch.arange(ow, dtype=torch.float32)
        want = f(oy[:, None], ox[None, :])
        edge = int(2 * max(H / rh, W / rw)) + 1           # output px beyond the canvas edge take its value
        inner = (slice(edge, oh - edge), slice(edge, ow - edge))
        assert (out[0, 0][inner].float() - want[inner]).abs().max() <= 1.0
