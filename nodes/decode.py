"""Decoding clips: to IMAGE frames (LiveAvatarVAEDecodeClips), or straight to an mp4 with the voice
muxed in, clip by clip, for renders too long to hold as frames (LiveAvatarSaveVideo)."""
from __future__ import annotations

import os

import torch
from comfy_api.input_impl import VideoFromFile
from comfy_api.latest import io, ui

import comfy.model_management as mm
from comfy.cli_args import args
import comfy.utils
import folder_paths

from ..liveavatar_backend.video import Mp4Writer
from .clips import clip_info, clips_of
from .loader import LiveAvatarModel
from .upscale import METHODS, even, resize_frames


def decoded_clips(decoder, clips):
    """Frames [F, H, W, 3] of each clip, in order. The next clip decodes on the GPU (on the decoder's
    stream) while the caller stores or encodes the frames it was given; interruptible between clips."""
    for clip in clips:
        mm.throw_exception_if_processing_interrupted()
        decoder.submit(clip)
        yield from decoder.collect()
    yield from decoder.collect(wait=True)


class LiveAvatarVAEDecodeClips(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarVAEDecodeClips",
            display_name="Live Avatar VAE Decode Clips",
            category="LiveAvatar",
            description="Decodes the sampler's clips one at a time with the streaming Wan VAE into frames "
                        "(48·N − 3 frames at 25 fps), and passes the voice and fps on for Create Video.",
            inputs=[
                LiveAvatarModel.Input("model", tooltip="From Live Avatar Model Loader (its VAE is used)."),
                io.Latent.Input("clips", tooltip="From Live Avatar Sampler."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Every frame of the video, in order (48·N − 3)."),
                     io.Audio.Output(display_name="audio", tooltip="The voice at its own sample rate, cut at the "
                                                                     "video's end: for Create Video."),
                     io.Float.Output(display_name="fps", tooltip="25 (the model's frame rate): for Create Video.")],
        )

    @classmethod
    def execute(cls, model, clips) -> io.NodeOutput:
        info = clip_info(clips)
        decoder = model.decoder(info["warm_up"], info["height"], info["width"])
        frames = None
        written = 0
        bar = comfy.utils.ProgressBar(max(1, info.get("num_clips", 1)))
        for index, chunk in enumerate(decoded_clips(decoder, clips_of(clips))):
            if frames is None:
                frames = torch.empty(info["num_frames"], *chunk.shape[1:])
            frames[written: written + chunk.shape[0]] = chunk
            written += chunk.shape[0]
            bar.update_absolute(index + 1)
        return io.NodeOutput(frames[:written], info["audio"], info["fps"])


class LiveAvatarSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSaveVideo",
            display_name="Live Avatar Decode + Save Video",
            category="LiveAvatar",
            description="Decodes clip by clip and writes an H.264 mp4 with the voice (AAC) directly, never "
                        "holding all frames: use it for long renders. Optional resize on the way.",
            inputs=[
                LiveAvatarModel.Input("model", tooltip="From Live Avatar Model Loader (its VAE is used)."),
                io.Latent.Input("clips", tooltip="From Live Avatar Sampler."),
                io.String.Input("filename_prefix", default="video/LiveAvatar",
                                tooltip="Output path prefix inside ComfyUI's output folder."),
                io.Float.Input("scale", default=1.0, min=0.25, max=8.0, step=0.05,
                               tooltip="Resize factor applied to each clip before writing (1.0 = none)."),
                io.Combo.Input("method", options=METHODS, default="bicubic", tooltip="Resampling filter for 'scale'."),
                io.Int.Input("crf", default=19, min=0, max=51,
                             tooltip="H.264 quality: lower is better and bigger (19 ≈ visually lossless)."),
            ],
            outputs=[io.Video.Output(display_name="video", tooltip="The saved mp4, with the voice.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clips, filename_prefix, scale, method, crf) -> io.NodeOutput:
        info = clip_info(clips)                           # checked before anything is written
        height, width = even(info["height"] * scale), even(info["width"] * scale)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        filename = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, filename)
        audio = info["audio"]
        decoder = model.decoder(info["warm_up"], info["height"], info["width"])
        bar = comfy.utils.ProgressBar(info["num_clips"])
        with Mp4Writer(path, width, height, fps=info["fps"], audio=(audio["waveform"][0, 0], audio["sample_rate"]),
                       crf=crf, metadata=cls._workflow_metadata()) as writer:
            for index, frames in enumerate(decoded_clips(decoder, clips_of(clips))):
                if frames.shape[1:3] != (height, width):
                    frames = resize_frames(frames, height, width, method)
                writer.write(frames)
                bar.update_absolute(index + 1)
        saved = ui.SavedResult(filename, subfolder, io.FolderType.output)
        return io.NodeOutput(VideoFromFile(path), ui=ui.PreviewVideo([saved]))

    @classmethod
    def _workflow_metadata(cls) -> dict | None:
        """The prompt and the workflow, stored as core SaveVideo stores them (the mp4 can be dragged back
        into ComfyUI), unless ComfyUI runs with --disable-metadata."""
        hidden = getattr(cls, "hidden", None)
        if args.disable_metadata or hidden is None:
            return None
        metadata = dict(hidden.extra_pnginfo or {})
        if hidden.prompt is not None:
            metadata["prompt"] = hidden.prompt
        return metadata or None
