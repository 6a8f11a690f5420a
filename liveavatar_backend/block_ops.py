"""The per-layer arithmetic of a DiT block as pure functions of tensors.

Weights arrive as arguments (a linear layer is `(weight, bias)`, or `(weight_fp8, inverse_scale,
bias)` for FP8, a `fp8.WeightOnlyFP8` on GPUs without FP8 matrix units), so `torch.compile` traces
each function ONCE and reuses the code for all 40 layers; fusing the float32 norm / modulation /
RoPE / FP8-quantisation elementwise work into a few kernels. The eager path runs the very same
functions, so compiled and eager cannot drift apart.

Only the part that touches the caches (writes and attention over the cache) stays outside.
The sink-key rotation and the audio injectors live here too: run eagerly, each would be a dozen
small elementwise kernels per call, for every layer of every block-step.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import (fp8_linear_quantized, fp8_linears, fp8_weights, fp8_weights_linear, multiplies_in_fp8,
                  quantize_per_tensor, quantize_static)
from .layers import gelu_tanh, layer_norm as layer_norm32, rms_norm
from .rope import apply_rope as rotate


def linear_weights(layer: nn.Module) -> tuple:
    """(weight, bias) of an nn.Linear; of an FP8Linear (weight_fp8, inverse_scale, bias), or
    `WeightOnlyFP8` on a GPU without FP8 matrix units (`fp8.fp8_weights`)."""
    if hasattr(layer, "weight_fp8"):
        return fp8_weights(layer)
    return layer.weight, layer.bias


def linear(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    if len(weights) == 2:
        return F.linear(x, weights[0], weights[1])
    return fp8_weights_linear(x, weights)


def linears(x: torch.Tensor, *weights: tuple) -> list[torch.Tensor]:
    """x through several linears of one format; FP8 quantises x once for all of them."""
    if not multiplies_in_fp8(weights[0]):
        return [linear(x, w) for w in weights]
    return fp8_linears(x, list(weights))


def attention_inputs(x, e0, modulation, q, k, v, norm_q, norm_k, cos, sin, num_heads: int, eps: float,
                     raw_keys: bool = False):
    """Self-attention inputs of one block: modulated LayerNorm, q/k/v, RMS norms, RoPE.

    Returns (q_rot, k_rot, k_raw, v), each [1, heads, L, head_dim] over token-major [1, L, heads,
    head_dim] memory, in x's dtype. The un-rotated keys k_raw (the sink prefill keeps the
    reference's) are None unless `raw_keys`: as an output they would be one more write of L × dim."""
    dtype = x.dtype
    mod = modulation[0].float() + e0
    h = layer_norm32(x, eps).to(dtype).float() * (1 + mod[1]) + mod[0]
    h = h.to(dtype)
    q_out, k_out, v_out = linears(h, q, k, v)
    qh = rms_norm(q_out, norm_q, eps).unflatten(-1, (num_heads, -1))
    kh = rms_norm(k_out, norm_k, eps).unflatten(-1, (num_heads, -1))
    vh = v_out.unflatten(-1, (num_heads, -1))
    return (rotate(qh, cos, sin).transpose(1, 2), rotate(kh, cos, sin).transpose(1, 2),
            kh.transpose(1, 2) if raw_keys else None, vh.transpose(1, 2))


def fp8_attention_inputs(q_rot, k_rot, v, key_scale, value_scale):
    """`attention_inputs`' outputs for FP8 attention: (q8, q's inverse scale [1,1,1,1], k8, v8).
    Queries are scaled per call, keys/values at their layer's fixed cache scales (fp8_attention)."""
    q8, q_inverse = quantize_per_tensor(q_rot)
    return q8, q_inverse.reshape(1, 1, 1, 1), quantize_static(k_rot, key_scale), quantize_static(v, value_scale)


def attention_output(attn_out, o, dtype):
    """The o-projection of [1, heads, L, head_dim] attention output, or of FP8 attention's
    (e4m3 output, its inverse scale), which is already the projection's FP8 input."""
    if isinstance(attn_out, tuple):
        out8, inverse = attn_out
        if multiplies_in_fp8(o):
            return fp8_linear_quantized(out8.transpose(1, 2).flatten(2), inverse, *o, out_dtype=dtype)
        attn_out = (out8.float() * inverse).to(dtype)                  # bf16 multiplies: dequantise first
    return linear(attn_out.transpose(1, 2).flatten(2), o)


def finish_block(x, attn_out, e0, modulation, o, norm3_weight, norm3_bias, cross_q, cross_norm_q, cross_o,
                 text_k, text_v, ffn_in, ffn_out, num_heads: int, eps: float):
    """Rest of the block after self-attention: gated residual, text cross-attention, gated FFN.

    Residual additions in float32; the official block casts to bf16 before the text
    cross-attention whatever the compute dtype (spec §11). `attn_out` as `attention_output` takes it."""
    dtype = x.dtype
    mod = modulation[0].float() + e0
    y = attention_output(attn_out, o, dtype)
    x32 = x.float() + y.float() * mod[2]
    h = layer_norm32(x32.to(torch.bfloat16), eps, norm3_weight, norm3_bias).to(dtype)
    cq = rms_norm(linear(h, cross_q), cross_norm_q, eps).unflatten(-1, (num_heads, -1)).transpose(1, 2)
    cross = F.scaled_dot_product_attention(cq, text_k, text_v).transpose(1, 2).flatten(2)
    x32 = x32 + linear(cross, cross_o).float()
    h = (layer_norm32(x32, eps) * (1 + mod[4]) + mod[3]).to(dtype)
    pre = linear(h, ffn_in)
    # Compiled FP8 quantises the GELU's output: an amax pass and an e4m3 pass over 3168 × 13824
    # values (704*384), both compute-bound on Inductor's tanh; the σ form takes 49 + 55-58 µs per
    # layer and step against 69 + 69 (H200). bf16 writes it once, a memory-bound pass where tanh
    # took 56-60 µs and the σ form 75-79 µs in default builds. Eager, the σ form would be ~9 separate
    # kernels (18x slower than F.gelu), so it is only used while compiling.
    fused_sigmoid = multiplies_in_fp8(ffn_out) and torch.compiler.is_compiling()
    hidden = gelu_tanh(pre) if fused_sigmoid else F.gelu(pre, approximate="tanh")
    x32 = x32 + linear(hidden, ffn_out).float() * mod[5]
    return x32.to(dtype)


def reference_keys(sink_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_scale=None) -> torch.Tensor:
    """The sink's un-rotated keys [1, heads, L, head_dim] rotated to its current temporal position
    (in e4m3 at `key_scale` for an FP8 cache).

    Runs for every layer of every block-step (the sink's position rolls, spec §2.4); eager it is
    about ten elementwise passes, compiled one."""
    rotated = rotate(sink_k.transpose(1, 2), cos, sin).transpose(1, 2)
    return rotated if key_scale is None else quantize_static(rotated, key_scale)


def audio_injection(x, audio_tokens, audio_global, adain, q, k, v, o, norm_q, norm_k,
                    num_heads: int, eps: float, adain_eps: float):
    """x plus one audio injector's output (spec §2.5.4): each latent frame's tokens attend to that
    frame's audio tokens after a LayerNorm modulated by the frame's global audio token.

    x [1, F*hw, dim]; audio_tokens [F, n+1, dim]; audio_global [F, dim]. No gate."""
    frames = audio_tokens.shape[0]
    per_frame = x.unflatten(1, (frames, -1)).squeeze(0)                       # [F, hw, dim]
    shift, scale = linear(F.silu(audio_global), adain).float().chunk(2, dim=-1)
    normed = (layer_norm32(per_frame, adain_eps) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)
    qh = rms_norm(linear(normed, q), norm_q, eps).unflatten(-1, (num_heads, -1)).transpose(1, 2)
    k_out, v_out = linears(audio_tokens, k, v)
    kh = rms_norm(k_out, norm_k, eps).unflatten(-1, (num_heads, -1)).transpose(1, 2)
    vh = v_out.unflatten(-1, (num_heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(2)
    return x + linear(out, o).flatten(0, 1).unsqueeze(0)


_compiled: dict[str, object] = {}
COMPILE_SWITCH = "LIVEAVATAR_COMPILE"      # "0": run eager PyTorch (slower, no first-run compilation)
# Compiled versions kept per function. Each size and weight format adds about two (streaming block
# and sink prefill); with fullgraph=True, reaching dynamo's default of 8 would be an error, not a
# fallback, in a long ComfyUI session that tries many sizes.
RECOMPILE_LIMIT = 256


def raise_recompile_limit() -> None:
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * RECOMPILE_LIMIT)


def compile_supported() -> tuple[bool, str]:
    """(whether torch.compile may be used for GPU work here, why not). Inductor's GPU kernels
    need Triton, which some installs lack (Windows wheels of PyTorch do not bring it)."""
    if os.environ.get(COMPILE_SWITCH, "1").strip() == "0":
        return False, f"{COMPILE_SWITCH}=0 is set"
    try:
        from torch.utils._triton import has_triton
    except ImportError:                       # a PyTorch without this helper: is the package there?
        available = importlib.util.find_spec("triton") is not None
    else:
        available = has_triton()
    if not available:
        return False, "Triton is not installed or does not support this GPU"
    return True, ""


def compiled(name: str):
    """The compiled version of a function of this module once `enable_compile()` ran, else eager."""
    return _compiled.get(name) or globals()[name]


def enable_compile(backend="inductor", options: dict | None = None) -> None:
    """Compile the per-layer functions (one graph each, shared by every layer). `options` are
    Inductor settings for these functions alone (the host process's own compiles keep theirs).

    Inductor keeps its compiled code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so the
    compile cost is paid once per machine, not once per run."""
    raise_recompile_limit()
    for name in ("attention_inputs", "fp8_attention_inputs", "finish_block", "reference_keys", "audio_injection"):
        _compiled[name] = torch.compile(globals()[name], backend=backend, dynamic=False, fullgraph=True,
                                        options=options)


def disable_compile() -> None:
    _compiled.clear()
