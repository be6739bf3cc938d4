"""Schedulers: timesteps and step outputs against diffusers, and against the sampler fixture (no diffusers)."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, require_diffusers
from m3ddm.schedulers import (QUALITY, REFERENCE_START, SCHEDULERS, DDIMScheduler, DPMSolverPlusPlusScheduler,
                              PNDMScheduler, add_noise, alphas_cumprod, dpm_timesteps, leading_timesteps,
                              make_scheduler, segment_timesteps)

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            set_alpha_to_one=False, steps_offset=1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def sampler_json():
    return json.loads((FIXTURES / "clip_sampler_tiny.json").read_text())


# ---------------------------------------------------------------- diffusers-free checks

def test_pndm_timesteps_and_alphas_match_fixture(sampler_json):
    s = PNDMScheduler(50)
    assert s.timesteps.tolist() == sampler_json["pndm_timesteps_all"]
    assert s.timesteps.dtype == torch.long and len(s.timesteps) == 51
    start = s.start_index(1.0)
    assert start == 1 and s.timesteps[start:].tolist() == sampler_json["cases"]["case1"]["step_timesteps"]
    ac = alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    for t, v in sampler_json["alphas_cumprod"].items():
        assert ac[int(t)].item() == v  # float32 -> Python float is exact, so equality is the right check


def test_start_index_general_strength():
    s = PNDMScheduler(50)
    # init = min(int(50 s) + 1, 50); loop timesteps[51 - init:]
    assert s.start_index(0.5) == 51 - 26
    assert s.start_index(0.99) == 51 - 50


def test_x_T_and_first_pndm_step_match_fixture():
    t = load_file(str(FIXTURES / "clip_sampler_tiny.safetensors"))
    ac = alphas_cumprod()
    x_T = add_noise(t["intermediate.X0_init_latents"], t["inputs.noise"], 961, ac)
    assert torch.equal(x_T, t["intermediate.x_T"])
    for case in ("case1", "case2"):
        s = PNDMScheduler(50)
        x1 = s.step(t[f"{case}.guided_eps_step0"], 961, t["intermediate.x_T"])
        ref = t[f"{case}.latents_after_steps_0to3"][0]
        assert rel_err(x1, ref) <= 1e-6


def test_add_noise_per_item_timesteps():
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ac = alphas_cumprod()
    out = add_noise(x0, n, torch.tensor([0, 500, 999]), ac)
    for i, t in enumerate([0, 500, 999]):
        torch.testing.assert_close(out[i], ac[t].sqrt() * x0[i] + (1 - ac[t]).sqrt() * n[i], rtol=1e-6, atol=1e-7)


def test_pndm_redo_step_by_hand():
    """The second call goes 981 -> 961 from the saved first sample with eps = mean of the first two."""
    s, ac = PNDMScheduler(50), alphas_cumprod()
    g = torch.Generator().manual_seed(2)
    x0, e0, e1 = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3))
    s.alphas_cumprod = ac.double()
    s.final_alpha_cumprod = s.alphas_cumprod[0]
    s.step(e0, 961, x0)
    x = s.step(e1, 961, torch.zeros(5, dtype=torch.float64))  # the sample passed in is ignored on the redo
    a, ap, e = ac[981].double(), ac[961].double(), (e0 + e1) / 2
    expect = (ap / a).sqrt() * x0 - (ap - a) * e / (a * (1 - ap).sqrt() + (a * (1 - a) * ap).sqrt())
    torch.testing.assert_close(x, expect, rtol=1e-12, atol=0)


def test_ddim_eta0_recovers_x0_exactly_with_true_eps():
    """With the true noise as eps, DDIM eta 0 lands on sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    s, ac = DDIMScheduler(10), alphas_cumprod().double()
    s.alphas_cumprod, s.final_alpha_cumprod = ac, ac[0]
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    xt = ac[901].sqrt() * x0 + (1 - ac[901]).sqrt() * eps
    torch.testing.assert_close(s.step(eps, 901, xt), ac[801].sqrt() * x0 + (1 - ac[801]).sqrt() * eps)


# ---------------------------------------------------------------- bad input

def test_bad_step_counts_raise():
    for bad in (0, -3, 1001, 2.5, "50", True):
        with pytest.raises(ValueError, match=f"received {bad!r}"):
            PNDMScheduler(bad)
        with pytest.raises(ValueError, match=f"received {bad!r}"):
            DDIMScheduler(bad)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        leading_timesteps(0)


def test_bad_step_inputs_raise():
    for s in (PNDMScheduler(10), DDIMScheduler(10)):
        x = torch.zeros(1, 4, 2, 2)
        with pytest.raises(ValueError, match=r"\(1, 4, 2, 2\) and \(1, 4, 3, 3\)"):
            s.step(x, 901, torch.zeros(1, 4, 3, 3))
        with pytest.raises(ValueError, match="torch.int64"):
            s.step(x.long(), 901, x.long())
        with pytest.raises(ValueError, match=r"\[0, 999\], received 1000"):
            s.step(x, 1000, x)
    with pytest.raises(ValueError, match="received -0.5"):
        DDIMScheduler(10, eta=-0.5)
    with pytest.raises(ValueError, match="received 0"):
        PNDMScheduler(10).start_index(0)


def test_bad_add_noise_raises():
    ac = alphas_cumprod()
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"\(2, 4, 2, 2\).*received \(2, 4, 3, 3\)"):
        add_noise(x, torch.zeros(2, 4, 3, 3), 10, ac)
    with pytest.raises(ValueError, match="1 or 2 timesteps.*received 3"):
        add_noise(x, x, torch.tensor([1, 2, 3]), ac)
    with pytest.raises(ValueError, match=r"\[0, 999\], received \[1000\]"):
        add_noise(x, x, 1000, ac)


# ---------------------------------------------------------------- diffusers parity

@pytest.mark.parametrize("n", [10, 25, 50])
def test_timesteps_match_diffusers(n):
    d = require_diffusers()
    p = d.PNDMScheduler(skip_prk_steps=True, **SD15)
    p.set_timesteps(n)
    assert torch.equal(PNDMScheduler(n).timesteps, p.timesteps)
    q = d.DDIMScheduler(clip_sample=False, **SD15)
    q.set_timesteps(n)
    assert torch.equal(DDIMScheduler(n).timesteps, q.timesteps)
    r = d.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    r.set_timesteps(n)
    assert torch.equal(leading_timesteps(n, steps_offset=0).flip(0), r.timesteps)
    assert torch.equal(alphas_cumprod(), r.alphas_cumprod) and torch.equal(alphas_cumprod(), p.alphas_cumprod)


def test_add_noise_matches_ddpm():
    d = require_diffusers()
    r = d.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(4)
    x0, n = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([1, 480, 961])
    assert rel_err(add_noise(x0, n, t, alphas_cumprod()), r.add_noise(x0, n, t)) <= 1e-6


@pytest.mark.parametrize("n, start", [(50, 1), (50, 0), (25, 0), (10, 0)])
def test_pndm_steps_match_diffusers(n, start):
    d = require_diffusers()
    ref = d.PNDMScheduler(skip_prk_steps=True, **SD15)
    ref.set_timesteps(n)
    ours = PNDMScheduler(n)
    g = torch.Generator().manual_seed(n + start)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref = x.clone()
    for i, t in enumerate(ours.timesteps[start:]):
        eps = torch.randn(x.shape, generator=g)
        x, x_ref = ours.step(eps, t, x), ref.step(eps, t, x_ref).prev_sample
        assert rel_err(x, x_ref) <= 1e-6, f"step {i} (t={int(t)})"
    assert i + 1 == len(ours.timesteps) - start


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_steps_match_diffusers(eta):
    d = require_diffusers()
    ref = d.DDIMScheduler(clip_sample=False, **SD15)
    ref.set_timesteps(50)
    ours = DDIMScheduler(50, eta=eta)
    g = torch.Generator().manual_seed(7)
    g_ours, g_ref = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps:
        eps = torch.randn(x.shape, generator=g)
        x = ours.step(eps, t, x, generator=g_ours)
        x_ref = ref.step(eps, t, x_ref, eta=eta, generator=g_ref).prev_sample
        assert rel_err(x, x_ref) <= 1e-6, f"t={int(t)}"


# ---------------------------------------------------------------- DPM-Solver++ (2M)

DPM_CONFIGS = {  # ours (kwargs) -> diffusers DPMSolverMultistepScheduler (kwargs), both with the SD-1.5 schedule
    "leading": ({"spacing": "leading"}, {"timestep_spacing": "leading"}),
    "trailing": ({"spacing": "trailing"}, {"timestep_spacing": "trailing"}),
    "linspace": ({"spacing": "linspace"}, {"timestep_spacing": "linspace"}),
    "karras": ({"use_karras_sigmas": True}, {"use_karras_sigmas": True}),
}


def diffusers_dpm(d, n, config, final="zero"):
    ref = d.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, final_sigmas_type=final,
                                        **DPM_CONFIGS[config][1])
    with warnings.catch_warnings():   # diffusers 0.34 + numpy 2: a DeprecationWarning per call, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        ref.set_timesteps(n)
    return ref


def ours_dpm(n, config, final="zero"):
    return DPMSolverPlusPlusScheduler(n, final_sigmas_type=final, **DPM_CONFIGS[config][0])


def test_dpm_constant_data_prediction_is_solved_exactly():
    """With x0(x, t) = c (a point mass) the ODE solution is x_t = alpha_t c + sigma_t e0; first- and second-order
    steps are both exact for it, so every step lands on the true trajectory (fp64) and the end is c."""
    g = torch.Generator().manual_seed(11)
    c, e0 = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    for config in DPM_CONFIGS:
        for final in ("zero", "sigma_min"):
            s = ours_dpm(12 if config == "karras" else 20, config, final)
            s.sigmas = s.sigmas.double()
            vp = [(1 / (v ** 2 + 1) ** 0.5, v / (v ** 2 + 1) ** 0.5) for v in s.sigmas]   # (alpha, sigma) per entry
            x = vp[0][0] * c + vp[0][1] * e0
            for i, t in enumerate(s.timesteps):
                eps = (x - vp[i][0] * c) / vp[i][1]                     # the eps a point-mass model predicts
                x = s.step(eps, t, x)
                torch.testing.assert_close(x, vp[i + 1][0] * c + vp[i + 1][1] * e0, rtol=1e-12, atol=1e-12)
            if final == "zero":
                assert (x - c).abs().max() < 1e-12


def test_dpm_first_step_is_ddim_and_lower_order_final():
    """Step 1 is first order (a DDIM step in sigma form); with N < 15 and sigma_min the last is first order too."""
    ac = alphas_cumprod().double()
    g = torch.Generator().manual_seed(12)
    x, e1, e2 = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    s = DPMSolverPlusPlusScheduler(2, spacing="leading", final_sigmas_type="sigma_min")
    s.sigmas = s.sigmas.double()
    t0, t1 = s.timesteps.tolist()                                     # 667, 334 (leading, r = 333, offset 1)
    assert (t0, t1) == (667, 334)
    x1 = s.step(e1, t0, x)
    x0 = (x - (1 - ac[t0]).sqrt() * e1) / ac[t0].sqrt()
    torch.testing.assert_close(x1, ac[t1].sqrt() * x0 + (1 - ac[t1]).sqrt() * e1, rtol=1e-6, atol=1e-9)
    x2 = s.step(e2, t1, x1)                                           # last step, N = 2 < 15: first order
    x0 = (x1 - (1 - ac[t1]).sqrt() * e2) / ac[t1].sqrt()
    torch.testing.assert_close(x2, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * e2, rtol=1e-6, atol=1e-9)


def test_dpm_timesteps_by_hand():
    assert dpm_timesteps(20, "leading").tolist() == [k * 47 + 1 for k in range(20, 0, -1)]   # 1000 // 21 = 47
    assert dpm_timesteps(20, "trailing").tolist() == list(range(999, 0, -50))
    assert dpm_timesteps(4, "linspace").tolist() == [999, 749, 500, 250]   # 749.25, 499.5 -> 500 (ties to even)
    assert ours_dpm(25, "karras").timesteps[0] == 999 and ours_dpm(25, "karras").timesteps[-1] == 0
    assert ours_dpm(5, "leading").sigmas[-1] == 0
    assert ours_dpm(5, "leading", "sigma_min").sigmas[-1] == ((1 - alphas_cumprod()[0]) / alphas_cumprod()[0]) ** 0.5


def test_dpm_bad_input_raises():
    with pytest.raises(ValueError, match="received 'cosine'"):
        DPMSolverPlusPlusScheduler(10, spacing="cosine")
    with pytest.raises(ValueError, match="received 'one'"):
        DPMSolverPlusPlusScheduler(10, final_sigmas_type="one")
    with pytest.raises(ValueError, match="no grid of 999 distinct"):
        DPMSolverPlusPlusScheduler(999, spacing="leading")            # 1000 // 1000 = 1: would reach t = 1000
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ValueError, match=f"received {bad!r}"):
            DPMSolverPlusPlusScheduler(bad)
    s, x = DPMSolverPlusPlusScheduler(2, spacing="leading"), torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="expects timestep 667, received 666"):
        s.step(x, 666, x)
    s.step(x, 667, x)
    s.step(x, 334, x)
    with pytest.raises(ValueError, match="called 3 times for 2 timesteps"):
        s.step(x, 334, x)
    s.reset()
    assert s.step(x, 667, x).shape == x.shape
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 2\) and \(1, 4, 3, 3\)"):
        s.step(x, 334, torch.zeros(1, 4, 3, 3))


def test_scheduler_names_and_quality_presets():
    assert SCHEDULERS == ("pndm", "ddim", "dpm++")
    assert make_scheduler("dpm++", 20).timesteps.tolist() == list(range(999, 0, -50))   # trailing by default
    kinds = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverPlusPlusScheduler}
    for name in SCHEDULERS:
        s = make_scheduler(name, 20)
        assert isinstance(s, kinds[name]) and s.num_inference_steps == 20
    with pytest.raises(ValueError, match="received 'euler'"):
        make_scheduler("euler", 20)
    assert QUALITY["reference"] == ("pndm", 50, None)
    for name, steps, start in QUALITY.values():
        make_scheduler(name, steps, start)


@pytest.mark.parametrize("config", list(DPM_CONFIGS))
@pytest.mark.parametrize("n", [10, 20, 25, 50])
def test_dpm_timesteps_and_sigmas_match_diffusers(n, config):
    d = require_diffusers()
    for final in ("zero", "sigma_min"):
        ref, ours = diffusers_dpm(d, n, config, final), ours_dpm(n, config, final)
        assert torch.equal(ours.timesteps, ref.timesteps), (n, config, final)
        assert torch.equal(ours.sigmas, ref.sigmas), (n, config, final)


def test_dpm_timesteps_match_diffusers_for_every_step_count():
    """Every N of each spacing where diffusers' grid is valid; where it is not (trailing N = 61, 103, ...: an
    extra timestep -1; leading N = 999: a timestep 1000), ours is its first N entries or refuses."""
    d = require_diffusers()
    for config in ("leading", "trailing", "linspace"):
        for n in range(1, 1000):
            ref = diffusers_dpm(d, n, config).timesteps
            valid = len(ref) == n and ref.min() >= 0 and ref.max() <= 999
            if not valid and config == "leading":
                with pytest.raises(ValueError):
                    ours_dpm(n, config)
                continue
            ours = ours_dpm(n, config).timesteps
            assert len(ours) == n and ours.min() >= 0
            assert torch.equal(ours, ref if valid else ref[:n]), (config, n)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("config", list(DPM_CONFIGS))
@pytest.mark.parametrize("n", [50, 20, 10])
def test_dpm_steps_match_diffusers(n, config, final):
    """Consecutive step outputs (50 for N = 50) within 1e-6 relative, from the same sample and eps."""
    d = require_diffusers()
    ref, ours = diffusers_dpm(d, n, config, final), ours_dpm(n, config, final)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref = x.clone()
    for i, t in enumerate(ours.timesteps):
        eps = torch.randn(x.shape, generator=g)
        x, x_ref = ours.step(eps, t, x), ref.step(eps, t, x_ref).prev_sample
        assert rel_err(x, x_ref) <= 1e-6, f"step {i} (t={int(t)})"
    assert i + 1 == n


def test_dpm_in_the_clip_sampler(tiny_models):
    """denoise_clip with dpm++: x_T noised at the first timestep, every timestep run once in order, and the
    trajectory is diffusers' DPMSolverMultistepScheduler fed the same guided eps."""
    from m3ddm.sampler import assemble_conditioning, denoise_clip, encode_global_context
    d = require_diffusers()
    unet, _ = tiny_models
    g = torch.Generator().manual_seed(13)
    start, noise, masked = (torch.randn(1, 4, 16, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(8, 8)
    mask[:, :2] = 1
    cond = assemble_conditioning(masked, torch.randn(1, 4, 8, 8, generator=g), mask, [None] * 16)
    with torch.no_grad():
        context = encode_global_context(unet, torch.randn(2, 4, 8, 8, generator=g))
        seen = []
        out = denoise_clip(unet, DPMSolverPlusPlusScheduler(8), start, noise, cond, context, 4,
                           on_step=lambda i, t, raw, eps, x: seen.append((t, eps.clone(), x.clone())))
    ref = diffusers_dpm(d, 8, "trailing")                            # our default spacing
    assert [t for t, _, _ in seen] == ref.timesteps.tolist()
    x = add_noise(start, noise, int(ref.timesteps[0]), alphas_cumprod())
    for t, eps, ours in seen:
        x = ref.step(eps, t, x).prev_sample
        assert rel_err(ours, x) <= 1e-6
    assert torch.equal(out, seen[-1][2])


# ---------------------------------------------------------------- start_timestep: PNDM-50's segment for DDIM and DPM++

def test_reference_start_is_where_pndm50_starts():
    from m3ddm.sampler import sampling_timesteps
    s = PNDMScheduler(50)
    assert REFERENCE_START == int(s.timesteps[s.start_index()]) == sampling_timesteps(s)[0] == 961


def test_segment_timesteps_by_hand():
    assert segment_timesteps(10, 961).tolist() == [961, 865, 769, 672, 576, 480, 384, 288, 191, 95]
    assert segment_timesteps(962, 961).tolist() == list(range(961, -1, -1))   # every timestep: the reference
    assert segment_timesteps(481, 961).tolist() == list(range(961, 0, -2))    # every other: its check
    assert segment_timesteps(1, 961).tolist() == [961]
    for n in range(1, 1001):                          # from T - 1 it is the trailing grid itself
        assert torch.equal(segment_timesteps(n, 999), dpm_timesteps(n, "trailing")), n
    for start in (1, 2, 7, 500, 961, 998):
        for n in range(1, start + 2):
            ts = segment_timesteps(n, start)
            assert len(ts) == n and ts[0] == start and ts[-1] >= 0 and bool((ts[1:] < ts[:-1]).all()), (start, n)


def test_segment_bad_input_raises():
    for bad in (0, 1000, -1, 961.0, True):
        with pytest.raises(ValueError, match=f"start_timestep must be an int in \\[1, 999\\], received {bad!r}"):
            segment_timesteps(5, bad)
    with pytest.raises(ValueError, match=r"\[1, 962\].*received 963"):
        DDIMScheduler(963, start_timestep=961)
    with pytest.raises(ValueError, match=r"\[1, 962\].*received 0"):
        DPMSolverPlusPlusScheduler(0, start_timestep=961)
    with pytest.raises(ValueError, match="does not combine with use_karras_sigmas"):
        DPMSolverPlusPlusScheduler(10, use_karras_sigmas=True, start_timestep=961)
    s, x = DDIMScheduler(5, start_timestep=961), torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"one of its timesteps \(961 .. 191, start_timestep 961\), received 801"):
        s.step(x, 801, x)
    with pytest.raises(ValueError, match="pndm scheduler has no start_timestep"):
        make_scheduler("pndm", 50, 961)


def test_ddim_segment_steps_by_hand():
    """With the true noise as eps (fp64), each step lands on the next grid timestep, the last on alphas_cumprod[0]."""
    s, ac = DDIMScheduler(4, start_timestep=REFERENCE_START), alphas_cumprod().double()
    s.alphas_cumprod, s.final_alpha_cumprod = ac, ac[0]
    g = torch.Generator().manual_seed(21)
    x0, eps = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    ts = s.timesteps.tolist()
    assert ts == [961, 721, 480, 239]                             # 962 - k 240.5, half to even, - 1
    x = ac[961].sqrt() * x0 + (1 - ac[961]).sqrt() * eps
    for t, a_next in zip(ts, [ac[721], ac[480], ac[239], ac[0]]):
        x = s.step(eps, t, x)
        torch.testing.assert_close(x, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, rtol=1e-12, atol=1e-12)


def test_make_scheduler_start_timestep():
    ddim, dpm = make_scheduler("ddim", 10, 961), make_scheduler("dpm++", 10, 961)
    assert torch.equal(ddim.timesteps, segment_timesteps(10, 961)) and torch.equal(dpm.timesteps, ddim.timesteps)
    assert dpm.final_sigmas_type == "sigma_min" and dpm.euler_at_final  # ends where PNDM and DDIM end
    assert dpm.sigmas[-1] == ((1 - alphas_cumprod()[0]) / alphas_cumprod()[0]) ** 0.5
    for name in ("ddim", "dpm++"):                                   # no start_timestep: as before
        assert make_scheduler(name, 10).start_timestep is None
    assert make_scheduler("dpm++", 10).final_sigmas_type == "zero" and not make_scheduler("dpm++", 10).euler_at_final


@pytest.mark.parametrize("n", [10, 20, 25, 50])
def test_ddim_segment_matches_diffusers_where_its_gaps_are_even(n):
    """From 999 with N dividing 1000 the segment grid is even: gap 1000 / N, last timestep gap - 1, which is
    diffusers' DDIM with steps_offset gap - 1; the steps (next-timestep lookup) match it within 1e-6."""
    d = require_diffusers()
    gap = 1000 // n
    ref = d.DDIMScheduler(clip_sample=False, **{**SD15, "steps_offset": gap - 1})
    ref.set_timesteps(n)
    ours = DDIMScheduler(n, start_timestep=999)
    assert torch.equal(ours.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(30 + n)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps:
        eps = torch.randn(x.shape, generator=g)
        x, x_ref = ours.step(eps, t, x), ref.step(eps, t, x_ref).prev_sample
        assert rel_err(x, x_ref) <= 1e-6, f"t={int(t)}"


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("start", [REFERENCE_START, 500])
@pytest.mark.parametrize("n", [5, 10, 14, 15, 20, 25, 50])
def test_dpm_segment_matches_diffusers_custom_timesteps(n, start, final):
    """start_timestep = diffusers' set_timesteps(timesteps=segment_timesteps(N, s)): the same sigmas, and every
    step output within 1e-6 relative (N = 14 / 15: both sides of lower_order_final's N < 15)."""
    d = require_diffusers()
    ours = DPMSolverPlusPlusScheduler(n, start_timestep=start, final_sigmas_type=final)
    ref = d.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, final_sigmas_type=final)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref.set_timesteps(timesteps=segment_timesteps(n, start).tolist())
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(40 + n)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref = x.clone()
    for i, t in enumerate(ours.timesteps):
        eps = torch.randn(x.shape, generator=g)
        x, x_ref = ours.step(eps, t, x), ref.step(eps, t, x_ref).prev_sample
        assert rel_err(x, x_ref) <= 1e-6, f"step {i} (t={int(t)})"
    assert i + 1 == n


@pytest.mark.parametrize("n, start", [(15, REFERENCE_START), (25, REFERENCE_START), (50, REFERENCE_START), (20, None)])
def test_dpm_euler_at_final_matches_diffusers(n, start):
    """euler_at_final (with sigma_min: a first-order last step at any N) step for step as diffusers' option."""
    d = require_diffusers()
    ours = DPMSolverPlusPlusScheduler(n, start_timestep=start, final_sigmas_type="sigma_min", euler_at_final=True)
    ref = d.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, final_sigmas_type="sigma_min",
                                        euler_at_final=True, timestep_spacing="trailing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ref.set_timesteps(n) if start is None else ref.set_timesteps(timesteps=segment_timesteps(n, start).tolist())
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    plain = DPMSolverPlusPlusScheduler(n, start_timestep=start, final_sigmas_type="sigma_min")
    g = torch.Generator().manual_seed(50 + n)
    x = torch.randn(2, 4, 3, 5, 5, generator=g)
    x_ref, x_plain = x.clone(), x.clone()
    for i, t in enumerate(ours.timesteps):
        eps = torch.randn(x.shape, generator=g)
        x, x_ref, x_plain = ours.step(eps, t, x), ref.step(eps, t, x_ref).prev_sample, plain.step(eps, t, x_plain)
        assert rel_err(x, x_ref) <= 1e-6, f"step {i} (t={int(t)})"
    assert i + 1 == n and not torch.equal(x, x_plain)          # only the last step differs, and it does
