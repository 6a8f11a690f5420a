"""Attention caches of the causal DiT (spec §2.8), laid out so that every attention call reads ONE
contiguous key/value range (no concatenation per call).

Per layer and per denoising step, keys and values live in one buffer [1, heads, cond + ring, head_dim]:

    | reference (hw) | motion (1.5·hw) | ring: the last 12 latent frames (12·hw) |
      └ cond region, written by the sink prefill ┘

* The ring holds the rotated keys / raw values the earlier blocks produced AT THIS STEP's noise
  level ("timestep forcing"): one `StepCache` per denoising step.
* The reference keys are re-rotated on every call (the sink frame's temporal position rolls), so
  their un-rotated form is kept once in `SinkKeys`; motion keys have fixed positions and are stored
  rotated.
"""
from __future__ import annotations

import dataclasses

import torch

from .constants import LATENTS_PER_BLOCK, LATENTS_PER_CLIP


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Token counts of the cache regions for a token grid of h×w per latent frame."""
    h: int
    w: int

    @property
    def frame_tokens(self) -> int:
        return self.h * self.w

    @property
    def ref_len(self) -> int:
        return self.frame_tokens

    @property
    def motion_len(self) -> int:
        # FramePack: newest frame at full grid, 2× bucket at half grid, 4× bucket: 4 frames at quarter grid
        return self.frame_tokens + (self.h // 2) * (self.w // 2) + 4 * (self.h // 4) * (self.w // 4)

    @property
    def cond_len(self) -> int:
        return self.ref_len + self.motion_len

    @property
    def ring_len(self) -> int:
        return LATENTS_PER_CLIP * self.frame_tokens

    @property
    def block_tokens(self) -> int:
        return LATENTS_PER_BLOCK * self.frame_tokens

    def ring_slot(self, first_frame: int) -> int:
        """Offset inside the ring where the block starting at latent frame `first_frame` is written."""
        return (first_frame * self.frame_tokens) % self.ring_len

    def bytes_per_step(self, num_layers: int, dim: int, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * (self.cond_len + self.ring_len) * dim * elem


class StepCache:
    """Keys and values of every layer for one denoising step."""

    def __init__(self, layout: CacheLayout, layers: range, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (1, num_heads, layout.cond_len + layout.ring_len, head_dim)
        self.layout = layout
        self.layers = layers
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.filled = 0   # ring tokens written so far (saturates at ring_len)

    def active_len(self) -> int:
        return self.layout.cond_len + self.filled

    def advance(self, first_frame: int) -> None:
        """Record that the block starting at `first_frame` has been written (after its last layer)."""
        end = min(self.layout.ring_len, (first_frame + LATENTS_PER_BLOCK) * self.layout.frame_tokens)
        self.filled = max(self.filled, end)

    def reset_ring(self) -> None:
        self.filled = 0

    def to(self, device, non_blocking: bool = False) -> "StepCache":
        for store in (self.k, self.v):
            for i in store:
                store[i] = store[i].to(device, non_blocking=non_blocking)
        return self


class SinkKeys:
    """Un-rotated reference keys per layer, written by the sink prefill, shared by all steps."""

    def __init__(self):
        self.ref_k: dict[int, torch.Tensor] = {}
