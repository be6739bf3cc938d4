"""One clip of M3DDM+ outpainting: conditioning assembly, guidance branches and the denoising loop.

Everything here works on VAE-scaled latents (x 0.18215); pixels and the VAE stay in pipeline.py.
Reference: spec/pipeline.md sections 4.2 and 5 (the per-clip sampler of the pipeline file).

Guidance, with the reference's meaning (spec 5.5):
    guidance_global > 1:  eps = e_uu + gl * (e_cu - e_uu) + gg * (e_cc - e_cu)
    guidance_global <= 1: eps = e_uu + gl * (e_cc - e_uu)            (the reference's two-way batch)
where the first letter is the local condition (u = black frames + all-ones mask, c = masked frames + border
mask) and the second the global one (u = encoder(zero latents), c = encoder(global latents)). The
reference's fourth branch e_uc is never used, so the fast path runs only the branches the formula needs.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .schedulers import PNDMScheduler, add_noise, alphas_cumprod


# ----------------------------------------------------------------------------------------------------
# Conditioning assembly


@dataclass
class ClipConditioning:
    """Conditioning channels of both local branches, each (1, 4, F, h, w) latents + (1, 1, F, h, w) mask."""
    cond_latents: torch.Tensor     # c: masked-frame latents, guides replaced by their stored latent
    cond_mask: torch.Tensor        # c: border mask, 0 at guides
    uncond_latents: torch.Tensor   # u: black-frame latent repeated over F, guides replaced
    uncond_mask: torch.Tensor      # u: all ones, 0 at guides


def assemble_conditioning(masked_latents: torch.Tensor, black_latent: torch.Tensor, mask: torch.Tensor,
                          guides: Sequence[Optional[torch.Tensor]]) -> ClipConditioning:
    """Build both local conditions of one clip (spec 5.3 steps 3-4).

    masked_latents: (1, 4, F, h, w) latents of the black-bordered frames.
    black_latent:   (1, 4, h, w) latent of an all -1 image.
    mask:           (h, w) latent mask (1 = generate), shared by every frame.
    guides:         F entries, None for a generated frame or a stored (4, h, w) latent for a guide.
    """
    _, c, f, h, w = masked_latents.shape
    if len(guides) != f:
        raise ValueError(f"expected {f} guide entries (one per clip frame), received {len(guides)}")
    if mask.shape != (h, w):
        raise ValueError(f"expected a latent mask of shape {(h, w)}, received {tuple(mask.shape)}")
    cond = masked_latents.clone()
    uncond = black_latent[:, :, None].expand(1, c, f, h, w).clone()
    cond_mask = mask.to(masked_latents.dtype).expand(1, 1, f, h, w).clone()
    uncond_mask = torch.ones_like(cond_mask)
    for k, guide in enumerate(guides):
        if guide is None:
            continue
        cond[:, :, k] = guide
        uncond[:, :, k] = guide
        cond_mask[:, :, k] = 0
        uncond_mask[:, :, k] = 0
    return ClipConditioning(cond, cond_mask, uncond, uncond_mask)


# ----------------------------------------------------------------------------------------------------
# Guidance


def guidance_branches(guidance_local: float, guidance_global: float, has_global: bool) -> tuple:
    """Names of the UNet branches the guidance formula needs: a subset of ("uu", "cu", "cc").

    Without global frames cc equals cu, and with guidance_local == 1 the uu term cancels.
    """
    if has_global and guidance_global > 1:
        names = ["uu", "cu", "cc"]
    else:
        names = ["uu", "cc" if has_global else "cu"]
    if guidance_local == 1:
        names.remove("uu")
    return tuple(names)


def combine_guidance(eps: dict, guidance_local: float, guidance_global: float) -> torch.Tensor:
    """The reference's guidance formula over whichever branches were computed (see module docstring)."""
    if "cu" in eps and "cc" in eps and guidance_global > 1:
        local = eps["cu"] if "uu" not in eps else eps["uu"] + guidance_local * (eps["cu"] - eps["uu"])
        return local + guidance_global * (eps["cc"] - eps["cu"])
    cond = eps["cc"] if "cc" in eps else eps["cu"]
    return cond if "uu" not in eps else eps["uu"] + guidance_local * (cond - eps["uu"])


def sampler_branches(guidance_local: float, guidance_global: float, has_global: bool, plain: bool) -> tuple:
    """The UNet batch of one step: the reference's four-way [uu, cu, uc, cc] (two-way [uu, cc] when
    guidance_global <= 1) in plain mode, else only the branches the formula needs."""
    if plain:
        return ("uu", "cu", "uc", "cc") if guidance_global > 1 else ("uu", "cc")
    return guidance_branches(guidance_local, guidance_global, has_global)


# ----------------------------------------------------------------------------------------------------
# Timesteps


def sampling_timesteps(scheduler) -> tuple:
    """(start timestep for add_noise, timesteps of the loop) as Python ints.

    PNDM reproduces the reference at strength 1 (spec 5.2): x_T at timesteps[1] = 961 and the loop over
    timesteps[1:], with the PLMS off-by-one that implies. DDIM starts at its first timestep and runs them all.
    """
    ts = [int(t) for t in scheduler.timesteps]
    if isinstance(scheduler, PNDMScheduler):
        return ts[1], ts[1:]
    return ts[0], ts


def clip_noise(seed: int, shape: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The per-clip noise: a CPU generator re-seeded for every clip, so every clip gets the same noise
    (reference behaviour) and the noise does not depend on the device."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# The denoising loop


@dataclass
class GlobalContext:
    """Global-frame cross-attention tokens, computed once per video by `encode_global_context`."""
    real: Optional[torch.Tensor]   # (1, T, 320) from the global latents; None when G == 0
    zero: torch.Tensor             # (1, T', 320) from all-zero latents (the unconditional global branch)
    latents: torch.Tensor          # (1, G, 4, h, w) the global latents themselves (for the plain path)


@torch.no_grad()
def encode_global_context(unet, global_latents: torch.Tensor) -> GlobalContext:
    """Tokens of the real and of the zero global latents, once (the reference re-encodes them every step).

    global_latents: (G, 4, h, w) VAE-scaled latents, G may be 0. The zero branch uses G zero frames so that
    both contexts have the same token count and can share one batched UNet call (a single zero frame would
    give the same attention result, since duplicated keys do not change a softmax average).
    """
    gl = global_latents[None]                                          # (1, G, 4, h, w)
    g = gl.shape[1]
    zero = unet.encode_global(torch.zeros_like(gl))                    # (1, max(G,1)*h'*w', 320)
    real = unet.encode_global(gl) if g > 0 else None
    return GlobalContext(real=real, zero=zero, latents=gl)


def model_eps(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The UNet's output as the noise estimate the schedulers and guidance take. A v-prediction model's output
    v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022) gives eps = sqrt(a) v + sqrt(1 - a) x_t."""
    if prediction == "epsilon":
        return out
    return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x


@torch.no_grad()
def denoise_clip(unet, scheduler, start_latents: torch.Tensor, noise: torch.Tensor,
                 conditioning: ClipConditioning, context: GlobalContext, fps,
                 guidance_local: float = 2.0, guidance_global: float = 4.0, plain: bool = False,
                 generator: Optional[torch.Generator] = None,
                 on_step: Optional[Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]] = None
                 ) -> torch.Tensor:
    """Denoise one clip; returns the final latents (1, 4, F, h, w), VAE-scaled, in fp32.

    start_latents: (1, 4, F, h, w) latents of the border-filled frames (X0 of the reference);
    x_T = add_noise(start_latents, noise, t_start). fps is the UNet's fps input (fps // stride).
    The UNet runs in its own dtype; guidance and scheduler arithmetic stay in fp32.

    plain=True is the reference-shaped baseline: all four branches (incl. the unused e_uc), the global
    latents re-encoded on every step, the UNet's own attention setting (the caller sets "math" and
    per-frame context). The default runs only the needed branches with the context computed once.
    on_step(i, t, unet_out, guided_eps, latents_after_step) is a hook for tests and progress; unet_out is
    (B, 4, F, h, w) in the order of `sampler_branches(...)`. It forces no host sync by itself.
    """
    unet_dtype = next(unet.parameters()).dtype
    prediction = unet.config.prediction_type
    has_global = context.real is not None
    names = sampler_branches(guidance_local, guidance_global, has_global, plain)

    local = {"u": (conditioning.uncond_latents, conditioning.uncond_mask),
             "c": (conditioning.cond_latents, conditioning.cond_mask)}
    cond_part = torch.cat([torch.cat(local[n[0]], dim=1) for n in names]).to(unet_dtype)  # (B, 5, F, h, w)
    batch = len(names)
    if plain:
        zeros = torch.zeros_like(context.latents)
        global_latents = torch.cat([context.latents if n[1] == "c" else zeros for n in names]).to(unet_dtype)
        extra = {"global_latents": global_latents}                     # (B, G, 4, h, w)
    else:
        real = context.real if has_global else context.zero
        tokens = torch.cat([real if n[1] == "c" else context.zero for n in names]).to(unet_dtype)
        extra = {"context": tokens}                                    # (B, T, 320)

    scheduler.reset()
    t_start, loop = sampling_timesteps(scheduler)
    alphas = alphas_cumprod().to(start_latents.device)                 # SD-1.5 schedule, float32 (1000,)
    x = add_noise(start_latents.float(), noise.float(), t_start, alphas)  # x_T, (1, 4, F, h, w)
    device = start_latents.device
    # timesteps and fps as device tensors made once, so the loop makes no host-to-device copy per step
    t_unet = torch.tensor(loop, device=device)
    fps_unet = torch.tensor([int(fps)], device=device)
    for i, t in enumerate(loop):
        x_in = torch.cat([x.to(unet_dtype).expand(batch, -1, -1, -1, -1), cond_part], dim=1)  # (B, 9, F, h, w)
        out = unet(x_in, t_unet[i], fps_unet, **extra).float()         # (B, 4, F, h, w)
        eps_by_branch = dict(zip(names, model_eps(out, x, alphas[t], prediction).split(1)))
        eps = combine_guidance(eps_by_branch, guidance_local, guidance_global)   # (1, 4, F, h, w)
        if isinstance(scheduler, PNDMScheduler):
            x = scheduler.step(eps, t, x)
        else:
            x = scheduler.step(eps, t, x, generator=generator)
        if on_step is not None:
            on_step(i, t, out, eps, x)
    return x

