"""The Wan2.1 VAE at full size (random weights, bf16) on one GPU: how temporal chunking, memory
layout (NCDHW / channels-last NDHWC) and torch.compile change the two VAE passes on the critical
path (issue 4):

* encode of the 73 static motion frames (time to first frame), by frames per encoder call;
* streaming decode of one clip (12 latents → 48 frames) after the 7 warm-up latents, by latents
  per decoder call (diffusers' own decode uses 1).

Each row's output is compared with the first row of its size and pass (by default diffusers' path:
4 frames / 1 latent per call, NCDHW). All variants compute the same thing (tests/test_media.py,
float32), so only bf16 rounding and algorithm choice may differ.

    python bench/bench_vae.py --sizes 384*256,704*384 --encode-chunks 4,24 --decode-chunks 1,3
    python bench/bench_vae.py --sizes 704*384 --encode-chunks 4 --decode-chunks 1 \
        --variants ndhwc-compiled-heuristic,ndhwc-compiled
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cuda_time_ms, full_size_vae, write_rows           # noqa: E402
from liveavatar_backend import constants as C                        # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size         # noqa: E402

PORTRAIT_HW = (400, 720)


def make_vae(variant: str):
    """A layout, 'ncdhw' (diffusers') or 'ndhwc' (the engine's on a GPU), then optional parts:
    '-compiled' (torch.compile, as in quality/balanced mode), '-heuristic' (cuDNN's guessed
    algorithms instead of timed ones: `autotune_convs` off). 'ndhwc-compiled' is the engine's VAE
    in quality/balanced mode. Same seed, so the variants share their weights."""
    layout, *parts = variant.split("-")
    if layout not in ("ncdhw", "ndhwc") or not set(parts) <= {"compiled", "heuristic"}:
        raise SystemExit(f"unknown variant {variant!r}")
    torch.manual_seed(0)
    vae = full_size_vae("cuda")
    if layout == "ncdhw":
        vae.channels_last = False
        for p in vae.model.parameters():
            p.data = p.data.contiguous()
    vae.autotune_convs = "heuristic" not in parts
    if "compiled" in parts:
        vae.enable_compile()
    return vae


def time_clip_decode(vae, latents_per_call: int, warm: torch.Tensor, clip: torch.Tensor, repeat: int = 5):
    """Median ms of decoding one clip with a freshly primed stream (the priming is not timed)."""
    times = []
    for _ in range(repeat + 1):
        stream = vae.stream_decoder(latents_per_call)
        stream.warm_up(warm)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = stream.decode(clip)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return out, statistics.median(times[1:])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="384*256,704*384")
    parser.add_argument("--encode-chunks", default="4,24,72", help="frames per encoder call")
    parser.add_argument("--decode-chunks", default="1,3,12", help="latents per decoder call")
    parser.add_argument("--variants", default="ncdhw,ndhwc,ndhwc-compiled", help="see make_vae")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of each variant's last decode")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        width, height = parse_size(size)
        H, W = target_size(*PORTRAIT_HW, width * height)
        g = torch.Generator(device="cuda").manual_seed(0)
        portrait = torch.rand(1, 3, 1, H, W, device="cuda", generator=g) * 2 - 1
        motion_frames = portrait.expand(-1, -1, C.MOTION_FRAMES, -1, -1)
        clip = torch.randn(1, 16, C.LATENTS_PER_CLIP, H // 8, W // 8, device="cuda", generator=g)
        warm = torch.randn(1, 16, C.WARM_UP_LATENTS, H // 8, W // 8, device="cuda", generator=g)
        reference = {}
        for variant in args.variants.split(","):
            vae = make_vae(variant)
            for kind, chunks in (("encode", args.encode_chunks), ("decode", args.decode_chunks)):
                for chunk in [int(c) for c in chunks.split(",") if c]:
                    torch.cuda.reset_peak_memory_stats()
                    if kind == "encode":
                        out = vae.encode(motion_frames, chunk)
                        ms = cuda_time_ms(lambda: vae.encode(motion_frames, chunk), warmup=1, repeat=5)
                    else:
                        out, ms = time_clip_decode(vae, chunk, warm, clip)
                    reference.setdefault(kind, out)
                    row = {"device": torch.cuda.get_device_name(), "size": f"{W}*{H}", "pass": kind,
                           "per_call": chunk, "variant": variant, "ms": ms,
                           "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                           "rel_err_vs_first_row": rel_err(out, reference[kind]),
                           "date": datetime.date.today().isoformat(), "torch": torch.__version__}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    time_clip_decode(vae, chunk, warm, clip, repeat=1)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
            del vae
            torch.cuda.empty_cache()
    write_rows(Path(args.out) / f"vae-{rows[0]['device'].replace(' ', '-')}-{datetime.date.today().isoformat()}.json", rows)
    print(f"\n{'size':>9} {'pass':>6} {'per call':>8} {'variant':>31} {'ms':>8} {'peak GB':>8} {'rel.err':>8}")
    for r in rows:
        print(f"{r['size']:>9} {r['pass']:>6} {r['per_call']:>8} {r['variant']:>31} {r['ms']:8.1f} "
              f"{r['peak_gb']:8.1f} {r['rel_err_vs_first_row']:8.1e}")
    print("decode: one clip (12 latents, 48 frames) after 7 priming latents; encode: 73 frames")


if __name__ == "__main__":
    main()
