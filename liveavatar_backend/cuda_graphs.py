"""CUDA graphs of whole denoising steps (issue 4: the 384*256 preview is CPU-launch-bound).

Once a step's ring is full (from clip 1 on), every call of that step with the same ring slot has
identical shapes and buffer addresses, so the pass embed → 40 layers → head is captured once per
(step, ring slot) and replayed: one launch instead of ~2,000. Inputs that change (latents, RoPE
tables, audio tokens) are copied into static buffers before each replay. All graphs share one
memory pool: they run one after another.

The graphs hold the job's cache addresses, so every job captures its own, during clip 1 (16
captures at 4 steps). What a capture costs on top of a replay is kept small:
* ONE pass outside capture per job, on the stream the captures use: lazy initialisation (cuBLAS
  workspaces, cuDNN plans, compiled kernels) happens there; a pass per capture would add a whole
  extra forward to every block-step of clip 1;
* no `torch.cuda.graph` context: it empties the allocator's cache before every capture, so the
  eager work between captures has to allocate its memory from the driver again; here the cache is
  emptied once, before the job's first capture.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCacheBank
from .model import LiveAvatarDiT


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
ASYNC_ALLOCATOR = "cudaMallocAsync"      # torch.cuda.get_allocator_backend()'s name; ComfyUI's default


def capture_blocked() -> str | None:
    """Why steps cannot be captured in this process (None: they can). Under PyTorch's cudaMallocAsync
    allocator (H100, torch 2.11, 2026-12-06, PERFORMANCE.md):
    * memory allocated inside a capture is not yet mapped, and the compiled layer functions' Triton
      kernels check their pointers when launched: the capture failed with "CUDA driver error:
      invalid argument" and the process then aborted;
    * eager layer functions do capture, but every graph keeps its own memory (81.4 GB at 384*256
      in `balanced`, against 32 GB without graphs) and they ran at half the compiled speed.
    Compiled steps without graphs ran at 0.96× (384*256) to 0.99× (704*384) of compiled graphs
    under PyTorch's own allocator, so there the sampler runs without graphs."""
    if torch.cuda.get_allocator_backend() == ASYNC_ALLOCATOR:
        return (f"PyTorch's {ASYNC_ALLOCATOR} allocator is on (ComfyUI's default: start ComfyUI with "
                "--disable-cuda-malloc for PyTorch's own), and denoising steps cannot be captured under it")
    return None


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device for the whole process: cuBLAS keeps a 32 MiB workspace per
    (handle, stream), so a new stream per job would hold another 32 MiB after each job."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class StepGraphs:
    def __init__(self, dit: LiveAvatarDiT, bank: KVCacheBank, text_kv):
        self.dit, self.bank, self.text_kv = dit, bank, text_kv
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.static: dict[str, torch.Tensor] = {}
        self.warmed_up = False                # one pass outside capture per job, before its first capture

    def ready(self, step: int) -> bool:
        """Graphs only apply once the step's ring is full (constant attention length)."""
        return self.bank.step(step).filled == self.bank.layout.ring_len

    def _stage(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name not in self.static:
            self.static[name] = torch.empty_like(value)
        self.static[name].copy_(value, non_blocking=True)
        return self.static[name]

    def _forward(self, t: float, first_frame: int, step: int) -> torch.Tensor:
        s = self.static
        x = self.dit.embed_noisy(s["latents"])
        tables = (s["cos"], s["sin"], s["ref_cos"], s["ref_sin"])
        x = self.dit.run_layers(x, range(self.dit.cfg.num_layers), t, first_frame, tables, self.bank,
                                self.bank.step(step), self.text_kv, (s["audio_tokens"], s["audio_global"]))
        return self.dit.unembed(x, t, self.bank.layout)

    def _capture(self, t: float, first_frame: int, step: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        caller, stream = torch.cuda.current_stream(), capture_stream(self.dit.device)
        stream.wait_stream(caller)                    # the staged inputs and earlier cache writes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            if not self.warmed_up:                    # lazy inits happen outside capture, once per job
                self._forward(t, first_frame, step)
                torch.cuda.synchronize()
                # memory the eager passes cached goes back to the driver once, for the graphs' pool:
                # an allocation that fails inside a capture cannot free cached blocks. Later captures
                # reuse the pool (the same allocations in the same order)
                torch.cuda.empty_cache()
                self.warmed_up = True
            # thread_local: an unsafe CUDA call from another thread of the host process is not an error here
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = self._forward(t, first_frame, step)
            finally:
                graph.capture_end()
        caller.wait_stream(stream)
        return graph, out

    def velocity(self, latents, t: float, first_frame: int, reference_frame: int, step: int, audio) -> torch.Tensor:
        """Same result as `dit.denoise_block` (without advancing the cache), through a graph."""
        # captures and replays use the current device's streams: make it the DiT's (cuda:1, say)
        with torch.cuda.device(self.dit.device):
            tables = self.dit.rope_tables(first_frame, latents.shape[1], reference_frame, self.bank.layout)
            for name, value in zip(("latents", "cos", "sin", "ref_cos", "ref_sin", "audio_tokens", "audio_global"),
                                   (latents, *tables, *audio)):
                self._stage(name, value)
            key = (step, self.bank.layout.ring_slot(first_frame))
            if key not in self.graphs:
                self.graphs[key] = self._capture(t, first_frame, step)
            graph, out = self.graphs[key]
            graph.replay()
            return out.clone()
