"""Speed and memory of the full-size model on one GPU (issue 4).

Builds the 14B DiT with random weights directly on the GPU, runs the real causal generation loop
(`BlockSampler`) for a few clips per case and mode, re-measures the hardware floor in the same
process, checks every optimised mode against the plain eager bf16 path (relative error per block
after all steps, same seed), and prints a table; rows also go to <out>/<device>-<date>.json.

    python bench/bench_single_gpu.py --cases 384*256:3,704*384:4 --modes bf16,bf16-compiled,fp8-compiled
    python bench/bench_single_gpu.py --decode ...     # FPS and TTFF of DiT + VAE decode (issue 4's targets)

Mode names are built from parts: bf16|fp8, -wo (FP8 weights multiplied in bf16, as GPUs without FP8
matrix units run them), -attn8 (FP8 attention over e4m3 caches, memory_mode 'fast'), -compiled,
-graphs (CUDA graphs), -lowvram (caches in host memory).
"""
from __future__ import annotations

import argparse
import copy
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

from common import ClockSampler, full_size_vae, make_decoder, random_dit, synthetic_conditioning  # noqa: E402
from floor import step_floor_ms                                      # noqa: E402
from liveavatar_backend import block_ops                             # noqa: E402
from liveavatar_backend import fp8 as fp8_module                     # noqa: E402
from liveavatar_backend import constants as C                        # noqa: E402
from liveavatar_backend.config import DiTConfig                      # noqa: E402
from liveavatar_backend.cuda_graphs import capture_blocked           # noqa: E402
from liveavatar_backend.fp8 import convert_to_fp8                    # noqa: E402
from liveavatar_backend.loading import assemble_dit                  # noqa: E402
from liveavatar_backend.memory_budget import host_cache_bytes        # noqa: E402
from liveavatar_backend.pipeline import BlockSampler, GenerationPlan  # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size         # noqa: E402
from liveavatar_backend.vae import DECODE_LATENTS_PER_CALL           # noqa: E402

PORTRAIT_HW = (400, 720)     # the bundled examples are 720×400 landscape portraits


def plan_for(size: str, steps: int, clips: int) -> GenerationPlan:
    width, height = parse_size(size)
    return GenerationPlan(*target_size(*PORTRAIT_HW, width * height), clips, steps, seed=0)


def run_clips(model, plan: GenerationPlan, offload: bool = False, graphs: bool = False, vae=None,
              overlap: bool = False, fp8_attention: bool = False):
    """Generate; returns (clean latents of every block, seconds per block, seconds to first frame,
    decode seconds per block, `time.time()` at the end of each block). With a `vae`, every block
    is decoded as it finishes, inside its time: in line (decode timed on its own too), or with
    `overlap` as the CLI does it, on the decoder's stream while the next block denoises (then only
    block 0's frames are waited for, for the time to first frame, and no decode time of its own is
    measured)."""
    cond = synthetic_conditioning(model, plan.height, plan.width)
    decoder = make_decoder(plan, vae=vae) if vae is not None else None     # primed: 7 latents decoded
    blocks, times, decode_times, ends = [], [], [], []
    torch.cuda.synchronize()                    # the priming stays out of the time to first block
    t0 = last = time.perf_counter()
    ttff = None

    def on_progress(event):
        nonlocal last, ttff
        if event.latents is None:
            return
        if decoder is not None and overlap:
            decoder.submit(event.latents)
            decoder.collect(wait=ttff is None)
        elif decoder is not None:
            torch.cuda.synchronize()
            start = time.perf_counter()
            decoder.decode(event.latents)
            torch.cuda.synchronize()
            decode_times.append(time.perf_counter() - start)
        torch.cuda.current_stream().synchronize()            # the DiT's stream, not the decoder's
        now = time.perf_counter()
        ttff = now - t0 if ttff is None else ttff
        times.append(now - last)
        ends.append(time.time())
        last = now
        blocks.append(event.latents.float().cpu())

    sampler = BlockSampler(model, plan, cond, offload_caches=offload, cuda_graphs=graphs, fp8_attention=fp8_attention)
    for _ in sampler.clips(on_progress=on_progress):
        pass
    if decoder is not None:
        decoder.collect(wait=True)
    return blocks, times, ttff, decode_times, ends


def profile_clip(model, plan: GenerationPlan, offload: bool, path: Path, fp8_attention: bool = False) -> None:
    """One clip under torch.profiler (without CUDA graphs, so every kernel is listed); the kernel
    table goes to `path`, its top lines to stdout; the ATen ops grouped by input shapes go to
    `<path>-shapes.txt` (which attention length, which copy). The profiled clip is a sampler's
    first: its rings fill block by block, so its attention is shorter than at steady state."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        run_clips(model, plan, offload, fp8_attention=fp8_attention)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=110)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    by_shape = prof.key_averages(group_by_input_shape=True)
    path.with_name(path.stem + "-shapes.txt").write_text(
        by_shape.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60, max_shapes_column_width=100))
    print("\n".join(table.splitlines()[:14]), flush=True)


def clip_seconds(block_seconds: list[float]) -> list[float]:
    """Seconds per clip from seconds per block. Clip 0 includes the sink prefill; clip 1 includes
    the prefill of the rolling sink (run when clip 0 ends) and, with CUDA graphs, their captures."""
    per_clip = C.BLOCKS_PER_CLIP
    return [sum(block_seconds[i: i + per_clip]) for i in range(0, len(block_seconds), per_clip)]


def steady_clocks(clocks: ClockSampler, start: float, end: float) -> dict:
    """The clock fields of a row: over the steady-state blocks (after block `skip`, to the last)."""
    summary = clocks.summary(since=start, until=end)
    return {"clock_window": "steady-state blocks", **summary} if "sm_clock_mhz" in summary else summary


def memory_cap_gb(mode: str, size: str) -> float | None:
    """low_vram promises: the 384*256 preview within 23 GB, the 704*384 render within 48 GB (issue 4)."""
    if "lowvram" not in mode:
        return None
    width, height = parse_size(size)
    return 23.0 if width * height <= 384 * 256 else 48.0


def relative_errors(blocks, reference) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(blocks, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="384*256:3,704*384:4", help="size:steps,…")
    parser.add_argument("--modes", default="bf16,bf16-compiled,fp8-compiled")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--profile", action="store_true", help="also profile one clip per case and mode")
    parser.add_argument("--decode", action="store_true",
                        help="VAE-decode every block (full-size random Wan2.1 VAE): FPS and TTFF include the decode")
    parser.add_argument("--overlap", action="store_true",
                        help="with --decode: decode on the decoder's own CUDA stream while the next block denoises (the CLI's way)")
    parser.add_argument("--decode-latents-per-call", type=int, default=DECODE_LATENTS_PER_CALL,
                        help="latents per VAE decoder call (default: the engine's)")
    args = parser.parse_args()
    cases = [(s, int(n)) for s, n in (c.split(":") for c in args.cases.split(","))]
    cfg = DiTConfig.wan_s2v_14b()
    torch.cuda.reset_peak_memory_stats()
    fp8_only = all(mode.startswith("fp8") for mode in args.modes.split(","))
    if fp8_only:                                 # as the engine loads FP8 modes
        model = assemble_dit(lambda keep: random_dit(cfg, "cuda", keep=keep), cfg, fp8=True)
    else:                                        # bf16 first (the reference); converted in place later
        model = random_dit(cfg, "cuda")
    torch.cuda.empty_cache()
    load = {"load": "FP8, one layer group at a time" if fp8_only else "bf16 whole (FP8 rows: converted after it)",
            "load_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "reserved_unused_gb_after_load": (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 1e9}
    if args.decode:                  # the engine compiles the VAE except in low_vram (a smaller peak)
        eager_vae = full_size_vae("cuda")
        eager_vae.decode_latents_per_call = args.decode_latents_per_call
        compiled_vae = copy.copy(eager_vae)
        compiled_vae.enable_compile()
    rows, floors, floor_clocks, reference = [], {}, {}, {}
    overlapped = args.decode and args.overlap
    decode_label = "+decode-overlap" if overlapped else "+decode" if args.decode else ""
    has_fp8_matmul = fp8_module.has_fp8_matmul
    for mode in args.modes.split(","):
        if mode.startswith("fp8") and not hasattr(model.blocks[0].ffn[0], "weight_fp8"):
            convert_to_fp8(model)
            torch.cuda.empty_cache()
        weight_only = "-wo" in mode                    # as an A100 or an RTX 3090 runs 'balanced'
        fp8_module.has_fp8_matmul = (lambda device: False) if weight_only else has_fp8_matmul
        compile_s = None
        offload = "lowvram" in mode
        graphs = "graphs" in mode and not offload and capture_blocked() is None   # as BlockSampler decides
        label = mode + decode_label + (" (no graphs)" if "graphs" in mode and not offload and not graphs else "")
        attn8 = "attn8" in mode                  # FP8 attention over e4m3 caches (memory_mode 'fast')
        vae = None if not args.decode else compiled_vae if "-compiled" in mode and not offload else eager_vae
        if vae is not None:
            vae.autotune_convs = not offload             # as the engine sets it (timed cuDNN algorithms)
        if "-compiled" in mode:
            block_ops.enable_compile()
        else:
            block_ops.disable_compile()
        for size, steps in cases:
            plan = plan_for(size, steps, args.clips)
            cap = memory_cap_gb(mode, size)
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total) if cap else 1.0)
            warm_up_clip_s = None
            if "-compiled" in mode:
                t = time.perf_counter()
                warm_up_times = run_clips(model, plan_for(size, steps, 2), offload, graphs, vae, args.overlap,
                                          attn8)[1]                                   # warm-up: compiles
                compile_s = time.perf_counter() - t
                warm_up_clip_s = clip_seconds(warm_up_times)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with ClockSampler() as clocks:
                blocks, times, ttff, decode_times, ends = run_clips(model, plan, offload, graphs, vae, args.overlap, attn8)
            peak_gb = torch.cuda.max_memory_allocated() / 1e9            # before the profile's own run
            # low_vram's pinned host memory as the pinned allocator holds it (torch 2.11's
            # host_memory_stats() came back empty on an H100, 2026-12-06: estimated, not measured)
            host_estimate_gb = host_cache_bytes(model.cfg, plan, offload_caches=offload) / 1e9
            if args.profile:
                profile_clip(model, plan_for(size, steps, 1), offload,
                             Path(args.out) / f"profile-{mode}-{size.replace('*', 'x')}.txt", attn8)
            # steady state: clip 0 holds the prefill; with CUDA graphs clip 1 holds their captures
            skip = C.BLOCKS_PER_CLIP * (2 if graphs else 1)
            if len(times) <= skip:
                raise SystemExit(f"--clips {args.clips} leaves no steady-state block for {mode}; use --clips {skip // C.BLOCKS_PER_CLIP + 2}")
            block_s = statistics.median(times[skip:])
            # DiT alone: block time minus its in-line decode (overlapped, the two cannot be told apart)
            dit_s = statistics.median([t - d for t, d in zip(times[skip:], decode_times[skip:])]) \
                if decode_times else block_s
            decode_s = statistics.median(decode_times[skip:]) if decode_times else None
            clip_s = clip_seconds(times)
            # with CUDA graphs, clip 1 captures one graph per (step, ring slot): its excess over a
            # steady-state clip (captures + the rolling sink's prefill) is what every job pays once,
            # since the graphs belong to the job's caches
            clip1_extra_s = clip_s[1] - statistics.median(clip_s[2:]) if graphs else None
            # which matmuls the floor times: FP8 only where the mode multiplies in FP8
            fp8 = mode.startswith("fp8") and not weight_only and has_fp8_matmul("cuda")
            if (size, fp8) not in floors:
                with ClockSampler() as sampler:
                    floors[(size, fp8)] = step_floor_ms(plan.layout, model.cfg, fp8=fp8)["step_ms"]
                floor_clocks[(size, fp8)] = {f"floor_{k}": v for k, v in sampler.summary().items()}
            torch.cuda.set_per_process_memory_fraction(1.0)
            if mode == "bf16":
                reference[(size, steps)] = blocks
            err = relative_errors(blocks, reference[(size, steps)]) if (size, steps) in reference else None
            row = {"device": torch.cuda.get_device_name(), "gpus": 1, "size": f"{plan.width}*{plan.height}",
                   "steps": steps, "mode": label, "cuda_graphs": graphs,
                   "allocator": torch.cuda.get_allocator_backend(), "clips": args.clips, "fps": C.FRAMES_PER_BLOCK / block_s,
                   "ms_per_block_step": 1000 * dit_s / steps,
                   "ms_per_block_step_includes": "DiT + overlapped decode" if overlapped else "DiT",
                   "ttff_s": ttff,
                   "decode_ms_per_block": None if decode_s is None else 1000 * decode_s,
                   "fps_dit_only": None if overlapped else C.FRAMES_PER_BLOCK / dit_s,
                   "ttff_includes": "prefill + first block" + (" + its decode" if args.decode else ", DiT only"),
                   "decode_latents_per_call": eager_vae.decode_latents_per_call if args.decode else None,
                   "compile_s": compile_s, "warm_up_clip_s": warm_up_clip_s, "clip_s": clip_s,
                   "clip1_extra_s": clip1_extra_s,
                   "peak_gb": peak_gb, "memory_cap_gb": cap,
                   "host_cache_estimate_gb": host_estimate_gb,
                   "floor_step_ms": floors[(size, fp8)],
                   "floor_ratio": 1000 * dit_s / steps / floors[(size, fp8)], "max_rel_err_vs_bf16_eager": err,
                   **floor_clocks[(size, fp8)], **load,
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   **steady_clocks(clocks, ends[skip - 1], ends[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    name = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out) / f"{name}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print("FPS: DiT + decode (with --decode); ms/blk-step and ratio: DiT alone against the floor "
          "(DiT + overlapped decode with --overlap); host GB: low_vram's pinned caches, estimated")
    print(f"\n{'size':>9} {'steps':>5} {'mode':>30} {'FPS':>6} {'FPS DiT':>7} {'dec ms':>6} {'ms/blk-step':>11} "
          f"{'TTFF s':>7} {'peak GB':>8} {'host GB':>7} {'floor':>6} {'ratio':>6} {'rel.err':>8} {'compile s':>9} {'clip1+ s':>9} {'SM MHz':>6} {'W':>4} {'floor MHz':>9}")
    for r in rows:
        err = "-" if r["max_rel_err_vs_bf16_eager"] is None else f"{r['max_rel_err_vs_bf16_eager']:.1e}"
        comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        capture = "-" if r["clip1_extra_s"] is None else f"{r['clip1_extra_s']:.1f}"
        dec = "-" if r["decode_ms_per_block"] is None else f"{r['decode_ms_per_block']:.0f}"
        dit = "-" if r["fps_dit_only"] is None else f"{r['fps_dit_only']:.1f}"
        print(f"{r['size']:>9} {r['steps']:>5} {r['mode']:>30} {r['fps']:6.1f} {dit:>7} {dec:>6} "
              f"{r['ms_per_block_step']:11.1f} "
              f"{r['ttff_s']:7.2f} {r['peak_gb']:8.1f} {r['host_cache_estimate_gb']:7.1f} {r['floor_step_ms']:6.1f} {r['floor_ratio']:6.2f} {err:>8} {comp:>9} {capture:>9} "
              f"{r.get('sm_clock_mhz', float('nan')):6.0f} {r.get('power_w', float('nan')):4.0f} "
              f"{r.get('floor_sm_clock_mhz', float('nan')):9.0f}")


if __name__ == "__main__":
    main()
