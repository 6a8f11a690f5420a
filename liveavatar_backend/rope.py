"""3-D rotary position embedding of the S2V DiT (spec §2.4).

Each head of `head_dim` channels is `head_dim/2` complex pairs of ADJACENT channels (2i, 2i+1),
split into temporal / height / width groups (22/21/21 pairs for head_dim 128). The official code
builds complex tables in float64 and stores them as complex32 (fp16 cos and sin); we compute the
angles the same way and round cos/sin to fp16 too, so positions agree bit for bit. Unlike the
official 45 000-row table, positions here are computed on demand: there is no length limit.

Token positions:
* noisy tokens of a block: frames F0..F0+2, full h×w grid;
* reference (sink) frame: one frame at `REFERENCE_ROPE_FRAME` (30), rolled forward during streaming;
* FramePack motion tokens at fixed negative times: newest frame −1 (full grid), 2× bucket −3
  (half grid), 4× bucket −19, −14, −9, −4 (quarter grid); spatial indices spread over the full
  grid with numpy's integer-truncated linspace, as the official `rope_precompute` does.
"""
from __future__ import annotations

import numpy as np
import torch

# FramePack temporal positions (spec §2.4): bucket sizes 1 / 2 / 16 frames, newest first.
MOTION_POST_TIME = -1
MOTION_2X_TIME = -3
MOTION_4X_TIMES = (-19, -14, -9, -4)


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w): the official `c - 2*(c//3), c//3, c//3`."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _inverse_frequencies(num_pairs: int, theta: float) -> torch.Tensor:
    # official rope_params(…, dim=2*num_pairs): 1 / theta^(arange(0, dim, 2) / dim), float64
    dim = 2 * num_pairs
    return 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64),
                           torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def grid_positions(times, height_index, width_index) -> torch.Tensor:
    """[N, 3] (t, h, w) positions of the tokens of a (T, h, w) grid in flatten order."""
    t = torch.as_tensor(times, dtype=torch.float64)
    h = torch.as_tensor(height_index, dtype=torch.float64)
    w = torch.as_tensor(width_index, dtype=torch.float64)
    tt, hh, ww = torch.meshgrid(t, h, w, indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=1)


def _spread(full: int, count: int) -> list[int]:
    """Integer indices spreading `count` tokens over a full axis of `full` (np.linspace + int cast)."""
    return np.linspace(0, full - 1, count).astype(int).tolist()


def noisy_positions(first_frame: int, num_frames: int, h: int, w: int) -> torch.Tensor:
    return grid_positions(range(first_frame, first_frame + num_frames), range(h), range(w))


def reference_positions(frame: int, h: int, w: int) -> torch.Tensor:
    return grid_positions([frame], range(h), range(w))


def motion_positions(h: int, w: int) -> torch.Tensor:
    """Positions of the FramePack tokens in their sequence order [post, 2×, 4×]."""
    post = grid_positions([MOTION_POST_TIME], range(h), range(w))
    half = grid_positions([MOTION_2X_TIME], _spread(h, h // 2), _spread(w, w // 2))
    quarter = grid_positions(MOTION_4X_TIMES, _spread(h, h // 4), _spread(w, w // 4))
    return torch.cat([post, half, quarter])


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, head_dim/2] (float32 holding fp16-rounded values) for [N, 3] positions."""
    split = rope_pair_split(head_dim)
    angles = torch.cat([torch.outer(positions[:, axis], _inverse_frequencies(n, theta))
                        for axis, n in enumerate(split)], dim=1)
    cos = torch.cos(angles).to(torch.float16).to(torch.float32)
    sin = torch.sin(angles).to(torch.float16).to(torch.float32)
    return _to_device(cos, device), _to_device(sin, device)


def _to_device(table: torch.Tensor, device) -> torch.Tensor:
    """Tables are built on the host; a copy from pageable memory would make the CPU wait for the
    GPU to drain its queue (once per denoising step), so GPU copies go through pinned memory."""
    if device is None or torch.device(device).type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [..., N, heads, head_dim] by per-token angles [N, head_dim/2].

    Computed in float32 (the official code uses float64 on bf16 inputs; after rounding back to
    bf16 the two agree) and returned in x's dtype. Written as x·cos + swap(x)·(∓sin) with
    swap(x) = (x1, x0, x3, x2, …) rather than by stacking the rotated pairs: compiled, a stack
    becomes masked loads of every input per output channel (3.4× the memory-bound time at 704*384).
    """
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    channel = torch.arange(x.shape[-1], device=x.device)
    sign = (channel % 2) * 2 - 1                                   # −1 for even channels, +1 for odd
    cos2 = cos.repeat_interleave(2, dim=-1)[:, None, :]
    sin2 = (sin.repeat_interleave(2, dim=-1) * sign)[:, None, :]
    return (x32 * cos2 + swapped * sin2).to(x.dtype)
