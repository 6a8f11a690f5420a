"""How generated clips travel between nodes: a core LATENT dict with the extra data decoding needs.

    {"samples": [1, 16, 12·N, H/8, W/8] float32,          # ComfyUI's Wan video-latent layout
     "liveavatar": {"fps", "num_frames", "audio", "warm_up", "height", "width", "num_clips"}}

`audio` is the voice for the video, at its own sample rate (`soundtrack_of`), cut at the video's end;
the model itself hears it at 16 kHz.

Long renders: when the latents of the whole run would exceed IN_MEMORY_LIMIT_BYTES, `samples` is a
file-backed tensor in ComfyUI's temp folder, so the OS pages it out instead of holding hours of
latents in RAM. The file is unlinked as soon as it is mapped: its space goes back when the tensor does
(on Windows, which keeps open files, ComfyUI's temp folder is emptied when ComfyUI exits).
"""
from __future__ import annotations

import os
import uuid

import torch
from PIL import Image

import comfy.latent_formats
import folder_paths

from ..liveavatar_backend import constants as C
from ..liveavatar_backend.audio import to_16k_mono
from ..liveavatar_backend.video import aac_ready

IN_MEMORY_LIMIT_BYTES = 1 << 30
# Where Load Audio 16k keeps the voice at the file's own rate, beside the 16 kHz waveform the model
# needs: an extra key of the AUDIO dict, which core nodes pass along untouched or drop with the audio.
SOUNDTRACK_KEY = "liveavatar_soundtrack"
_WAN_RGB = comfy.latent_formats.Wan21()      # core's latent→RGB preview factors for Wan 2.1 latents


def audio_to_16k_mono(audio: dict) -> torch.Tensor:
    """Core AUDIO {"waveform": [B, C, T], "sample_rate"} -> mono 16 kHz float32 [T]."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected a core AUDIO input (from Load Audio or LiveAvatar Load Audio 16k)")
    waveform = audio["waveform"]
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 3 or waveform.numel() == 0:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"audio: the waveform is {shape}; expected [batch, channels, samples] with at least "
                         "one channel and sample (load a voice recording with Load Audio or LiveAvatar "
                         "Load Audio 16k)")
    return to_16k_mono(_mono(audio), int(audio["sample_rate"]))


def soundtrack_of(audio: dict) -> tuple[torch.Tensor, int]:
    """(mono waveform [T], sample rate) of the voice to put in the video, at a rate AAC can carry: the
    original-rate voice that Load Audio 16k carries along where it still matches the AUDIO's length
    (a node that edited the waveform but copied the dict would leave a stale one), else the AUDIO
    itself (core Load Audio: the file's own rate)."""
    track = audio.get(SOUNDTRACK_KEY)
    if track is None or abs(_seconds(track) - _seconds(audio)) > 1 / C.VIDEO_FPS:
        track = audio
    return aac_ready(_mono(track), int(track["sample_rate"]))


def _mono(audio: dict) -> torch.Tensor:
    return audio["waveform"][0].float().mean(dim=0)


def _seconds(audio: dict) -> float:
    return audio["waveform"].shape[-1] / audio["sample_rate"]


def latent_preview(latents: torch.Tensor) -> Image.Image:
    """Last latent frame [16, F, h, w] -> a small RGB preview through core's linear factors."""
    frame = latents[:, -1].float().cpu()
    factors = torch.tensor(_WAN_RGB.latent_rgb_factors)              # [16, 3]
    bias = torch.tensor(_WAN_RGB.latent_rgb_factors_bias)
    rgb = torch.einsum("chw,cr->hwr", frame, factors) + bias
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    return Image.fromarray(rgb)


class ClipLatents:
    """Collects clip latents into the LATENT `samples` tensor as they arrive."""

    def __init__(self, job):
        plan = job.plan
        shape = (1, 16, C.LATENTS_PER_CLIP * plan.num_clips, plan.height // 8, plan.width // 8)
        numel = 1
        for n in shape:
            numel *= n
        if numel * 4 > IN_MEMORY_LIMIT_BYTES:
            path = os.path.join(folder_paths.get_temp_directory(), f"liveavatar_latents_{uuid.uuid4().hex}.bin")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.samples = torch.from_file(path, shared=True, size=numel, dtype=torch.float32).view(shape)
            try:
                os.unlink(path)          # the mapping stays valid; nothing is left behind, even on an interrupt
            except OSError:
                pass
        else:
            self.samples = torch.zeros(shape)
        self.job = job
        self.count = 0

    def append(self, clip: torch.Tensor) -> None:
        start = C.LATENTS_PER_CLIP * self.count
        self.samples[0, :, start: start + C.LATENTS_PER_CLIP] = clip.float()
        self.count += 1

    def as_latent(self, soundtrack: tuple[torch.Tensor, int]) -> dict:
        """The LATENT, with `soundtrack` (mono waveform, rate) cut at the end of the video."""
        plan = self.job.plan
        waveform, rate = soundtrack
        waveform = waveform[: -(-plan.num_frames * rate // C.VIDEO_FPS)]         # ceil: the last frame's voice
        return {"samples": self.samples,
                "liveavatar": {"fps": float(C.VIDEO_FPS), "num_frames": plan.num_frames, "num_clips": plan.num_clips,
                               "height": plan.height, "width": plan.width,
                               "audio": {"waveform": waveform[None, None].contiguous(), "sample_rate": rate},
                               "warm_up": self.job.decoder_warm_up.cpu()}}


def clip_info(latent: dict) -> dict:
    """The clip information the sampler puts in its LATENT; a clear error for any other LATENT."""
    info = latent.get("liveavatar") if isinstance(latent, dict) else None
    if info is None:
        raise ValueError("clips: this LATENT does not come from LiveAvatarSampler (it lacks the clip "
                         "information); connect the sampler's 'clips' output")
    return info


def clips_of(latent: dict):
    """Each clip [16, 12, h, w] of a LiveAvatar LATENT, in order (checked before the first is asked for)."""
    num_clips = clip_info(latent)["num_clips"]
    samples = latent["samples"][0]
    return (samples[:, C.LATENTS_PER_CLIP * clip: C.LATENTS_PER_CLIP * (clip + 1)] for clip in range(num_clips))
