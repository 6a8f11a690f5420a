"""The sharded DiT on 1…N GPUs of one host (issue 5): FPS, time to first block, per-GPU peak memory,
pipeline bubble, and the largest size that fits under a per-process memory cap.

The full-size 14B DiT with random weights is made directly on each GPU by its worker (the same
layer-range loading as a checkpoint, without the file), driven through the real controller
(`liveavatar_backend.parallel.PipelineWorkers`) with synthetic conditioning. N = 1 runs the same
worker code on one GPU, so the speed-up is measured against the same build.

    python bench/bench_multi_gpu.py --gpus 1,2 --cases 704*384:4 --modes bf16,fp8 --clips 4
    python bench/bench_multi_gpu.py --gpus 2 --modes fp8 --cap-gb 22 --cases 384*256:3,576*384:4,704*384:4
    python bench/bench_multi_gpu.py --gpus 2 --cases 704*384:4 --modes bf16 --decode   # VAE decode overlapped

Rows go to bench/results/<device>-<date>-multi.json and a table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_decoder                                         # noqa: E402
from liveavatar_backend import constants as C                           # noqa: E402
from liveavatar_backend.config import DiTConfig                         # noqa: E402
from liveavatar_backend.parallel import PipelineWorkers, WorkerError    # noqa: E402
from liveavatar_backend.parallel_worker import MEMORY_CAP_ENV           # noqa: E402
from liveavatar_backend.pipeline import GenerationPlan                  # noqa: E402
from liveavatar_backend.pipeline_schedule import build_schedule, bubble_fraction  # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size           # noqa: E402

PORTRAIT_HW = (400, 720)          # the bundled examples are 720×400 landscape portraits
MODES = {"bf16": dict(fp8=False, offload_caches=False), "fp8": dict(fp8=True, offload_caches=False),
         "fp8-lowvram": dict(fp8=True, offload_caches=True)}


def plan_for(size: str, steps: int, clips: int) -> GenerationPlan:
    width, height = parse_size(size)
    return GenerationPlan(*target_size(*PORTRAIT_HW, width * height), clips, steps, seed=0)


def synthetic_inputs(plan: GenerationPlan, cfg: DiTConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h8, w8 = plan.height // 8, plan.width // 8
    text = torch.randn(64, cfg.text_dim, generator=g)
    ref = torch.randn(16, 1, h8, w8, generator=g).bfloat16()
    motion = torch.randn(16, C.MOTION_LATENTS, h8, w8, generator=g).bfloat16()
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, C.FRAMES_PER_CLIP, generator=g)
    return text, ref, motion, lambda first, count: audio[..., :count]


def run_job(workers: PipelineWorkers, plan: GenerationPlan, cfg: DiTConfig, decoder=None) -> dict:
    """One generation; clip arrival times -> steady FPS (clips after the first), time to first block."""
    text, ref, motion, audio = synthetic_inputs(plan, cfg)
    first_block = []
    t0 = time.perf_counter()

    def on_progress(event):
        if not first_block:
            first_block.append(time.perf_counter() - t0)

    arrivals, clips = [], []
    for clip in workers.sample(plan, text, ref, motion, audio, on_progress=on_progress):
        clips.append(clip.float())
        if decoder is not None:
            decoder.decode(clip.to("cuda:0"))
        arrivals.append(time.perf_counter() - t0)
    steady = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]   # clip 0 includes the pipeline fill
    clip_s = statistics.median(steady) if steady else arrivals[-1]
    reports = workers.last_reports
    peaks = [round(r["peak_bytes"] / 1e9, 2) for r in reports]
    return {"fps": C.FRAMES_PER_CLIP / clip_s, "ms_per_block_step": 1000 * clip_s / (C.BLOCKS_PER_CLIP * plan.steps),
            "ttfb_s": first_block[0], "ttff_s": first_block[0],       # DiT only: no decode in this script
            "floor_ratio": None,                                       # the floor is bench_single_gpu.py's
            "total_s": arrivals[-1], "peak_gb": max(peaks), "peak_gb_per_gpu": peaks,
            "bubble": round(reports[0]["bubble"], 4),
            "compute_ms_per_rank": [round(r["compute_ms"], 1) for r in reports],
            "tick_ms_per_rank": [round(r["tick_ms"], 1) for r in reports],
            "launch_ms_per_rank": [round(r["launch_ms"], 1) for r in reports], "_clips": clips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2", help="device counts to run, e.g. 1,2,4")
    parser.add_argument("--cases", default="704*384:4", help="size:steps,… (in order; with --cap-gb the "
                                                              "first that does not fit ends the ladder)")
    parser.add_argument("--modes", default="bf16,fp8", help=",".join(MODES))
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--cap-gb", type=float, default=None, help="per-process GPU memory cap")
    parser.add_argument("--decode", action="store_true", help="also VAE-decode every clip on cuda:0 here")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model on CPU workers: checks the script")
    args = parser.parse_args()
    cfg = DiTConfig.tiny() if args.cpu_dry_run else DiTConfig.wan_s2v_14b()
    device_name = "cpu-dry-run" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    rows = []
    extra_env = {MEMORY_CAP_ENV: str(args.cap_gb)} if args.cap_gb else {}
    for gpus in [int(g) for g in args.gpus.split(",")]:
        for mode in args.modes.split(","):
            load = dict(dit=None, lora=None, lora_scale=None, random="tiny" if args.cpu_dry_run else "14b", **MODES[mode])
            devices = ["cpu"] * gpus if args.cpu_dry_run else [f"cuda:{i}" for i in range(gpus)]
            workers = PipelineWorkers(devices, load, report=print, extra_env=extra_env)
            t = time.perf_counter()
            workers.start()
            load_s = time.perf_counter() - t
            for case in args.cases.split(","):
                size, steps = case.split(":")
                plan = plan_for(size, int(steps), args.clips)
                row = {"device": device_name, "gpus": gpus, "size": f"{plan.width}*{plan.height}", "steps": int(steps),
                       "mode": mode + ("+decode" if args.decode else ""), "cap_gb": args.cap_gb, "date": date,
                       "load_s": round(load_s, 1),
                       "schedule_bubble": round(bubble_fraction(build_schedule(args.clips, int(steps), gpus), gpus), 4)}
                try:
                    t = time.perf_counter()
                    run_job(workers, plan_for(size, int(steps), 1), cfg)     # warm-up: compile, cuBLAS plans
                    row["warmup_s"] = round(time.perf_counter() - t, 1)
                    decoder = make_decoder(plan) if args.decode else None
                    row.update(run_job(workers, plan, cfg, decoder))
                    row["fits"] = True
                except WorkerError as exc:
                    row.update(fits=False, error=str(exc).splitlines()[0][:300])
                print(json.dumps({k: v for k, v in row.items() if k != "_clips"}), flush=True)
                rows.append(row)
                if not row["fits"] and args.cap_gb:
                    break
            workers.close()
    for row in rows:                   # speed-up and output difference against 1 GPU of the same build
        single = next((r for r in rows if r["gpus"] == 1 and r["size"] == row["size"] and r["steps"] == row["steps"]
                       and r["mode"] == row["mode"] and r.get("fits")), None)
        if single and row.get("fits"):
            row["speedup_vs_1gpu"] = round(row["fps"] / single["fps"], 3)
            row["max_rel_err_vs_1gpu"] = max(((a - b).norm() / b.norm()).item()
                                             for a, b in zip(row["_clips"], single["_clips"]))
    for row in rows:
        row.pop("_clips", None)
    out = Path(args.out) / f"{device_name.replace(' ', '-')}-{date}-multi{'-cap' if args.cap_gb else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'gpus':>4} {'size':>8} {'st':>2} {'mode':>12} {'FPS':>6} {'x1gpu':>6} {'ms/blk-step':>11} "
          f"{'TTFB s':>6} {'bubble':>6} {'rel.err':>8}  peak GB per GPU")
    for r in rows:
        if r.get("fits"):
            print(f"{r['gpus']:>4} {r['size']:>8} {r['steps']:>2} {r['mode']:>12} {r['fps']:6.1f} "
                  f"{r.get('speedup_vs_1gpu', float('nan')):6.2f} {r['ms_per_block_step']:11.1f} {r['ttfb_s']:6.2f} "
                  f"{r['bubble']:6.3f} {r.get('max_rel_err_vs_1gpu', float('nan')):8.1e}  {r['peak_gb_per_gpu']}")
        else:
            print(f"{r['gpus']:>4} {r['size']:>8} {r['steps']:>2} {r['mode']:>12}  does not fit: {r['error'][:60]}")


if __name__ == "__main__":
    main()
