"""The hardware floor of one denoising step of one block (issue 4): the sum of isolated cuBLAS /
SDPA kernel times for exactly the shapes one step needs, measured on the GPU at hand."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from liveavatar_backend.config import DiTConfig
from liveavatar_backend.fp8 import FP8_DTYPE
from liveavatar_backend.kv_cache import CacheLayout
from common import cuda_time_ms


def _matmul_ms(m: int, k: int, n: int, fp8: bool) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    if not fp8:
        return cuda_time_ms(lambda: a @ b.t())
    a8, b8 = a.to(FP8_DTYPE), b.to(FP8_DTYPE)
    one = torch.ones((), device="cuda")
    return cuda_time_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16, use_fast_accum=True))


def _attention_ms(heads: int, q_len: int, k_len: int, head_dim: int, batch: int = 1) -> float:
    q = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads, k_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v))


def step_floor_ms(layout: CacheLayout, cfg: DiTConfig, fp8: bool) -> dict:
    """Per-step floor: per layer 6 dim×dim projections + 2 FFN matmuls + self/text attention;
    plus the audio injectors' q/o projections and per-frame attention."""
    m = layout.block_tokens
    keys = layout.ring_len + layout.cond_len
    proj = _matmul_ms(m, cfg.dim, cfg.dim, fp8)
    ffn = _matmul_ms(m, cfg.dim, cfg.ffn_dim, fp8) + _matmul_ms(m, cfg.ffn_dim, cfg.dim, fp8)
    self_attn = _attention_ms(cfg.num_heads, m, keys, cfg.head_dim)
    text_attn = _attention_ms(cfg.num_heads, m, cfg.text_len, cfg.head_dim)
    audio_attn = _attention_ms(cfg.num_heads, layout.frame_tokens, cfg.num_audio_token + 1, cfg.head_dim, batch=3)
    per_layer = 6 * proj + ffn + self_attn + text_attn
    injectors = len(cfg.audio_inject_layers) * (2 * proj + audio_attn)
    total = cfg.num_layers * per_layer + injectors
    return {"query_tokens": m, "keys": keys, "step_ms": total, "proj_ms": proj, "ffn_ms": ffn,
            "self_attn_ms": self_attn, "text_attn_ms": text_attn}
