"""One prepared job to frames in order, with the VAE decode placed where it fits (the command line's
render; ComfyUI runs sampling and decoding as separate nodes instead).

* alongside: each finished block is decoded on the decoder's own CUDA stream while the next block
  denoises, and its frames are handed over at once: the video grows as it renders.
* after: where the decoder does not fit on the GPU beside the DiT's caches, the clean latents of
  each clip go to a temporary file next to the output (1.6 MB a clip at 704*384 in bf16, so hours
  of audio stay on disk, not in memory) and are decoded once sampling has freed the caches. This is
  `quality` (bf16) at 704*384, 4 steps on an 80 GB card: 32.6 GB of weights, 46 GB of caches and
  ≈ 4 GB of decoder do not fit together (PERFORMANCE.md, 2026-12-05).

The choice is made before the first block: an out-of-memory error inside the decoder half-way
through a render would leave its causal caches half-updated and the render lost.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from . import constants as C
from .errors import InputError
from .kv_offload import ALLOCATOR_ENV_VARS
from .memory_budget import free_gpu_bytes

DECODE_PLACEMENTS = ("auto", "alongside", "after")
# free memory the allocator may not be able to hand over although it is free in sum: blocks cached
# for the decoder's stream or in the CUDA graphs' pool, and the rounding of block sizes
MEMORY_HEADROOM_BYTES = 2 ** 30


# PyTorch's caching allocator by default carves fixed segments into blocks that cannot merge across
# segments: `quality` at 704*384, 4 steps on an 80 GB H100 then ran out of memory in sampling with
# 1.7 GiB reserved but unusable; with expandable segments the same run fits (82.2 GB peak,
# PERFORMANCE.md, 2026-12-06). ComfyUI configures its own process's allocator.
ALLOCATOR_SETTINGS = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """In a process of our own (the command line, bench_render.py), before CUDA's first allocation:
    expandable segments, unless the allocator is configured already (under either name)."""
    if any(name in os.environ for name in ALLOCATOR_ENV_VARS):
        return
    os.environ[allocator_env_var(torch.__version__)] = ALLOCATOR_SETTINGS


def allocator_env_var(torch_version: str) -> str:
    """The variable to give this torch expandable segments in. From 2.11 the new name PYTORCH_ALLOC_CONF
    (honoured, tests/test_render.py on an H100; no deprecation warning). Before, the old name: 2.9 and
    2.10 warn that it is deprecated, but 2.9.1 ignores `expandable_segments` under the new one
    (pytorch/pytorch#183387)."""
    try:
        return "PYTORCH_ALLOC_CONF" if TorchVersion(torch_version) >= (2, 11) else "PYTORCH_CUDA_ALLOC_CONF"
    except Exception:                    # a version string packaging cannot read: the name every torch reads
        return "PYTORCH_CUDA_ALLOC_CONF"


class LatentSpill:
    """Tensors parked in a temporary file, read back in the order written. On POSIX systems the
    file has no name, so it goes however the process ends; elsewhere it is deleted when closed."""

    def __init__(self, directory: str | Path | None = None):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.entries: list[tuple[int, int, torch.Size, torch.dtype]] = []   # offset, bytes, shape, dtype

    def append(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        offset = self.file.seek(0, os.SEEK_END)      # reading moved the position
        self.file.write(data)
        self.entries.append((offset, len(data), tensor.shape, tensor.dtype))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        for offset, size, shape, dtype in self.entries:
            self.file.seek(offset)
            raw = bytearray(self.file.read(size))
            yield torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "LatentSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def choose_placement(requested: str, sampling_bytes: int | None, decoder_bytes: int,
                     free_bytes: int) -> tuple[str, str]:
    """('alongside' or 'after', why, for the log; empty when nothing needs saying).

    `sampling_bytes`: what sampling adds on the GPU (None: not estimated, on the CPU or with the
    DiT's layers on worker processes; then the decoder runs alongside as before);
    `decoder_bytes`: the decoder's working memory per call."""
    if requested not in DECODE_PLACEMENTS:
        raise InputError(f"decode {requested!r}: choose one of {', '.join(DECODE_PLACEMENTS)}")
    if requested != "auto":
        return requested, ""
    if sampling_bytes is None:
        return "alongside", ""
    need = sampling_bytes + decoder_bytes + MEMORY_HEADROOM_BYTES
    if need <= free_bytes:
        return "alongside", ""
    gb = 1e9
    return "after", (f"decoding after sampling: the DiT's caches and working memory ({sampling_bytes / gb:.1f} GB) "
                     f"and the VAE decoder ({decoder_bytes / gb:.1f} GB) do not fit together in the "
                     f"{free_bytes / gb:.1f} GB free on the GPU, so the latents wait on disk and the frames "
                     "come at the end. To stream frames as they render, use a lighter --memory-mode "
                     "(balanced: FP8 weights; low_vram) or a smaller --size.")


def primed_decoder(engine, job):
    """The job's streaming decoder, primed, and the working memory one decode call needs on the
    GPU beyond what the decoder keeps (its priming's peak; 0 on the CPU)."""
    device = engine.device
    if device.type != "cuda":
        return engine.decoder(job.decoder_warm_up), 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    decoder = engine.decoder(job.decoder_warm_up)
    torch.cuda.synchronize(device)
    return decoder, torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)


def render(engine, job, write_frames: Callable[[torch.Tensor], None], *, decode: str = "auto",
           spill_dir: str | Path | None = None, report: Callable[[str], None] = print, progress=None) -> str:
    """Sample `job` and hand its frames [F, H, W, 3] (float in [0, 1], CPU) to `write_frames` in
    order. `progress(total, unit, desc)` makes a tqdm-like bar (None: no bar). Returns the
    placement used: 'alongside' or 'after'."""
    decoder, decoder_bytes = primed_decoder(engine, job)
    sampling_bytes = engine.sampling_gpu_bytes(job.plan)
    free_bytes = free_gpu_bytes(engine.device) if sampling_bytes is not None else 0
    placement, why = choose_placement(decode, sampling_bytes, decoder_bytes, free_bytes)
    if why:
        report(why)
    if placement == "after" and engine.device.type == "cuda":
        torch.cuda.empty_cache()       # the priming's cached blocks, for sampling; decoding comes later
    make_bar = progress or _NoBar
    with make_bar(total=job.plan.total_block_steps, unit="block-step", desc="generating") as bar:
        if placement == "alongside":
            _sample_decoding_alongside(engine, job, decoder, write_frames, bar, report)
            return placement
        with LatentSpill(spill_dir) as spill:
            for clip in engine.sample(job, on_progress=lambda event: bar.update(event.done - bar.n),
                                      report=report):
                spill.append(clip)
            bar.close()
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()               # the caches' blocks, now free, for the decoder
            with make_bar(total=len(spill), unit="clip", desc="decoding") as decoding:
                for clip in spill:
                    for block in clip.split(C.LATENTS_PER_BLOCK, dim=1):    # as alongside: the same frames
                        write_frames(decoder.decode(block))
                    decoding.update(1)
    return placement


def _sample_decoding_alongside(engine, job, decoder, write_frames, bar, report) -> None:
    def on_progress(event):
        bar.update(event.done - bar.n)
        if event.latents is not None:
            decoder.submit(event.latents)          # decodes while the next block denoises
            for frames in decoder.collect():
                write_frames(frames)

    for _ in engine.sample(job, on_progress=on_progress, report=report):
        pass
    for frames in decoder.collect(wait=True):
        write_frames(frames)


class _NoBar:
    n = 0

    def __init__(self, **_):
        pass

    def update(self, count: int) -> None:
        self.n += count

    def __enter__(self):
        return self

    def close(self) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass
