"""Finished latents to frames, in line or overlapped with the denoising of the next block.

In line, the VAE decode of a 704*384 block is 10–16 % of the block time on one GPU (PERFORMANCE.md),
and it stops the caller twice: for the decode and for the copy of the frames to the host.
Overlapped (`submit` / `collect`), the decode runs on a CUDA stream of its own, ordered after the
work that produced the latents and concurrent with whatever the caller queues next, and the
frames reach page-locked host memory without the caller waiting for either. (On one GPU at
704*384 the DiT leaves little idle to overlap with; the caller's CPU time, such as mp4 encoding or
storing frames, is what it frees.)

Stream rules kept here: everything the decoder writes is allocated on its stream; tensors made on
the caller's stream that the decoder reads (the latents) are marked with `record_stream`, so the
caching allocator does not hand their memory to other work before the decoder is done with them.
"""
from __future__ import annotations

import collections

import torch

from . import constants as C
from .vae import WanVAE


class ClipDecoder:
    """Streams latents through the VAE, dropping the video's first 3 frames (spec §3.7).

    The causal conv caches are primed with the static motion latents first (the official TPP path),
    so memory stays bounded however long the video is. Every decode, in line or not, runs on the
    decoder's own stream (on a GPU), so its caches are only ever touched from one stream.

    `max_in_flight` bounds the submitted decodes the GPU may still be working on: `submit` waits
    for the oldest one beyond it, so a decode slower than the DiT cannot pile up GPU work. Finished
    frames wait in (pinned) host memory until `collect` hands them over: collect as you go."""

    def __init__(self, vae: WanVAE, warm_up_latents: torch.Tensor, max_in_flight: int = 2):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.stream_decoder = vae.stream_decoder()
        self.device = vae.device
        self.cuda_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.max_in_flight = max_in_flight
        self.pending: collections.deque = collections.deque()     # (done event | None, host frames)
        self.frames_out = 0
        with self._on_own_stream():
            self.stream_decoder.warm_up(self._read_on_own_stream(warm_up_latents))

    def _on_own_stream(self):
        """A context running its work on the decoder's stream, after all work queued so far on the
        caller's stream (which produced the latents)."""
        if self.cuda_stream is None:
            return torch.no_grad()
        self.cuda_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.cuda_stream)

    def _read_on_own_stream(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mark a caller's tensor on the decoder's GPU as used by the decoder's stream (tensors on
        the CPU or another GPU are copied inside the stream context, so the copies belong to it)."""
        if self.cuda_stream is not None and tensor.device == self.cuda_stream.device:
            tensor.record_stream(self.cuda_stream)
        return tensor

    def submit(self, latents: torch.Tensor) -> None:
        """Start decoding the next latents of the video, [16, T, H8, W8]; `collect` returns the frames."""
        if len(self.pending) >= self.max_in_flight and self.pending[-self.max_in_flight][0] is not None:
            self.pending[-self.max_in_flight][0].synchronize()
        with self._on_own_stream():
            video = self.stream_decoder.decode(self._read_on_own_stream(latents).unsqueeze(0))   # [1, 3, 4T, H, W]
            frames = ((video[0] + 1) / 2).permute(1, 2, 3, 0)              # [4T, H, W, 3] in [0, 1]
            if self.frames_out == 0:
                frames = frames[C.DROPPED_LEADING_FRAMES:]
            self.frames_out += frames.shape[0]
            if self.cuda_stream is None:
                self.pending.append((None, frames.contiguous()))
                return
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.cuda_stream)
        self.pending.append((done, host))

    def collect(self, wait: bool = False) -> list[torch.Tensor]:
        """Frames [F, H, W, 3] float in [0, 1] on the CPU of the finished submissions, in order;
        with `wait`, of all of them."""
        out = []
        while self.pending and (wait or self.pending[0][0] is None or self.pending[0][0].query()):
            done, frames = self.pending.popleft()
            if done is not None:
                done.synchronize()
            out.append(frames)
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latents of the video, [16, T, H8, W8] (a block or a clip) -> frames [4T, H, W, 3]
        float in [0, 1] on the CPU (the first call drops the video's first 3 frames)."""
        if self.pending:
            raise RuntimeError("decode() while submitted latents are pending: collect(wait=True) first")
        self.submit(latents)
        return self.collect(wait=True)[0]
