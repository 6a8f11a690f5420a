"""The per-layer arithmetic of a DiT block as pure functions of tensors.

Weights arrive as arguments (a linear layer is `(weight, bias)`, or `(weight_fp8, inverse_scale,
bias)` for FP8), so `torch.compile` traces each function ONCE and reuses the code for all 40
layers; fusing the float32 norm / modulation / RoPE / FP8-quantisation elementwise work into a few
kernels. The eager path runs the very same functions, so compiled and eager cannot drift apart.

Only the part that touches the caches (writes and attention over the cache) stays outside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import fp8_linear
from .layers import layer_norm as layer_norm32, rms_norm
from .rope import apply_rope as rotate


def linear(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    if len(weights) == 2:
        return F.linear(x, weights[0], weights[1])
    return fp8_linear(x, *weights)


def attention_inputs(x, e0, modulation, q, k, v, norm_q, norm_k, cos, sin, num_heads: int, eps: float):
    """Self-attention inputs of one block: modulated LayerNorm, q/k/v, RMS norms, RoPE.

    Returns (q_rot, k_rot, k_raw, v), each [1, heads, L, head_dim] in x's dtype."""
    dtype = x.dtype
    mod = modulation[0].float() + e0
    h = layer_norm32(x, eps).to(dtype).float() * (1 + mod[1]) + mod[0]
    h = h.to(dtype)
    qh = rms_norm(linear(h, q), norm_q, eps).unflatten(-1, (num_heads, -1))
    kh = rms_norm(linear(h, k), norm_k, eps).unflatten(-1, (num_heads, -1))
    vh = linear(h, v).unflatten(-1, (num_heads, -1))
    return (rotate(qh, cos, sin).transpose(1, 2), rotate(kh, cos, sin).transpose(1, 2),
            kh.transpose(1, 2), vh.transpose(1, 2))


def finish_block(x, attn_out, e0, modulation, o, norm3_weight, norm3_bias, cross_q, cross_norm_q, cross_o,
                 text_k, text_v, ffn_in, ffn_out, num_heads: int, eps: float):
    """Rest of the block after self-attention: gated residual, text cross-attention, gated FFN.

    Residual additions in float32; the official block casts to bf16 before the text
    cross-attention whatever the compute dtype (spec §11)."""
    dtype = x.dtype
    mod = modulation[0].float() + e0
    y = linear(attn_out.transpose(1, 2).flatten(2), o)
    x32 = x.float() + y.float() * mod[2]
    h = layer_norm32(x32.to(torch.bfloat16), eps, norm3_weight, norm3_bias).to(dtype)
    cq = rms_norm(linear(h, cross_q), cross_norm_q, eps).unflatten(-1, (num_heads, -1)).transpose(1, 2)
    cross = F.scaled_dot_product_attention(cq, text_k, text_v).transpose(1, 2).flatten(2)
    x32 = x32 + linear(cross, cross_o).float()
    h = (layer_norm32(x32, eps) * (1 + mod[4]) + mod[3]).to(dtype)
    hidden = F.gelu(linear(h, ffn_in), approximate="tanh")
    x32 = x32 + linear(hidden, ffn_out).float() * mod[5]
    return x32.to(dtype)


_compiled: dict[str, object] = {}


def eager(name: str):
    return globals()[name]


def compiled(name: str):
    """The compiled version of a function of this module once `enable_compile()` ran, else eager."""
    return _compiled.get(name) or globals()[name]


def enable_compile(mode: str | None = None) -> None:
    """Compile `attention_inputs` and `finish_block` (one graph each, shared by every layer).

    Inductor keeps its compiled code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so the
    compile cost is paid once per machine, not once per run."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for name in ("attention_inputs", "finish_block"):
        _compiled[name] = torch.compile(globals()[name], mode=mode, dynamic=False, fullgraph=True)


def disable_compile() -> None:
    _compiled.clear()
