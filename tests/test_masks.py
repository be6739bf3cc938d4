"""Training masks: strategy statistics, band widths, guide cases, global-frame masking, latent downsampling."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from m3ddm import masks as M

N_DRAWS = 10_000
TOL = 0.02  # 2 percentage points


def test_direction_and_ratio_statistics_match_the_configuration():
    g = torch.Generator().manual_seed(0)
    families, side_sets, ratios = Counter(), Counter(), []
    for _ in range(N_DRAWS):
        family, sides, ratio = M.draw_directions(g)
        families[family] += 1
        side_sets[tuple(sides)] += 1
        ratios.append(ratio)
    for name, p in zip(M.FAMILIES, M.MaskSpec().family_weights):
        assert abs(families[name] / N_DRAWS - p) < TOL, (name, families[name] / N_DRAWS, p)
    expected = {("left",): 0.075, ("right",): 0.075, ("top",): 0.075, ("bottom",): 0.075,
                ("left", "right"): 0.275, ("top", "bottom"): 0.275, M.SIDES: 0.15}
    assert set(side_sets) == set(expected)
    for sides, p in expected.items():
        assert abs(side_sets[sides] / N_DRAWS - p) < TOL, (sides, side_sets[sides] / N_DRAWS, p)
    r = torch.tensor(ratios)
    assert r.min() >= 0.15 and r.max() <= 0.75
    assert r.min() < 0.16 and r.max() > 0.74  # the whole range is used
    assert abs(r.mean().item() - 0.45) < 0.01
    # uniform: each tenth of the range holds about 10 %
    hist = torch.histc(r, bins=10, min=0.15, max=0.75) / N_DRAWS
    assert (hist - 0.1).abs().max() < TOL


def test_guide_case_statistics():
    g = torch.Generator().manual_seed(1)
    cases, raw_fraction = Counter(), []
    for _ in range(N_DRAWS):
        case, guides = M.draw_guides(16, g)
        cases[case] += 1
        if case == "all_masked":
            assert not guides.any()
        elif case == "first_last_raw":
            assert guides[0] and guides[-1] and not guides[1:-1].any()
        else:
            raw_fraction.append(guides.float().mean().item())
    for name, p in zip(M.GUIDE_CASES, M.MaskSpec().guide_case_weights):
        assert abs(cases[name] / N_DRAWS - p) < TOL, (name, cases[name] / N_DRAWS, p)
    assert abs(sum(raw_fraction) / len(raw_fraction) - 0.5) < TOL


def test_band_mask_widths():
    m = M.band_mask(64, 128, ("left", "right"), 0.5)
    assert m[:, :32].eq(1).all() and m[:, -32:].eq(1).all() and m[:, 32:-32].eq(0).all()
    m = M.band_mask(128, 128, ("top",), 0.3)  # int(128 * 0.3 / 2) = 19
    assert m[:19].eq(1).all() and m[19:].eq(0).all()
    m = M.band_mask(64, 64, M.SIDES, 0.75)  # 24 px per side
    assert m[24:40, 24:40].eq(0).all() and m.sum() == 64 * 64 - 16 * 16


def test_plus_masks_are_shared_across_frames_and_m3ddm_masks_are_not():
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        clip = M.sample_clip_masks(16, 32, 32, g, "m3ddm_plus")
        d = clip.direction_masks
        assert torch.equal(d, d[:1].expand_as(d))
        assert d.sum() > 0
        # guide frames are all zero, the others keep the shared mask
        assert torch.equal(clip.masks[clip.guides], torch.zeros_like(clip.masks[clip.guides]))
        assert torch.equal(clip.masks[~clip.guides], d[~clip.guides])
    differing = 0
    for _ in range(50):
        clip = M.sample_clip_masks(16, 32, 32, g, "m3ddm")
        d = clip.direction_masks
        differing += int(not torch.equal(d, d[:1].expand_as(d)))
        assert len(set(clip.ratios)) == 16
    assert differing == 50


def test_masks_are_reproducible_from_the_generator():
    a = M.sample_clip_masks(8, 16, 24, torch.Generator().manual_seed(5), "m3ddm")
    b = M.sample_clip_masks(8, 16, 24, torch.Generator().manual_seed(5), "m3ddm")
    assert torch.equal(a.masks, b.masks) and torch.equal(a.guides, b.guides)
    with pytest.raises(ValueError, match="mask strategy"):
        M.sample_clip_masks(8, 16, 16, torch.Generator(), "nope")


def _fixed_clip():
    direction = M.band_mask(16, 16, ("left",), 0.5)
    other = M.band_mask(16, 16, ("top",), 0.5)
    direction_masks = torch.stack([direction, other, direction, direction])
    guides = torch.tensor([False, False, True, False])
    masks = direction_masks * (~guides).float()[:, None, None]
    return M.ClipMasks(masks, direction_masks, guides, [], [], "random_raw")


def test_global_frame_masks_modes():
    clip = _fixed_clip()
    clip_indices = [10, 12, 14, 16]
    global_indices = [0, 12, 14, 30]
    none = M.global_frame_masks("none", clip, clip_indices, global_indices)
    assert none.sum() == 0
    overlap = M.global_frame_masks("overlap", clip, clip_indices, global_indices)
    assert overlap[0].sum() == 0 and overlap[3].sum() == 0          # not in the clip: unmasked (the reference leak)
    assert torch.equal(overlap[1], clip.masks[1])                     # in the clip: that frame's mask
    assert overlap[2].sum() == 0                                      # a raw guide frame stays unmasked
    full = M.global_frame_masks("all", clip, clip_indices, global_indices)
    union = torch.maximum(clip.direction_masks[0], clip.direction_masks[1])
    assert torch.equal(full[0], union) and torch.equal(full[3], union)
    assert torch.equal(full[1], clip.masks[1]) and full[2].sum() == 0
    with pytest.raises(ValueError, match="global-frame mask mode"):
        M.global_frame_masks("some", clip, clip_indices, global_indices)


def test_latent_mask_equals_nearest_interpolation():
    g = torch.Generator().manual_seed(3)
    clip = M.sample_clip_masks(4, 64, 96, g, "m3ddm")
    ours = M.latent_mask(clip.masks)
    ref = F.interpolate(clip.masks[None], size=(8, 12), mode="nearest")[0]
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="multiples of 8"):
        M.latent_mask(torch.zeros(4, 60, 64))
