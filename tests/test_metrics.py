"""m3ddm.metrics against scikit-image / lpips / scipy fixtures and analytic values."""
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from m3ddm import metrics as M
from m3ddm.errors import UserError

MF = FIXTURES / "metrics"


def _hwc_to_frames(x):  # (H, W, 3) uint8 -> (1, 3, H, W)
    return x.permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def ssim_data():
    return load_file(str(MF / "ssim_images.safetensors")), json.loads((MF / "ssim.json").read_text())


@pytest.fixture(scope="module")
def lpips_data():
    d = load_file(str(MF / "lpips_alex.safetensors"))
    model = M.LPIPS()
    model.load_state_dict({k: v.float() for k, v in d.items() if k.startswith(("features.", "lin"))}, strict=True)
    return d, model.eval()


def _pair(images, case):
    names = case["tensors"]
    a = _hwc_to_frames(images[names[0]])
    b = _hwc_to_frames(images[names[-1]])
    return a, b


# ---------------------------------------------------------------------------------------- PSNR


def test_psnr_matches_fixture_and_identical_is_inf(ssim_data):
    images, js = ssim_data
    for case in js["cases"]:
        a, b = _pair(images, case)
        p = M.psnr(a, b).item()
        if case["psnr_is_infinite"]:
            assert p == math.inf
            assert M.format_value(p) == "inf" and M.json_value(p) == "inf"
        else:
            assert abs(p - case["psnr_01_float64_db"]) < 1e-9, case["name"]


def test_psnr_of_gaussian_noise_is_analytic():
    g = torch.Generator().manual_seed(0)
    # float frames in [0, 1]: PSNR = 10 log10(1 / sigma^2), no clipping at mid grey
    sigma = 0.05
    a = torch.full((4, 3, 512, 512), 0.5, dtype=torch.float64)
    b = a + sigma * torch.randn(a.shape, generator=g, dtype=torch.float64)
    measured = M.psnr(a, b).mean().item()
    assert abs(measured - 10 * math.log10(1 / sigma ** 2)) < 0.01
    # uint8 frames (the real path): rounding adds 1/12 of a grey level squared (Sheppard), sigma = 10 levels
    a8 = torch.full((4, 3, 512, 512), 128, dtype=torch.uint8)
    b8 = (128 + 10 * torch.randn(a8.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    measured = M.psnr(a8, b8).mean().item()
    assert abs(measured - 10 * math.log10(255 ** 2 / (100 + 1 / 12))) < 0.01


def test_psnr_band_ignores_pixels_outside_the_band():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (2, 3, 16, 24), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 16, 24), generator=g, dtype=torch.uint8)
    band = torch.zeros(16, 24, dtype=torch.bool)
    band[:, :4] = True
    before = M.psnr(a, b, band)
    b2 = b.clone()
    b2[..., 4:] = a[..., 4:]  # repair everything outside the band
    assert torch.equal(before, M.psnr(a, b2, band))
    assert (M.psnr(a, b2) > M.psnr(a, b)).all()


# ---------------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("variant,key,per_channel", [
    (M.SSIM_UNIFORM7, "ssim_a_uniform7_sample_cov", "ssim_a_per_channel_rgb"),
    (M.SSIM_GAUSSIAN11, "ssim_b_gaussian_sigma1.5_population_cov", "ssim_b_per_channel_rgb"),
])
def test_ssim_matches_scikit_image(ssim_data, variant, key, per_channel):
    images, js = ssim_data
    for case in js["cases"]:
        a, b = _pair(images, case)
        s = M.ssim(a, b, variant).item()
        assert abs(s - case[key]) < 1e-9, (case["name"], s, case[key])  # stated bound 1e-4; measured ~3e-15
        chans = M.ssim_map(a, b, variant).mean((2, 3))[0].tolist()
        for got, want in zip(chans, case[per_channel]):
            assert abs(got - want) < 1e-9
    a, _ = _pair(images, js["cases"][4])
    assert M.ssim(a, a, variant).item() == 1.0


def test_ssim_float_input_and_band(ssim_data):
    images, js = ssim_data
    a, b = _pair(images, js["cases"][0])
    s8 = M.ssim(a, b).item()
    assert abs(M.ssim(a.double() / 255, b.double() / 255).item() - s8) < 1e-9
    band = torch.ones(64, 64, dtype=torch.bool)
    assert abs(M.ssim(a, b, band=band).item() - s8) < 1e-12  # full band = whole frame
    band[:, 20:] = False
    b2 = b.clone()
    b2[..., 30:] = 0  # windows centred in the band (cols < 20) reach at most col 22
    assert abs(M.ssim(a, b2, band=band).item() - M.ssim(a, b, band=band).item()) < 1e-12
    with pytest.raises(ValueError):
        M.ssim(a[..., :5, :5], b[..., :5, :5])


# ---------------------------------------------------------------------------------------- LPIPS


def test_lpips_matches_the_lpips_package(lpips_data):
    d, model = lpips_data
    assert torch.equal(model.shift, d["scaling_layer.shift"]) and torch.equal(model.scale, d["scaling_layer.scale"])
    x0 = torch.cat([d["in0"], d["same"]])
    x1 = torch.cat([d["in1"], d["same"]])
    with torch.no_grad():
        total = model(x0, x1)
        per_layer = model(x0, x1, per_layer=True)
        lin0 = model.layer_maps(d["in0"][:1], d["in1"][:1])[0]
    assert (total - d["lpips_total"]).abs().max() < 1e-6  # stated 1e-5; measured 0 (bit-exact)
    assert (per_layer - d["lpips_per_layer"]).abs().max() < 1e-6
    assert (lin0 - d["pair0.lin0_map"]).abs().max() < 1e-6
    assert total[-1].item() == 0.0  # identical pair


def test_lpips_frames_on_uint8_and_band(lpips_data):
    _, model = lpips_data
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (3, 3, 64, 80), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-20, 21, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert (M.lpips_frames(model, a, a) == 0).all()
    whole = M.lpips_frames(model, a, b, batch=2)[0]
    direct = model(M.to_lpips_input(a), M.to_lpips_input(b)).double()
    assert torch.allclose(whole, direct)
    band = torch.zeros(64, 80, dtype=torch.bool)
    band[:, :16] = True
    both = M.lpips_frames(model, a, b, regions=(None, band, torch.ones(64, 80, dtype=torch.bool)))
    assert both.shape == (3, 3) and torch.allclose(both[0], whole, rtol=1e-6) and (both[1] > 0).all()
    assert torch.allclose(both[2], whole, rtol=0.1)  # upsampled maps: close to, not equal to, the plain mean
    assert (M.lpips_frames(model, a, a, regions=(band,)) == 0).all()


def test_load_lpips_round_trip(tmp_path, lpips_data):
    from m3ddm import weights
    d, model = lpips_data
    path = tmp_path / "lpips.safetensors"
    weights.save_model(path, model.state_dict(), "lpips", {})
    loaded = M.load_lpips(path)
    with torch.no_grad():
        assert torch.equal(loaded(d["in0"], d["in1"]), model(d["in0"], d["in1"]))
    with pytest.raises(UserError):
        M.load_lpips(tmp_path / "missing.safetensors")
    bad = tmp_path / "vae.safetensors"
    weights.save_model(bad, {"x": torch.zeros(1)}, "vae", {})
    with pytest.raises(UserError):
        M.load_lpips(bad)


# ---------------------------------------------------------------------------------------- Frechet / FVD


def test_frechet_distance_matches_scipy():
    feats = load_file(str(MF / "frechet.safetensors"))
    cases = {c["name"]: c for c in json.loads((MF / "frechet.json").read_text())["cases"]}
    c = cases["set1"]
    got = M.frechet_distance(feats[c["x"]], feats[c["y"]])
    assert abs(got - c["frechet_scipy"]) / c["frechet_scipy"] < 1e-6
    assert abs(got - float(c["frechet_exact_highprec_str"])) / got < 1e-12  # measured 3e-16
    c = cases["rank_deficient"]
    got = M.frechet_distance(feats[c["x"]], feats[c["y"]])
    assert abs(got - c["frechet_scipy"]) / c["frechet_scipy"] < 1e-6
    assert abs(got - float(c["frechet_exact_highprec_str"])) / got < 1e-7
    # identical sets: 0 up to float64 rounding (scipy itself gives -6.5e-13)
    assert 0 <= M.frechet_distance(feats["set1_a"], feats["set1_a"]) < 1e-9


def test_sqrtm_psd_and_trace_of_product():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    s1, s2 = x.T @ x / 29, y.T @ y / 29
    r = M.sqrtm_psd(s1)
    assert torch.allclose(r @ r, s1, atol=1e-12) and torch.allclose(r, r.T)
    assert (torch.linalg.eigvalsh(r) >= -1e-12).all()
    # S1 S2 has real non-negative eigenvalues; the trace of its square root is their root-sum
    lam = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0)
    assert abs(M.trace_sqrt_product(s1, s2).item() - lam.sqrt().sum().item()) < 1e-10
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    assert abs(M.trace_sqrt_product(torch.diag(a), torch.diag(b)).item() - 4.0) < 1e-12


class _StandInI3D(torch.nn.Module):
    """Same call signature as the I3D TorchScript model; a fixed random projection of pooled pixels."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 12)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear")
        x = torch.nn.functional.adaptive_avg_pool3d(x, (1, 4, 4)).flatten(1)  # (N, 48)
        return self.proj(x)


def test_fvd_with_a_sha256_checked_torchscript_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_standin.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_StandInI3D()).save(str(path))
    digest = M.sha256_file(path)
    with pytest.raises(UserError, match="sha256"):
        M.load_i3d(path, None)
    with pytest.raises(UserError, match="sha256"):
        M.load_i3d(path, "0" * 64)
    with pytest.raises(UserError):
        M.load_i3d(tmp_path / "missing.pt", digest)
    det = M.load_i3d(path, digest.upper())
    g = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (6, 10, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (real.int() // 2).to(torch.uint8)
    feats = M.i3d_features(det, real, batch=4)
    assert feats.shape == (6, 12) and feats.dtype == torch.float64
    assert 0 <= M.fvd(det, real, real) < 1e-9
    assert M.fvd(det, real, fake) > 1e-3
    with pytest.raises(UserError):
        M.i3d_features(det, real[:, :8])


# ---------------------------------------------------------------------------------------- flicker


def test_flicker_ratio():
    g = torch.Generator().manual_seed(5)
    truth = torch.randint(0, 128, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    assert M.flicker_ratio(truth, truth) == 1.0
    doubled = truth * 2  # every frame-to-frame change doubles
    assert abs(M.flicker_ratio(doubled, truth) - 2.0) < 1e-12
    static = truth[:1].expand(5, -1, -1, -1)
    assert M.flicker_ratio(static, truth) == 0.0
    assert M.flicker_ratio(truth, static) == math.inf
    band = torch.zeros(8, 8, dtype=torch.bool)
    band[:, :2] = True
    out = truth.clone()
    out[..., 2:] = 0  # outside the band: ignored
    assert M.flicker_ratio(out, truth, band) == 1.0
