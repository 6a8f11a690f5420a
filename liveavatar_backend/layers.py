"""Building blocks shared by the DiT and its audio injectors (Wan 2.x conventions)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm over all channels: normalised in float32, rounded to x's dtype, then scaled."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# GELU's tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Hendrycks & Gimpel 2016,
# the `approximate="tanh"` of the Wan FFN)
GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), computed in float32 (or float64) and rounded to x's dtype, written as
    x·σ(2u) (= ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³)).

    The same function; the form is for the compiler: Inductor turns tanh into a libdevice call of
    about twenty instructions, σ into one exponential and a division. Over the FFN's 3168 × 13824
    hidden values per layer and step (704*384) the tanh made the FP8 path's amax pass compute-bound."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    inner = x32 + GELU_TANH_CUBIC * x32 * x32 * x32
    return (x32 * torch.sigmoid((2.0 * GELU_TANH_SCALE) * inner)).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float = 1e-6, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in float32 (Wan's WanLayerNorm); returns float32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over [B, heads, L, head_dim] tensors, no mask, scale 1/sqrt(head_dim)."""
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, dim] -> [B, heads, L, head_dim]"""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, head_dim] -> [B, L, dim]"""
    return x.transpose(1, 2).flatten(2)


class AttentionWeights(nn.Module):
    """The q, k, v, o projections and q/k RMS norms every Wan attention has (published names)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class CrossAttention(AttentionWeights):
    """q from the hidden states, k/v from a context (text or audio tokens); RMS-normed q/k, no RoPE.

    Keys and values depend only on the context, so callers compute them once with
    `context_kv()` and reuse them for every block and step.
    """

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = split_heads(self.norm_k(self.k(context)), self.num_heads)
        v = split_heads(self.v(context), self.num_heads)
        return k, v

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = split_heads(self.norm_q(self.q(x)), self.num_heads)
        k, v = context_kv
        return self.o(merge_heads(attention(q, k, v)))
