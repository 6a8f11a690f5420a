"""Loading the full-size model set from disk: time, memory and how the loader's progress bar moves.

Writes random full-size checkpoints in the published layout once (`--dir`; ≈ 45 GB): the 14B DiT in
4 bf16 safetensors shards, a rank-128 PEFT LoRA over every target module (1.35 GB, as published),
umT5-XXL as Wan's .pth (24 layers of d_model 4096 and d_ff 10240; the tiny test tokenizer's
vocabulary, so 2 GB less embedding than the real 11.4 GB file), the Wan2.1 VAE (base 96) and
wav2vec2-large's 24 layers of 1024 (with the test writer's small feature extractor). Then loads the
set with `LiveAvatarEngine.load` in a fresh process per row, the files in the page cache (`warm`)
or dropped from it first (`cold`: fsync + POSIX_FADV_DONTNEED per file), and reports the seconds
to the DiT's end of the bar, to the text encoder's and to the end (with the VAE's, the audio
encoder's and the checks' seconds in that last stretch), the longest time
the bar stood still, the GPU and host peaks, and on a GPU the seconds to park the loaded weights in
host RAM and to bring them back (`LiveAvatarEngine.park` / `unpark`).

    python bench/bench_load.py --dir /tmp/liveavatar-14b --modes quality balanced --caches warm cold
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_rows                                           # noqa: E402
from liveavatar_backend.audio import write_tiny_wav2vec2                # noqa: E402
from liveavatar_backend.config import DiTConfig                         # noqa: E402
from liveavatar_backend.engine import VAE_FILE, WAV2VEC_DIR, LiveAvatarEngine, ModelSpec   # noqa: E402
from liveavatar_backend.fixtures import (CHECKPOINT_DIR, LORA_FILE, make_tiny_checkpoints, random_dit,  # noqa: E402
                                         write_sharded_dit)
from liveavatar_backend.loading import LoadProgress                     # noqa: E402
from liveavatar_backend.lora import write_tiny_lora                     # noqa: E402
from liveavatar_backend.text import write_tiny_umt5                     # noqa: E402
from liveavatar_backend.vae import write_tiny_vae                       # noqa: E402

# umT5-XXL (google/umt5-xxl config.json), the LoRA (spec §1: r=128), the Wan2.1 VAE's base width
UMT5_XXL = dict(d_model=4096, num_layers=24, num_heads=64, d_ff=10240)
LORA_RANK = 128
VAE_BASE_DIM = 96
CHECKS = ("compile_check_s", "enable_compile_s", "graph_check_s")   # timed by `time_the_rest`
DONE_MARKER = "written.json"


def write_checkpoints(out: Path, tiny: bool) -> None:
    """The full-size set in the published layout (`tiny`: the test set), once (a marker says it is
    complete)."""
    if (out / DONE_MARKER).exists():
        return
    started = time.perf_counter()
    if tiny:
        make_tiny_checkpoints(out)
    else:
        write_full_size(out)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    (out / DONE_MARKER).write_text(json.dumps({"seconds": time.perf_counter() - started, "bytes": sizes}, indent=1))


def write_full_size(out: Path) -> None:
    folder = out / CHECKPOINT_DIR
    cfg = DiTConfig.wan_s2v_14b()
    dit = random_dit(cfg, "cuda")
    write_sharded_dit(dit, folder)
    write_tiny_lora(out / LORA_FILE, dit, rank=LORA_RANK, spelling="peft")
    del dit
    torch.cuda.empty_cache()
    write_tiny_umt5(folder, **UMT5_XXL)
    write_tiny_vae(folder / VAE_FILE, base_dim=VAE_BASE_DIM, fmt="pth")
    write_tiny_wav2vec2(folder / WAV2VEC_DIR, hidden=cfg.audio_dim, layers=cfg.audio_layers - 1)


def drop_from_page_cache(out: Path) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_the_rest(seconds: dict) -> None:
    """Time the steps after the text encoder (VAE, audio encoder, the compile and graph checks) into
    `seconds`, so that the row says which of them the bar's last stretch waits on. The first
    `compile_supported` call of the process is made inside the VAE's load: its time is in both
    `vae_s` and `compile_check_s`."""
    import liveavatar_backend.engine as engine_module

    def timed(function, key):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
        return wrapper
    engine_module._load_vae = timed(engine_module._load_vae, "vae_s")
    extractor = engine_module.AudioFeatureExtractor
    extractor.load = classmethod(timed(extractor.load.__func__, "audio_s"))
    engine_module.block_ops.compile_supported = timed(engine_module.block_ops.compile_supported, "compile_check_s")
    engine_module.block_ops.enable_compile = timed(engine_module.block_ops.enable_compile, "enable_compile_s")
    engine_module.capture_blocked = timed(engine_module.capture_blocked, "graph_check_s")


def load_once(out: Path, mode: str, device: str) -> dict:
    """One load in this process: the progress bar's timeline, the time and the peaks."""
    rest: dict[str, float] = {}
    time_the_rest(rest)
    spec = ModelSpec.from_folder(out / CHECKPOINT_DIR, lora=out / LORA_FILE)
    on_gpu = device.startswith("cuda")
    heard: list[tuple[float, float]] = []
    started = time.perf_counter()
    engine = LiveAvatarEngine.load(spec, device=device, memory_mode=mode,
                                   progress=lambda f: heard.append((time.perf_counter() - started, f)))
    if on_gpu:
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    times = [0.0] + [t for t, _ in heard]

    def reached(fraction: float) -> float:
        return next(t for t, f in heard if f >= fraction - 1e-9)
    row = {"mode": mode, "load_s": total,
           "dit_s": reached(LoadProgress.DIT_SHARE),
           "text_encoder_s": reached(LoadProgress.DIT_SHARE + LoadProgress.TEXT_SHARE) - reached(LoadProgress.DIT_SHARE),
           "rest_s": total - reached(LoadProgress.DIT_SHARE + LoadProgress.TEXT_SHARE),
           "bar_updates": len(heard), "longest_still_s": max(b - a for a, b in zip(times, times[1:] + [total])),
           "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0,
           "gpu_after_load_gb": torch.cuda.memory_allocated() / 1e9 if on_gpu else 0.0,
           "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
           "text_encoder_pinned": all(w.is_pinned() for w in engine.text_encoder.model.parameters()),
           **rest}
    if engine.parkable:                  # what giving the GPU to ComfyUI's models costs (nodes/loader.py)
        for step in ("park", "unpark"):
            moved = time.perf_counter()
            getattr(engine, step)()
            torch.cuda.synchronize()
            row[f"{step}_s"] = time.perf_counter() - moved
            torch.cuda.empty_cache()
            row[f"gpu_after_{step}_gb"] = torch.cuda.memory_allocated() / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/liveavatar-14b"))
    parser.add_argument("--modes", nargs="+", default=["quality", "balanced"])
    parser.add_argument("--caches", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test checkpoints (a check of this script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)       # internal: one load, its row on stdout
    args = parser.parse_args()
    if args.child:
        print("ROW " + json.dumps(load_once(args.dir, args.child, args.device)))
        return
    written = time.perf_counter()
    write_checkpoints(args.dir, args.tiny)
    print(f"checkpoints ready in {time.perf_counter() - written:.0f} s: "
          f"{sum(json.loads((args.dir / DONE_MARKER).read_text())['bytes'].values()) / 1e9:.1f} GB", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = Path(args.out) / f"{device.replace(' ', '-')}-{date.today().isoformat()}-load.json"
    rows = []
    for cache in args.caches:
        for mode in args.modes:
            if cache == "cold":
                drop_from_page_cache(args.dir)
            done = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--device", args.device,
                                   "--child", mode], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or not lines:
                print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
                raise SystemExit(f"the {mode} load ({cache}) failed")
            rows.append(dict(json.loads(lines[-1][4:]), cache=cache, device=device, gpus=1,
                             date=date.today().isoformat()))
            print(rows[-1], flush=True)
            write_rows(results, rows)                    # kept row by row: a run cut short keeps its rows
    print(f"\n{'mode':9} {'cache':5} {'load s':>7} {'DiT s':>6} {'umT5 s':>7} {'rest s':>7} {'still s':>8} "
          f"{'GPU peak':>9} {'host RSS':>9} {'park s':>7} {'unpark s':>8} {'VAE s':>6} {'audio s':>7} {'checks s':>8}")
    for r in rows:
        print(f"{r['mode']:9} {r['cache']:5} {r['load_s']:7.1f} {r['dit_s']:6.1f} {r['text_encoder_s']:7.1f} "
              f"{r['rest_s']:7.1f} {r['longest_still_s']:8.1f} {r['gpu_peak_gb']:8.1f}G {r['host_peak_rss_gb']:8.1f}G "
              f"{r.get('park_s', float('nan')):7.1f} {r.get('unpark_s', float('nan')):8.1f} {r.get('vae_s', 0):6.2f} "
              f"{r.get('audio_s', 0):7.2f} {sum(r.get(k, 0) for k in CHECKS):8.2f}")


if __name__ == "__main__":
    main()
