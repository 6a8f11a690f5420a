"""The FFN's GELU and the FP8 quantisation of its output alone, at full size (issue 4).

Between the FFN's two matmuls, the FP8 path computes GELU(pre) over 3168 × 13824 values (704*384),
its absolute maximum (the dynamic per-tensor scale) and its e4m3 copy: two passes over 88 MB,
69 + 68 µs per layer and step in the H200 profile of 2026-12-02, where reading 88 MB takes about
25 µs. This script times the variants, each compiled as the engine compiles its layer functions:

* `tanh`: F.gelu(approximate="tanh"), then `quantize_per_tensor` (the code before 2026-12-02);
* `sigmoid`: the same function written as x·σ(2u) (`layers.gelu_tanh`, the engine's now);
* `extremes`: the amax taken from the pre-activation's minimum and maximum instead of a pass that
  evaluates GELU (GELU falls to its minimum at x = −0.7518 and rises after it, so max|GELU| over the
  values is max(|GELU(min)|, GELU(max)), or the minimum's 0.170 when that lies between them and is
  larger: then an upper bound).

and the bf16 path's GELU alone (`bf16-tanh`, `bf16-sigmoid`). Agreement is checked against `tanh`.

    python bench/bench_ffn_gelu.py --size 704*384
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cuda_time_ms, write_rows                       # noqa: E402
from liveavatar_backend.config import DiTConfig                   # noqa: E402
from liveavatar_backend.fp8 import FP8_MAX, quantize_per_tensor, quantize_static  # noqa: E402
from liveavatar_backend.kv_cache import CacheLayout               # noqa: E402
from liveavatar_backend.layers import gelu_tanh                   # noqa: E402
from liveavatar_backend.sizes import parse_size                   # noqa: E402

GELU_ARGMIN = -0.7517916   # where the tanh-approximated GELU is smallest (solved numerically)


def gelu_amax_from_extremes(pre: torch.Tensor) -> torch.Tensor:
    low, high = pre.aminmax()
    ends = gelu_tanh(torch.stack([low, high])).float().abs().amax()     # rounded as the values are
    inside = gelu_tanh(torch.tensor(GELU_ARGMIN, device=pre.device)).abs()
    return torch.where((low < GELU_ARGMIN) & (high > GELU_ARGMIN), torch.maximum(ends, inside), ends)


def variants():
    def tanh(pre):
        return quantize_per_tensor(F.gelu(pre, approximate="tanh"))

    def sigmoid(pre):
        return quantize_per_tensor(gelu_tanh(pre))

    def extremes(pre):
        amax = gelu_amax_from_extremes(pre).clamp(min=1e-12)
        scale = (FP8_MAX / amax).clamp(max=FP8_MAX)
        return quantize_static(gelu_tanh(pre), scale), scale.reciprocal()

    def bf16_tanh(pre):
        return F.gelu(pre, approximate="tanh")

    def bf16_sigmoid(pre):
        return gelu_tanh(pre)
    return {"tanh": tanh, "sigmoid": sigmoid, "extremes": extremes, "bf16-tanh": bf16_tanh,
            "bf16-sigmoid": bf16_sigmoid}


def agreement(out, ref) -> dict:
    """How an FP8 variant's (e4m3, inverse scale) or a bf16 output differs from the reference's."""
    if isinstance(out, tuple):
        (q, inv), (q_ref, inv_ref) = out, ref
        deq, deq_ref = q.float() * inv, q_ref.float() * inv_ref
        return {"scale_rel_diff": abs(inv.item() / inv_ref.item() - 1),
                "values_differing": (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item(),
                "rel_err": ((deq - deq_ref).norm() / deq_ref.norm()).item()}
    return {"values_differing": (out != ref).float().mean().item(),
            "rel_err": ((out.float() - ref.float()).norm() / ref.float().norm()).item()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    cfg = DiTConfig.wan_s2v_14b()
    width, height = parse_size(args.size)
    tokens = CacheLayout(height // 16, width // 16).block_tokens
    torch.manual_seed(0)
    # three input sets (264 MB, over the 50-60 MB L2): FFN pre-activations of random weights are
    # about N(0, 1); heavier tails as a check that the scale follows the extremes
    inputs = [torch.randn(tokens, cfg.ffn_dim, device="cuda", dtype=torch.bfloat16) * s for s in (1.0, 2.0, 0.5)]
    inputs[1][0, :8] = torch.tensor([-9.0, 7.5, -0.75, 30.0, -30.0, 0.2, 3.0, -3.0])
    rows, reference = [], {}
    for name, fn in variants().items():
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        outs = [compiled(x) for x in inputs]
        calls = iter(range(10 ** 9))
        ms = cuda_time_ms(lambda: compiled(inputs[next(calls) % len(inputs)]), warmup=5, repeat=50)
        ref_name = "bf16-tanh" if name.startswith("bf16") else "tanh"
        reference.setdefault(name, outs)
        worst = {}
        for out, ref in zip(outs, reference[ref_name]):
            for key, value in agreement(out, ref).items():
                worst[key] = max(worst.get(key, 0.0), value)
        row = {"device": torch.cuda.get_device_name(), "size": args.size, "variant": name, "ms": ms,
               "vs": ref_name, **worst, "date": datetime.date.today().isoformat(), "torch": torch.__version__}
        print(row, flush=True)
        rows.append(row)
    device = torch.cuda.get_device_name().replace(" ", "-")
    write_rows(Path(args.out) / f"ffn-gelu-{device}-{datetime.date.today()}.json", rows)
    print(f"\n{'variant':>13} {'µs':>7} {'vs':>9} {'scale diff':>10} {'differing':>9} {'rel.err':>8}")
    for r in rows:
        print(f"{r['variant']:>13} {1000 * r['ms']:7.1f} {r['vs']:>9} {r.get('scale_rel_diff', 0):10.1e} "
              f"{r['values_differing']:9.2e} {r['rel_err']:8.1e}")


if __name__ == "__main__":
    main()
