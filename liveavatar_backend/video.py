"""Writing the result: a streaming H.264 mp4 writer with the voice muxed in as AAC (PyAV only).

Frames are appended clip by clip and encoded at once, so a render of any length holds one clip of
frames in memory. The file is written under a temporary name in the same folder and renamed when
complete: an error or interruption never leaves a half-written mp4 behind.

All 48·N − 3 generated frames are kept; the audio is cut at the end of the video. (The official
script muxes with `ffmpeg -shortest`, which also cuts the video at the end of the audio.)
"""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

AAC_FRAME_SAMPLES = 1024        # samples per AAC frame
AUDIO_BITRATE = 192_000         # spec §3.8: -b:a 192k


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] (or uint8) -> uint8, by ×255 and truncation like the official
    conversion (spec §3.8)."""
    if frames.dtype == torch.uint8:
        return frames.cpu().numpy()
    return (frames.float().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()


def check_output_path(path: str | Path) -> Path:
    """The output file's path, its folder created; a clear InputError where no file can go there."""
    path = Path(path)
    if path.name in ("", ".", "..") or path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder or has no file name; give a file name such as out.mp4")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output {path}: its folder cannot be created ({exc.strerror or exc}); "
                         "choose another place") from None
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"output {path}: the folder {path.parent} is not writable; choose another place")
    return path


# The sample rates AAC (ISO 14496-3, the FFmpeg encoder's list) can carry; others are resampled to 48 kHz.
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def aac_ready(samples: torch.Tensor, rate: int) -> tuple[torch.Tensor, int]:
    """(samples, rate) as AAC can carry them: unchanged, or resampled to 48 kHz."""
    if int(rate) in AAC_SAMPLE_RATES:
        return samples, int(rate)
    import torchaudio
    return torchaudio.functional.resample(samples.float().reshape(-1), int(rate), 48000), 48000


class Mp4Writer:
    def __init__(self, path: str | Path, width: int, height: int, fps: float = 25.0,
                 audio: tuple[torch.Tensor, int] | None = None, crf: int = 19, metadata: dict | None = None):
        """`metadata`: container tags, each value as JSON (as ComfyUI's SaveVideo stores the workflow)."""
        import av
        if width % 2 or height % 2:
            raise InputError(f"video size {width}x{height}: H.264 needs even width and height; "
                             "resize to an even size (e.g. with LiveAvatarUpscaleVideo)")
        self.path = check_output_path(path)
        tags = {key: json.dumps(value) for key, value in (metadata or {}).items()}    # fails before any file
        audio = None if audio is None else aac_ready(*audio)
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self.fps, self.audio, self.frames_written, self.audio_written = fps, audio, 0, 0
        try:
            self.container = av.open(str(self.partial), mode="w", format="mp4",
                                     options={"movflags": "use_metadata_tags"})      # keeps custom tags
        except OSError as exc:
            raise InputError(f"output {self.path}: cannot be written ({exc}); choose another place") from None
        self.container.metadata.update(tags)
        self.video = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.options = {"crf": str(crf)}
        self.audio_stream = None
        if audio is not None:
            self.audio_stream = self.container.add_stream("aac", rate=int(audio[1]))
            self.audio_stream.layout = "mono"
            self.audio_stream.bit_rate = AUDIO_BITRATE
            self.samples = audio[0].float().reshape(-1).clamp(-1, 1).numpy()

    def write(self, frames: torch.Tensor) -> None:
        """Append frames; the voice follows in whole AAC frames up to the video's length so far, so
        audio and video interleave in the file and nothing is left to encode at the end."""
        import av
        for rgb in frames_to_uint8(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in self.video.encode(frame):
                self.container.mux(packet)
            self.frames_written += 1
        if self.audio_stream is not None:
            self._write_audio(self._audio_end() // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES)

    def _audio_end(self) -> int:
        """Samples of voice that the frames written so far cover (the audio is cut at the video's end)."""
        return min(len(self.samples), int(round(self.frames_written / self.fps * self.audio[1])))

    def _write_audio(self, end: int) -> None:
        import av
        for start in range(self.audio_written, end, AAC_FRAME_SAMPLES):
            chunk = self.samples[start: min(start + AAC_FRAME_SAMPLES, end)]
            frame = av.AudioFrame.from_ndarray(chunk[None].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate = self.audio[1]
            frame.pts = start
            for packet in self.audio_stream.encode(frame):
                self.container.mux(packet)
        self.audio_written = max(self.audio_written, end)

    def close(self) -> None:
        """Flush both streams and move the file into place; on any failure nothing is left behind."""
        try:
            for packet in self.video.encode(None):
                self.container.mux(packet)
            if self.audio_stream is not None:
                self._write_audio(self._audio_end())
                for packet in self.audio_stream.encode(None):
                    self.container.mux(packet)
            self.container.close()
            os.replace(self.partial, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def probe_mp4(path: str | Path) -> dict:
    """Frame count, fps, size and audio presence of an mp4 (decodes the video stream)."""
    import av
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        frames = sum(1 for _ in container.decode(video=0))
        return {"frames": frames, "fps": float(video.average_rate), "width": video.width,
                "height": video.height, "has_audio": audio is not None,
                "audio_sample_rate": audio.sample_rate if audio is not None else None,
                "duration": float(container.duration or 0) / 1e6}
