"""m3ddm.memory: the live-storage count is exact on known allocations, the same on meta and CPU tensors, and
the full-size sampler's estimate stays inside the 6 GiB target (a regression guard, shapes only)."""
import pytest
import torch
import torch.nn.functional as F

from m3ddm import memory as M

MiB = 2 ** 20


def test_live_memory_counts_outputs_until_they_are_freed():
    with torch.no_grad(), M.LiveMemory(block=1) as mode:
        a = torch.zeros(MiB // 4)                  # 1 MiB
        b = a * 2                                  # 1 MiB more
        view = b[: 10]                             # a view: no new storage
        b.add_(1)                                  # in place: no new storage
        assert mode.live == 2 * MiB
        del b                                      # still held by the view
        assert mode.live == 2 * MiB
        del view
        assert mode.live == MiB
        c = torch.cat([a, a])                      # 2 MiB: peak 3 MiB
        del c, a
    assert mode.live == 0 and mode.peak == 3 * MiB
    assert mode.at_peak[0][0] == 2 * MiB and "cat" in mode.at_peak[0][1]


def test_blocks_are_rounded_like_the_cuda_allocator():
    assert M.rounded(1) == 512 and M.rounded(512) == 512 and M.rounded(513) == 1024
    with M.LiveMemory() as mode:
        x = torch.zeros(3)                         # 12 bytes -> one 512-byte block
    assert mode.peak == 512
    del x


def test_fused_attention_holds_no_score_matrix():
    q = torch.zeros(2, 4, 256, 16, device="meta")
    k = torch.zeros(2, 4, 512, 16, device="meta")
    peaks = {}
    for fused in (False, True):
        with (M.FusedAttention() if fused else torch.no_grad()), M.LiveMemory(block=1) as mode:
            out = F.scaled_dot_product_attention(q, k, k)
        peaks[fused] = mode.peak
        assert out.shape == q.shape
    assert peaks[False] >= 2 * 4 * 256 * 512 * 4                     # the math path's fp32 scores
    assert peaks[True] == 2 * 4 * 256 * 16 * 4 + 2 * 4 * 256 * 4 + 3 * 8   # output, log-sum-exp, RNG state


def test_meta_count_equals_cpu_count_tiny():
    """The tracker sees the same allocations on meta tensors as on real CPU tensors (validate's first half)."""
    counted = {}
    for device in ("meta", "cpu"):
        unet, _ = M.build("tiny", torch.float32, device)
        with torch.no_grad(), M.FusedAttention(), M.LiveMemory(block=1) as mode:
            for t in list(unet.parameters()) + list(unet.buffers()):
                mode.track(t, "weights")
            base = mode.live
            M.sampler_step(unet, 64, 3, torch.float32, device)
        counted[device] = mode.peak - base
    assert counted["meta"] == counted["cpu"] > 0


@pytest.mark.slow
def test_full_size_sampler_estimate_is_inside_the_6_gib_target():
    """Released UNet + SD-1.5 VAE resident in bf16, 256 px, 16 frames, 3 branches: 3.66 GiB when measured
    (UNet weights 2.42 GiB); the reference needs ~13 GB."""
    e = M.estimate("full", 256, torch.bfloat16, 3, 8)
    assert 2.4 * 2 ** 30 < e.unet_weights < 2.45 * 2 ** 30
    assert e.unet_step_peak > e.unet_weights + e.vae_weights
    assert e.total < 6 * 2 ** 30
