"""FP8 weights for the DiT's linear layers, as the official `--fp8` path does it (spec §1.4).

Per-tensor symmetric float8_e4m3fn weights (scale = clamp(448 / max|W|, max=448)), dynamic
per-tensor activation scaling on every call, `torch._scaled_mm` with float32 scales and bf16
output. Applied AFTER the LoRA merge. The layers the official code keeps in high precision
(timestep and text embeddings, the head, the audio encoder's final linear) are skipped.

On devices without FP8 matrix units (CPU, pre-Hopper GPUs) the same quantised values are
multiplied in float32, so the numerical effect of FP8 can be measured anywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                                   # largest finite e4m3fn value
# substrings of module names kept in high precision (spec §1.4)
FP8_SKIPPED = ("text_embedding", "time_embedding", "time_projection", "head.head",
               "casual_audio_encoder.encoder.final_linear")


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x8, inverse scale) with x ≈ x8 · inverse_scale; scale = clamp(448/max|x|, max=448)."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = (FP8_MAX / amax).clamp(max=FP8_MAX)
    x8 = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale.reciprocal()


def _scaled_mm_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


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
        self.out_dtype = out_dtype
        self.use_scaled_mm = _scaled_mm_supported(w8.device)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantised weight (for code that inspects it); not used by forward."""
        return (self.weight_fp8.float() * self.weight_scale).to(self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        x8, x_inv_scale = quantize_per_tensor(flat)
        if self.use_scaled_mm:
            out = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_inv_scale, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=True)
        else:
            out = F.linear(x8.float() * x_inv_scale, self.weight_fp8.float() * self.weight_scale,
                           None if self.bias is None else self.bias.float()).to(self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def convert_to_fp8(model: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every eligible nn.Linear in place; returns the number of parameters now in FP8."""
    converted = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(s in full for s in FP8_SKIPPED):
                setattr(module, child_name, FP8Linear(child, out_dtype))
                converted += child.weight.numel()
                del child
    return converted
