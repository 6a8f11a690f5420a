"""The audio side of the S2V DiT (spec §2.5): `casual_audio_encoder` and the audio injectors.

Module and parameter names follow the published checkpoint (including the `casual` spelling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import block_ops
from .block_ops import linear_weights
from .layers import CrossAttention, layer_norm

AUDIO_ADALN_EPS = 1e-5   # spec §8.7: the audio AdaLN uses 1e-5, everything else 1e-6


class CausalConv1d(nn.Module):
    """Conv1d with replicate left-padding of kernel−1 frames, so output j sees inputs ≤ j·stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [B, C, T], float32
        x = F.pad(x, (self.left_pad, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), self.conv.stride)


class AudioMotionEncoder(nn.Module):
    """Causal conv stack: per-frame audio features -> (global token, num_token local tokens + padding).

    Temporal stride 4 (two stride-2 convs). Channel widths: dim/4 → dim/2 → dim; the local path
    runs `num_token` groups of dim/4 channels in parallel. All LayerNorms are affine-free.
    """

    def __init__(self, audio_dim: int, dim: int, num_token: int, eps: float = 1e-6):
        super().__init__()
        self.num_token = num_token
        self.eps = eps
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_token)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:   # [B, C, T] -> [B, C, T]
        return F.silu(layer_norm(x.transpose(1, 2), self.eps)).transpose(1, 2)

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm_act(self.conv2(self._norm_act(x)))
        return self._norm_act(self.conv3(x))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, audio_dim] float32 -> global [B, T', 1, dim], local [B, T', num_token+1, dim]."""
        batch = features.shape[0]
        x = features.transpose(1, 2)
        local = self.conv1_local(x)                                   # [B, n*C, T]
        local = local.unflatten(1, (self.num_token, -1)).flatten(0, 1)  # [(B n), C, T]
        local = self._downsample(local).transpose(1, 2)                 # [(B n), T', dim]
        local = local.unflatten(0, (batch, self.num_token)).transpose(1, 2)  # [B, T', n, dim]
        padding = self.padding_tokens.float().expand(batch, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)

        glob = self._downsample(self.conv1_global(x)).transpose(1, 2)   # [B, T', dim]
        glob = F.linear(glob, self.final_linear.weight.float(), self.final_linear.bias.float())
        return glob.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Learned softmax-free weighting of the wav2vec2 layers, then the causal conv encoder (float32)."""

    def __init__(self, audio_dim: int, audio_layers: int, dim: int, num_token: int):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, audio_layers, 1, 1), 0.01))
        self.encoder = AudioMotionEncoder(audio_dim, dim, num_token)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, layers, audio_dim, T] -> (global, local) as AudioMotionEncoder returns them."""
        weights = F.silu(self.weights.float())
        mixed = (features.float() * weights / weights.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(mixed.transpose(1, 2))


class AudioAdaLayerNorm(nn.Module):
    """LayerNorm (no affine, eps 1e-5) modulated by the global audio token: shift first, then scale.
    Holds the weights; the arithmetic is `block_ops.audio_injection`."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)


class AudioInjector(nn.Module):
    """Per-frame cross-attention from video tokens to that frame's audio tokens (no gate)."""

    def __init__(self, dim: int, num_heads: int, num_injectors: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, eps) for _ in range(num_injectors)])
        self.injector_adain_layers = nn.ModuleList([AudioAdaLayerNorm(dim) for _ in range(num_injectors)])

    def inject(self, index: int, x: torch.Tensor, audio_tokens: torch.Tensor,
               audio_global: torch.Tensor) -> torch.Tensor:
        """x [1, F*hw, dim] noisy tokens; audio_tokens [F, n+1, dim]; audio_global [F, dim].
        Returns x with injector `index`'s output added, [1, F*hw, dim] in x's dtype."""
        attn, adain = self.injector[index], self.injector_adain_layers[index]
        return block_ops.compiled("audio_injection")(
            x, audio_tokens, audio_global, linear_weights(adain.linear), linear_weights(attn.q),
            linear_weights(attn.k), linear_weights(attn.v), linear_weights(attn.o),
            attn.norm_q.weight, attn.norm_k.weight, self.num_heads, self.eps, AUDIO_ADALN_EPS)
