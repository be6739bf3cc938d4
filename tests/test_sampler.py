"""Per-clip sampler: parity with the reference fixture (clip_sampler_tiny), branch logic, plain vs fast."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from m3ddm.masks import latent_mask
from m3ddm.sampler import (ClipConditioning, GlobalContext, assemble_conditioning, clip_noise, combine_guidance,
                           denoise_clip, encode_global_context, guidance_branches,
                           sampling_timesteps)
from m3ddm.schedulers import DDIMScheduler, PNDMScheduler, alphas_cumprod


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only; scoped to each test (a module-level set_grad_enabled would leak into other files)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def fx():
    return load_file(str(FIXTURES / "clip_sampler_tiny.safetensors"))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def clip_inputs(fx, vae):
    """The reference's per-clip encode (posterior mean, patch P1) and conditioning, from the fixture pixels."""
    init = fx["inputs.init_px"].permute(1, 0, 2, 3)                   # (16, 3, 128, 128)
    masked = fx["inputs.masked_px"].permute(1, 0, 2, 3)
    black = torch.full((1, 3, 128, 128), -1.0)
    x0 = vae.encode_latents(init).permute(1, 0, 2, 3)[None]          # (1, 4, 16, 16, 16)
    c = vae.encode_latents(masked).permute(1, 0, 2, 3)[None]
    u = vae.encode_latents(black)                                     # (1, 4, 16, 16)
    gl = vae.encode_latents(fx["inputs.global_px"])                   # (4, 4, 16, 16)
    guides = [None] * 16
    for pos, lat in zip(fx["inputs.guide_positions"].tolist(), fx["inputs.guide_latents"]):
        guides[pos] = lat
    cond = assemble_conditioning(c, u, latent_mask(fx["inputs.pix_mask"][0, 0]), guides)
    return x0, c, u, gl, cond


def test_conditioning_matches_reference(fx, tiny_models):
    _, vae = tiny_models
    x0, c, u, gl, cond = clip_inputs(fx, vae)
    for ours, name in [(x0, "X0_init_latents"), (c, "C_masked_latents_before_guides"), (u, "U_black_latent"),
                       (gl, "global_latents"), (cond.cond_latents, "cond_latents_cond_branch"),
                       (cond.uncond_latents, "cond_latents_uncond_branch")]:
        ref = fx["intermediate." + name]
        assert ours.shape == ref.shape, name
        assert rel(ours, ref) < 1e-5, (name, rel(ours, ref))
    assert torch.equal(cond.cond_mask, fx["intermediate.mask_cond_branch"])
    assert torch.equal(cond.uncond_mask, fx["intermediate.mask_uncond_branch"])
    assert torch.equal(clip_noise(6, (1, 4, 16, 16, 16)), fx["inputs.noise"])


@pytest.mark.slow
@pytest.mark.parametrize("case,gg", [("case1", 4.0), ("case2", 1.0)])
def test_clip_parity_with_reference(fx, tiny_models, case, gg):
    """50 PNDM steps from the fixture's inputs reproduce the reference's final latents and images."""
    unet, vae = tiny_models
    x0, _, _, gl, cond = clip_inputs(fx, vae)
    ctx = encode_global_context(unet, gl)
    trace = {}

    def on_step(i, t, out, eps, x):
        if i == 0:
            trace["out"], trace["eps"] = out, eps
        if i < 4:
            trace.setdefault("steps", []).append(x)

    sched = PNDMScheduler(50)
    assert sampling_timesteps(sched)[0] == 961
    final = denoise_clip(unet, sched, x0, fx["inputs.noise"], cond, ctx, fps=6.0,
                         guidance_local=2.0, guidance_global=gg, on_step=on_step)
    ref_out = fx[f"{case}.unet_out_step0"]
    rows = [0, 1, 3] if gg > 1 else [0, 1]       # our branches uu, cu, cc / uu, cc; the reference's uc unused
    assert rel(trace["out"], ref_out[rows]) < 1e-4
    assert rel(trace["eps"], fx[f"{case}.guided_eps_step0"]) < 1e-4
    for i in range(4):
        assert rel(trace["steps"][i], fx[f"{case}.latents_after_steps_0to3"][i]) < 1e-4, i
    ref = fx[f"{case}.final_latents"]
    err = (final - ref).abs().max().item()
    print(f"{case}: final latents max abs err {err:.3g} ({err / ref.abs().max().item():.3g} of max|ref|)")
    assert err <= 1e-4 * ref.abs().max().item()
    images = (vae.decode_latents(final[0].permute(1, 0, 2, 3)) + 1) / 2   # (16, 3, 128, 128) in [0, 1]
    ref_img = fx[f"{case}.decoded_images"].permute(0, 3, 1, 2)
    err_img = (images - ref_img).abs().max().item()
    print(f"{case}: decoded images max abs err {err_img:.3g}")
    assert err_img <= 1e-4 * ref_img.abs().max().item()


class _Stop(Exception):
    pass


def _step0(unet, x0, noise, cond, ctx, gg, plain):
    """UNet output and guided eps of the first PNDM(50) step only (the loop is aborted after it)."""
    got = {}

    def on_step(i, t, out, eps, x):
        got.update(out=out, eps=eps, t=t)
        raise _Stop

    with pytest.raises(_Stop):
        denoise_clip(unet, PNDMScheduler(50), x0, noise, cond, ctx, fps=6.0, guidance_local=2.0,
                     guidance_global=gg, plain=plain, on_step=on_step)
    assert got["t"] == 961
    return got


def test_step0_fast_and_plain_match_reference(fx, tiny_models):
    """Step 0 of case1: the fast path (3 branches, tokens once, SDPA) and the plain reference-shaped path
    (4 branches incl. the unused uc, global latents re-encoded, math attention, per-frame K/V) both match
    the reference's UNet output and guided eps; the 3-branch eps equals the 4-branch formula to 1e-5."""
    unet, vae = tiny_models
    x0, _, _, gl, cond = clip_inputs(fx, vae)
    ctx = encode_global_context(unet, gl)
    fast = _step0(unet, x0, fx["inputs.noise"], cond, ctx, 4.0, plain=False)
    unet.set_attention("math", per_frame_context=True)
    try:
        plain = _step0(unet, x0, fx["inputs.noise"], cond, ctx, 4.0, plain=True)
    finally:
        unet.set_attention("sdpa", per_frame_context=False)
    ref_out, ref_eps = fx["case1.unet_out_step0"], fx["case1.guided_eps_step0"]
    assert fast["out"].shape[0] == 3 and plain["out"].shape[0] == 4
    assert rel(fast["out"], ref_out[[0, 1, 3]]) < 1e-4
    assert rel(plain["out"], ref_out) < 1e-4
    assert rel(fast["eps"], ref_eps) < 1e-4 and rel(plain["eps"], ref_eps) < 1e-4
    print(f"step0 eps: fast vs plain {rel(fast['eps'], plain['eps']):.2e} relative")
    assert rel(fast["eps"], plain["eps"]) < 1e-5


def test_guidance_branch_selection():
    e = {k: torch.randn(2, 3, dtype=torch.float64) for k in ("uu", "cu", "uc", "cc")}
    ref4 = e["uu"] + 2 * (e["cu"] - e["uu"]) + 4 * (e["cc"] - e["cu"])
    assert guidance_branches(2, 4, True) == ("uu", "cu", "cc")
    assert torch.allclose(combine_guidance({k: e[k] for k in ("uu", "cu", "cc")}, 2, 4), ref4)
    assert torch.allclose(combine_guidance(e, 2, 4), ref4)                 # e_uc is ignored
    # reference two-way batch when guidance_global <= 1: u + gl (c - u), c = cond local AND cond global
    assert guidance_branches(2, 1, True) == ("uu", "cc")
    assert torch.allclose(combine_guidance({"uu": e["uu"], "cc": e["cc"]}, 2, 1), e["uu"] + 2 * (e["cc"] - e["uu"]))
    # no global frames: cc == cu, so the global term vanishes
    assert guidance_branches(2, 4, False) == ("uu", "cu")
    assert torch.allclose(combine_guidance({"uu": e["uu"], "cu": e["cu"]}, 2, 4), e["uu"] + 2 * (e["cu"] - e["uu"]))
    # guidance_local 1: uu cancels out
    assert guidance_branches(1, 4, True) == ("cu", "cc")
    full = e["uu"] + 1 * (e["cu"] - e["uu"]) + 4 * (e["cc"] - e["cu"])
    assert torch.allclose(combine_guidance({"cu": e["cu"], "cc": e["cc"]}, 1, 4), full)
    assert guidance_branches(1, 1, True) == ("cc",)


def test_conditioning_guides_and_mask():
    masked = torch.randn(1, 4, 16, 2, 3)
    black = torch.randn(1, 4, 2, 3)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    g = torch.randn(1, 4, 2, 3)
    cond = assemble_conditioning(masked, black, mask, [g] + [None] * 14 + [g])
    assert isinstance(cond, ClipConditioning)
    for t in (cond.cond_latents, cond.uncond_latents):
        assert torch.equal(t[:, :, 0], g) and torch.equal(t[:, :, 15], g)
    assert torch.equal(cond.cond_latents[:, :, 1:15], masked[:, :, 1:15])
    assert torch.equal(cond.uncond_latents[:, :, 7], black)
    assert cond.cond_mask[:, :, 0].sum() == 0 and cond.uncond_mask[:, :, 15].sum() == 0
    assert torch.equal(cond.cond_mask[0, 0, 3], mask) and cond.uncond_mask[0, 0, 3].min() == 1
    with pytest.raises(ValueError):
        assemble_conditioning(masked, black, mask, [None] * 15)
    pix = torch.zeros(16, 24)
    pix[:, :8] = 1
    pix[0, 8] = 1                          # only the top-left pixel of each 8x8 cell counts
    assert torch.equal(latent_mask(pix), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_ddim_runs_all_timesteps():
    s = DDIMScheduler(4)
    start, loop = sampling_timesteps(s)
    assert start == loop[0] and len(loop) == 4
    start, loop = sampling_timesteps(PNDMScheduler(50))
    assert (start, loop[:3], len(loop)) == (961, [961, 961, 941], 50)


@pytest.mark.slow
def test_same_start_solves_converge_to_the_same_start_solution(tiny_models):
    """start_timestep 961: x_T is the fill noised at 961 (as PNDM-50's), and DPM++ / DDIM with K steps over
    [961 -> alphas_cumprod[0]] approach a fine DDIM solve of that segment as K grows (DPM++ at second order,
    about 4x per doubling; DDIM at first order), while DPM++ from 999 stays far from it whatever K."""
    from m3ddm.schedulers import DPMSolverPlusPlusScheduler, make_scheduler
    unet, _ = tiny_models
    g = torch.Generator().manual_seed(13)
    start, noise, masked = (torch.randn(1, 4, 2, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(8, 8)
    mask[:, :2] = 1
    cond = assemble_conditioning(masked, torch.randn(1, 4, 8, 8, generator=g), mask, [None] * 2)
    context = encode_global_context(unet, torch.randn(2, 4, 8, 8, generator=g))
    seen = []

    def solve(scheduler):
        return denoise_clip(unet, scheduler, start, noise, cond, context, 4,
                            on_step=lambda i, t, raw, eps, x: seen.append(t) if i == 0 else None)

    fine = solve(DDIMScheduler(241, start_timestep=961))           # a gap of 4 timesteps
    err = {}
    for name in ("dpm++", "ddim"):
        err[name] = [rel(solve(make_scheduler(name, k, 961)), fine) for k in (5, 10, 20)]
    err["dpm++ from 999"] = [rel(solve(DPMSolverPlusPlusScheduler(k, final_sigmas_type="sigma_min")), fine)
                             for k in (10, 20)]
    assert set(seen[:-2]) == {961} and seen[-2:] == [999, 999]
    for name in ("dpm++", "ddim"):
        assert err[name][0] > err[name][1] > err[name][2], err
    assert err["dpm++"][2] < err["dpm++"][0] / 6 and err["dpm++"][2] < err["ddim"][2] / 2, err
    assert min(err["dpm++ from 999"]) > 10 * err["dpm++"][2], err


class OracleUNet(torch.nn.Module):
    """Knows the clean latents x0: returns the exact noise of x_t (epsilon) or the exact v, per the schedule."""

    def __init__(self, x0, prediction_type):
        super().__init__()
        self.x0, self.weight = x0, torch.nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"prediction_type": prediction_type})()
        self.alphas = alphas_cumprod()

    def forward(self, x_in, t, fps, context=None):
        a = self.alphas[int(t)].double()
        x_t = x_in[:, :4].double()
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = eps if self.config.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return out.float()


def test_v_prediction_model_samples_as_its_epsilon_twin():
    """A v-prediction UNet goes through the sampler as the noise estimate sqrt(a) v + sqrt(1 - a) x_t: an
    exact-v oracle and an exact-noise oracle of the same clean latents give the same clip, for PNDM and DDIM."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    start, noise = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 4, 3, 4, 4, generator=g)
    cond = assemble_conditioning(torch.zeros(1, 4, 3, 4, 4), torch.zeros(1, 4, 4, 4), torch.ones(4, 4), [None] * 3)
    context = GlobalContext(real=None, zero=torch.zeros(1, 16, 320), latents=torch.zeros(1, 0, 4, 4, 4))
    for scheduler in (lambda: PNDMScheduler(10), lambda: DDIMScheduler(10)):
        out = {p: denoise_clip(OracleUNet(x0, p), scheduler(), start, noise, cond, context, 6, guidance_local=2.0)
               for p in ("epsilon", "v_prediction")}
        assert (out["epsilon"] - x0).abs().max() < 0.2   # denoised (the last step lands on alpha_bar[1], not 1)
        torch.testing.assert_close(out["v_prediction"], out["epsilon"], rtol=0, atol=1e-5)


def test_v_prediction_is_a_config_field():
    from m3ddm.unet3d import UNET_PRESETS, UNet3DConfig
    assert UNET_PRESETS["tiny"].prediction_type == "epsilon"   # the reference's (and every converted file's)
    with pytest.raises(ValueError, match="prediction_type"):
        UNet3DConfig(prediction_type="sample")
