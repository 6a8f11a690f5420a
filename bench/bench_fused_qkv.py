"""Self-attention's q, k and v projections as three GEMMs or as one over the stacked weight.

The three 5120×5120 projections of a layer read the same input; one GEMM with N = 3 × 5120 runs
more tiles per launch, which may fill the GPU's last wave of tiles better. This times both in bf16
and in FP8 (three per-tensor `_scaled_mm` calls against one call with row-wise scales that reproduce the three
per-tensor weight scales exactly, and one call with a single shared weight scale), at the query
token counts of 384*256 and 704*384.

    python3 bench/bench_fused_qkv.py [--repeat 50]

Prints a table last; rows go to bench/results/fused-qkv-<device>-<date>.json.
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

from common import cuda_time_ms, write_rows                                   # noqa: E402
from liveavatar_backend.fp8 import quantize_per_tensor                        # noqa: E402

DIM = 5120                      # Wan2.2-S2V-14B hidden size (spec §2)
TOKENS = {"384*256": 1152, "704*384": 3168}     # query tokens of one 3-latent-frame block


def bf16_variants(x, weights, biases):
    fused_w, fused_b = torch.cat(weights), torch.cat(biases)
    return {"bf16 3 GEMMs": lambda: [F.linear(x, w, b) for w, b in zip(weights, biases)],
            "bf16 1 GEMM": lambda: F.linear(x, fused_w, fused_b)}


def fp8_variants(x, weights, biases):
    quantised = [quantize_per_tensor(w) for w in weights]
    fused_w8 = torch.cat([w8 for w8, _ in quantised])
    rowwise_scale = torch.cat([s.expand(DIM) for _, s in quantised]).float().reshape(1, -1)
    shared_w8, shared_scale = quantize_per_tensor(torch.cat(weights))
    fused_b = torch.cat(biases)

    def three():
        x8, xs = quantize_per_tensor(x)
        return [torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=s, bias=b, out_dtype=torch.bfloat16,
                                 use_fast_accum=True) for (w8, s), b in zip(quantised, biases)]

    def rowwise():
        x8, xs = quantize_per_tensor(x)
        return torch._scaled_mm(x8, fused_w8.t(), scale_a=xs.reshape(1, 1).expand(x8.shape[0], 1).contiguous(),
                                scale_b=rowwise_scale, bias=fused_b, out_dtype=torch.bfloat16, use_fast_accum=True)

    def shared():
        x8, xs = quantize_per_tensor(x)
        return torch._scaled_mm(x8, shared_w8.t(), scale_a=xs, scale_b=shared_scale, bias=fused_b,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    reference = torch.cat(three(), dim=-1).float()
    errors = {name: ((fn().float() - reference).norm() / reference.norm()).item()
              for name, fn in (("FP8 1 GEMM, row-wise scales", rowwise), ("FP8 1 GEMM, shared scale", shared))}
    return ({"FP8 3 GEMMs": three, "FP8 1 GEMM, row-wise scales": rowwise, "FP8 1 GEMM, shared scale": shared},
            errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    weights = [torch.randn(DIM, DIM, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(3)]
    biases = [torch.randn(DIM, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(3)]
    rows = []
    for size, tokens in TOKENS.items():
        x = torch.randn(tokens, DIM, device="cuda", dtype=torch.bfloat16)
        variants = bf16_variants(x, weights, biases)
        fp8, errors = fp8_variants(x, weights, biases)
        variants.update(fp8)
        for name, fn in variants.items():
            with torch.no_grad():
                ms = cuda_time_ms(fn, warmup=10, repeat=args.repeat)
            rows.append({"device": device, "date": datetime.date.today().isoformat(), "size": size,
                         "tokens": tokens, "variant": name, "ms": ms, "rel_error_vs_3_gemms": errors.get(name)})
            print(rows[-1], flush=True)
    slug = device.replace(" ", "-")
    write_rows(Path(args.out) / f"fused-qkv-{slug}-{datetime.date.today()}.json", rows)
    print(f"\n{'size':8} {'variant':30} {'ms':>7} {'× 3 GEMMs':>9} {'rel. error':>10}")
    for row in rows:
        baseline = "bf16 3 GEMMs" if row["variant"].startswith("bf16") else "FP8 3 GEMMs"
        base = next(r["ms"] for r in rows if r["size"] == row["size"] and r["variant"] == baseline)
        error = "" if row["rel_error_vs_3_gemms"] is None else f"{row['rel_error_vs_3_gemms']:.1e}"
        print(f"{row['size']:8} {row['variant']:30} {row['ms']:7.3f} {row['ms'] / base:9.3f} {error:>10}")


if __name__ == "__main__":
    main()
