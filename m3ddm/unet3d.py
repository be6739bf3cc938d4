"""The M3DDM / M3DDM+ pseudo-3D UNet with its global-frame encoder, in plain PyTorch.

Module names mirror the released checkpoint's state-dict keys exactly, so a checkpoint loads with a
plain strict `load_state_dict`. Tensors are (B, C, F, H, W) throughout; H and W are latent sizes.

    unet = UNet3D(UNET_PRESETS["full"])
    eps = unet(x, t, fps, global_latents=g)   # x (B, 9, F, h, w) = [z_t | cond latents | mask], g (B, G, 4, h, w)
    ctx = unet.encode_global(g)               # or once per clip, then unet(x, t, fps, context=ctx)

Guidance batching is the caller's business: an "unconditional global" row is simply a row whose global
latents are all zero (the encoder still runs on them, exactly as the reference does).
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock3D", "DownBlockP3D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock3D", "UpBlockP3D")


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class UNet3DConfig:
    in_channels: int = 9                  # [noisy latents (4) | conditioning latents (4) | mask (1)]
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2             # down blocks; up blocks have one more
    attention_head_dim: int = 8           # the NUMBER of heads (SD-1.x convention); head dim = C / 8
    cross_attention_dim: int = 320        # width of the global tokens
    norm_num_groups: int = 32             # every GroupNorm of the UNet
    norm_eps: float = 1e-5                # resnet GroupNorms and conv_norm_out
    transformer_norm_eps: float = 1e-6    # both transformer GroupNorms (hard-coded in the reference)
    flip_sin_to_cos: bool = True          # time and fps sinusoids are [cos, sin]
    freq_shift: int = 0
    time_max_period: int = 1000           # not SD's 10000
    fps_max_period: int = 30
    frame_max_period: int = 1000          # temporal position embedding (always [cos, sin], shift 0)
    frame_embed_dim: int = 320            # width of the frame-index sinusoid, whatever the block width
    down_block_types: tuple = ("CrossAttnDownBlock3D",) * 3 + ("DownBlockP3D",)
    up_block_types: tuple = ("UpBlockP3D",) + ("CrossAttnUpBlock3D",) * 3
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    act_fn: str = "silu"
    prediction_type: str = "epsilon"      # what the output is: the noise (M3DDM+), or "v_prediction" (the demo)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"expected {n} down and up block types (one per block_out_channels entry), "
                             f"received {len(self.down_block_types)} and {len(self.up_block_types)}")
        bad = [t for t in self.down_block_types + self.up_block_types if t not in DOWN_BLOCK_TYPES + UP_BLOCK_TYPES]
        bad += [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.attention_head_dim]
        if bad or self.act_fn != "silu" or self.downsample_padding != 1:
            raise ValueError(f"expected block types in {DOWN_BLOCK_TYPES + UP_BLOCK_TYPES}, widths divisible by "
                             f"norm_num_groups and attention_head_dim, act_fn 'silu' and downsample_padding 1, "
                             f"received {bad}, {self.act_fn!r} and {self.downsample_padding}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, received {self.prediction_type!r}")

    @property
    def time_embed_dim(self):
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d):
        """From a dataclass dict or a diffusers config.json dict (its `_*` keys and `sample_size` are ignored)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_") and k != "sample_size"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"expected UNet3DConfig fields, received unknown keys {unknown}")
        return cls(**d)


UNET_PRESETS = {
    "full": UNet3DConfig(),  # the released M3DDM / M3DDM+ checkpoint, 1,299,279,320 parameters
    "tiny": UNet3DConfig(block_out_channels=(16, 16, 16, 32), norm_num_groups=8),  # the test fixture, 1,322,488
    "small": UNet3DConfig(block_out_channels=(64, 128, 256, 256)),  # the CPU benchmark, 54.4 M
    "demo": UNet3DConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
                         attention_head_dim=4),  # the bundled demo model, 9.84 M
    "demo_gpu": UNet3DConfig(block_out_channels=(40, 80, 160, 160), layers_per_block=1, norm_num_groups=8,
                             attention_head_dim=4),  # make demo-weights-gpu, 14.9 M (29.8 MB in fp16)
}


def list_presets():
    """{preset name: one-line description} of UNET_PRESETS."""
    return {"full": "released M3DDM/M3DDM+ architecture, widths (320, 640, 1280, 1280), 1.30 B parameters",
            "tiny": "test-fixture architecture, widths (16, 16, 16, 32), 8 norm groups, 1.32 M parameters",
            "small": "CPU-benchmark architecture, widths (64, 128, 256, 256), 54.4 M parameters",
            "demo": "the bundled demo model, widths (32, 64, 128, 128), 1 layer per block, 16 groups, 4 heads, 9.84 M",
            "demo_gpu": "make demo-weights-gpu: widths (40, 80, 160, 160), 1 layer per block, 8 groups, 4 heads, 14.9 M"}


# ----------------------------------------------------------------------------------------------------
# embeddings


class Sinusoid(nn.Module):
    """Positions (N,) -> (N, dim) fp32 sinusoid, [cos, sin] when flipped. Always computed in fp32."""

    def __init__(self, dim, max_period, flip_sin_to_cos=True, shift=0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"expected an even sinusoid width, received {dim}")
        self.dim, self.max_period, self.flip, self.shift = dim, max_period, flip_sin_to_cos, shift

    def forward(self, positions):
        half = self.dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=positions.device)
        freqs = torch.exp(exponent / (half - self.shift))
        angles = positions.float()[:, None] * freqs[None, :]  # (N, half)
        if self.flip:
            return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class EmbeddingMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (the reference's TimestepEmbedding)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------
# convolutions and resnets


class Pseudo3DConv(nn.Module):
    """Conv2d 3x3 per frame, then a full-channel Conv1d k=3 over time (zero-padded at the clip ends)."""

    def __init__(self, dim, dim_out):
        super().__init__()
        self.spatial_conv = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.temporal_conv = nn.Conv1d(dim_out, dim_out, 3, padding=1)
        nn.init.dirac_(self.temporal_conv.weight)  # a fresh temporal conv is the identity
        nn.init.zeros_(self.temporal_conv.bias)

    def forward(self, x):
        B, C, Fr, H, W = x.shape
        x = x.transpose(1, 2).reshape(B * Fr, C, H, W)
        x = self.spatial_conv(x)  # (B*F, C', H, W)
        C = x.shape[1]
        x = x.reshape(B, Fr, C, H, W).permute(0, 3, 4, 2, 1).reshape(B * H * W, C, Fr)
        x = self.temporal_conv(x)  # (B*H*W, C', F)
        return x.reshape(B, H, W, C, Fr).permute(0, 3, 4, 1, 2)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv1 (+time, +fps) GN-SiLU-conv2, plus a 1x1x1 shortcut. GNs pool over all frames (5-D)."""

    def __init__(self, dim, dim_out, temb_dim, groups, eps, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim, eps=eps)
        self.conv1 = Pseudo3DConv(dim, dim_out)
        self.time_emb_proj = nn.Linear(temb_dim, dim_out)
        self.fps_emb_proj = nn.Linear(temb_dim, dim_out)
        self.norm2 = nn.GroupNorm(groups, dim_out, eps=eps)
        self.conv2 = Pseudo3DConv(dim_out, dim_out)
        self.conv_shortcut = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, emb, femb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C', F, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None, None]
        h = h + self.fps_emb_proj(F.silu(femb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


# ----------------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Multi-head attention without bias on q/k/v; `impl` is "sdpa" (fused) or "math" (plain softmax)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.impl = "sdpa"
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 1 was a p=0 dropout in the reference
        nn.init.zeros_(self.to_out[0].weight)  # a fresh block starts as an identity residual

    def forward(self, x, context=None):
        context = x if context is None else context
        N, L, C = x.shape
        T, d = context.shape[1], C // self.heads
        q = self.to_q(x).view(N, L, self.heads, d).transpose(1, 2)  # (N, heads, L, d)
        k = self.to_k(context).view(N, T, self.heads, d).transpose(1, 2)  # (N, heads, T, d)
        v = self.to_v(context).view(N, T, self.heads, d).transpose(1, 2)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-1, -2)) * d ** -0.5  # (N, heads, L, T), scale after the matmul
            out = scores.softmax(dim=-1) @ v
        return self.to_out[0](out.transpose(1, 2).reshape(N, L, C))


class GEGLU(nn.Module):
    def __init__(self, dim, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-LN self-attention, second attention (cross to `context`, or self when context_dim is None), GEGLU FF.

    With `context` (B, T, Cc) and hidden states ((B*F), L, C), the cross-attention keys and values are
    computed once per batch item: the F*L queries of an item attend to the same T tokens, which equals the
    reference's per-frame copies. `per_frame_context = True` repeats the context per frame like the reference.
    """

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.per_frame_context = False

    def forward(self, h, context=None):
        h = self.attn1(self.norm1(h)) + h
        if context is None:
            h = self.attn2(self.norm2(h)) + h
        elif self.per_frame_context:
            frames = h.shape[0] // context.shape[0]
            h = self.attn2(self.norm2(h), context.repeat_interleave(frames, dim=0)) + h
        else:
            BF, L, C = h.shape
            q = self.norm2(h).reshape(context.shape[0], -1, C)  # (B, F*L, C)
            h = self.attn2(q, context).reshape(BF, L, C) + h
        return self.ff(self.norm3(h)) + h


class SpatialTemporalTransformer(nn.Module):
    """Per-frame spatial transformer (self + cross to global tokens), then a temporal one over the F frames."""

    def __init__(self, dim, heads, context_dim, groups, cfg):
        super().__init__()
        eps = cfg.transformer_norm_eps
        self.norm = nn.GroupNorm(groups, dim, eps=eps)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.frame_proj = Sinusoid(cfg.frame_embed_dim, cfg.frame_max_period, True, 0)
        self.temporal_position_embed_proj = EmbeddingMLP(cfg.frame_embed_dim, dim)
        self.norm2 = nn.GroupNorm(groups, dim, eps=eps)
        self.proj_in2 = nn.Conv3d(dim, dim, 1)
        self.transformer_blocks2 = nn.ModuleList([TransformerBlock(dim, heads)])
        self.proj_out2 = nn.Conv3d(dim, dim, 1)
        for conv in (self.proj_in2, self.proj_out2):  # a fresh temporal half is the identity
            nn.init.dirac_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, context):
        B, C, Fr, H, W = x.shape
        # spatial half: per frame, GroupNorm statistics per frame
        r = x.transpose(1, 2).reshape(B * Fr, C, H, W)
        h = self.proj_in(self.norm(r))
        h = h.permute(0, 2, 3, 1).reshape(B * Fr, H * W, C)  # ((B*F), H*W, C), tokens row-major
        h = self.transformer_blocks[0](h, context)
        h = self.proj_out(h.reshape(B * Fr, H, W, C).permute(0, 3, 1, 2)) + r
        x = h.reshape(B, Fr, C, H, W).transpose(1, 2)  # (B, C, F, H, W)
        # temporal half: GroupNorm pooled over all frames, frame-index embedding added after proj_in2
        h = self.proj_in2(self.norm2(x))
        h = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, Fr, C)  # ((B*H*W), F, C)
        frames = torch.arange(Fr, device=x.device)
        pe = self.temporal_position_embed_proj(self.frame_proj(frames).to(h.dtype))  # (F, C)
        h = self.transformer_blocks2[0](h + pe)
        h = h.reshape(B, H, W, Fr, C).permute(0, 4, 3, 1, 2)
        return self.proj_out2(h) + x


# ----------------------------------------------------------------------------------------------------
# samplers and UNet blocks


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x):
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # per-frame 2x nearest
        return self.conv(x)


class DownBlock(nn.Module):
    """CrossAttnDownBlock3D (with_attention) or DownBlockP3D: (resnet -> transformer) x layers, then a
    downsampler. Returns the output and the skip tensors it pushes (one per layer, then the downsampler's)."""

    def __init__(self, dim, dim_out, with_attention, add_downsample, cfg):
        super().__init__()
        groups, heads = cfg.norm_num_groups, cfg.attention_head_dim
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock(dim if i == 0 else dim_out, dim_out, cfg.time_embed_dim,
                                                  groups, cfg.norm_eps) for i in range(n)])
        if with_attention:
            self.attentions = nn.ModuleList([SpatialTemporalTransformer(dim_out, heads, cfg.cross_attention_dim,
                                                                        groups, cfg) for _ in range(n)])
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample(dim_out)]) if add_downsample else None

    def forward(self, h, emb, femb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb, femb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    def __init__(self, dim, cfg):
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, cfg.time_embed_dim, groups, eps, scale)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTemporalTransformer(dim, cfg.attention_head_dim,
                                                                    cfg.cross_attention_dim, groups, cfg)])

    def forward(self, h, emb, femb, context):
        h = self.resnets[0](h, emb, femb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, emb, femb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock3D (with_attention) or UpBlockP3D: for each of layers+1 resnets, concatenate
    [current, skip] (current first; skips consumed from the end), resnet, transformer; then an upsampler."""

    def __init__(self, dim_prev, dim_out, dim_skip_last, with_attention, add_upsample, cfg):
        super().__init__()
        groups, heads = cfg.norm_num_groups, cfg.attention_head_dim
        n = cfg.layers_per_block + 1
        ins = [(dim_prev if i == 0 else dim_out) + (dim_skip_last if i == n - 1 else dim_out) for i in range(n)]
        self.resnets = nn.ModuleList([ResnetBlock(c, dim_out, cfg.time_embed_dim, groups, cfg.norm_eps)
                                      for c in ins])
        if with_attention:
            self.attentions = nn.ModuleList([SpatialTemporalTransformer(dim_out, heads, cfg.cross_attention_dim,
                                                                        groups, cfg) for _ in range(n)])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample(dim_out)]) if add_upsample else None

    def forward(self, h, skips, emb, femb, context):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, F, H, W)
            h = resnet(h, emb, femb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


# ----------------------------------------------------------------------------------------------------
# global-frame encoder (attribute paths are transformers' ResNet names, as in the checkpoint)


class ConvBN(nn.Module):
    def __init__(self, dim, dim_out, kernel_size, stride=1, relu=True):
        super().__init__()
        self.convolution = nn.Conv2d(dim, dim_out, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(dim_out)
        self.relu = relu

    def forward(self, x):
        h = self.convolution(x)
        # the BatchNorm may be kept in fp32 in a bf16/fp16 model (weights.cast_model): normalise in its dtype
        h = self.normalization(h.to(self.normalization.weight.dtype)).to(h.dtype)
        return F.relu(h) if self.relu else h


class Bottleneck(nn.Module):
    """1x1 reduce (to out/4), 3x3 (carries the stride), 1x1 expand; projection shortcut when the shape changes."""

    def __init__(self, dim, dim_out, stride):
        super().__init__()
        r = dim_out // 4
        needs_projection = dim != dim_out or stride != 1
        self.shortcut = ConvBN(dim, dim_out, 1, stride, relu=False) if needs_projection else None
        self.layer = nn.Sequential(ConvBN(dim, r, 1), ConvBN(r, r, 3, stride), ConvBN(r, dim_out, 1, relu=False))

    def forward(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.layer(x) + residual)


class Stage(nn.Module):
    def __init__(self, dim, dim_out, stride):
        super().__init__()
        self.layers = nn.Sequential(Bottleneck(dim, dim_out, stride), Bottleneck(dim_out, dim_out, 1))

    def forward(self, x):
        return self.layers(x)


class GlobalEncoder(nn.Module):
    """(N, 4, h, w) global-frame latents -> (N, out_dim, ceil(h/2) - 2, ceil(w/2) - 2). BatchNorms use their
    running statistics in eval mode (the reference runs the encoder in eval mode at inference)."""

    stages = ((4, 8, 1), (8, 16, 1), (16, 32, 2), (32, 64, 1), (64, 128, 1))

    def __init__(self, out_dim):
        super().__init__()
        self.resnet_layer = nn.Sequential(*[Stage(i, o, s) for i, o, s in self.stages])
        self.convolution = nn.Conv2d(128, out_dim, 3)  # no padding

    def forward(self, x):
        return self.convolution(self.resnet_layer(x))


# ----------------------------------------------------------------------------------------------------
# the UNet


class UNet3D(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = self.config = config if config is not None else UNet3DConfig()
        widths, c0 = cfg.block_out_channels, cfg.block_out_channels[0]
        self.gradient_checkpointing = False

        self.time_proj = Sinusoid(c0, cfg.time_max_period, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = EmbeddingMLP(c0, cfg.time_embed_dim)
        self.fps_proj = Sinusoid(c0, cfg.fps_max_period, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.fps_embedding = EmbeddingMLP(c0, cfg.time_embed_dim)
        self.global_img_encoder = GlobalEncoder(cfg.cross_attention_dim)
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, (1, 3, 3), padding=(0, 1, 1))

        n = len(widths)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock(widths[max(i - 1, 0)], widths[i], kind == "CrossAttnDownBlock3D",
                                              i < n - 1, cfg))
        self.mid_block = MidBlock(widths[-1], cfg)
        rev = widths[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            self.up_blocks.append(UpBlock(rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)],
                                          kind == "CrossAttnUpBlock3D", i < n - 1, cfg))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps)
        self.conv_out = Pseudo3DConv(c0, cfg.out_channels)

    @property
    def size_multiple(self):
        return 2 ** (len(self.config.block_out_channels) - 1)

    def set_attention(self, impl="sdpa", per_frame_context=False):
        """"sdpa" (F.scaled_dot_product_attention) or "math" (plain softmax). per_frame_context=True computes
        the cross-attention keys/values once per frame, as the reference does (same result, more work)."""
        if impl not in ("sdpa", "math"):
            raise ValueError(f"expected attention 'sdpa' or 'math', received {impl!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = impl
            elif isinstance(m, TransformerBlock):
                m.per_frame_context = per_frame_context

    def encode_global(self, global_latents):
        """(B, G, 4, h, w) VAE-scaled latents -> context tokens (B, G*h'*w', C_ctx), token = g*h'*w' + y*w' + x.
        G == 0 means "no global condition": the tokens of one all-zero latent frame (the reference's
        unconditional branch; the tokens carry no position, so attention over G zero frames is the same)."""
        if global_latents.ndim != 5 or global_latents.shape[2] != 4:
            raise ValueError(f"expected global latents (B, G, 4, h, w), received {tuple(global_latents.shape)}")
        B, G, C, h, w = global_latents.shape
        if h < 5 or w < 5:
            raise ValueError(f"expected global latents at least 5x5, received {h}x{w}")
        dtype = self.conv_in.weight.dtype
        if G == 0:
            global_latents, G = global_latents.new_zeros(B, 1, C, h, w), 1
        tokens = self.global_img_encoder(global_latents.reshape(B * G, C, h, w).to(dtype))  # (B*G, Cc, h', w')
        Cc, hh, ww = tokens.shape[1:]
        return tokens.reshape(B, G, Cc, hh, ww).permute(0, 1, 3, 4, 2).reshape(B, G * hh * ww, Cc)

    def _per_sample(self, value, B, name, truncate):
        if not torch.is_tensor(value):
            value = torch.tensor([int(value)])  # Python scalars become integers, as in the reference
        value = value.reshape(-1).to(self.conv_in.weight.device)
        if value.numel() not in (1, B):
            raise ValueError(f"expected {name} as a scalar or ({B},) tensor, received shape {tuple(value.shape)}")
        if truncate and value.is_floating_point():
            value = value.trunc()
        return value.expand(B)

    def _check_inputs(self, x, global_latents, context):
        cfg, m = self.config, self.size_multiple
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, F, h, w), received {tuple(x.shape)}")
        if x.shape[3] % m or x.shape[4] % m:
            raise ValueError(f"expected latent height and width that are multiples of {m} "
                             f"(pixels multiples of {8 * m}), received {x.shape[3]}x{x.shape[4]}")
        if (global_latents is None) == (context is None):
            raise ValueError("expected exactly one of global_latents and context, received "
                             f"{'both' if context is not None else 'neither'}")
        if global_latents is not None and (global_latents.ndim != 5 or global_latents.shape[0] != x.shape[0]):
            raise ValueError(f"expected global latents ({x.shape[0]}, G, 4, h, w), "
                             f"received {tuple(global_latents.shape)}")
        if context is not None and (context.ndim != 3 or context.shape[0] not in (1, x.shape[0])
                                    or context.shape[2] != cfg.cross_attention_dim):
            raise ValueError(f"expected context ({x.shape[0]}, T, {cfg.cross_attention_dim}), "
                             f"received {tuple(context.shape)}")

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, t, fps, global_latents=None, context=None):
        """x (B, in_channels, F, h, w); t, fps: scalars or (B,) tensors (fps truncated to an integer);
        global_latents (B, G, 4, h, w) or a precomputed context (B, T, C_ctx). Returns (B, out_channels, F, h, w)."""
        self._check_inputs(x, global_latents, context)
        B, dtype = x.shape[0], self.conv_in.weight.dtype
        if context is None:
            context = self.encode_global(global_latents)
        context = context.to(dtype).expand(B, -1, -1)

        t = self._per_sample(t, B, "t", truncate=False)
        fps = self._per_sample(fps, B, "fps", truncate=True)
        emb = self.time_embedding(self.time_proj(t).to(dtype))  # (B, 4*C0)
        femb = self.fps_embedding(self.fps_proj(fps).to(dtype))

        x = x.to(dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1
        h = self.conv_in(x)  # (B, C0, F, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, emb, femb, context)
            skips.extend(block_skips)
        h = self._run(self.mid_block, h, emb, femb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = self._run(block, h, tuple(skips[-n:]), emb, femb, context)
            del skips[-n:]
        h = F.silu(self.conv_norm_out(h))  # GroupNorm pooled over all frames
        return self.conv_out(h)  # (B, out_channels, F, h, w)


def build_unet(preset_or_config="full", device=None, dtype=None):
    """A fresh (randomly initialised) UNet3D from a preset name or a UNet3DConfig; device="meta" builds no storage."""
    cfg = preset_or_config
    if isinstance(cfg, str):
        if cfg not in UNET_PRESETS:
            raise ValueError(f"expected a preset in {sorted(UNET_PRESETS)}, received {cfg!r}")
        cfg = replace(UNET_PRESETS[cfg])
    with torch.device(device or "cpu"):
        return UNet3D(cfg).to(dtype=dtype)
