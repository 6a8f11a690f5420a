"""The named memory modes users pick from (issue 4), and what each changes.

| mode      | DiT weights | self-attention | step caches            | text/audio encoders |
|-----------|-------------|----------------|------------------------|---------------------|
| quality   | bf16        | bf16           | on the GPU             | CPU after use       |
| balanced  | FP8 (e4m3)  | bf16           | on the GPU             | CPU after use       |
| fast      | FP8 (e4m3)  | FP8 (cuDNN)    | on the GPU, e4m3       | CPU after use       |
| low_vram  | FP8 (e4m3)  | bf16           | pinned host memory, streamed in layer by layer | CPU |

`balanced` is the official `--fp8` recipe; `fast` goes beyond it (fp8_attention.py: one GPU,
Hopper or newer, the cuDNN frontend installed).

`auto` is a choice, not a mode: at load it becomes `quality`, `balanced` or `low_vram` by the free
memory of the (first) GPU, whichever keeps the most quality while the 384*256 preview still fits
(`resolve_auto`). It never picks `fast`, whose change to the output is larger. A run whose caches
then do not fit the GPU keeps them in host RAM (`with_host_caches`, `engine.run_mode`).

GPUs without FP8 matrix units (before Ada: an A100, an RTX 3090) run `balanced` and `low_vram` with
the same e4m3 weights multiplied in bf16 (`fp8.WeightOnlyFP8`): FP8's memory, not its speed (each
call dequantises the weight first), and activations left unquantised; `fast` needs Hopper.

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


AUTO = "auto"
MEMORY_MODE_CHOICES = (AUTO, *MEMORY_MODES)
# Free memory `auto` asks of a GPU for `quality` and for `balanced`: each mode's measured peak for the
# 384*256, 3-step preview with the decoder (48.1 and 32.1 GB, 1× H100, 2026-12-05, docs/PERFORMANCE.md)
# plus 1 GB. Below the second, `low_vram` (19 GB there).
AUTO_QUALITY_FREE_BYTES = 49 * 10 ** 9
AUTO_BALANCED_FREE_BYTES = 33 * 10 ** 9


def memory_mode(name: str) -> MemoryMode:
    from .errors import InputError
    if name not in MEMORY_MODES:
        raise InputError(f"memory_mode {name!r}: choose one of {', '.join(MEMORY_MODE_CHOICES)}")
    return MEMORY_MODES[name]


def with_host_caches(mode: MemoryMode) -> MemoryMode:
    """`mode`'s weights with the attention caches in host RAM, streamed in layer by layer: `low_vram`
    for the FP8 modes, `quality`'s bf16 weights otherwise (where 'auto' moves a run, `engine.run_mode`)."""
    if mode.fp8_weights:
        return MEMORY_MODES["low_vram"]
    return dataclasses.replace(mode, offload_caches=True, lighter="")


def resolve_auto(free_bytes: int | None, gpus: int = 1) -> MemoryMode:
    """What `auto` means where the (first) GPU has `free_bytes` free and the DiT is split over `gpus`
    GPUs, each holding about 1/gpus of the weights and caches. None (the CPU, or GPUs on other hosts):
    `quality`."""
    if free_bytes is None or free_bytes * gpus >= AUTO_QUALITY_FREE_BYTES:
        return MEMORY_MODES["quality"]
    if free_bytes * gpus >= AUTO_BALANCED_FREE_BYTES:
        return MEMORY_MODES["balanced"]
    return MEMORY_MODES["low_vram"]
