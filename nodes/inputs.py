"""LiveAvatarLoadPortrait and LiveAvatarLoadAudio16k: pick or upload files from ComfyUI's input folder.

Both decode with the backend's loaders, so every format the backend accepts works here, and a bad
file fails with a message naming it."""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
from comfy_api.latest import io

import folder_paths

from ..liveavatar_backend import constants as C
from ..liveavatar_backend.audio import PEAK_LIMIT, load_audio, loudness_gain, to_16k_mono
from ..liveavatar_backend.image import load_portrait
from .clips import SOUNDTRACK_KEY
from .status import NodeStatus

log = logging.getLogger("liveavatar")


def _input_files(kinds: list[str]) -> list[str]:
    folder = folder_paths.get_input_directory()
    files = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
    return sorted(folder_paths.filter_files_content_types(files, kinds))


def _trimmed(wave: torch.Tensor, rate: int, start_seconds: float, duration_seconds: float) -> torch.Tensor:
    first = int(start_seconds * rate)
    return wave[first:] if duration_seconds <= 0 else wave[first: first + int(duration_seconds * rate)]


def _file_hash(name: str) -> str:
    digest = hashlib.sha256()
    with open(folder_paths.get_annotated_filepath(name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LiveAvatarLoadPortrait(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarLoadPortrait",
            display_name="Live Avatar Load Portrait",
            category="LiveAvatar",
            description="Loads the portrait to animate (JPG, PNG, WebP; transparency, grayscale, CMYK, "
                        "16-bit and EXIF rotation handled).",
            inputs=[io.Combo.Input("image", options=_input_files(["image"]), upload=io.UploadType.image,
                                   tooltip="An image in ComfyUI's input folder, or upload one. A well-lit, "
                                           "front-facing portrait of at least 512 px works best.")],
            outputs=[io.Image.Output(display_name="portrait", tooltip="The portrait as RGB, for the sampler.")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        # a portrait below 512 px: said on the node and in the log
        picture = load_portrait(folder_paths.get_annotated_filepath(image), warn=NodeStatus(logging.WARNING))
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
        return io.NodeOutput(pixels[None])

    @classmethod
    def fingerprint_inputs(cls, image):
        return _file_hash(image)

    @classmethod
    def validate_inputs(cls, image):
        if not folder_paths.exists_annotated_filepath(image):
            return f"image: {image!r} is not in the input folder; upload it or pick another file"
        return True


class LiveAvatarLoadAudio16k(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarLoadAudio16k",
            display_name="Live Avatar Load Audio (16 kHz)",
            category="LiveAvatar",
            description="Loads a voice recording (wav incl. 32-bit float, mp3, flac, m4a/aac, ogg, or the "
                        "audio of a video), optionally trims and normalises it, and resamples it to the "
                        "16 kHz mono the model needs. The video keeps the voice at the file's own rate.",
            inputs=[
                io.Combo.Input("audio", options=_input_files(["audio", "video"]), upload=io.UploadType.audio,
                               tooltip="An audio file in ComfyUI's input folder, or upload one."),
                io.Float.Input("start_seconds", default=0.0, min=0.0, max=1e6, step=0.1,
                               tooltip="Skip this much from the start."),
                io.Float.Input("duration_seconds", default=0.0, min=0.0, max=1e6, step=0.1,
                               tooltip="Keep this much after the start; 0 keeps everything."),
                io.Boolean.Input("normalize_loudness", default=False,
                                 tooltip="Scale quiet or loud recordings to a common speech level "
                                         "(peak-safe). The official code does not normalise."),
            ],
            outputs=[io.Audio.Output(display_name="audio", tooltip="The voice at 16 kHz mono, for the sampler (which "
                                                                   "puts it in the video at the file's own rate)."),
                     io.Float.Output(display_name="duration_seconds", tooltip="Length of the voice kept, in seconds.")],
        )

    @classmethod
    def execute(cls, audio, start_seconds, duration_seconds, normalize_loudness) -> io.NodeOutput:
        waveform, rate = load_audio(folder_paths.get_annotated_filepath(audio))
        voice = _trimmed(to_16k_mono(waveform, rate), C.AUDIO_SAMPLE_RATE, start_seconds, duration_seconds)
        original = _trimmed(waveform, rate, start_seconds, duration_seconds)
        if voice.numel() < C.AUDIO_SAMPLE_RATE // C.VIDEO_FPS:
            raise ValueError(f"audio: {audio!r} has nothing left after trimming (start {start_seconds} s, "
                             f"duration {duration_seconds} s); lower start_seconds")
        if normalize_loudness:
            # the original keeps what lies above 8 kHz, so its peaks may be higher: one gain safe for both
            gain = min(loudness_gain(voice), PEAK_LIMIT / max(original.abs().max().item(), 1e-8))
            voice, original = voice * gain, original * gain
        out = {"waveform": voice[None, None].contiguous(), "sample_rate": C.AUDIO_SAMPLE_RATE}
        if rate != C.AUDIO_SAMPLE_RATE:           # the video gets the voice at the file's own rate
            out[SOUNDTRACK_KEY] = {"waveform": original[None, None].contiguous(), "sample_rate": rate}
        return io.NodeOutput(out, voice.numel() / C.AUDIO_SAMPLE_RATE)

    @classmethod
    def fingerprint_inputs(cls, audio, **_):
        return _file_hash(audio)

    @classmethod
    def validate_inputs(cls, audio):      # no **kwargs: ComfyUI then range-checks the other inputs
        if not folder_paths.exists_annotated_filepath(audio):
            return f"audio: {audio!r} is not in the input folder; upload it or pick another file"
        return True
