"""Command line: `python -m liveavatar_backend {generate,make-tiny-checkpoints,keys}`."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .errors import CheckpointError, GenerationInterrupted, InputError
from .memory_modes import AUTO, MEMORY_MODE_CHOICES
from .render import DECODE_PLACEMENTS


def _report(message: str) -> None:
    print(message, file=sys.stderr)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _generate(args) -> int:
    from .render import prefer_expandable_segments
    prefer_expandable_segments()                  # before torch touches the GPU
    import torch
    from tqdm import tqdm

    from .audio import load_audio, to_16k_mono
    from .engine import LiveAvatarEngine, ModelSpec
    from .image import load_portrait
    from .pipeline import check_run_settings
    from .render import render
    from .sizes import parse_size
    from .video import Mp4Writer, check_output_path

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible; use --device cpu")
    parse_size(args.size)                         # what needs no model fails before minutes of loading
    check_run_settings(max_clips=args.num_clip, steps=args.steps, seed=args.seed)
    check_output_path(args.out)
    for stop in (signal.SIGTERM, signal.SIGHUP):  # `timeout`, `docker stop`, a closed terminal: no partial mp4
        signal.signal(stop, _interrupt)
    portrait = load_portrait(args.image)
    wave, rate = load_audio(args.audio)
    voice = to_16k_mono(wave, rate)
    spec = ModelSpec.from_folder(args.ckpt_dir, lora=args.lora)
    engine = LiveAvatarEngine.load(spec, device=args.device, memory_mode=args.memory_mode, report=_report)
    job = engine.prepare(portrait, voice, args.prompt, size=args.size, num_clips=args.num_clip,
                         steps=args.steps, seed=args.seed)
    plan = job.plan
    print(f"{plan.width}x{plan.height}, {plan.num_clips} clips, {plan.num_frames} frames, {plan.steps} steps",
          file=sys.stderr)
    try:
        with Mp4Writer(args.out, plan.width, plan.height, fps=25, audio=(wave, rate)) as writer:   # at its own rate
            render(engine, job, writer.write, decode=args.decode, spill_dir=Path(args.out).resolve().parent,
                   report=_report, progress=tqdm)
    finally:
        engine.close()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _make_tiny(args) -> int:
    from .fixtures import make_tiny_checkpoints
    out = make_tiny_checkpoints(args.out_dir, seed=args.seed)
    print(f"tiny random checkpoints written to {out}")
    return 0


def _keys(args) -> int:
    from .config import DiTConfig
    from .loading import build_empty_dit
    cfg = DiTConfig.wan_s2v_14b() if args.config == "14b" else DiTConfig.tiny()
    model = build_empty_dit(cfg)
    rows = [json.dumps([name, list(t.shape)]) for name, t in model.state_dict().items()]
    print("[" + ",\n ".join(rows) + "]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m liveavatar_backend",
                                     description="Live Avatar: talking-avatar video from a portrait and a voice.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an mp4 with the voice muxed in")
    gen.add_argument("--ckpt-dir", required=True, help="the Wan2.2-S2V-14B folder")
    gen.add_argument("--lora", help="liveavatar.safetensors (the 4-step distilled LoRA)")
    gen.add_argument("--image", required=True, help="portrait (jpg, png, webp)")
    gen.add_argument("--audio", required=True, help="voice (wav, mp3, flac, m4a, ogg; any rate)")
    gen.add_argument("--prompt", required=True, help="describe the scene and style")
    gen.add_argument("--size", default="704*384", help="pixel area W*H (also WxH or W×H), e.g. 384*256")
    gen.add_argument("--num-clip", type=int, default=0, help="48-frame clips; 0 = follow the audio")
    gen.add_argument("--steps", type=int, default=4, choices=(2, 3, 4))
    gen.add_argument("--seed", type=int, default=420)
    gen.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu; a list of GPUs (cuda:0,cuda:1) splits "
                                                      "the DiT over them; external:N waits for N torchrun workers")
    gen.add_argument("--memory-mode", default=AUTO, choices=MEMORY_MODE_CHOICES,
                     help="quality (bf16), balanced (FP8 weights), fast (FP8 weights and attention), low_vram; "
                          "auto (default): quality where the GPU has 49 GB free, balanced from 33 GB, else low_vram")
    gen.add_argument("--decode", default="auto", choices=DECODE_PLACEMENTS,
                     help="where the VAE decode runs: alongside sampling (frames stream out as they render), "
                          "after it (latents wait on disk; for when the decoder does not fit beside the caches), "
                          "or auto: alongside where it fits (default)")
    gen.add_argument("--out", required=True, help="output .mp4")
    gen.set_defaults(run=_generate)
    tiny = sub.add_parser("make-tiny-checkpoints", help="write tiny random checkpoints in the published layouts")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_make_tiny)
    keys = sub.add_parser("keys", help="print [name, shape] of the DiT built on the meta device")
    keys.add_argument("--config", default="14b", choices=("14b", "tiny"))
    keys.set_defaults(run=_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (GenerationInterrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from .parallel import WorkerError
        if not isinstance(exc, WorkerError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
