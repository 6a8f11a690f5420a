"""The real engine end to end on a GPU with the tiny checkpoints: every memory mode through the
command line (compile, CUDA graphs from clip 1, pinned text-encoder visits, VAE on the GPU).

    python bench/gpu_smoke.py OUT_DIR [MODES]      # MODES: comma-separated, default all three
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liveavatar_backend.fixtures import make_tiny_checkpoints  # noqa: E402
from liveavatar_backend.video import Mp4Writer, probe_mp4      # noqa: E402


MEMORY_MODES = ("quality", "balanced", "low_vram")


def main(out: Path, modes=MEMORY_MODES) -> int:
    import torch
    from PIL import Image
    models = make_tiny_checkpoints(out / "tiny")
    Image.fromarray((np.random.default_rng(0).random((400, 720, 3)) * 255).astype(np.uint8)).save(out / "p.png")
    voice = out / "voice.mp4"                       # an audio track in an mp4: any container works
    with Mp4Writer(voice, 64, 64, audio=(torch.sin(torch.arange(16000 * 6) / 9.0) * 0.3, 16000)) as w:
        w.write(torch.zeros(150, 64, 64, 3))
    failures = 0
    for mode in modes:
        video = out / f"{mode}.mp4"
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "liveavatar_backend", "generate", "--ckpt-dir",
                              models / "Wan2.2-S2V-14B", "--lora", models / "liveavatar.safetensors", "--image",
                              out / "p.png", "--audio", voice, "--prompt", "a person talks", "--size", "384*256",
                              "--num-clip", "3", "--steps", "3", "--device", "cuda", "--memory-mode", mode,
                              "--out", video], cwd=ROOT, capture_output=True, text=True)
        ok = run.returncode == 0 and probe_mp4(video)["frames"] == 48 * 3 - 3
        failures += not ok
        print(mode, "OK" if ok else f"FAILED\n{run.stderr[-3000:]}", probe_mp4(video) if ok else "",
              f"{time.perf_counter() - started:.0f} s (cold compile included)", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else MEMORY_MODES))
