"""Speed and memory of the full-size model on one GPU (issue 4).

Builds the 14B DiT with random weights directly on the GPU, runs the real causal generation loop
(`BlockSampler`) for a few clips at each size / step count / mode, re-measures the hardware floor
in the same process, and prints a table; rows are also written as JSON to bench/results/.

    python bench/bench_single_gpu.py --sizes 384*256,704*384 --steps 3,4 --modes bf16,fp8 --clips 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Stopwatch, random_dit, synthetic_conditioning   # noqa: E402
from floor import step_floor_ms                                      # noqa: E402
from liveavatar_backend import constants as C                        # noqa: E402
from liveavatar_backend.config import DiTConfig                      # noqa: E402
from liveavatar_backend.fp8 import convert_to_fp8                    # noqa: E402
from liveavatar_backend.pipeline import BlockSampler, GenerationPlan  # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size         # noqa: E402

PORTRAIT_HW = (400, 720)     # the bundled examples are 720×400 landscape portraits


def run_case(model, size: str, steps: int, clips: int, mode: str, floors: dict) -> dict:
    width, height = parse_size(size)
    H, W = target_size(*PORTRAIT_HW, width * height)
    plan = GenerationPlan(H, W, clips, steps, seed=0)
    cond = synthetic_conditioning(model, H, W)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    block_times: list[float] = []
    marks = {}

    def on_progress(event):
        if event.latents is not None:
            torch.cuda.synchronize()
            block_times.append(time.perf_counter() - marks["last"])
            marks["last"] = time.perf_counter()
            if "first" not in marks:
                marks["first"] = marks["last"] - marks["start"]

    sampler = BlockSampler(model, plan, cond)
    torch.cuda.synchronize()
    marks["start"] = marks["last"] = time.perf_counter()
    for _ in sampler.clips(on_progress=on_progress):
        pass
    torch.cuda.synchronize()
    steady = block_times[C.BLOCKS_PER_CLIP:] or block_times      # skip clip 0 (warm-up, prefill)
    steady.sort()
    block_s = steady[len(steady) // 2]
    ms_per_block_step = 1000 * block_s / steps
    key = (size, mode == "fp8")
    if key not in floors:
        floors[key] = step_floor_ms(plan.layout, model.cfg, fp8=(mode == "fp8"))
    floor = floors[key]
    return {"device": torch.cuda.get_device_name(), "gpus": 1, "size": f"{W}*{H}", "area_preset": size,
            "steps": steps, "mode": mode, "clips": clips,
            "fps": C.FRAMES_PER_BLOCK / block_s, "ms_per_block_step": ms_per_block_step,
            "ttff_s": marks["first"], "ttff_includes": "prefill + first block (DiT only)",
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "floor_step_ms": floor["step_ms"], "floor_ratio": ms_per_block_step / floor["step_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--steps", default="3,4")
    parser.add_argument("--modes", default="bf16,fp8")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = DiTConfig.wan_s2v_14b()
    with Stopwatch() as build:
        model = random_dit(cfg, "cuda")
    print(f"built 14B DiT on GPU in {build.seconds:.1f} s, {torch.cuda.memory_allocated() / 1e9:.1f} GB", flush=True)
    rows, floors = [], {}
    for mode in args.modes.split(","):
        if mode == "fp8":
            convert_to_fp8(model)
            torch.cuda.empty_cache()
        for size in args.sizes.split(","):
            for steps in map(int, args.steps.split(",")):
                row = run_case(model, size, steps, args.clips, mode, floors)
                print(json.dumps(row), flush=True)
                rows.append(row)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"{name}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'size':>9} {'steps':>5} {'mode':>5} {'FPS':>6} {'ms/blk-step':>11} {'TTFF s':>7} {'peak GB':>8} {'floor ms':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['size']:>9} {r['steps']:>5} {r['mode']:>5} {r['fps']:6.1f} {r['ms_per_block_step']:11.1f} "
              f"{r['ttff_s']:7.2f} {r['peak_gb']:8.1f} {r['floor_step_ms']:8.1f} {r['floor_ratio']:6.2f}")


if __name__ == "__main__":
    main()
