"""Canvas geometry, masks, crops, border fill and composites (spec pipeline.md sections 2, 3 and 6).

Geometry (reference arithmetic, one fix):
- The union target canvas at source resolution extends the short side until every requested ratio
  fits (`union_target_hw`).
- scale = S / max(union); the frame is resized to (int(H*scale), int(W*scale)) with an antialiased
  bilinear resize (torchvision's Resize(antialias=True) semantics: F.interpolate bilinear, antialias,
  align_corners=False), rounded to uint8 (the reference truncates), and pasted centred on a black square canvas; the odd pixel
  goes bottom/right.
- FIX: the canvas side is always exactly S, a multiple of 64. The reference recomputes the side from
  truncated sizes and gets 255/254 (511/510) for "2:3", "21:9", 854x480 -> "3:4", ..., then crashes.
- Mask: 1 = generate (the border), 0 = keep (the frame). Latent mask: nearest downsample by 8 (the
  top-left pixel of each 8x8 cell), as F.interpolate(mode="nearest"): `masks.latent_mask`.
- Output crop per ratio a:b (the working-size outputs): centred on the canvas, the largest a:b rectangle,
  as the reference: the long side is S and the short side int(S*b/a) (or int(S*a/b)); FIX: an odd short
  side is rounded UP to even for H.264. So the short side is the even integer nearest to the exact
  S*b/a (an odd integer goes up), within 1 px of it, and the crop always contains the whole frame (it only
  differs from the reference for "21:9"-like ratios, where the reference's side is odd).

Border fill (the reference uses OpenCV's Telea inpainting, for the starting latent x_T only): an
onion-peel fill, a simplified Telea without its gradient and direction terms. Layer by layer from the
frame's edge outwards, every unknown pixel that touches known pixels gets the mean of its known 3x3
neighbours and becomes known, until the canvas is full. The frame's edge colours are thus carried
straight out into the border (a column gradient stays a column gradient), with a slight blur that
grows with the distance. Known pixels are returned exactly, there are no holes, and every value is a
convex combination of known pixels (no overshoot). Cost: one 3x3 pooling per border pixel of depth.

Full-resolution composite (`--keep-resolution`): the output for ratio a:b is that ratio's crop of the
union canvas at the source's scale (one ratio: the source extended to a:b), with the ratio exact up to
rounding to even pixels: the long side is the even integer nearest to the canvas side at source scale,
max(union), and the short side the even integer nearest to what a:b makes of it (odd integers go up),
neither smaller than the source. 1920x1080 -> 21:9 is 2520x1080; 640x480 -> 16:9 is 854x480. The source is centred, (out - in) // 2 from the
top/left (within 1 px of the centre), at its exact pixels; only the generated border is resampled
(bilinear) from the working canvas, with the source rectangle mapped exactly onto the canvas frame
rectangle so that the seam lines up (output pixels beyond the canvas edge, at most about a canvas pixel,
take the edge's value). `feather` px blends the source into the generated border over a ramp inside the
known region's edges (default 0 = hard paste).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

LATENT_FACTOR = 8       # VAE downsampling
SIDE_MULTIPLE = 64      # canvas side must be a multiple of this (UNet: 8 x 3 downsamples)


# ----------------------------------------------------------------------------------------------
# ratios and geometry

def parse_ratios(text: str) -> list:
    """'16:9,9:16' -> [(16, 9), (9, 16)]. Positive whole numbers W:H, comma-separated; exact
    duplicates are dropped (first kept)."""
    ratios = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise UserError(f"Aspect ratio {part.strip()!r} is not valid; use W:H with positive whole "
                            "numbers, comma-separated, e.g. 16:9,9:16.")
        ratio = (int(m.group(1)), int(m.group(2)))
        if ratio not in ratios:
            ratios.append(ratio)
    return ratios


def ratio_label(ratio: tuple, sep: str = ":") -> str:
    """(16, 9) -> '16:9' (sep='-' gives the file-name form '16-9')."""
    return f"{ratio[0]}{sep}{ratio[1]}"


def union_target_hw(source_hw: tuple, ratios: Sequence[tuple]) -> tuple:
    """Smallest canvas at source resolution that contains the frame and fits every ratio:
    the reference's get_max_target_size. Returns floats (max_h, max_w)."""
    h, w = source_hw
    max_h, max_w, cur = h, w, w / h
    for a, b in ratios:
        t = a / b
        if cur < t:
            max_w = max(max_w, t * h)
        else:
            max_h = max(max_h, w / t)
    return max_h, max_w


def needs_outpainting(source_hw: tuple, ratio: tuple) -> bool:
    """False when the source already has this ratio to within one source pixel (the output for it
    can be the source itself)."""
    th, tw = union_target_hw(source_hw, [ratio])
    return (th - source_hw[0]) >= 1 or (tw - source_hw[1]) >= 1


def _even_up(n: int) -> int:
    return n + (n % 2)


@dataclass(frozen=True)
class CanvasGeometry:
    """Where a source frame sits on the square working canvas.

    source_hw: (H, W) of the source; ratios: the requested (a, b) ratios; size: canvas side S.
    union_hw: union target at source resolution (floats); scale = S / max(union_hw).
    resized_hw: (h', w') of the resized frame; pad: (top, left) of the frame on the canvas.
    crops: {(a, b): (x0, y0, w, h)}: per-ratio output crop of the canvas (even w, h).
    """
    source_hw: tuple
    ratios: tuple
    size: int
    union_hw: tuple
    scale: float
    resized_hw: tuple
    pad: tuple
    crops: dict

    @property
    def side(self) -> int:
        return self.size

    @property
    def latent_size(self) -> int:
        return self.size // LATENT_FACTOR

    @property
    def frame_box(self) -> tuple:
        """(y0, x0, h, w) of the resized frame on the canvas."""
        return (self.pad[0], self.pad[1], self.resized_hw[0], self.resized_hw[1])


def check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size <= 0 or size % SIDE_MULTIPLE:
        raise UserError(f"--size {size} is not a positive multiple of {SIDE_MULTIPLE} (the side of the square "
                        "canvas); use e.g. 256 or 512.")
    return int(size)


def crop_box(side: int, ratio: tuple) -> tuple:
    """(x0, y0, w, h): the centred a:b crop of a side x side canvas (reference rule, sizes rounded
    up to even)."""
    t = ratio[0] / ratio[1]
    if 1 > t:
        w, h = _even_up(int(side * t)), side
    else:
        w, h = side, _even_up(int(side / t))
    return ((side - w) // 2, (side - h) // 2, w, h)


def canvas_geometry(source_hw: tuple, ratios: Sequence[tuple], size: int = 256) -> CanvasGeometry:
    """The canvas geometry for a source of (H, W) and the requested ratios on an S x S canvas."""
    size = check_size(size)
    h, w = int(source_hw[0]), int(source_hw[1])
    if h < 1 or w < 1:
        raise UserError(f"Source frame size {w}x{h} is empty; give a video with real frames.")
    if not ratios:
        raise UserError("No aspect ratio was given; pass at least one, e.g. 16:9.")
    ratios = tuple(tuple(int(x) for x in r) for r in ratios)
    union = union_target_hw((h, w), ratios)
    scale = size / max(union)
    rh, rw = max(1, int(h * scale)), max(1, int(w * scale))
    pad = ((size - rh) // 2, (size - rw) // 2)
    crops = {r: crop_box(size, r) for r in ratios}
    return CanvasGeometry(source_hw=(h, w), ratios=ratios, size=size, union_hw=union, scale=scale,
                          resized_hw=(rh, rw), pad=pad, crops=crops)


# ----------------------------------------------------------------------------------------------
# masks

def pixel_mask(geom: CanvasGeometry, device=None, dtype=torch.float32) -> torch.Tensor:
    """(S, S) mask, 1 = generate (border), 0 = keep (the frame)."""
    mask = torch.ones(geom.size, geom.size, device=device, dtype=dtype)
    y0, x0, h, w = geom.frame_box
    mask[y0:y0 + h, x0:x0 + w] = 0
    return mask


# ----------------------------------------------------------------------------------------------
# frames onto the canvas

def frames_to_tensor(frames, device=None) -> torch.Tensor:
    """uint8 numpy (n, H, W, 3) or (H, W, 3) -> uint8 tensor (n, 3, H, W)."""
    x = torch.as_tensor(np.asarray(frames), device=device)
    if x.ndim == 3:
        x = x[None]
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (n, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """uint8 tensor (n, 3, H, W) -> numpy (n, H, W, 3) for the video writer."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 (n, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def resize_antialias(x: torch.Tensor, hw: tuple) -> torch.Tensor:
    """Float (n, C, H, W) -> (n, C, h, w): bilinear with antialiasing (torchvision Resize semantics)."""
    return F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)


def frames_to_canvas(frames: torch.Tensor, geom: CanvasGeometry, device=None) -> torch.Tensor:
    """uint8 (n, 3, H, W) source frames -> uint8 (n, 3, S, S) masked canvas: resized frame centred,
    black (0) border. Resize in float32 on 0..255 values, then ROUNDED to uint8 (the reference
    truncates, which turns e.g. a flat 200 into 199 where the filter weights sum to just under 1)."""
    if tuple(frames.shape[-2:]) != geom.source_hw:
        raise ValueError(f"expected frames of size {geom.source_hw}, got {tuple(frames.shape[-2:])}")
    x = frames.to(device=device, dtype=torch.float32)
    small = resize_antialias(x, geom.resized_hw).round().clamp(0, 255).to(torch.uint8)
    canvas = torch.zeros(x.shape[0], 3, geom.size, geom.size, dtype=torch.uint8, device=x.device)
    y0, x0, h, w = geom.frame_box
    canvas[:, :, y0:y0 + h, x0:x0 + w] = small
    return canvas


def global_frames_to_model(frames: torch.Tensor, size: int, device=None) -> torch.Tensor:
    """Global frames: uint8 (n, 3, H, W) -> float32 (n, 3, S, S) in [-1, 1], SQUASHED to S x S (no
    canvas, no mask), as the reference: /255, antialiased resize, then (x - 0.5) / 0.5."""
    x = frames.to(device=device, dtype=torch.float32) / 255
    return (resize_antialias(x, (size, size)) - 0.5) / 0.5


def to_model(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 pixels -> [-1, 1]: (x / 255 - 0.5) / 0.5 in float32 (reference), then cast."""
    return ((x.float() / 255 - 0.5) / 0.5).to(dtype)


def from_model(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> uint8: round(clamp(x / 2 + 0.5, 0, 1) * 255) (diffusers numpy_to_pil)."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# border fill for the starting latent

def border_fill(images: torch.Tensor, mask: torch.Tensor, max_iters: int = 10_000) -> torch.Tensor:
    """Fill the masked pixels (mask 1 = fill) of (n, C, H, W) images by onion-peel (see module doc).

    Known pixels are returned unchanged; uint8 input gives uint8 output (rounded)."""
    known = (1 - mask.float()).to(images.device).reshape(1, 1, *images.shape[-2:])  # shared by all frames
    if not (known > 0).any():
        raise ValueError("border_fill needs at least one known pixel (mask 0)")
    out = images.float() * known
    for _ in range(max_iters):
        if (known > 0).all():
            break
        # mean of the known 3x3 neighbours (the pooling divisor cancels in the ratio)
        weight = F.avg_pool2d(known, 3, stride=1, padding=1)                         # (1, 1, H, W)
        colour = F.avg_pool2d(out, 3, stride=1, padding=1)                           # (n, C, H, W)
        ring = (known == 0) & (weight > 0)                                           # the next layer
        out = torch.where(ring, colour / weight.clamp_min(1e-12), out)
        known = known + ring.float()
    if images.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(images.dtype)


# ----------------------------------------------------------------------------------------------
# paste-back, crops and the full-resolution composite

def _feather_ramp(h: int, w: int, feather: int, sides: tuple, device=None) -> torch.Tensor:
    """(h, w) weight of the known region: 1 inside, ramping down towards the edges listed in
    `sides` (top, bottom, left, right booleans) over `feather` px; the edge pixel gets 0.5/feather."""
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    inf = torch.full_like(ys, float("inf")), torch.full_like(xs, float("inf"))
    top = ys if sides[0] else inf[0]
    bottom = (h - 1 - ys) if sides[1] else inf[0]
    left = xs if sides[2] else inf[1]
    right = (w - 1 - xs) if sides[3] else inf[1]
    dist = torch.minimum(torch.minimum(top, bottom)[:, None], torch.minimum(left, right)[None, :])
    return ((dist + 0.5) / feather).clamp(0, 1)


def paste_known(generated: torch.Tensor, canvas: torch.Tensor, geom: CanvasGeometry,
                feather: int = 0) -> torch.Tensor:
    """Canvas-resolution paste-back: uint8 (n, 3, S, S) generated frames with the known frame pixels
    of the uint8 masked canvas put back. feather=0: hard paste (the reference, without its float
    round-trip that turns some levels into level-1); feather>0: linear ramp inside the frame's edges."""
    out = generated.clone()
    y0, x0, h, w = geom.frame_box
    src = canvas[:, :, y0:y0 + h, x0:x0 + w]
    if feather <= 0:
        out[:, :, y0:y0 + h, x0:x0 + w] = src
        return out
    sides = (y0 > 0, y0 + h < geom.size, x0 > 0, x0 + w < geom.size)
    alpha = _feather_ramp(h, w, feather, sides, device=generated.device)
    gen = generated[:, :, y0:y0 + h, x0:x0 + w].float()
    out[:, :, y0:y0 + h, x0:x0 + w] = (alpha * src.float() + (1 - alpha) * gen).round().to(torch.uint8)
    return out


def crop(frames: torch.Tensor, geom: CanvasGeometry, ratio: tuple) -> torch.Tensor:
    """(..., S, S) canvas frames -> (..., h, w) centred crop for one ratio."""
    x0, y0, w, h = geom.crops[tuple(ratio)]
    return frames[..., y0:y0 + h, x0:x0 + w]


@dataclass(frozen=True)
class FullResLayout:
    """Full-resolution output for one ratio: out_hw (even), offset (top, left) of the source in it."""
    out_hw: tuple
    offset: tuple


def _even_near(x: float, at_least: int) -> int:
    """The even integer nearest to x (an odd integer goes up), and at least `at_least` rounded up to even."""
    return max(_even_up(at_least), 2 * math.floor(x / 2 + 0.5))


def full_res_layout(geom: CanvasGeometry, ratio: tuple) -> FullResLayout:
    """Size of the --keep-resolution output for a ratio and where the source goes in it (module doc)."""
    H, W = geom.source_hw
    a, b = ratio
    side = max(geom.union_hw)                      # the canvas side at source scale, before any rounding
    if a >= b:                                     # the crop's long side is the canvas side; the short follows
        out_w = _even_near(side, W)
        out_h = _even_near(out_w * b / a, H)
    else:
        out_h = _even_near(side, H)
        out_w = _even_near(out_h * a / b, W)
    return FullResLayout(out_hw=(out_h, out_w), offset=((out_h - H) // 2, (out_w - W) // 2))


def composite_full_res(source: torch.Tensor, generated: torch.Tensor, geom: CanvasGeometry, ratio: tuple,
                       feather: int = 0) -> torch.Tensor:
    """--keep-resolution output for one ratio: uint8 (n, 3, out_h, out_w).

    source: uint8 (n, 3, H, W) source frames at full resolution; generated: uint8 (n, 3, S, S)
    canvas frames. The border is bilinearly resampled from the canvas (mapping the source rectangle
    exactly onto the canvas frame rectangle); the source pixels are pasted untouched (feather=0) or
    blended over a `feather`-px ramp inside their edges."""
    H, W = geom.source_hw
    if tuple(source.shape[-2:]) != (H, W) or tuple(generated.shape[-2:]) != (geom.size, geom.size):
        raise ValueError(f"expected source (n, 3, {H}, {W}) and canvas (n, 3, {geom.size}, {geom.size}), "
                         f"got {tuple(source.shape)} and {tuple(generated.shape)}")
    layout = full_res_layout(geom, ratio)
    (out_h, out_w), (top, left) = layout.out_hw, layout.offset
    rh, rw = geom.resized_hw
    dev = generated.device
    # continuous canvas coordinate of each output pixel centre, then grid_sample's [-1, 1]
    u = geom.pad[1] + (torch.arange(out_w, device=dev, dtype=torch.float32) + 0.5 - left) * (rw / W)
    v = geom.pad[0] + (torch.arange(out_h, device=dev, dtype=torch.float32) + 0.5 - top) * (rh / H)
    gx = (2 * u / geom.size - 1)[None, :].expand(out_h, out_w)
    gy = (2 * v / geom.size - 1)[:, None].expand(out_h, out_w)
    grid = torch.stack([gx, gy], dim=-1)[None].expand(generated.shape[0], out_h, out_w, 2)
    up = F.grid_sample(generated.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = up.round().clamp(0, 255).to(torch.uint8)                      # (n, 3, out_h, out_w)
    src = source.to(dev)
    if feather <= 0:
        out[:, :, top:top + H, left:left + W] = src
        return out
    sides = (top > 0, top + H < out_h, left > 0, left + W < out_w)
    alpha = _feather_ramp(H, W, feather, sides, device=dev)
    region = up[:, :, top:top + H, left:left + W]
    out[:, :, top:top + H, left:left + W] = (alpha * src.float() + (1 - alpha) * region).round().clamp(0, 255).to(torch.uint8)
    return out
