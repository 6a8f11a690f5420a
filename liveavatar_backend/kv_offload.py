"""Low-VRAM caches: every step's keys/values live in pinned host memory and are streamed into a
two-slot GPU staging area one layer at a time, overlapping the copy of layer l+1 with the compute
of layer l (issue 4's low_vram mode).

Host storage is chunked so every transfer is contiguous: per layer, one cond chunk per step pair
and one chunk per ring slot (a block's 3 latent frames) per step. A step only ever needs its own
ring and the cond region, so that is all that crosses the bus; new block keys/values go back to
the host right after they are written. The GPU holds 2 layers' worth of one step's cache instead
of every layer of every step.

PyTorch's pinned-memory allocator (`CachingHostAllocator`) rounds every allocation up to a power of
two, which cost low_vram 18.8 GB of RAM for 12.9 GB of caches at 384*256, 3 steps (and 193 for 122
at 1024*704). So the chunks are not allocated one by one but packed into slabs whose sizes are
(nearly) powers of two: `slab_chunk_counts` plans them, and `memory_budget.host_cache_bytes` counts
RAM from the same plan.
"""
from __future__ import annotations

import os

import torch

from .constants import BLOCKS_PER_CLIP
from .kv_cache import CacheLayout, KVCacheBank, StepCache, cache_tensor, token_major

# Largest pinned slab. A power of two, so a full slab wastes only its size modulo a chunk (≤ 2.2 %
# of it at the sizes of sizes.py); big enough that a 48 GB bank is a dozen allocations.
PINNED_SLAB_BYTES = 1 << 32


# PyTorch's pinned allocator pins each block with one cudaHostAlloc call by default, ≈ 2 GB/s:
# 13 GB of caches at 384*256, 3 steps took 5.2-7.0 s before the first block. With these settings
# (PyTorch's CUDA allocator options) it mallocs, touches the pages from 8 threads (the count
# PyTorch's allocator code names as its benchmarked best) and registers them: 2.3 s for the same
# 13 GB on an H200 (bench_host_caches.py, docs/PERFORMANCE.md, 2026-12-07).
PARALLEL_PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
ALLOCATOR_ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_parallel_pinning() -> bool:
    """Switch PyTorch's pinned allocator to `PARALLEL_PINNING` for the rest of the process, unless
    the allocator settings name a pinned-memory option already (the user's choice stands). True if
    the switch is on. A PyTorch that refuses it keeps its default pinning: slower, same result."""
    if any("pinned_" in os.environ.get(name, "") for name in ALLOCATOR_ENV_VARS):
        return False
    try:
        torch.cuda.memory._set_allocator_settings(PARALLEL_PINNING)
    except (AttributeError, RuntimeError, ValueError):
        return False
    return True


def power_of_two_ceil(nbytes: int) -> int:
    return 1 << (nbytes - 1).bit_length()


def slab_chunk_counts(chunk_bytes: int, count: int) -> list[int]:
    """How many chunks of `chunk_bytes` each slab holds, for `count` chunks in all: full slabs of
    `PINNED_SLAB_BYTES` (or a power of two holding one chunk, were a chunk larger), then, for the
    rest, slabs of the largest power of two the rest fills, so that no slab wastes a chunk or more
    (by the allocator's rounding)."""
    assert chunk_bytes > 0, chunk_bytes
    full_slab = max(PINNED_SLAB_BYTES, power_of_two_ceil(chunk_bytes))
    counts = []
    while count > 0:
        rest = min(count * chunk_bytes, full_slab)
        slab = max(power_of_two_ceil(chunk_bytes), 1 << (rest.bit_length() - 1))   # largest 2^k <= rest
        counts.append(min(count, slab // chunk_bytes))
        count -= counts[-1]
    return counts


def host_chunks(count: int, tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                pin: bool) -> list[torch.Tensor]:
    """`count` zeroed host chunks laid out as `cache_tensor`'s ([1, heads, tokens, head_dim] over
    token-major memory), views into slabs planned by `slab_chunk_counts`. The zeros are not needed
    (tests/test_model.py fills the chunks with NaN: no region is read before it is written) and
    cost nothing measurable: pinning is what takes the time (`PARALLEL_PINNING`)."""
    chunk_bytes = tokens * num_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    chunks = []
    for in_slab in slab_chunk_counts(chunk_bytes, count):
        slab = torch.zeros(in_slab, tokens, num_heads, head_dim, dtype=dtype, pin_memory=pin)
        chunks += [slab[i:i + 1].transpose(1, 2) for i in range(in_slab)]
    return chunks


class OffloadedKVCacheBank(KVCacheBank):
    """KVCacheBank whose buffers are GPU staging slots filled from pinned host chunks on demand."""

    def __init__(self, layout: CacheLayout, layers: range, steps: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.layout, self.layers, self.steps = layout, layers, steps
        self.device = torch.device(device)
        self.pair_sizes = [min(2, steps - 2 * p) for p in range((steps + 1) // 2)]
        pin = self.device.type == "cuda"
        if pin:
            prefer_parallel_pinning()

        def host(keys: list, tokens: int) -> dict:   # (keys, values) chunks per key, token-major like
            chunks = iter(host_chunks(2 * len(keys), tokens, num_heads, head_dim, dtype, pin))   # staging
            return {key: (next(chunks), next(chunks)) for key in keys}

        # host chunks: cond per (layer, pair); ring per (layer, step, slot)
        self.host_cond = host([(l, p) for l in layers for p in range(len(self.pair_sizes))], layout.cond_len)
        self.host_ring = host([(l, s, b) for l in layers for s in range(steps) for b in range(BLOCKS_PER_CLIP)],
                              layout.block_tokens)
        widest = layout.cond_len + 2 * layout.ring_len
        self.staging = [(cache_tensor(widest, num_heads, head_dim, dtype=dtype, device=device),
                         cache_tensor(widest, num_heads, head_dim, dtype=dtype, device=device)) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device) if pin else None
        self.loaded: dict[int, tuple] = {}          # slot -> (layer, step) it holds
        self.ready: dict[int, torch.cuda.Event] = {}
        self.sink_ref_k: dict[int, torch.Tensor] = {}
        self.step_views = [OffloadedStepCache(self, i) for i in range(steps)]
        self.scales = None                          # bf16 caches: FP8 attention keeps its caches on the GPU

    # ------------------------------------------------------------------ staging
    def _fill(self, slot: int, layer: int, view: "OffloadedStepCache") -> None:
        keys, values = self.staging[slot]
        cond_k, cond_v = self.host_cond[(layer, view.pair)]
        where = slice(view.cond_start, view.cond_start + view.layout.cond_len)
        keys[:, :, where].copy_(cond_k, non_blocking=True)
        values[:, :, where].copy_(cond_v, non_blocking=True)
        filled_blocks = view.filled // view.layout.block_tokens
        for block in range(filled_blocks):
            ring = view._ring_range(block * view.layout.block_tokens, view.layout.block_tokens)
            ring_k, ring_v = self.host_ring[(layer, view.step, block)]
            keys[:, :, ring].copy_(ring_k, non_blocking=True)
            values[:, :, ring].copy_(ring_v, non_blocking=True)
        self.loaded[slot] = (layer, view.step)

    def _schedule(self, slot: int, layer: int, view: "OffloadedStepCache") -> None:
        if self.copy_stream is None:
            self._fill(slot, layer, view)
            return
        compute_done = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(compute_done)      # the slot's previous user has finished
            self._fill(slot, layer, view)
            self.ready[slot] = self.copy_stream.record_event()

    def staged(self, layer: int, view: "OffloadedStepCache"):
        """GPU buffers holding `layer` for `view`'s step; prefetches the next layer into the other slot,
        whose last user (the previous layer) has been queued already, so the copy overlaps this layer."""
        slot = layer % 2
        if self.loaded.get(slot) != (layer, view.step):
            self._schedule(slot, layer, view)           # only the first layer of a pass waits for its copy
        nxt = layer + 1
        if nxt in self.layers and self.loaded.get(nxt % 2) != (nxt, view.step):
            self._schedule(nxt % 2, nxt, view)
        if slot in self.ready:
            torch.cuda.current_stream(self.device).wait_event(self.ready.pop(slot))
        return self.staging[slot]

    def write_back(self, layer: int, view: "OffloadedStepCache", block: int, k: torch.Tensor, v: torch.Tensor):
        host_k, host_v = self.host_ring[(layer, view.step, block)]
        if self.copy_stream is None:
            host_k.copy_(k)
            host_v.copy_(v)
            return
        written = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(written)
            host_k.copy_(k, non_blocking=True)
            host_v.copy_(v, non_blocking=True)
            k.record_stream(self.copy_stream)
            v.record_stream(self.copy_stream)

    def release(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.host_cond.clear()
        self.host_ring.clear()
        self.staging.clear()
        self.sink_ref_k.clear()
        # PyTorch keeps freed pinned blocks for reuse, out of the host's available memory; hand them
        # back so other programs, and the next run's check of the available RAM, see them free
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if self.copy_stream is not None and empty_host_cache is not None:
            empty_host_cache()


class OffloadedStepCache(StepCache):
    def _buffers(self, layer: int):
        return self.bank.staged(layer, self)

    def write_block(self, layer: int, first_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().write_block(layer, first_frame, k, v)
        block = self.layout.ring_slot(first_frame) // self.layout.block_tokens
        self.bank.write_back(layer, self, block, token_major(k), token_major(v))

    def advance(self, first_frame: int) -> None:
        super().advance(first_frame)
        self.bank.loaded.clear()                 # the next pass refetches (its ring has grown)

    def write_cond(self, layer: int, motion_k_rotated: torch.Tensor, v: torch.Tensor) -> None:
        cond_k, cond_v = self.bank.host_cond[(layer, self.pair)]
        cond_k[:, :, self.layout.ref_len:].copy_(motion_k_rotated)
        cond_v.copy_(v)
        self.bank.loaded.clear()                 # staged copies are stale now
