"""FP8 weights for the DiT's linear layers, as the official `--fp8` path does it (spec §1.4).

Per-tensor symmetric float8_e4m3fn weights (scale = clamp(448 / max|W|, max=448)), dynamic
per-tensor activation scaling on every call, `torch._scaled_mm` with float32 scales and bf16
output. Applied AFTER the LoRA merge. The layers the official code keeps in high precision
(timestep and text embeddings, the head, the audio encoder's final linear) are skipped.

On the CPU the same quantised values are multiplied in float32, so the numerical effect of FP8
can be measured anywhere. FP8 matrix multiplication on a GPU needs compute capability 8.9+ (Ada,
Hopper or newer); older GPUs (an A100, an RTX 3090) keep the e4m3 weights, at FP8's size, and
multiply them in bf16 (`WeightOnlyFP8`): the weights' rounding without the activations'.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MATMUL_CAPABILITY = (8, 9)                    # torch._scaled_mm's e4m3 GEMMs: Ada, Hopper and newer
FP8_MAX = 448.0                                   # largest finite e4m3fn value
# substrings of module names kept in high precision (spec §1.4)
FP8_SKIPPED = ("text_embedding", "time_embedding", "time_projection", "head.head",
               "casual_audio_encoder.encoder.final_linear")


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x8, inverse scale) with x ≈ x8 · inverse_scale; scale = clamp(448/max|x|, max=448)."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = (FP8_MAX / amax).clamp(max=FP8_MAX)
    return quantize_static(x, scale), scale.reciprocal()


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · scale in e4m3 for a scale chosen beforehand, saturating at ±448."""
    return (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_inv_scale: torch.Tensor, bias) -> torch.Tensor:
    """x @ W.T + bias with W stored as (w8, inverse scale) and x quantised per call (per tensor)."""
    return fp8_linears(x, [(w8, w_inv_scale, bias)])[0]


def fp8_linears(x: torch.Tensor, weights: list[tuple]) -> list[torch.Tensor]:
    """x through several FP8 linears: x is quantised once (the same per-tensor scale each call would
    compute), so q, k and v of one input cost one quantisation pass, not three."""
    x8, x_inv_scale = quantize_per_tensor(x.reshape(-1, x.shape[-1]))
    return [fp8_linear_quantized(x8.view(x.shape), x_inv_scale, *w, out_dtype=x.dtype) for w in weights]


def fp8_linear_quantized(x8: torch.Tensor, x_inv_scale: torch.Tensor, w8: torch.Tensor, w_inv_scale: torch.Tensor,
                         bias, out_dtype: torch.dtype) -> torch.Tensor:
    """x @ W.T + bias for an input already in e4m3 (x ≈ x8 · x_inv_scale, one scale for the tensor)."""
    flat = x8.reshape(-1, x8.shape[-1])
    if x8.is_cuda:
        out = torch._scaled_mm(flat, w8.t(), scale_a=x_inv_scale.reshape(()), scale_b=w_inv_scale, bias=bias,
                               out_dtype=out_dtype, use_fast_accum=True)
    else:       # no FP8 matrix units here: the same quantised values, multiplied in float32
        out = F.linear(flat.float() * x_inv_scale.reshape(()), w8.float() * w_inv_scale,
                       None if bias is None else bias.float())
    return out.to(out_dtype).reshape(*x8.shape[:-1], -1)


class WeightOnlyFP8(NamedTuple):
    """An FP8 linear's weights on a GPU without FP8 matrix units. Each call dequantises the e4m3
    weight to the input's dtype (one pass, fused by torch.compile: a temporary of the layer's size,
    at most 141 MB in bf16 for the 14B model's FFN) and multiplies in that dtype; the activations
    are not quantised, so the result is nearer to bf16 than the official recipe's."""
    weight_fp8: torch.Tensor
    inverse_scale: torch.Tensor
    bias: torch.Tensor | None


def weight_only_linear(x: torch.Tensor, weights: WeightOnlyFP8) -> torch.Tensor:
    """x @ W.T + bias for W = weight_fp8 · inverse_scale, multiplied in x's dtype."""
    weight = (weights.weight_fp8.float() * weights.inverse_scale).to(x.dtype)
    return F.linear(x, weight, weights.bias)


def fp8_weights_linear(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    """x through an FP8 linear in the form `fp8_weights` gave for its device."""
    if isinstance(weights, WeightOnlyFP8):
        return weight_only_linear(x, weights)
    return fp8_linear(x, *weights)


def multiplies_in_fp8(weights: tuple) -> bool:
    """Whether these linear weights (see `fp8_weights`) multiply an e4m3 input: the official recipe."""
    return len(weights) == 3 and not isinstance(weights, WeightOnlyFP8)


class FP8Linear(nn.Module):
    """Drop-in replacement for nn.Linear holding `weight_fp8` and `weight_scale` buffers."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, w_inv_scale = quantize_per_tensor(linear.weight.data)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", w_inv_scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.to(out_dtype),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_weights_linear(x, fp8_weights(self))


def fp8_weights(layer: FP8Linear) -> tuple:
    """The layer's weights as its device multiplies them: (e4m3 weight, inverse scale, bias) for
    `torch._scaled_mm` (or the CPU's float32 emulation of it), `WeightOnlyFP8` on a GPU without FP8
    matrix units. Decided at every call, so a model moved to another GPU follows it."""
    weights = (layer.weight_fp8, layer.weight_scale, layer.bias)
    return weights if has_fp8_matmul(layer.weight_fp8.device) else WeightOnlyFP8(*weights)


def converts_to_fp8(name: str, module: nn.Module) -> bool:
    """Whether `convert_to_fp8` turns this module (named as in `model.named_modules()`) into FP8."""
    return type(module) is nn.Linear and not any(s in name for s in FP8_SKIPPED)


def has_fp8_matmul(device) -> bool:
    """Whether this device multiplies e4m3 inputs (the CPU does, emulating it in float32). Asked for
    every linear of every pass: remembered per GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return _gpu_has_fp8_matmul(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _gpu_has_fp8_matmul(index: int) -> bool:
    return (torch.version.hip is None              # ROCm reports its gfx architecture here, not a CUDA capability
            and torch.cuda.get_device_capability(index) >= FP8_MATMUL_CAPABILITY)


def fp8_matmul_unavailable(device) -> str | None:
    """Why this device cannot multiply e4m3 inputs (None: it can, or it is the CPU, which emulates);
    FP8 weights there are multiplied in bf16 (`WeightOnlyFP8`)."""
    if has_fp8_matmul(device):
        return None
    device = torch.device(device)
    if torch.version.hip is not None:
        return (f"{torch.cuda.get_device_name(device)} ({device}) is a ROCm GPU; this pack multiplies FP8 only on "
                "NVIDIA GPUs of compute capability 8.9 or newer")
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} ({device}, compute capability {major}.{minor}) has no FP8 "
            "matrix units (they need 8.9 or newer: Ada, Hopper, Blackwell)")


def convert_to_fp8(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every eligible nn.Linear in place; returns the number of parameters now in FP8.

    One layer at a time, holding no reference to a replaced layer, so its high-precision weight
    is freed before the next is converted: the peak is the model plus one layer, not 1.5 models."""
    targets = [name for name, child in model.named_modules()
               if converts_to_fp8(name, child) and not child.weight.is_meta]     # meta: another device's layers
    converted = 0
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        converted += linear.weight.numel()
        setattr(parent, child_name, FP8Linear(linear, out_dtype))
        del linear
    return converted
