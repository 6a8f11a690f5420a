"""The named memory modes users pick from (issue 4), and what each changes.

| mode      | DiT weights | self-attention | step caches            | text/audio encoders |
|-----------|-------------|----------------|------------------------|---------------------|
| quality   | bf16        | bf16           | on the GPU             | CPU after use       |
| balanced  | FP8 (e4m3)  | bf16           | on the GPU             | CPU after use       |
| fast      | FP8 (e4m3)  | FP8 (cuDNN)    | on the GPU, e4m3       | CPU after use       |
| low_vram  | FP8 (e4m3)  | bf16           | pinned host memory, streamed in layer by layer | CPU |

`balanced` is the official `--fp8` recipe; `fast` goes beyond it (fp8_attention.py: one GPU,
Hopper or newer, the cuDNN frontend installed).

On the CPU every mode computes in float32 (FP8 is emulated in float32 where a mode asks for it).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MemoryMode:
    name: str
    fp8_weights: bool
    offload_caches: bool
    fp8_attention: bool = False
    lighter: str = ""          # what to choose instead when this mode's caches do not fit the GPU


_LOW_VRAM = "'low_vram' (the caches in host memory)"
_FAST = "'fast' (caches of half the size in FP8; one Hopper or newer GPU)"
MEMORY_MODES = {
    "quality": MemoryMode("quality", fp8_weights=False, offload_caches=False,
                          lighter=f"memory_mode 'balanced' (FP8 weights: 15 GB more room, the same caches), "
                                  f"{_FAST} or {_LOW_VRAM}"),
    "balanced": MemoryMode("balanced", fp8_weights=True, offload_caches=False,
                           lighter=f"memory_mode {_FAST} or {_LOW_VRAM}"),
    "fast": MemoryMode("fast", fp8_weights=True, offload_caches=False, fp8_attention=True,
                       lighter=f"memory_mode {_LOW_VRAM}"),
    "low_vram": MemoryMode("low_vram", fp8_weights=True, offload_caches=True),
}


def memory_mode(name: str) -> MemoryMode:
    from .errors import InputError
    if name not in MEMORY_MODES:
        raise InputError(f"memory_mode {name!r}: choose one of {', '.join(MEMORY_MODES)}")
    return MEMORY_MODES[name]
