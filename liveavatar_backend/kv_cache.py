"""Attention caches of the causal DiT (spec §2.8), laid out so that every attention call reads ONE
contiguous key/value range and the cond region is stored once per PAIR of steps, not once per step.

Per layer, steps 2p and 2p+1 share one buffer [1, heads, ring + cond + ring, head_dim]:

    | ring of step 2p (filled right→left) | reference (hw) | motion (1.5·hw) | ring of step 2p+1 (left→right) |
                                          └──── cond region (sink prefill) ───┘

so step 2p attends to the contiguous range [ring_len − filled, ring_len + cond_len) and step 2p+1
to [ring_len, ring_len + cond_len + filled). Ring order does not matter: keys are rotated with
absolute positions and there is no mask. A ring holds the keys/values that the blocks of the last
12 latent frames produced AT THAT STEP's noise level ("timestep forcing", spec §2.8).

At 704×384 with 4 steps this keeps 2 cond copies instead of 4 (4.3 GB less in bf16), which is
what lets the bf16 model plus caches fit an 80 GB card.

The reference keys are re-rotated on every call (the sink's temporal position rolls), so their
un-rotated form is kept in `sink_ref_k`; motion keys have fixed positions and are stored rotated.

Memory order is token-major (`cache_tensor`): a buffer is seen as [1, heads, N, head_dim] but
stored as [1, N, heads, head_dim], the order in which `block_ops.attention_inputs` produces keys
and values. So a block's write into its ring slot is one dense copy (head-major buffers made it a
gather of 256-byte rows: 55 against 36 µs per tensor and layer at 704*384 on an H200,
bench/bench_attention.py), and the low-VRAM bank's host<->GPU transfers are single memcpys.
"""
from __future__ import annotations

import dataclasses

import torch

from .constants import LATENTS_PER_BLOCK, LATENTS_PER_CLIP


def cache_tensor(tokens: int, num_heads: int, head_dim: int, **factory) -> torch.Tensor:
    """Zeros seen as [1, heads, tokens, head_dim], stored token-major ([1, tokens, heads, head_dim])."""
    return torch.zeros(1, tokens, num_heads, head_dim, **factory).transpose(1, 2)


def token_major(x: torch.Tensor) -> torch.Tensor:
    """x [1, heads, L, head_dim] over token-major memory: x itself if it is laid out so, else a copy."""
    heads, _, head_dim = x.shape[1:]
    if x.stride()[1:] == (head_dim, heads * head_dim, 1):
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


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
        """Offset (in ring order) where the block starting at latent frame `first_frame` goes."""
        return (first_frame * self.frame_tokens) % self.ring_len

    def bank_bytes(self, num_layers: int, steps: int, dim: int, dtype=torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        pairs = (steps + 1) // 2
        return 2 * num_layers * (pairs * self.cond_len + steps * self.ring_len) * dim * elem


class StepCache:
    """One denoising step's view of the shared buffers: where its ring and the cond region lie."""

    def __init__(self, bank: "KVCacheBank", step: int):
        self.bank = bank
        self.layout = bank.layout
        self.step = step
        self.pair = step // 2
        self.left = step % 2 == 0 and step + 1 < bank.steps   # a lone last step uses the right side
        lay = self.layout
        self.cond_start = lay.ring_len if self._paired_buffer() else 0
        self.filled = 0

    def _paired_buffer(self) -> bool:
        return self.bank.pair_sizes[self.pair] == 2

    def _buffers(self, layer: int):
        return self.bank.k[layer][self.pair], self.bank.v[layer][self.pair]

    def _ring_range(self, offset: int, length: int) -> slice:
        """Buffer positions of ring offsets [offset, offset+length)."""
        lay = self.layout
        if self.left:
            return slice(lay.ring_len - offset - length, lay.ring_len - offset)
        start = self.cond_start + lay.cond_len + offset
        return slice(start, start + length)

    def write_block(self, layer: int, first_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        keys, values = self._buffers(layer)
        where = self._ring_range(self.layout.ring_slot(first_frame), k.shape[2])
        keys[:, :, where] = k
        values[:, :, where] = v

    def write_reference(self, layer: int, k_rotated: torch.Tensor) -> None:
        keys, _ = self._buffers(layer)
        keys[:, :, self.cond_start: self.cond_start + self.layout.ref_len] = k_rotated

    def write_cond(self, layer: int, motion_k_rotated: torch.Tensor, v: torch.Tensor) -> None:
        keys, values = self._buffers(layer)
        lay, start = self.layout, self.cond_start
        keys[:, :, start + lay.ref_len: start + lay.cond_len] = motion_k_rotated
        values[:, :, start: start + lay.cond_len] = v

    def active(self, layer: int, first_frame: int, block_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values the current block attends to: cond region + ring filled so far incl. itself."""
        lay = self.layout
        filled = min(lay.ring_len, max(self.filled, lay.ring_slot(first_frame) + block_len))
        keys, values = self._buffers(layer)
        if self.left:
            where = slice(lay.ring_len - filled, lay.ring_len + lay.cond_len)
        else:
            where = slice(self.cond_start, self.cond_start + lay.cond_len + filled)
        return keys[:, :, where], values[:, :, where]

    def advance(self, first_frame: int) -> None:
        """Record that the block starting at `first_frame` is written (after its last layer)."""
        lay = self.layout
        self.filled = max(self.filled, min(lay.ring_len, lay.ring_slot(first_frame) + lay.block_tokens))


class KVCacheBank:
    """All steps' caches for a range of layers (one device's share when layers are sharded)."""

    def __init__(self, layout: CacheLayout, layers: range, steps: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.layout, self.layers, self.steps = layout, layers, steps
        self.pair_sizes = [min(2, steps - 2 * p) for p in range((steps + 1) // 2)]
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}
        for layer in layers:
            lengths = [layout.cond_len + n * layout.ring_len for n in self.pair_sizes]
            self.k[layer] = [cache_tensor(n, num_heads, head_dim, dtype=dtype, device=device) for n in lengths]
            self.v[layer] = [cache_tensor(n, num_heads, head_dim, dtype=dtype, device=device) for n in lengths]
        self.sink_ref_k: dict[int, torch.Tensor] = {}
        self.step_views = [StepCache(self, i) for i in range(steps)]
        self.scales = None      # fp8_attention.CacheScales when the buffers hold e4m3 keys/values

    def step(self, i: int) -> StepCache:
        return self.step_views[i]

    def all_steps(self) -> list[StepCache]:
        return self.step_views

    def release(self) -> None:
        self.k.clear()
        self.v.clear()
        self.sink_ref_k.clear()
