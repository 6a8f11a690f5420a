"""The causal block-wise generation loop of Live Avatar (spec §3.4–§3.6, §4.1).

For each clip of 12 latent frames (48 video frames), for each block of 3 latent frames, the block
is denoised in `steps` flow-match Euler steps; step i reads and writes cache i (timestep forcing).
The reference ("sink") frame and the FramePack motion tokens are prefilled into every cache once.

Where the official single-GPU and multi-GPU (TPP) pipelines differ we follow the TPP path, which
is the one the published real-time results use, and say so:
* reference latent = VAE encoding of the portrait as one frame; motion latents = the last 19 latents
  of the portrait repeated 73 frames;
* rolling sink: after clip 0 the sink becomes latent frame 0 of clip 0 and is prefilled again.
Improvements over the official code (documented in README): the sink RoPE offset is drawn from a
generator seeded with `seed` (reproducible), caches are sized from the resolution (any size), and
positions have no upper limit (any length).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator

import torch

from . import constants as C
from .errors import GenerationInterrupted, InputError
from .fp8 import FP8_DTYPE
from .fp8_attention import cache_scales
from .kv_cache import CacheLayout, KVCacheBank
from .cuda_graphs import StepGraphs, capture_blocked
from .kv_offload import OffloadedKVCacheBank
from .model import LiveAvatarDiT
from .schedule import euler_step, flow_match_schedule, validate_steps

# spec §3.4: how many video frames of audio features one block / one clip covers
AUDIO_FRAMES_PER_BLOCK = C.FRAMES_PER_BLOCK


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    height: int
    width: int
    num_clips: int
    steps: int
    seed: int

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout(self.height // 16, self.width // 16)

    @property
    def num_frames(self) -> int:
        """Frames in the final video: 48·N − 3 (spec §8.1)."""
        return C.FRAMES_PER_CLIP * self.num_clips - C.DROPPED_LEADING_FRAMES

    @property
    def total_block_steps(self) -> int:
        return self.num_clips * C.BLOCKS_PER_CLIP * self.steps


@dataclasses.dataclass
class Conditioning:
    """Everything the DiT needs besides noise, computed once per generation."""
    ref_latent: torch.Tensor        # [16, 1, H8, W8] normalised VAE latent of the portrait
    motion_latents: torch.Tensor    # [16, 19, H8, W8]
    text_kv: list | None            # per-layer text cross-attention (k, v); None when the DiT is sharded
    audio_features: Callable[[int, int], torch.Tensor]   # (first video frame, count) -> [L, C, count]
    text_states: torch.Tensor | None = None   # umT5 states [L, 4096], sent to the devices of a sharded DiT


@dataclasses.dataclass
class ProgressEvent:
    done: int                       # block-steps finished
    total: int
    clip: int
    block: int
    step: int
    latents: torch.Tensor | None = None   # the block's latents when a block finishes (for previews)


def sink_offset(seed: int, first_frame: int, step: int) -> int:
    """The sink RoPE offset d ~ U{4..30} of one forward call (spec §2.4).

    The official code draws it from Python's unseeded global `random` on every call, so its
    output is not reproducible. Here it is a pure function of (seed, block, step): the same seed
    gives the same video, and a multi-GPU schedule that runs calls in another order still
    matches the single-GPU result."""
    low, high = C.SINK_OFFSET_RANGE
    return random.Random(f"{seed}:{first_frame}:{step}").randint(low, high)


def reference_frame(first_frame: int, offset: int) -> int:
    """Temporal RoPE position of the sink during streaming: max(30, F0 + d) (spec §2.4)."""
    return max(C.REFERENCE_ROPE_FRAME, first_frame + offset)


def clip_noise(plan: GenerationPlan, clip: int, device, dtype) -> torch.Tensor:
    """Noise of one clip, drawn at once from a generator seeded seed + clip (spec §3.4)."""
    generator = torch.Generator(device=device).manual_seed(plan.seed + clip)
    shape = (16, C.LATENTS_PER_CLIP, plan.height // 8, plan.width // 8)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class BlockSampler:
    """Runs the causal loop of one generation on one device and yields clean clip latents."""

    def __init__(self, dit: LiveAvatarDiT, plan: GenerationPlan, cond: Conditioning, *,
                 rolling_sink: bool = True, offset: Callable[[int, int], int] | None = None,
                 offload_caches: bool = False, cuda_graphs: bool = False, fp8_attention: bool = False):
        validate_steps(plan.steps)
        self.dit, self.plan, self.cond = dit, plan, cond
        self.rolling_sink = rolling_sink
        # (first_frame, step) -> sink offset; tests pin it to compare with the official code
        self.offset = offset or (lambda first_frame, step: sink_offset(plan.seed, first_frame, step))
        self.timesteps, self.sigmas = flow_match_schedule(plan.steps)
        cfg = dit.cfg
        layout = plan.layout
        if fp8_attention and offload_caches:
            raise ValueError("FP8 attention keeps its e4m3 caches on the GPU and cannot offload them: "
                             "use memory_mode 'fast' (caches on the GPU) or 'low_vram' (bf16 attention)")
        bank_type = OffloadedKVCacheBank if offload_caches else KVCacheBank
        self.bank = bank_type(layout, range(cfg.num_layers), plan.steps, cfg.num_heads, cfg.head_dim,
                              FP8_DTYPE if fp8_attention else dit.dtype, dit.device)
        if fp8_attention:
            self.bank.scales = cache_scales(dit, range(cfg.num_layers), self.timesteps[: plan.steps])
        use_graphs = cuda_graphs and dit.device.type == "cuda" and not offload_caches and capture_blocked() is None
        self.graphs = StepGraphs(dit, self.bank, cond.text_kv) if use_graphs else None

    def prefill(self, ref_latent: torch.Tensor) -> None:
        self.dit.prefill_sink(ref_latent, self.cond.motion_latents, self.cond.text_kv, self.bank)

    def denoise_block(self, x: torch.Tensor, audio, first_frame: int, on_step) -> torch.Tensor:
        for i in range(self.plan.steps):
            t = float(self.timesteps[i])
            ref_frame = reference_frame(first_frame, self.offset(first_frame, i))
            if self.graphs is not None and self.graphs.ready(i):
                velocity = self.graphs.velocity(x, t, first_frame, ref_frame, i, audio)
                self.bank.step(i).advance(first_frame)
            else:
                velocity = self.dit.denoise_block(x, t, first_frame, ref_frame, self.bank, self.bank.step(i),
                                                  self.cond.text_kv, audio)
            x = euler_step(x, velocity, float(self.sigmas[i]), float(self.sigmas[i + 1]))
            on_step(i)
        return x

    def clips(self, on_progress: Callable[[ProgressEvent], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
        """Yields the clean latents [16, 12, H8, W8] of each clip, in order (on the model's device)."""
        plan, dit = self.plan, self.dit
        done = 0
        try:
            with torch.no_grad():
                self.prefill(self.cond.ref_latent)
                for clip in range(plan.num_clips):
                    noise = clip_noise(plan, clip, dit.device, dit.dtype)
                    out = torch.empty_like(noise)
                    for block in range(C.BLOCKS_PER_CLIP):
                        first_frame = C.LATENTS_PER_CLIP * clip + C.LATENTS_PER_BLOCK * block
                        video_frame = C.FRAMES_PER_CLIP * clip + C.FRAMES_PER_BLOCK * block
                        feats = self.cond.audio_features(video_frame, AUDIO_FRAMES_PER_BLOCK)
                        audio = dit.encode_audio_block(feats, C.AUDIO_HISTORY_FRAMES, C.MOTION_LATENTS)
                        lat = slice(C.LATENTS_PER_BLOCK * block, C.LATENTS_PER_BLOCK * (block + 1))

                        def on_step(step, clip=clip, block=block):
                            nonlocal done
                            done += 1
                            if should_stop is not None and should_stop():
                                raise GenerationInterrupted(f"stopped at clip {clip}, block {block}, step {step}")
                            if on_progress is not None:
                                on_progress(ProgressEvent(done, plan.total_block_steps, clip, block, step))

                        out[:, lat] = self.denoise_block(noise[:, lat], audio, first_frame, on_step)
                        if on_progress is not None:
                            on_progress(ProgressEvent(done, plan.total_block_steps, clip, block,
                                                      plan.steps - 1, latents=out[:, lat]))
                    if clip == 0 and self.rolling_sink and plan.num_clips > 1:
                        # Rolling Sink Frame (spec §3.5): latent 0 of clip 0 becomes the reference
                        self.prefill(out[:, :1])
                    yield out
        finally:
            self.release()

    def release(self) -> None:
        """Drop the caches (the bulk of generation memory)."""
        self.graphs = None
        self.bank.release()


def plan_generation(*, image_height: int, image_width: int, area: int, audio_frames: int,
                    max_clips: int | None, steps: int, seed: int) -> GenerationPlan:
    """Resolution from the portrait and the area (spec §3.1); clips from the audio (spec §3.2)."""
    from .sizes import target_size
    check_run_settings(max_clips=max_clips, steps=steps, seed=seed)
    height, width = target_size(image_height, image_width, area)
    clips_for_audio = clips_for_audio_frames(audio_frames)
    num_clips = clips_for_audio if not max_clips else min(max_clips, clips_for_audio)
    return GenerationPlan(height, width, num_clips, steps, seed)


def check_run_settings(*, max_clips: int | None, steps: int, seed: int) -> None:
    """The settings of a run that need no model (the command line checks them before loading one)."""
    validate_steps(steps)
    if max_clips is not None and max_clips < 0:
        raise InputError(f"num_clips is {max_clips}; use 0 to follow the audio or a positive count")
    if not 0 <= seed < 2 ** 63:
        raise InputError(f"seed {seed} out of range; use 0 … 2^63−1")


def clips_for_audio_frames(audio_frames_30hz: int) -> int:
    """nr = int(A30 / (48·1.2)) + 1 where A30 is the 30 Hz feature count (spec §3.2)."""
    per_clip = C.FRAMES_PER_CLIP * C.AUDIO_FEATURE_RATE / C.VIDEO_FPS
    return int(audio_frames_30hz / per_clip) + 1
