"""How long `low_vram` takes to set up its host caches before the first block (issue 4).

Builds the real `OffloadedKVCacheBank` at full size (pinned host chunks packed into slabs, two GPU
staging slots) and releases it, three times per case; the `zeroed` rows zero the host chunks once
more, to show what zeroing costs beside pinning.

    python bench/bench_host_caches.py --cases 384*256:3,704*384:4

The bank switches PyTorch's pinned allocator to parallel pinning (`kv_offload.PARALLEL_PINNING`)
unless the allocator settings name a pinned option: PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:False
times PyTorch's default pinning. Rows record which one ran (`parallel_pinning`).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liveavatar_backend import kv_offload                             # noqa: E402
from liveavatar_backend.config import DiTConfig                       # noqa: E402
from liveavatar_backend.memory_budget import host_cache_bytes         # noqa: E402
from liveavatar_backend.pipeline import GenerationPlan                # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size          # noqa: E402

PORTRAIT_HW = (400, 720)     # the bundled examples are 720×400 landscape portraits
REPEATS = 3


def setup_seconds(cfg: DiTConfig, plan: GenerationPlan, zeroed: bool) -> float:
    """Seconds to build the bank (and, `zeroed`, to zero its host chunks); the bank is released after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    bank = kv_offload.OffloadedKVCacheBank(plan.layout, range(cfg.num_layers), plan.steps, cfg.num_heads,
                                           cfg.head_dim, torch.bfloat16, "cuda")
    if zeroed:
        for chunks in (bank.host_cond, bank.host_ring):
            for keys, values in chunks.values():
                keys.zero_()
                values.zero_()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bank.release()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="384*256:3,704*384:4", help="size:steps,…")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    cfg = DiTConfig.wan_s2v_14b()
    parallel = kv_offload.prefer_parallel_pinning()         # what the bank will do (it asks again)
    rows = []
    for case in args.cases.split(","):
        size, steps = case.split(":")
        width, height = parse_size(size)
        plan = GenerationPlan(*target_size(*PORTRAIT_HW, width * height), 2, int(steps), seed=0)
        for zeroed in (False, True):
            times = [setup_seconds(cfg, plan, zeroed) for _ in range(REPEATS)]
            rows.append({"device": torch.cuda.get_device_name(), "size": f"{plan.width}*{plan.height}",
                         "steps": plan.steps, "host_chunks": "zeroed" if zeroed else "as the bank makes them",
                         "parallel_pinning": parallel,
                         "setup_s_median": statistics.median(times), "setup_s": times,
                         "host_gb": host_cache_bytes(cfg, plan, offload_caches=True) / 1e9,
                         "date": datetime.date.today().isoformat(), "torch": torch.__version__})
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"host-caches-{name}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'size':>9} {'steps':>5} {'host chunks':>22} {'pinning':>8} {'host GB':>8} {'setup s':>8}")
    for r in rows:
        pinning = "parallel" if r["parallel_pinning"] else "default"
        print(f"{r['size']:>9} {r['steps']:>5} {r['host_chunks']:>22} {pinning:>8} {r['host_gb']:8.1f} "
              f"{r['setup_s_median']:8.2f}")


if __name__ == "__main__":
    main()
