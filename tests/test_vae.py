"""VAE: key manifest, parity with diffusers' AutoencoderKL, fixture latents/images (no diffusers), bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, require_diffusers
from m3ddm.vae import VAE_PRESETS, AutoencoderKL, VAEConfig

SMALL = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed):
    """Random weights everywhere (norms included) so that no parameter can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def diffusers_vae(cfg: VAEConfig):
    d = require_diffusers()
    n = len(cfg.block_out_channels)
    return d.AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                           down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                           block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                           latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups).eval()


def compare(ours, ref, x, tol, generator_seed=11):
    with torch.no_grad():
        p, q = ours.encode(x, batch=2), ref.encode(x).latent_dist
        errs = {"mean": rel_err(p.mean, q.mean), "logvar": rel_err(p.logvar, q.logvar), "std": rel_err(p.std, q.std)}
        z = p.sample(torch.Generator().manual_seed(generator_seed))
        errs["sample"] = rel_err(z, q.sample(torch.Generator().manual_seed(generator_seed)))
        errs["decode"] = rel_err(ours.decode(z, batch=2), ref.decode(z).sample)
    for k, e in errs.items():
        assert e <= tol, f"{k}: {e:.3g} > {tol}"
    return errs


# ---------------------------------------------------------------- structure

def test_sd15_keys_and_shapes_match_manifest():
    manifest = json.loads((FIXTURES / "keys" / "sd15_vae_diffusers_keys.json").read_text())
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS["sd15"])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(manifest)
    assert got == manifest


def test_tiny_preset_matches_fixture_config():
    cfg = json.loads((FIXTURES / "vae_tiny" / "config.json").read_text())
    tiny = VAE_PRESETS["tiny"]
    for field in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                  "scaling_factor"):
        assert getattr(tiny, field) == cfg[field], field
    assert list(tiny.block_out_channels) == cfg["block_out_channels"]
    assert VAEConfig() == VAE_PRESETS["sd15"]


# ---------------------------------------------------------------- fixture checks (no diffusers)

@pytest.fixture(scope="module")
def tiny_vae():
    model = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    model.load_state_dict(load_file(str(FIXTURES / "vae_tiny" / "diffusion_pytorch_model.safetensors")), strict=True)
    return model


@pytest.fixture(scope="module")
def sampler_tensors():
    return load_file(str(FIXTURES / "clip_sampler_tiny.safetensors"))


def test_fixture_latents_without_diffusers(tiny_vae, sampler_tensors):
    """The reference encoded with the posterior mean (patch P1) times 0.18215."""
    t = sampler_tensors
    init = t["inputs.init_px"][:, :4].permute(1, 0, 2, 3)  # first 4 of the 16 frames: (4, 3, 128, 128)
    global_px = t["inputs.global_px"][:2]  # (2, 3, 128, 128)
    black = torch.full((1, 3, 128, 128), -1.0)
    with torch.no_grad():
        x0 = tiny_vae.encode_latents(init, batch=3)  # (4, 4, 16, 16)
        gl = tiny_vae.encode_latents(global_px)
        u = tiny_vae.encode_latents(black)
    ref_x0 = t["intermediate.X0_init_latents"][0, :, :4].permute(1, 0, 2, 3)
    assert rel_err(x0, ref_x0) <= 1e-5
    assert rel_err(gl, t["intermediate.global_latents"][:2]) <= 1e-5
    assert rel_err(u[0], t["intermediate.U_black_latent"][0]) <= 1e-5


def test_fixture_decoded_images_without_diffusers(tiny_vae, sampler_tensors):
    t = sampler_tensors
    z = t["case1.final_latents"][0].permute(1, 0, 2, 3)  # (16, 4, 16, 16)
    with torch.no_grad():
        img = tiny_vae.decode_latents(z[:3], batch=2)  # (3, 3, 128, 128) in [-1, 1]
    img01 = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (img01 - t["case1.decoded_images"][:3]).abs().max().item() <= 1e-4  # the fixture README's bound


def test_chunking_does_not_change_results(tiny_vae):
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        a, b = tiny_vae.encode(x, batch=1), tiny_vae.encode(x, batch=8)
        # conv kernels may differ by batch size, so equal up to fp32 rounding, not bitwise
        assert rel_err(a.mean, b.mean) <= 1e-5 and rel_err(a.logvar, b.logvar) <= 1e-5
        assert rel_err(tiny_vae.decode(a.mean, batch=2), tiny_vae.decode(a.mean, batch=3)) <= 1e-5


def test_latent_helpers_scale_and_clamp(tiny_vae):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        post = tiny_vae.encode(x)
        assert torch.equal(tiny_vae.encode_latents(x), post.mean * 0.18215)
        assert torch.equal(post.mode(), post.mean)
        assert post.logvar.min() >= -30 and post.logvar.max() <= 20
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        s = tiny_vae.encode_latents(x, generator=g1, sample=True)
        assert torch.equal(s, post.sample(g2) * 0.18215) and not torch.equal(s, post.mean * 0.18215)
        z = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(5)) * 3
        img = tiny_vae.decode_latents(z)
        assert torch.equal(img, tiny_vae.decode(z / 0.18215).clamp(-1, 1))
        assert img.shape == (2, 3, 16, 16) and img.abs().max() <= 1


# ---------------------------------------------------------------- bad input

def test_bad_input_raises(tiny_vae):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*received \(3, 16, 16\)"):
        tiny_vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*received \(1, 4, 16, 16\)"):
        tiny_vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="torch.float32.*received torch.float64"):
        tiny_vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"divisible by 8, received \(16, 12\)"):
        tiny_vae.encode(torch.zeros(1, 3, 16, 12))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\).*received \(1, 3, 2, 2\)"):
        tiny_vae.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="received 0"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2), batch=0)
    with pytest.raises(ValueError, match="received a batch of 0"):
        tiny_vae.decode(torch.zeros(0, 4, 2, 2))


# ---------------------------------------------------------------- diffusers parity

def test_fixture_weights_match_diffusers(tiny_vae):
    d = require_diffusers()
    ref = d.AutoencoderKL.from_pretrained(str(FIXTURES / "vae_tiny")).eval()
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    compare(tiny_vae, ref, x, tol=1e-5)


def test_small_random_config_matches_diffusers():
    ref = randomize(diffusers_vae(SMALL), seed=0)
    ours = AutoencoderKL(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    compare(ours, ref, x, tol=1e-5)


@pytest.mark.slow
def test_full_sd15_config_matches_diffusers():
    ref = diffusers_vae(VAE_PRESETS["sd15"])
    ours = AutoencoderKL(VAE_PRESETS["sd15"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    compare(ours, ref, x, tol=1e-4)
