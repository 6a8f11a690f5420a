"""Time from "generate" to the first decoded frame at full size (issue 4), model already loaded.

Every component is full size with random weights on the GPU: the 14B DiT, umT5-XXL (transformers),
wav2vec2-large (transformers), the Wan2.1 VAE (diffusers). Timed: prompt encoding + text K/V,
wav2vec2 over the voice, VAE encoding of the portrait (1 frame) and the motion frames (73 static
frames), the sink prefill, the first block at all steps, and its streaming decode (with warm-up).

    python bench/bench_ttff.py --size 704*384 --steps 4 --audio-seconds 10
    python bench/bench_ttff.py --memory-mode fast ...   # the DiT as a named memory mode runs it

The DiT runs as the engine runs it in `--memory-mode` (quality: bf16; balanced: FP8 weights; fast:
FP8 weights and FP8 attention over e4m3 caches). low_vram is not offered: the engine runs its
audio encoder on the CPU, its VAE eager and its caches from host memory, which this bench does
not model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import full_size_vae, random_dit, random_module             # noqa: E402
from liveavatar_backend import block_ops                               # noqa: E402
from liveavatar_backend import constants as C                          # noqa: E402
from liveavatar_backend.audio import AudioFeatureExtractor             # noqa: E402
from liveavatar_backend.config import DiTConfig                        # noqa: E402
from liveavatar_backend.fp8 import convert_to_fp8                      # noqa: E402
from liveavatar_backend.memory_modes import memory_mode                # noqa: E402
from liveavatar_backend.clip_decoder import ClipDecoder                # noqa: E402
from liveavatar_backend.pipeline import BlockSampler, Conditioning, GenerationPlan  # noqa: E402
from liveavatar_backend.render import prefer_expandable_segments       # noqa: E402
from liveavatar_backend.sizes import parse_size, target_size           # noqa: E402
from liveavatar_backend.vae import DECODE_LATENTS_PER_CALL, ENCODE_FRAMES_PER_CALL  # noqa: E402


class FirstBlockDone(Exception):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="704*384")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--encode-frames-per-call", type=int, default=ENCODE_FRAMES_PER_CALL)
    parser.add_argument("--decode-latents-per-call", type=int, default=DECODE_LATENTS_PER_CALL)
    parser.add_argument("--memory-mode", default="quality", choices=("quality", "balanced", "fast"))
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    # as the command line does: without it `quality` at 704*384 ran out of memory on an H100 (2026-12-06)
    prefer_expandable_segments()
    mode = memory_mode(args.memory_mode)
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model
    dev = "cuda"
    dit = random_dit(DiTConfig.wan_s2v_14b(), dev)
    if mode.fp8_weights:
        convert_to_fp8(dit)
    block_ops.enable_compile()
    with init_empty_weights():
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu"))
        w2v = Wav2Vec2Model(Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                           intermediate_size=4096, feat_extract_norm="layer",
                                           do_stable_layer_norm=True, conv_bias=True))
    t5, w2v = random_module(t5, dev).to("cpu"), random_module(w2v, dev)
    for p in t5.parameters():
        p.data = p.data.pin_memory()
    vae = full_size_vae(dev)
    vae.enable_compile()                           # as the engine runs it outside low_vram
    vae.encode_frames_per_call, vae.decode_latents_per_call = args.encode_frames_per_call, args.decode_latents_per_call
    audio = AudioFeatureExtractor(w2v, True, dev, torch.bfloat16)
    width, height = parse_size(args.size)
    H, W = target_size(400, 720, width * height)
    plan = GenerationPlan(H, W, 1, args.steps, seed=0)
    voice = torch.randn(int(args.audio_seconds * C.AUDIO_SAMPLE_RATE)) * 0.1
    portrait = torch.rand(3, H, W, device=dev) * 2 - 1
    ids = torch.randint(0, 256384, (1, 60), device=dev)

    def first_frame():
        marks = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            host = [p.data for p in t5.parameters()]   # the engine's policy: pinned host weights,
            for p, h in zip(t5.parameters(), host):     # copied in for the call, GPU copies dropped
                p.data = h.to(dev, non_blocking=True)
            text = t5(input_ids=ids).last_hidden_state[0]
            for p, h in zip(t5.parameters(), host):
                p.data = h
            text_kv = dit.text_context_kv(text)
            torch.cuda.synchronize(); marks["text"] = time.perf_counter() - t0
            features = audio.windows(voice)
            torch.cuda.synchronize(); marks["audio"] = time.perf_counter() - t0
            static = vae.encode(portrait[None, :, None].expand(-1, -1, C.MOTION_FRAMES, -1, -1))[0]
            ref, motion = static[:, :1], static[:, -C.MOTION_LATENTS:]          # as the engine does
            torch.cuda.synchronize(); marks["vae_encode"] = time.perf_counter() - t0
            cond = Conditioning(ref.to(dit.dtype), motion.to(dit.dtype), text_kv,
                                lambda first, count: features(first, count).to(dev))
            decoder = ClipDecoder(vae, motion[None, :, : C.WARM_UP_LATENTS])
            block = {}

            def on_progress(event):
                if event.latents is not None and "latents" not in block:
                    block["latents"] = event.latents.clone()
                    raise FirstBlockDone
            try:
                for _ in BlockSampler(dit, plan, cond, fp8_attention=mode.fp8_attention).clips(on_progress=on_progress):
                    pass
            except FirstBlockDone:
                pass
            torch.cuda.synchronize(); marks["first_block"] = time.perf_counter() - t0
            frames = decoder.decode(block["latents"])
            torch.cuda.synchronize(); marks["first_frames_decoded"] = time.perf_counter() - t0
        return marks, frames.shape

    first_frame()                                  # warm-up: compile, cuDNN/cuBLAS plans
    runs = [first_frame()[0] for _ in range(3)]
    runs.sort(key=lambda m: m["first_frames_decoded"])
    median = runs[1]
    row = {"device": torch.cuda.get_device_name(), "gpus": 1, "size": f"{W}*{H}", "steps": args.steps,
           "mode": f"{args.memory_mode}-compiled", "audio_seconds": args.audio_seconds,
           "vae_frames_per_encode_call": args.encode_frames_per_call,
           "vae_latents_per_decode_call": args.decode_latents_per_call, "ttff_s": median["first_frames_decoded"],
           "ttff_breakdown_s": median, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(json.dumps(row))
    out = Path(args.out) / f"ttff-{row['device'].replace(' ', '-')}-{args.memory_mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"\nTTFF {row['size']} {args.steps} steps {args.memory_mode}: {row['ttff_s']:.2f} s (median of 3)  " +
          "  ".join(f"{k}={v:.2f}" for k, v in median.items()))


if __name__ == "__main__":
    main()
