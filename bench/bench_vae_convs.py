"""The Wan VAE decoder's causal 3×3×3 convolutions at 704*384, one latent per decoder call (the
engine's default), timed alone in the ways PyTorch can run them (issue 4: the decode was ≈ 105 ms
of a 704*384 block):

* `conv3d`: as diffusers runs it: time cache concatenated, F.pad, conv3d (NDHWC);
* `conv3d-pad`: the spatial padding left to the convolution (no F.pad copy);
* `conv2d-taps`: the three time taps stacked along channels, one conv2d over the frames
  (weights [O, 3·C, 3, 3]); the stacking copy is timed with it;
* `conv3d-pad-autotuned` (with `--inductor`): `conv3d-pad` through torch.compile's max-autotune,
  where Inductor times cuDNN against its Triton convolution templates and keeps the fastest (its
  choice is made once per shape, on the first call, with cuDNN's benchmark mode off).

each with cuDNN's heuristic algorithm choice and with `torch.backends.cudnn.benchmark`. Every
variant's output is compared with `conv3d` in float32 (must agree to bf16 rounding).

Outcome (PERFORMANCE.md, H200 2026-12-01): alone, the padding inside the conv saves 10–20 % per
conv and the stacked taps are no better; in the compiled decoder the padding inside saved as much
as cuDNN's timed algorithms do, but not on top of them, and raised the decoder's peak by 1.4 GB,
so the engine keeps diffusers' padding and times the algorithms (`vae.cudnn_autotune`).

    python bench/bench_vae_convs.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_time_ms, write_rows        # noqa: E402

# (name, channels in, channels out, frames out per call, H, W): the decoder's 3×3×3 convs at 704*384
# with one latent per call (diffusers' WanDecoder3d: widths 384, 384, 192, 96 from the lowest
# resolution up; temporal upsampling after the first two stages)
SHAPES = [
    ("mid/up0 384@48x88", 384, 384, 1, 48, 88),
    ("up1 384@96x176", 384, 384, 2, 96, 176),
    ("up1 in 192->384@96x176", 192, 384, 2, 96, 176),
    ("up2 192@192x352", 192, 192, 4, 192, 352),
    ("up3 96@384x704", 96, 96, 4, 384, 704),
]
CACHE_T = 2          # frames of the previous call that a causal 3-tap conv reads


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def conv3d(x, cache, w):
    return F.conv3d(F.pad(torch.cat([cache, x], dim=2), (1, 1, 1, 1, 0, 0)), w)


def conv3d_pad(x, cache, w):
    return F.conv3d(torch.cat([cache, x], dim=2), w, padding=(0, 1, 1))


def conv2d_taps(x, cache, w2d):
    full = torch.cat([cache, x], dim=2)                            # [1, C, T+2, H, W]
    frames = x.shape[2]
    taps = torch.cat([full[:, :, k:k + frames] for k in range(3)], dim=1)    # [1, 3C, T, H, W]
    taps = taps[0].transpose(0, 1).contiguous(memory_format=torch.channels_last)   # [T, 3C, H, W]
    out = F.conv2d(taps, w2d, padding=1)                           # [T, O, H, W]
    return out.transpose(0, 1).unsqueeze(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inductor", action="store_true", help="add the max-autotune variant (slow to compile)")
    args = parser.parse_args()
    autotuned = torch.compile(conv3d_pad, mode="max-autotune-no-cudagraphs", dynamic=False)
    rows = []
    torch.manual_seed(0)
    for name, cin, cout, frames, h, w in SHAPES:
        x = channels_last(torch.randn(1, cin, frames, h, w, device="cuda", dtype=torch.bfloat16))
        cache = channels_last(torch.randn(1, cin, CACHE_T, h, w, device="cuda", dtype=torch.bfloat16))
        w3 = channels_last(torch.randn(cout, cin, 3, 3, 3, device="cuda", dtype=torch.bfloat16) / (27 * cin) ** 0.5)
        w2 = channels_last(w3.permute(0, 2, 1, 3, 4).reshape(cout, 3 * cin, 3, 3))
        flops = 2 * frames * h * w * cin * cout * 27
        with torch.no_grad():
            reference = conv3d(x.float(), cache.float(), w3.float())
            variants = {"conv3d": lambda: conv3d(x, cache, w3), "conv3d-pad": lambda: conv3d_pad(x, cache, w3),
                        "conv2d-taps": lambda: conv2d_taps(x, cache, w2)}
            if args.inductor:
                variants["conv3d-pad-autotuned"] = lambda: autotuned(x, cache, w3)
            for bench_flag in (False, True):
                torch.backends.cudnn.benchmark = bench_flag
                for variant, fn in variants.items():
                    out = fn()
                    err = ((out.float() - reference).norm() / reference.norm()).item()
                    ms = cuda_time_ms(fn, warmup=3, repeat=20)
                    row = {"device": torch.cuda.get_device_name(), "shape": name, "variant": variant,
                           "cudnn_benchmark": bench_flag, "ms": ms, "tflops": flops / ms / 1e9,
                           "rel_err_fp32": err, "date": datetime.date.today().isoformat(),
                           "torch": torch.__version__}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    torch.backends.cudnn.benchmark = False
    write_rows(Path(os.environ.get("OUT", "bench/results")) /
               f"vae-convs-{rows[0]['device'].replace(' ', '-')}-{datetime.date.today().isoformat()}.json", rows)
    print(f"\n{'shape':>24} {'variant':>12} {'benchmark':>9} {'ms':>8} {'TFLOPS':>7} {'rel.err':>8}")
    for r in rows:
        print(f"{r['shape']:>24} {r['variant']:>12} {str(r['cudnn_benchmark']):>9} {r['ms']:8.3f} "
              f"{r['tflops']:7.0f} {r['rel_err_fp32']:8.1e}")


if __name__ == "__main__":
    main()
