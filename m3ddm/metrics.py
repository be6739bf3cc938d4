"""Video outpainting metrics, pure torch: PSNR, SSIM (two variants), LPIPS (AlexNet v0.1), FVD, flicker.

Frames enter as uint8 tensors (F, 3, H, W), RGB, exactly the pixels that would be written to disk.
Every per-frame metric takes an optional `band` mask (H, W) bool, True = generated pixels, and then
scores only those pixels; without it the whole frame is scored (the published protocol).
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .weights import load_tensors, make_config, read_header, sha256_file, strict_load

# ------------------------------------------------------------------------------------------------
# PSNR


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float64 [0, 1]; float input is taken to be in [0, 1] already."""
    return x.double() / 255 if x.dtype == torch.uint8 else x.double()


def psnr(a: torch.Tensor, b: torch.Tensor, band: torch.Tensor = None) -> torch.Tensor:
    """Per-frame PSNR in dB on [0, 1] (float64), inf where a frame matches exactly.

    a, b: (F, 3, H, W), uint8 or float in [0, 1]. Per frame, then averaged by the caller, as the
    reference evaluation does (not the PSNR of the mean MSE).
    """
    _check_pair(a, b)
    d2 = (to_unit(a) - to_unit(b)) ** 2  # (F, 3, H, W)
    if band is None:
        mse = d2.flatten(1).mean(1)
    else:
        w = band.to(d2.dtype).expand_as(d2)
        mse = (d2 * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return 10 * torch.log10(1.0 / mse)  # mse == 0 gives +inf


# ------------------------------------------------------------------------------------------------
# SSIM: scikit-image's structural_similarity, both of its common settings


@dataclass(frozen=True)
class SSIMVariant:
    name: str
    taps: tuple            # 1-D window, applied separably
    sample_covariance: bool


def _uniform_taps(size=7):
    return tuple([1.0 / size] * size)


def _gaussian_taps(sigma=1.5, truncate=3.5):
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius: 5 taps each side
    w = [math.exp(-(k * k) / (2 * sigma * sigma)) for k in range(-radius, radius + 1)]
    s = sum(w)
    return tuple(x / s for x in w)


# skimage default (what the M3DDM+ reference evaluation calls) and Wang et al. 2004.
SSIM_UNIFORM7 = SSIMVariant("uniform7", _uniform_taps(7), sample_covariance=True)
SSIM_GAUSSIAN11 = SSIMVariant("gaussian11", _gaussian_taps(1.5), sample_covariance=False)
SSIM_VARIANTS = {v.name: v for v in (SSIM_UNIFORM7, SSIM_GAUSSIAN11)}


def ssim_map(a: torch.Tensor, b: torch.Tensor, variant: SSIMVariant = SSIM_UNIFORM7) -> torch.Tensor:
    """SSIM map over full windows only, float64: (F, 3, H - 2p, W - 2p) with p = window radius.

    scikit-image filters with reflect padding and then crops p pixels on every side, so only full
    windows survive; computing the valid convolution directly gives the same numbers.
    """
    _check_pair(a, b)
    n, c, h, w = a.shape
    k = len(variant.taps)
    if h < k or w < k:
        raise ValueError(f"SSIM needs frames of at least {k}x{k} pixels, received {h}x{w}")
    tw, th = _filter_matrix(w, variant.taps), _filter_matrix(h, variant.taps)  # (W, W-k+1), (H, H-k+1)

    def filt(x):  # valid separable filtering as two matrix products (BLAS; float64 conv2d is slow on CPU)
        return th.T @ (x @ tw)

    x, y = _to_255(a), _to_255(b)  # (F, 3, H, W) float64
    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    cov_norm = k * k / (k * k - 1) if variant.sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # uint8 data range
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s  # (F, 3, H - k + 1, W - k + 1)


def _filter_matrix(n, taps):
    """Banded (n, n-k+1) matrix whose column j holds the taps at rows j..j+k-1: x @ T = valid correlation."""
    k = len(taps)
    t = torch.zeros(n, n - k + 1, dtype=torch.float64)
    cols = torch.arange(n - k + 1)
    for i, tap in enumerate(taps):
        t[cols + i, cols] = tap
    return t


def ssim(a, b, variant=SSIM_UNIFORM7, band=None) -> torch.Tensor:
    """Per-frame SSIM (mean over windows, then over the 3 channels), float64; uint8 or [0, 1] input.

    With `band`, only windows centred on a generated pixel count (NaN if none is far enough from
    the frame edge to hold a full window).
    """
    if isinstance(variant, str):
        variant = SSIM_VARIANTS[variant]
    return reduce_ssim_map(ssim_map(a, b, variant), variant, band)


def reduce_ssim_map(s, variant, band=None):
    """SSIM map (F, 3, h, w) -> per-frame SSIM, over all windows or those centred in `band` (H, W)."""
    per_channel = s.mean((2, 3)) if band is None else _masked_mean(s, _crop_band(band, len(variant.taps)))
    return per_channel.mean(1)


def _to_255(x):  # float64 on the uint8 scale, so C1 and C2 use data range 255 either way
    return x.double() if x.dtype == torch.uint8 else x.double() * 255


def _crop_band(band, k):
    p = (k - 1) // 2
    h, w = band.shape
    return band[p:h - p, p:w - p]


def _masked_mean(x, mask):  # x (..., h, w), mask (h, w) -> (...)
    m = mask.to(x.dtype)
    return (x * m).sum((-2, -1)) / m.sum()


# ------------------------------------------------------------------------------------------------
# LPIPS v0.1 with the AlexNet trunk (Zhang et al. 2018), written from the published description


LPIPS_MIN_SIDE = 31


@dataclass
class LPIPSConfig:
    channels: tuple = (64, 192, 384, 256, 256)
    # v0.1 input scaling layer constants (ImageNet statistics mapped to [-1, 1] inputs)
    shift: tuple = (-0.030, -0.088, -0.188)
    scale: tuple = (0.458, 0.448, 0.450)
    eps: float = 1e-10


class LinearHead(nn.Module):
    """A 1x1 conv C -> 1 without bias; sits at index 1 so the state-dict name is `model.1.weight`."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance: AlexNet relu1..relu5, unit-normalised, squared difference, heads."""

    def __init__(self, config: LPIPSConfig = None):
        super().__init__()
        self.config = config = config or LPIPSConfig()
        c = config.channels
        # torchvision AlexNet .features indices, so the state dict uses features.{0,3,6,8,10}.*
        self.features = nn.ModuleDict({
            "0": nn.Conv2d(3, c[0], 11, stride=4, padding=2),
            "3": nn.Conv2d(c[0], c[1], 5, padding=2),
            "6": nn.Conv2d(c[1], c[2], 3, padding=1),
            "8": nn.Conv2d(c[2], c[3], 3, padding=1),
            "10": nn.Conv2d(c[3], c[4], 3, padding=1),
        })
        for i, ch in enumerate(c):
            setattr(self, f"lin{i}", LinearHead(ch))
        self.register_buffer("shift", torch.tensor(config.shift).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(config.scale).view(1, 3, 1, 1), persistent=False)

    def trunk(self, x):
        """x (N, 3, H, W) in [-1, 1] -> the five ReLU outputs."""
        f = self.features
        x = (x - self.shift) / self.scale
        r1 = F.relu(f["0"](x))                                # (N, 64, H/4, W/4)
        r2 = F.relu(f["3"](F.max_pool2d(r1, 3, 2)))           # (N, 192, ., .)
        r3 = F.relu(f["6"](F.max_pool2d(r2, 3, 2)))           # (N, 384, ., .)
        r4 = F.relu(f["8"](r3))
        r5 = F.relu(f["10"](r4))
        return [r1, r2, r3, r4, r5]

    def layer_maps(self, x0, x1):
        """Per-layer distance maps before the spatial mean: five (N, 1, H_l, W_l) tensors."""
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (N, 3, H, W) tensors of equal shape, "
                             f"received {tuple(x0.shape)} and {tuple(x1.shape)}")
        if min(x0.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} px a side (two 3/2 max-pools after "
                             f"the stride-4 conv), received {tuple(x0.shape[-2:])}")
        maps = []
        for i, (f0, f1) in enumerate(zip(self.trunk(x0), self.trunk(x1))):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + self.config.eps)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + self.config.eps)
            maps.append(getattr(self, f"lin{i}")((f0 - f1) ** 2))
        return maps

    def forward(self, x0, x1, per_layer=False):
        """x0, x1 (N, 3, H, W) RGB in [-1, 1] -> (N,) distances, or (N, 5) per-layer terms."""
        terms = torch.stack([m.mean((2, 3))[:, 0] for m in self.layer_maps(x0, x1)], 1)  # (N, 5)
        if per_layer:
            return terms
        total = terms[:, 0]
        for i in range(1, terms.shape[1]):  # summed in layer order, like the reference
            total = total + terms[:, i]
        return total

    def region_distances(self, x0, x1, regions):
        """LPIPS per region, from one pass through the network: (len(regions), N).

        A region None is the whole frame (plain spatial means: the published value). A region (H, W)
        bool restricts LPIPS to those pixels: each layer's map is upsampled bilinearly to (H, W) (the
        reference's spatial mode) and averaged over the region; the layers are summed.
        """
        h, w = x0.shape[-2:]
        maps = self.layer_maps(x0, x1)
        out = []
        for region in regions:
            if region is None:
                terms = [m.mean((2, 3))[:, 0] for m in maps]
            else:
                r = region.to(x0.dtype)
                terms = [(F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0] * r).sum((1, 2))
                         / r.sum() for m in maps]
            total = terms[0]
            for t in terms[1:]:
                total = total + t
            out.append(total)
        return torch.stack(out)


def load_lpips(path, device="cpu", dtype=torch.float32) -> LPIPS:
    """Load an m3ddm file of kind "lpips" (made by `weights_convert.py lpips`), strictly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LPIPS weights {path} do not exist; create them with `python weights_convert.py lpips`.")
    kind, config, _ = read_header(path)
    if kind != "lpips":
        raise UserError(f"{path} holds '{kind}' weights, not LPIPS; pass the file made by `weights_convert.py lpips`.")
    model = LPIPS(make_config(LPIPSConfig, config, strict=False))
    strict_load(model, load_tensors(path), str(path))
    return model.to(device=device, dtype=dtype).eval()


def to_lpips_input(frames: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> RGB in [-1, 1]."""
    return frames.to(dtype) / 255 * 2 - 1


@torch.no_grad()
def lpips_frames(model: LPIPS, a, b, regions=(None,), batch=8) -> torch.Tensor:
    """Per-frame LPIPS of uint8 frames (F, 3, H, W) for each region (None = whole frame, or an (H, W)
    bool mask): (len(regions), F) float64."""
    _check_pair(a, b)
    p = next(model.parameters())
    regions = [None if r is None else r.to(p.device) for r in regions]
    out = []
    for i in range(0, a.shape[0], batch):
        x0 = to_lpips_input(a[i:i + batch], p.dtype).to(p.device)
        x1 = to_lpips_input(b[i:i + batch], p.dtype).to(p.device)
        out.append(model.region_distances(x0, x1, regions).cpu())
    return torch.cat(out, 1).double()


# ------------------------------------------------------------------------------------------------
# Frechet distance (FID / FVD formula), float64


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Eigenvalues below zero (rounding of a PSD matrix) are clamped to zero.
    """
    a = (a + a.T) / 2
    lam, q = torch.linalg.eigh(a)
    return (q * lam.clamp(min=0).sqrt()) @ q.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """tr sqrtm(S1 S2) for symmetric PSD S1, S2.

    S1 S2 is not symmetric, but it is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD and has the
    same eigenvalues; so the trace is the sum of the square roots of that matrix's eigenvalues.
    """
    r = sqrtm_psd(s1)
    m = r @ s2 @ r
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    return lam.clamp(min=0).sqrt().sum()


def gaussian_stats(x: torch.Tensor):
    """Mean and unbiased covariance (divides by n-1) of features x (n, d), float64."""
    x = x.double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"feature statistics need a (n >= 2, d) matrix, received {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets x (n, d) and y (m, d), float64.

    ||mu_x - mu_y||^2 + tr S_x + tr S_y - 2 tr sqrtm(S_x S_y). The true value is >= 0, so a tiny
    negative result of rounding is reported as 0.
    """
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    fd = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt_product(s1, s2)
    return max(float(fd), 0.0)


# ------------------------------------------------------------------------------------------------
# I3D for FVD: the widely used Kinetics-400 TorchScript export (StyleGAN-V, `i3d_torchscript.pt`)

I3D_MIN_FRAMES = 9  # its temporal pooling collapses below this


def load_i3d(path, sha256: str, device="cpu"):
    """Load the I3D TorchScript model, but only after its sha256 matches the value the user vouches for.

    torch.jit.load runs code from the file, so an unverified file is never loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"I3D model {path} does not exist; download i3d_torchscript.pt and pass its path with --i3d.")
    want = (sha256 or "").strip().lower()
    if len(want) != 64 or any(ch not in "0123456789abcdef" for ch in want):
        raise UserError("FVD needs the I3D file's sha256 (64 hex digits); pass it with --i3d-sha256.")
    got = sha256_file(path)
    if got != want:
        raise UserError(f"I3D model {path} has sha256 {got}, not the expected {want}; "
                        "download the file again or pass the right --i3d-sha256.")
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; this file only exists as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def i3d_features(detector, videos: torch.Tensor, batch=4) -> torch.Tensor:
    """videos uint8 (N, F, 3, H, W) -> (N, 400) float64 features before the softmax.

    StyleGAN-V protocol: float input in [0, 255] laid out (N, 3, F, H, W); the model itself rescales
    to [-1, 1] and resizes to 224x224 (rescale=True, resize=True, return_features=True).
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"I3D expects videos (N, F, 3, H, W), received {tuple(videos.shape)}")
    if videos.shape[1] < I3D_MIN_FRAMES:
        raise UserError(f"FVD needs clips of at least {I3D_MIN_FRAMES} frames, received {videos.shape[1]}; "
                        "raise --frames.")
    device = next(iter(detector.parameters()), torch.empty(0)).device
    out = []
    for i in range(0, videos.shape[0], batch):
        x = videos[i:i + batch].permute(0, 2, 1, 3, 4).float().contiguous().to(device)  # (n, 3, F, H, W)
        out.append(detector(x, rescale=True, resize=True, return_features=True).double().cpu())
    return torch.cat(out)


def fvd(detector, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet video distance between two sets of uint8 videos (N, F, 3, H, W)."""
    return frechet_distance(i3d_features(detector, real), i3d_features(detector, fake))


# ------------------------------------------------------------------------------------------------
# Temporal consistency


def mean_abs_temporal_diff(frames: torch.Tensor, band: torch.Tensor = None) -> float:
    """Mean |frame[t+1] - frame[t]| on [0, 1] over the band (or the frame), channels and frame pairs."""
    if frames.shape[0] < 2:
        raise ValueError(f"temporal difference needs at least 2 frames, received {frames.shape[0]}")
    u = to_unit(frames)
    d = (u[1:] - u[:-1]).abs()  # (F-1, 3, H, W)
    if band is None:
        return float(d.mean())
    return float(_masked_mean(d, band).mean())


def flicker_ratio(output: torch.Tensor, truth: torch.Tensor, band: torch.Tensor = None) -> float:
    """Temporal change of the output relative to the ground truth's, in the band: 1 = as calm as the
    truth, > 1 flickers, < 1 is too static. inf if the truth is perfectly still and the output is not."""
    num = mean_abs_temporal_diff(output, band)
    den = mean_abs_temporal_diff(truth, band)
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


# ------------------------------------------------------------------------------------------------


def _check_pair(a, b):
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(f"expected two (F, 3, H, W) frame tensors of equal shape, "
                         f"received {tuple(a.shape)} and {tuple(b.shape)}")


def format_value(x, digits=4) -> str:
    """Render a metric for tables: 'inf' for infinity, 'nan' for undefined."""
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def json_value(x):
    """JSON has no inf/nan tokens: encode them as strings so the file stays standard JSON."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return format_value(x)
    return x


__all__ = ["psnr", "ssim", "ssim_map", "SSIM_UNIFORM7", "SSIM_GAUSSIAN11", "LPIPS", "LPIPSConfig", "load_lpips",
           "lpips_frames", "sqrtm_psd", "trace_sqrt_product", "frechet_distance", "load_i3d", "i3d_features",
           "fvd", "flicker_ratio", "mean_abs_temporal_diff", "format_value", "json_value"]
