"""The self-attention of one block over its cache, at full size, several ways (issue 4).

It is the largest single cost of a step: at 704*384 each layer's 3168 query tokens attend to 15312
keys (ring + reference + motion), about 1 TFLOP per layer. This script times it with the engine's
layouts (q is a transposed [L, heads, dim] tensor, k/v are slices of the cache buffers) through:

* `sdpa`, `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`: torch's SDPA, default and forced backends;
* `cudnn-fe`: the cuDNN frontend (pip `nvidia-cudnn-frontend`), EVERY execution plan its
  heuristics offer, each timed, so the plan torch's heuristic picks can be compared with the best;
* `cudnn-fe-fp8`: cuDNN's FP8 attention (e4m3 q/k/v with per-tensor scales), every plan. On Hopper
  its output is e4m3 too (bf16 output needs Blackwell, cuDNN 9.19 says); it is written with v's
  scale, which cannot overflow (each output row is a convex combination of v's rows), so the
  o-projection can take it as its FP8 input without another quantisation pass;
* `flex`: FlexAttention compiled, without a mask.

`--kv-layouts head-major,token-major` runs them over cache buffers in either memory order
([1, heads, N, dim] or [1, N, heads, dim]), and times the ring-slot write of one block's keys
(`slot-write-*`, a [1, heads, L, dim] view of token-major rows, as `attention_inputs` gives them).

Error: ‖out − ref‖/‖ref‖ against float32 attention of the same (bf16) inputs. `--sharpen` also
measures the FP8 error with logits scaled up (random q/k give flat softmaxes; trained ones do not).

    python bench/bench_attention.py --sizes 704*384,384*256
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cuda_time_ms, write_rows                  # noqa: E402
from liveavatar_backend.config import DiTConfig              # noqa: E402
from liveavatar_backend.fp8 import FP8_DTYPE, FP8_MAX, quantize_per_tensor  # noqa: E402
from liveavatar_backend.kv_cache import CacheLayout          # noqa: E402
from liveavatar_backend.sizes import parse_size              # noqa: E402

SDPA_BACKENDS = {"sdpa": None, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


KV_LAYOUTS = ("head-major", "token-major")     # cache buffers [1, heads, N, dim] / [1, N, heads, dim] (the engine's)


def cache_buffer(layout: CacheLayout, cfg: DiTConfig, kv_layout: str, dtype=torch.bfloat16, dev="cuda"):
    """A paired cache buffer, seen as [1, heads, N, dim] whatever its memory order."""
    heads, dim, length = cfg.num_heads, cfg.head_dim, layout.cond_len + 2 * layout.ring_len
    if kv_layout == "token-major":
        return torch.randn(1, length, heads, dim, device=dev).to(dtype).transpose(1, 2)
    return torch.randn(1, heads, length, dim, device=dev).to(dtype)


def engine_tensors(layout: CacheLayout, cfg: DiTConfig, kv_layout: str = "token-major", dtype=torch.bfloat16,
                   dev="cuda"):
    """q [1, heads, block, dim] (BSHD in memory) and k/v: the active range of a full left ring."""
    heads, dim = cfg.num_heads, cfg.head_dim
    q = torch.randn(1, layout.block_tokens, heads, dim, device=dev).to(dtype).transpose(1, 2)
    active = slice(0, layout.ring_len + layout.cond_len)
    k = cache_buffer(layout, cfg, kv_layout, dtype, dev)[:, :, active]
    v = cache_buffer(layout, cfg, kv_layout, dtype, dev)[:, :, active]
    return q, k, v


def slot_write_rows(layout: CacheLayout, cfg: DiTConfig, kv_layout: str):
    """Writing one block's keys (a [1, heads, L, dim] view of token-major rows, as
    `attention_inputs` returns them) into a ring slot of the buffer: what `write_block` does."""
    buffer = cache_buffer(layout, cfg, kv_layout)
    block = torch.randn(1, layout.block_tokens, cfg.num_heads, cfg.head_dim, device="cuda").to(buffer.dtype)
    block = block.transpose(1, 2)
    slot = buffer[:, :, layout.ring_len - layout.block_tokens: layout.ring_len]
    ms = cuda_time_ms(lambda: slot.copy_(block))
    gbytes = 2 * block.numel() * block.element_size() / 1e9
    yield {"variant": f"slot-write-{kv_layout}", "ms": ms, "gb_per_s": gbytes / (ms * 1e-3)}


def reference(q, k, v) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def tflops(q, k, ms: float) -> float:
    return 4 * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] / (ms * 1e-3) / 1e12


def sdpa_rows(q, k, v, ref):
    for name, backend in SDPA_BACKENDS.items():
        def call(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            ms = cuda_time_ms(call)
            yield {"variant": name, "ms": ms, "rel_err": rel_err(call(), ref)}
        except RuntimeError as e:
            yield {"variant": name, "error": str(e).splitlines()[0][:200]}


def cudnn_plans(graph, tensors: dict, out, ref, handle, name: str):
    """Build and time every execution plan of a built-up cuDNN graph."""
    import cudnn
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    for index in range(graph.get_execution_plan_count()):
        row = {"variant": name, "plan_index": index}
        try:
            graph.build_plan_at_index(index)
            row["plan"] = graph.get_plan_name_at_index(index)
            workspace = torch.empty(max(1, graph.get_workspace_size_plan_at_index(index)), device="cuda",
                                    dtype=torch.uint8)

            def call():
                graph.execute_plan_at_index(tensors, workspace, index, handle=handle)
            row["ms"] = cuda_time_ms(call)
            call()
            row["rel_err"] = rel_err(out, ref)
            row["workspace_mb"] = workspace.numel() / 2**20
        except Exception as e:                                   # noqa: BLE001 (a plan may not build)
            row["error"] = str(e).splitlines()[0][:200]
        yield row


def cudnn_handle():
    import cudnn
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    return handle


def cudnn_bf16_rows(q, k, v, ref):
    import cudnn
    handle = cudnn_handle()
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    qt, kt, vt = (graph.tensor_like(t) for t in (q, k, v))
    o, _ = graph.sdpa(name="sdpa", q=qt, k=kt, v=vt, generate_stats=False, attn_scale=1 / math.sqrt(q.shape[-1]))
    out = torch.empty_like(q)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride()))
    yield from cudnn_plans(graph, {qt: q, kt: k, vt: v, o: out}, out, ref, handle, "cudnn-fe")


def per_tensor_fp8(x):
    """(x in e4m3, descale [1,1,1,1]) as the FP8 linears scale their inputs."""
    x8, inverse = quantize_per_tensor(x)
    return x8, inverse.reshape(1, 1, 1, 1)


class _Dequantized:
    """An FP8 output read back in float32 (what `rel_err` needs of it)."""

    def __init__(self, x8, descale):
        self.x8, self.descale = x8, descale

    def float(self):
        return self.x8.float() * self.descale.reshape(())


def cudnn_fp8_rows(q, k, v, ref, name="cudnn-fe-fp8"):
    import cudnn
    handle = cudnn_handle()
    (q8, dq), (k8, dk), (v8, dv) = (per_tensor_fp8(t) for t in (q, k, v))
    one = lambda value: torch.full((1, 1, 1, 1), value, device="cuda", dtype=torch.float32)  # noqa: E731
    # softmax probabilities lie in [0, 1]: scaled by 448 they use the whole e4m3 range
    s_scale, s_descale, o_scale = one(FP8_MAX), one(1 / FP8_MAX), dv.reciprocal()
    amax_s, amax_o = one(0.0), one(0.0)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    qt, kt, vt = (graph.tensor_like(t) for t in (q8, k8, v8))
    scales = [graph.tensor_like(t) for t in (dq, dk, dv, s_descale, s_scale, o_scale)]
    o, _, amax_s_t, amax_o_t = graph.sdpa_fp8(
        q=qt, k=kt, v=vt, descale_q=scales[0], descale_k=scales[1], descale_v=scales[2],
        descale_s=scales[3], scale_s=scales[4], scale_o=scales[5], generate_stats=False,
        attn_scale=1 / math.sqrt(q.shape[-1]))
    out8 = torch.empty_like(q, dtype=FP8_DTYPE)
    o.set_output(True).set_dim(list(out8.shape)).set_stride(list(out8.stride())).set_data_type(cudnn.data_type.FP8_E4M3)
    for t in (amax_s_t, amax_o_t):
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    tensors = {qt: q8, kt: k8, vt: v8, o: out8, amax_s_t: amax_s, amax_o_t: amax_o}
    out = _Dequantized(out8, dv)
    tensors.update(zip(scales, (dq, dk, dv, s_descale, s_scale, o_scale)))
    quantize_ms = cuda_time_ms(lambda: [per_tensor_fp8(t) for t in (q, k, v)])
    for row in cudnn_plans(graph, tensors, out, ref, handle, name):
        row["quantize_qkv_ms"] = quantize_ms
        yield row


def flex_rows(q, k, v, ref):
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    try:
        ms = cuda_time_ms(lambda: compiled(q, k, v))
        yield {"variant": "flex", "ms": ms, "rel_err": rel_err(compiled(q, k, v), ref)}
    except Exception as e:                                       # noqa: BLE001
        yield {"variant": "flex", "error": str(e).splitlines()[0][:200]}


def size_rows(args, layout: CacheLayout, cfg: DiTConfig, kv_layout: str, wanted: set, size: str, device: str):
    q, k, v = engine_tensors(layout, cfg, kv_layout)
    ref = reference(q, k, v)
    found = list(slot_write_rows(layout, cfg, kv_layout))
    if "sdpa" in wanted:
        found += list(sdpa_rows(q, k, v, ref))
    for name, fn in (("cudnn-fe", cudnn_bf16_rows), ("cudnn-fe-fp8", cudnn_fp8_rows), ("flex", flex_rows)):
        if name in wanted:
            try:
                found += list(fn(q, k, v, ref))
            except Exception as e:                       # noqa: BLE001 (missing package, no support)
                found.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    if "cudnn-fe-fp8" in wanted and args.sharpen != 1:
        sharp_q = (q.float() * args.sharpen).to(q.dtype)
        sharp_ref = reference(sharp_q, k, v)
        sharp = list(sdpa_rows(sharp_q, k, v, sharp_ref))[:1]
        sharp[0]["variant"] = f"sdpa-q×{args.sharpen:g}"
        try:
            sharp += list(cudnn_fp8_rows(sharp_q, k, v, sharp_ref, name=f"cudnn-fe-fp8-q×{args.sharpen:g}"))[:3]
        except Exception as e:                           # noqa: BLE001
            sharp.append({"variant": "cudnn-fe-fp8-sharp", "error": str(e).splitlines()[0][:200]})
        found += sharp
    out_stride = list(F.scaled_dot_product_attention(q, k, v).stride())
    for row in found:
        row.update(device=device, size=size, kv_layout=kv_layout, query_tokens=q.shape[2], keys=k.shape[2],
                   sdpa_out_stride=out_stride, date=datetime.date.today().isoformat(),
                   torch=torch.__version__, cudnn=torch.backends.cudnn.version())
        if "ms" in row and not row["variant"].startswith("slot-write"):
            row["tflops"] = tflops(q, k, row["ms"])
    del q, k, v, ref
    torch.cuda.empty_cache()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="704*384,384*256")
    ap.add_argument("--variants", default="sdpa,cudnn-fe,cudnn-fe-fp8,flex")
    ap.add_argument("--kv-layouts", default="token-major",
                    help=f"cache memory orders: {','.join(KV_LAYOUTS)} (the engine's is token-major)")
    ap.add_argument("--sharpen", type=float, default=4.0, help="extra FP8 error row with q scaled by this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg, device = DiTConfig(), torch.cuda.get_device_name()
    wanted = set(args.variants.split(","))
    rows = []
    for size in args.sizes.split(","):
        height, width = parse_size(size)
        layout = CacheLayout(height // 16, width // 16)
        for kv_layout in args.kv_layouts.split(","):
            rows += size_rows(args, layout, cfg, kv_layout, wanted, size, device)
    out = args.out or f"bench/results/attention-{device.replace(' ', '-')}-{datetime.date.today()}.json"
    write_rows(out, rows)
    print(f"\n{'size':8} {'kv layout':11} {'variant':22} {'plan':>4} {'ms':>8} {'TFLOPS':>7} {'rel err':>8}  "
          f"plan name / error")
    for r in rows:
        print(f"{r['size']:8} {r['kv_layout']:11} {r['variant']:22} {str(r.get('plan_index', '')):>4} "
              f"{r.get('ms', float('nan')):8.3f} {r.get('tflops', float('nan')):7.0f} "
              f"{r.get('rel_err', float('nan')):8.1e}  {r.get('plan', '')[:60]}{r.get('error', '')}")


if __name__ == "__main__":
    main()
