"""Training masks: which border bands of a clip to generate, which frames are raw guides, how global frames are masked.

Conventions: masks are float tensors, 1 = generate, 0 = keep (or guide). Pixel masks are (F, H, W) for a clip,
(G, H, W) for the global frames. All randomness comes from an explicit torch.Generator.

Strategies (spec training.md 1.6, 1.7 and 2):
- "m3ddm_plus": one direction set and one width for every frame of a clip (the M3DDM+ recipe, the default).
- "m3ddm": every frame draws its own direction set and width (the original M3DDM, as the M3DDM+ paper
  describes it). It uses the same direction families and ratio range, so the two differ only in granularity.
Both then apply one of the three guide-frame cases, which turn some frames into raw guides (mask 0).
"""
from dataclasses import dataclass

import torch

MASK_STRATEGIES = ("m3ddm_plus", "m3ddm")
GLOBAL_MASK_MODES = ("none", "overlap", "all")
SIDES = ("left", "right", "top", "bottom")
FAMILIES = ("single", "pair", "four")
GUIDE_CASES = ("all_masked", "first_last_raw", "random_raw")


@dataclass(frozen=True)
class MaskSpec:
    ratio_min: float = 0.15
    ratio_max: float = 0.75
    family_weights: tuple = (0.30, 0.55, 0.15)      # single side / opposite pair / all four
    guide_case_weights: tuple = (0.30, 0.35, 0.35)  # all masked / first and last raw / each raw with p_frame_raw
    p_frame_raw: float = 0.5


@dataclass
class ClipMasks:
    masks: torch.Tensor        # (F, H, W) after the guide case: guide frames are all 0
    direction_masks: torch.Tensor  # (F, H, W) before the guide case
    guides: torch.Tensor       # (F,) bool, True = raw guide frame
    sides: list                # per frame: tuple of side names
    ratios: list               # per frame: float ratio
    guide_case: str


def _uniform(generator, low=0.0, high=1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(weights, generator) -> int:
    w = torch.tensor(weights, dtype=torch.float64)
    return int(torch.multinomial(w, 1, generator=generator).item())


def draw_directions(generator: torch.Generator, spec: MaskSpec = MaskSpec()):
    """One direction set and ratio: (family, sides, ratio)."""
    family = FAMILIES[_choice(spec.family_weights, generator)]
    if family == "single":
        sides = (SIDES[int(torch.randint(4, (), generator=generator))],)
    elif family == "pair":
        sides = ("left", "right") if torch.randint(2, (), generator=generator) == 0 else ("top", "bottom")
    else:
        sides = SIDES
    ratio = _uniform(generator, spec.ratio_min, spec.ratio_max)
    return family, sides, ratio


def band_mask(height: int, width: int, sides, ratio: float) -> torch.Tensor:
    """(H, W) mask with a band of int(size * ratio / 2) pixels on each chosen side (size = that axis' length)."""
    mask = torch.zeros(height, width)
    band_w, band_h = int(width * ratio / 2), int(height * ratio / 2)
    if "left" in sides and band_w > 0:
        mask[:, :band_w] = 1
    if "right" in sides and band_w > 0:
        mask[:, width - band_w:] = 1
    if "top" in sides and band_h > 0:
        mask[:band_h, :] = 1
    if "bottom" in sides and band_h > 0:
        mask[height - band_h:, :] = 1
    return mask


def draw_guides(num_frames: int, generator: torch.Generator, spec: MaskSpec = MaskSpec()):
    """The guide-frame case and a (F,) bool tensor, True = the frame is given raw (mask 0)."""
    case = GUIDE_CASES[_choice(spec.guide_case_weights, generator)]
    guides = torch.zeros(num_frames, dtype=torch.bool)
    if case == "first_last_raw":
        guides[0] = guides[-1] = True
    elif case == "random_raw":
        guides = torch.rand(num_frames, generator=generator) < spec.p_frame_raw
    return case, guides


def sample_clip_masks(num_frames: int, height: int, width: int, generator: torch.Generator,
                      strategy: str = "m3ddm_plus", spec: MaskSpec = MaskSpec()) -> ClipMasks:
    """Draw the direction masks of one clip with `strategy`, then a guide-frame case."""
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"mask strategy must be one of {MASK_STRATEGIES}, got {strategy!r}")
    if strategy == "m3ddm_plus":
        _, sides, ratio = draw_directions(generator, spec)
        draws = [(sides, ratio)] * num_frames
    else:
        draws = [draw_directions(generator, spec)[1:] for _ in range(num_frames)]
    direction_masks = torch.stack([band_mask(height, width, s, r) for s, r in draws])  # (F, H, W)
    case, guides = draw_guides(num_frames, generator, spec)
    masks = direction_masks * (~guides).float()[:, None, None]
    return ClipMasks(masks, direction_masks, guides, [s for s, _ in draws], [r for _, r in draws], case)


def global_frame_masks(mode: str, clip: ClipMasks, clip_indices, global_indices) -> torch.Tensor:
    """(G, H, W) masks for the global frames.

    none:    no global frame is masked (the ground truth of the region to generate is visible).
    overlap: the reference: a global frame whose source index is one of the clip's frames gets that frame's mask
             (after the guide case); all other global frames stay unmasked, which leaks the ground truth.
    all:     as overlap, and every other global frame gets the union of the clip's direction masks, so no global
             frame shows the region the model has to generate (as at inference, where it is never known).
    """
    if mode not in GLOBAL_MASK_MODES:
        raise ValueError(f"global-frame mask mode must be one of {GLOBAL_MASK_MODES}, got {mode!r}")
    _, height, width = clip.masks.shape
    out = torch.zeros(len(global_indices), height, width)
    if mode == "none":
        return out
    position = {int(src): k for k, src in enumerate(clip_indices)}
    union = clip.direction_masks.amax(dim=0)  # (H, W)
    for g, src in enumerate(global_indices):
        k = position.get(int(src))
        if k is not None:
            out[g] = clip.masks[k]
        elif mode == "all":
            out[g] = union
    return out


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Nearest downsampling to latent resolution, as F.interpolate(mode="nearest"): cell j takes pixel factor*j."""
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(f"mask height and width must be multiples of {factor}, got {tuple(mask.shape[-2:])}")
    return mask[..., ::factor, ::factor]
