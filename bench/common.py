"""Shared helpers of the benchmarks: full-size random models built directly on the GPU, synthetic
conditioning, timing with CUDA events. No checkpoint is needed: speed and memory do not depend on
the weight values (as long as they are finite and of realistic scale)."""
from __future__ import annotations

import datetime
import statistics
import subprocess
import tempfile
import time

import torch

from liveavatar_backend import constants as C
from liveavatar_backend.fixtures import random_dit  # noqa: F401  (used by the bench scripts)
from liveavatar_backend.pipeline import Conditioning


def random_module(module, device):
    """A module's parameters as random bf16 values on `device` (norm gains 1, the rest N(0, 0.02))."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name or "gamma" in name else torch.randn_like(p) * 0.02)
    return module.to(torch.bfloat16).eval()


def full_size_vae(device="cuda"):
    """The full-size Wan2.1 VAE (base width 96) with random weights, bf16, in the engine's layout."""
    from liveavatar_backend.vae import WanVAE, build_vae
    return WanVAE(random_module(build_vae(96), device), device, torch.bfloat16)


def make_decoder(plan, device="cuda:0", vae=None):
    """The engine's streaming decoder on a full-size random VAE (compiled, as in quality/balanced
    mode, unless a VAE is given), primed with warm-up latents."""
    from liveavatar_backend.clip_decoder import ClipDecoder
    if vae is None:
        vae = full_size_vae(device)
        vae.enable_compile()
    warm = torch.randn(1, 16, C.WARM_UP_LATENTS, plan.height // 8, plan.width // 8, device=device,
                       dtype=torch.bfloat16)
    return ClipDecoder(vae, warm)


def synthetic_conditioning(model, height: int, width: int, seed: int = 0) -> Conditioning:
    g = torch.Generator(device=model.device).manual_seed(seed)
    cfg = model.cfg
    dev, dt = model.device, model.dtype
    text = torch.randn(64, cfg.text_dim, generator=g, device=dev, dtype=dt)
    ref = torch.randn(16, 1, height // 8, width // 8, generator=g, device=dev, dtype=dt)
    motion = torch.randn(16, 19, height // 8, width // 8, generator=g, device=dev, dtype=dt)
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 48, generator=g, device=dev)
    with torch.no_grad():
        text_kv = model.text_context_kv(text)
    return Conditioning(ref, motion, text_kv, lambda first, count: audio[..., :count])


def write_rows(path, rows: list[dict]) -> None:
    """A bench's rows as a JSON list (bench/results/…), the folder made if needed."""
    import json
    from pathlib import Path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def cuda_time_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median time of fn() in ms, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Stopwatch:
    def __enter__(self):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


class ClockSampler:
    """Samples the GPU's SM clock, power draw and clock-event reasons (nvidia-smi, every 100 ms)
    while the `with` body runs: sustained FP8/bf16 work at full size can hold the GPU at its power
    limit, below the boost clock that isolated kernel timings (the floor) run at.

    `summary(since, until)` gives medians over the samples taken in that window (`time.time()`
    values); {} where nvidia-smi is missing, and {"clock_error": …} where it failed."""
    FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,clocks_event_reasons.active,power.limit,clocks.max.sm"

    def __init__(self, device: int = 0, period_ms: int = 100):
        self.command = ["nvidia-smi", f"--id={nvidia_smi_id(device)}", f"--query-gpu={self.FIELDS}",
                        "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        # (time, SM MHz, memory MHz, W, reasons, power limit W, max SM MHz)
        self.samples: list[tuple[float, float, float, float, str, float, float]] = []
        self.error = ""

    def __enter__(self):
        self._log, self._errors = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        try:
            self._process = subprocess.Popen(self.command, stdout=self._log, stderr=self._errors, text=True)
        except OSError:
            self._process = None
        return self

    def __exit__(self, *exc):
        if self._process is not None:
            if self._process.poll() not in (None, 0):         # it stopped on its own: bad id or field
                self._errors.seek(0)
                self.error = f"nvidia-smi exited with {self._process.returncode}: {self._errors.read().strip()[:200]}"
            self._process.terminate()
            self._process.wait()
        self._log.seek(0)
        for line in self._log:
            parts = [p.strip() for p in line.split(",")]
            try:                             # nvidia-smi's timestamp is local time, as time.time() reads it
                when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, float(parts[1]), float(parts[2]), float(parts[3]), parts[4],
                                     float(parts[5]), float(parts[6])))
            except (ValueError, IndexError):
                continue                     # a header or "[N/A]"
        self._log.close()
        self._errors.close()

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        if self.error:
            return {"clock_error": self.error}
        samples = [s for s in self.samples if since <= s[0] <= until]
        if not samples:
            return {}
        reasons = [s[4] for s in samples]
        return {"sm_clock_mhz": statistics.median(s[1] for s in samples),
                "mem_clock_mhz": statistics.median(s[2] for s in samples),
                "power_w": statistics.median(s[3] for s in samples),
                "clock_event_reasons": max(set(reasons), key=reasons.count),   # the most frequent bit mask
                "power_limit_w": samples[-1][5], "max_sm_clock_mhz": samples[-1][6],
                "clock_samples": len(samples)}


def nvidia_smi_id(device: int) -> str:
    """nvidia-smi's name for a CUDA device: its UUID (nvidia-smi's own indices need not follow
    CUDA's order or CUDA_VISIBLE_DEVICES); the index where no GPU is visible."""
    if not torch.cuda.is_available():
        return str(device)
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
