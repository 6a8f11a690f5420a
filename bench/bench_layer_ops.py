"""Time of one layer's compiled functions at full size, against the matmuls they contain (issue 4).

`block_ops.attention_inputs` and `block_ops.finish_block` hold all per-layer work outside the
self-attention over the cache. Their time minus that of their own matmuls and text attention
(measured alone, same shapes) is what the norms, modulation, RoPE and FP8 quantisation cost: the
part of the step that compilation settings can change. Inductor settings come from the
environment (e.g. TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1), so runs with different settings
compare in one table; `--profile` lists the kernels of each function.

    python bench/bench_layer_ops.py --size 704*384 --modes bf16,fp8
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

from common import cuda_time_ms, random_module, write_rows     # noqa: E402
from liveavatar_backend import block_ops, rope                 # noqa: E402
from liveavatar_backend.block_ops import linear_weights        # noqa: E402
from liveavatar_backend.config import DiTConfig                # noqa: E402
from liveavatar_backend.fp8 import convert_to_fp8, quantize_per_tensor  # noqa: E402
from liveavatar_backend.kv_cache import CacheLayout            # noqa: E402
from liveavatar_backend.model import DiTBlock                  # noqa: E402
from liveavatar_backend.sizes import parse_size                # noqa: E402

INDUCTOR_SWITCHES = ("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE")


def layer_inputs(cfg: DiTConfig, layout: CacheLayout, dev="cuda"):
    m = layout.block_tokens
    x = torch.randn(1, m, cfg.dim, device=dev, dtype=torch.bfloat16)
    e0 = torch.randn(6, cfg.dim, device=dev) * 0.1
    cos, sin = rope.rope_cos_sin(rope.noisy_positions(30, 3, layout.h, layout.w), cfg.head_dim, cfg.rope_theta, dev)
    # cuDNN attention returns [1, heads, L, head_dim] laid out as [1, L, heads, head_dim], like its q
    attn_out = torch.randn(1, m, cfg.num_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    text_k = torch.randn(1, cfg.num_heads, cfg.text_len, cfg.head_dim, device=dev, dtype=torch.bfloat16)
    return x, e0, cos, sin, attn_out, (text_k, torch.randn_like(text_k))


def calls(block: DiTBlock, inputs):
    """(attention_inputs, finish_block, their matmuls + text attention alone) as closures."""
    x, e0, cos, sin, attn_out, (text_k, text_v) = inputs
    sa, ca = block.self_attn, block.cross_attn

    def first():
        return block_ops.compiled("attention_inputs")(
            x, e0, block.modulation, linear_weights(sa.q), linear_weights(sa.k), linear_weights(sa.v),
            sa.norm_q.weight, sa.norm_k.weight, cos, sin, block.num_heads, block.eps)

    def second():
        return block_ops.compiled("finish_block")(
            x, attn_out, e0, block.modulation, linear_weights(sa.o), block.norm3.weight, block.norm3.bias,
            linear_weights(ca.q), ca.norm_q.weight, linear_weights(ca.o), text_k, text_v,
            linear_weights(block.ffn[0]), linear_weights(block.ffn[2]), block.num_heads, block.eps)

    flat = x[0]
    hidden = torch.randn(flat.shape[0], block.ffn[2].in_features, device=x.device, dtype=x.dtype)
    bare = [bare_linear(flat, layer) for layer in (sa.q, sa.k, sa.v)]
    bare_rest = [bare_linear(flat, layer) for layer in (sa.o, ca.q, ca.o, block.ffn[0])]
    bare_rest.append(bare_linear(hidden, block.ffn[2]))

    def matmuls_first():
        for fn in bare:
            fn()

    def matmuls_second():
        for fn in bare_rest:
            fn()
        F.scaled_dot_product_attention(attn_out, text_k, text_v)

    return first, second, matmuls_first, matmuls_second


def bare_linear(x: torch.Tensor, layer):
    """The layer's matmul alone: F.linear in bf16; for FP8, `_scaled_mm` on an input quantised beforehand."""
    if not hasattr(layer, "weight_fp8"):
        return lambda: F.linear(x, layer.weight, layer.bias)
    x8, x_scale = quantize_per_tensor(x)
    return lambda: torch._scaled_mm(x8, layer.weight_fp8.t(), scale_a=x_scale, scale_b=layer.weight_scale,
                                    bias=layer.bias, out_dtype=x.dtype, use_fast_accum=True)


def parse_option(value: str):
    """An Inductor setting's value: True/False, a number, or else the string itself."""
    import ast
    try:
        return ast.literal_eval({"true": "True", "false": "False"}.get(value.lower(), value))
    except (ValueError, SyntaxError):
        return value


def kernel_table(fn, title: str, path: Path) -> None:
    """Append the kernels of 5 calls of fn to `path`."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=120)
    with path.open("a") as f:
        f.write(f"## {title} (5 calls)\n{table}\n")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--modes", default="bf16,fp8")
    parser.add_argument("--label", default="default", help="name of the Inductor setting in the rows")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an Inductor setting for the layer functions, e.g. triton.multi_kernel=1 (repeatable)")
    args = parser.parse_args()
    options = {name: parse_option(value) for name, value in (o.split("=", 1) for o in args.option)} or None
    cfg = DiTConfig.wan_s2v_14b()
    width, height = parse_size(args.size)
    layout = CacheLayout(height // 16, width // 16)
    rows = []
    torch.manual_seed(0)
    with torch.device("meta"):
        block = DiTBlock(cfg)
    block = random_module(block, "cuda").requires_grad_(False)      # inference graphs, as in the engine
    inputs = layer_inputs(cfg, layout)
    for mode in args.modes.split(","):
        if mode not in ("bf16", "fp8"):
            raise SystemExit(f"--modes: unknown mode {mode!r}; use bf16, fp8 or bf16,fp8")
        if mode == "bf16" and hasattr(block.ffn[0], "weight_fp8"):
            raise SystemExit("--modes: list bf16 before fp8 (the conversion to FP8 is in place)")
        if mode == "fp8" and not hasattr(block.ffn[0], "weight_fp8"):
            convert_to_fp8(block)
        first, second, mm_first, mm_second = calls(block, inputs)
        block_ops.disable_compile()
        floor_first, floor_second = (cuda_time_ms(fn, warmup=3, repeat=20) for fn in (mm_first, mm_second))
        block_ops.enable_compile(options=options)
        for name, fn, floor in (("attention_inputs", first, floor_first), ("finish_block", second, floor_second)):
            ms = cuda_time_ms(fn, warmup=3, repeat=20)
            rows.append({"device": torch.cuda.get_device_name(), "size": args.size, "mode": mode,
                         "function": name, "setting": args.label, "ms": ms, "matmul_ms": floor,
                         "overhead_ms": ms - floor,
                         "inductor_env": {k: os.environ[k] for k in INDUCTOR_SWITCHES if k in os.environ},
                         "inductor_options": options,
                         "date": datetime.date.today().isoformat(), "torch": torch.__version__})
            if args.profile:
                kernel_table(fn, f"{name}, {mode}, {args.label}", Path(args.out) / f"layer-kernels-{args.label}.txt")
        torch._dynamo.reset()
    device = torch.cuda.get_device_name().replace(" ", "-")
    write_rows(Path(args.out) / f"layer-ops-{device}-{datetime.date.today()}-{args.label}.json", rows)
    print(f"\n{'mode':>5} {'function':>17} {'setting':>12} {'ms':>7} {'matmul ms':>9} {'overhead ms':>11}")
    for r in rows:
        print(f"{r['mode']:>5} {r['function']:>17} {r['setting']:>12} {r['ms']:7.3f} {r['matmul_ms']:9.3f} {r['overhead_ms']:11.3f}")


if __name__ == "__main__":
    main()
