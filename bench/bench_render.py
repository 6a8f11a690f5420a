"""The command line's render at full size on one GPU: where `--decode auto` puts the VAE decode
(alongside sampling, or after it with the latents on disk), whether it fits, and what it costs.

Builds an engine around the full-size DiT and VAE with random weights (no checkpoint; synthetic
text and audio conditioning, as bench_single_gpu does), then runs `render.render` as
`python -m liveavatar_backend generate` does, collecting frames instead of writing an mp4. Not
on the GPU here, unlike the command line: wav2vec2 (0.6 GB; umT5 is on the host there too).

    python bench/bench_render.py --size 704*384 --steps 4 --memory-mode quality --decode auto --clips 4
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import full_size_vae, random_dit, synthetic_conditioning, write_rows  # noqa: E402
from liveavatar_backend import block_ops                                         # noqa: E402
from liveavatar_backend import constants as C                                    # noqa: E402
from liveavatar_backend.config import DiTConfig                                  # noqa: E402
from liveavatar_backend.engine import Job, LiveAvatarEngine                      # noqa: E402
from liveavatar_backend.loading import assemble_dit                              # noqa: E402
from liveavatar_backend.memory_modes import memory_mode                          # noqa: E402
from liveavatar_backend.pipeline import GenerationPlan                           # noqa: E402
from liveavatar_backend.render import prefer_expandable_segments, render         # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size                     # noqa: E402

PORTRAIT_HW = (400, 720)     # the bundled examples are 720×400 landscape portraits


def build_engine(mode_name: str) -> LiveAvatarEngine:
    """As `LiveAvatarEngine.load` holds a single-GPU model (FP8 modes: one layer group at a time),
    without the encoders: the job's conditioning is synthetic."""
    mode, cfg = memory_mode(mode_name), DiTConfig.wan_s2v_14b()
    dit = assemble_dit(lambda keep: random_dit(cfg, "cuda", keep=keep), cfg, fp8=mode.fp8_weights)
    torch.cuda.empty_cache()
    vae = full_size_vae("cuda")
    vae.autotune_convs = not mode.offload_caches
    block_ops.enable_compile()
    if not mode.offload_caches:
        vae.enable_compile()
    return LiveAvatarEngine(dit, None, vae, None, "cuda", torch.bfloat16, spec=None, mode=mode)


def make_job(engine: LiveAvatarEngine, size: str, steps: int, clips: int) -> Job:
    width, height = parse_size(size)
    plan = GenerationPlan(*target_size(*PORTRAIT_HW, width * height), clips, steps, seed=0)
    cond = synthetic_conditioning(engine.dit, plan.height, plan.width)
    return Job(plan, cond, cond.motion_latents[:, : C.WARM_UP_LATENTS][None])


class ClipClock:
    """A progress bar (as `render` makes them) that notes when each clip's sampling and decoding end."""
    ends: dict[str, list[float]] = {}
    block_steps_per_clip = 0
    start = 0.0

    def __init__(self, total: int, unit: str, desc: str):
        self.n, self.desc, self.per = 0, desc, self.block_steps_per_clip if unit == "block-step" else 1
        ClipClock.ends[desc] = []

    def update(self, count: int) -> None:
        self.n += count
        if count and self.n % self.per == 0:
            ClipClock.ends[self.desc].append(time.perf_counter() - ClipClock.start)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def timed_render(engine, job, decode: str, spill_dir: Path) -> dict:
    """Renders once. Steady FPS: a clip's frames over its sampling time (clips 2 on: clip 0 holds
    the prefill, clip 1 the CUDA-graph captures), plus its decode time where decoding comes after."""
    first_frame, frames_seen, messages = None, 0, []
    ClipClock.ends = {}
    ClipClock.block_steps_per_clip = C.BLOCKS_PER_CLIP * job.plan.steps

    def take(frames: torch.Tensor) -> None:
        nonlocal first_frame, frames_seen
        first_frame = first_frame or time.perf_counter() - ClipClock.start
        frames_seen += frames.shape[0]

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ClipClock.start = time.perf_counter()
    placement = render(engine, job, take, decode=decode, spill_dir=spill_dir, report=messages.append,
                       progress=ClipClock)
    total = time.perf_counter() - ClipClock.start
    sampled, decoded = ClipClock.ends["generating"], ClipClock.ends.get("decoding", [])
    sample_clip_s = statistics.median(b - a for a, b in zip(sampled[1:], sampled[2:]))
    decode_clip_s = statistics.median(b - a for a, b in zip([sampled[-1]] + decoded, decoded)) if decoded else 0.0
    return {"placement": placement, "message": " ".join(messages), "frames": frames_seen, "total_s": total,
            "ttff_s": first_frame, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "sampling_estimate_gb": engine.sampling_gpu_bytes(job.plan) / 1e9,
            "sample_clip_s": sample_clip_s, "decode_clip_s": decode_clip_s,
            "fps": C.FRAMES_PER_CLIP / (sample_clip_s + decode_clip_s), "fps_overall": frames_seen / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--memory-mode", default="quality")
    parser.add_argument("--decode", default="auto", help="auto, alongside, after; comma-separated for several runs")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--memory-cap-gb", type=float,
                        help="cap what PyTorch may allocate (set_per_process_memory_fraction), e.g. 84.4 to hold an "
                             "H200 to an H100 80GB's 85.0 GB less its CUDA context")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    prefer_expandable_segments()              # as the command line does
    if args.clips < 3:
        parser.error("--clips: at least 3 (steady state is clip 2 on)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory_cap_gb:
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gb * 1e9 / torch.cuda.mem_get_info()[1])
    engine = build_engine(args.memory_mode)
    device = torch.cuda.get_device_name()
    rows = []
    for decode in args.decode.split(","):
        row = {"device": device, "gpus": 1, "size": args.size, "steps": args.steps, "mode": args.memory_mode,
               "decode": decode, "clips": args.clips, "memory_cap_gb": args.memory_cap_gb}
        try:
            warm = make_job(engine, args.size, args.steps, 2)       # compiles, captures, autotunes
            render(engine, warm, lambda frames: None, decode=decode, spill_dir=out, report=lambda message: None)
            del warm                                                 # its text keys/values
            torch.cuda.empty_cache()
            row.update(timed_render(engine, make_job(engine, args.size, args.steps, args.clips), decode, out))
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = " ".join(str(exc).split())[:400]
            traceback.print_exc(limit=-6)                 # where: sampling (which part) or the decoder
            print(row["error"], flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    stamp = datetime.date.today().isoformat()
    write_rows(out / f"render-{device.replace(' ', '-')}-{stamp}-{args.memory_mode}.json", rows)
    print("\n| size | steps | mode | --decode | placement | FPS | s/clip sampling + decoding | FPS overall | "
          "TTFF s | peak GB | sampling est. GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['steps']} | {r['mode']} | {r['decode']} | {r['error'][:90]} |")
            continue
        print(f"| {r['size']} | {r['steps']} | {r['mode']} | {r['decode']} | {r['placement']} | {r['fps']:.1f} | "
              f"{r['sample_clip_s']:.2f} + {r['decode_clip_s']:.2f} | {r['fps_overall']:.1f} | {r['ttff_s']:.2f} | "
              f"{r['peak_gb']:.1f} | {r['sampling_estimate_gb']:.1f} |")
    for r in rows:
        if r.get("message"):
            print(r["message"])


if __name__ == "__main__":
    main()
