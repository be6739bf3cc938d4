"""The Stable Diffusion 1.5 VAE (AutoencoderKL, kl-f8), written from its description.

Images (N, 3, H, W) in [-1, 1] <-> latents (N, 4, H/8, W/8). State-dict keys are exactly diffusers'
AutoencoderKL names, so a diffusers VAE state dict loads strictly. Imports torch only.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_SCALE = 0.18215  # hard-coded by the reference pipeline (it never reads the config's value)


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)


VAE_PRESETS = {
    "sd15": VAEConfig(),
    "tiny": VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    # the embedded demo model (m3ddm/assets/demo_vae.safetensors): SD-1.5 structure, factor 8, 4 latent
    # channels; widths (32, 64, 128, 128), 3.88 M parameters: 128 px encode + decode about 30 ms a frame on a CPU
    "demo": VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16),
}


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions, width C, with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # ".0" in the key names

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).view(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (N, HW, C)
        a = self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w)
        return x + a


class MidBlock(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the SD VAE


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_ch, out_ch, n_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch, out_ch, n_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)  # (N, C0, H, W)
        for block in self.down_blocks:
            x = block(x)  # halves H, W except in the last block
        x = self.mid_block(x)  # (N, C_last, H/8, W/8)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (N, 2*latent, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))  # (N, C_last, h, w)
        for block in self.up_blocks:
            x = block(x)  # doubles H, W except in the last block
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (N, 3, 8h, 8w)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of the encoder, one per image."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, generator=None):
        device = generator.device if generator is not None else self.mean.device  # CPU generator, CUDA mean: ok
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        noise = noise.to(self.mean.device)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.factor = 2 ** (len(config.block_out_channels) - 1)

    def _check(self, x, channels, what):
        p = next(self.parameters())
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"VAE {what} expects a (N, {channels}, H, W) tensor, received {got}")
        if x.dtype != p.dtype:
            raise ValueError(f"VAE {what} expects dtype {p.dtype} (the model's), received {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"VAE {what} expects at least one image, received a batch of 0")

    def _chunks(self, x, batch):
        if int(batch) < 1:
            raise ValueError(f"VAE batch must be >= 1, received {batch}")
        return x.split(int(batch), dim=0)

    def encode(self, x, batch=8) -> DiagonalGaussian:
        """x (N, 3, H, W) in [-1, 1], H and W multiples of 8 -> posterior over (N, 4, H/8, W/8)."""
        self._check(x, self.config.in_channels, "encode")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"VAE encode expects H and W divisible by {self.factor}, received {tuple(x.shape[2:])}")
        moments = torch.cat([self.quant_conv(self.encoder(c)) for c in self._chunks(x, batch)])
        return DiagonalGaussian(moments)

    def decode(self, z, batch=8):
        """Raw (unscaled) latents (N, 4, h, w) -> images (N, 3, 8h, 8w), unclamped."""
        self._check(z, self.config.latent_channels, "decode")
        return torch.cat([self.decoder(self.post_quant_conv(c)) for c in self._chunks(z, batch)])

    def encode_latents(self, x, batch=8, generator=None, sample=False):
        """Images in [-1, 1] -> latents scaled by 0.18215 (posterior mean unless sample=True)."""
        post = self.encode(x, batch)
        z = post.sample(generator) if sample else post.mean
        return z * LATENT_SCALE

    def decode_latents(self, z_scaled, batch=8):
        """Latents scaled by 0.18215 -> images clamped to [-1, 1]."""
        return self.decode(z_scaled / LATENT_SCALE, batch).clamp(-1.0, 1.0)
