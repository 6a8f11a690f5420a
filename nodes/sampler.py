"""LiveAvatarSampler: portrait + voice + prompt -> the latents of every clip, block by block."""
from __future__ import annotations

from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils

from .clips import ClipLatents, audio_to_16k_mono, latent_preview, soundtrack_of
from .loader import LiveAvatarModel, make_room
from .status import NodeStatus

CUSTOM_SIZE = "custom"
# the official presets, smallest first (spec §6), then the larger areas this engine also runs
SIZE_CHOICES = ["384*256", "688*368", "704*384", "720*400", "1024*704", "1280*720", CUSTOM_SIZE]
PREVIEW_MAX_SIDE = 512


class LiveAvatarSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSampler",
            display_name="Live Avatar Sampler",
            category="LiveAvatar",
            description="Generates a talking-avatar video as 48-frame clips at 25 fps, block by block "
                        "(causal streaming generation). Output: the clips' latents plus the audio.",
            inputs=[
                LiveAvatarModel.Input("model", tooltip="From Live Avatar Model Loader."),
                io.Image.Input("portrait", tooltip="The face to animate (first image of the batch is used). "
                                                   "Orientation of the video follows the portrait."),
                io.Audio.Input("audio", tooltip="The voice; any sample rate, mono or stereo (resampled to "
                                                "16 kHz mono internally)."),
                io.String.Input("prompt", multiline=True,
                                default="A person talks warmly to the camera. Soft light, natural colours.",
                                tooltip="Describe the scene and style (who, where, lighting), not the speech."),
                io.Combo.Input("size", options=SIZE_CHOICES, default="384*256",
                               tooltip="Pixel AREA (width*height); the aspect ratio comes from the portrait and "
                                       "both sides are multiples of 64. 384*256 is the fast preview, 704*384 "
                                       "the official quality. 'custom' uses custom_size."),
                io.String.Input("custom_size", default="512*512",
                                tooltip="Used when size is 'custom': W*H, WxH or W×H (e.g. 640*448)."),
                io.Int.Input("num_clips", default=0, min=0, max=1_000_000,
                             tooltip="Number of 48-frame clips (1.92 s each). 0 = as many as the audio needs; "
                                     "a larger number is capped to that (the video follows the voice)."),
                io.Int.Input("steps", default=4, min=2, max=4,
                             tooltip="Denoising steps per block: 4 is what the LoRA was distilled for; "
                                     "3 and 2 are faster previews."),
                io.Int.Input("seed", default=420, min=0, max=2 ** 63 - 1, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same video."),
            ],
            outputs=[io.Latent.Output(display_name="clips", tooltip="The latents of every clip (Wan video layout) "
                                                                     "with the voice, for the decoders.")],
        )

    @classmethod
    def execute(cls, model, portrait, audio, prompt, size, custom_size, num_clips, steps, seed) -> io.NodeOutput:
        area = custom_size if size == CUSTOM_SIZE else size
        voice = audio_to_16k_mono(audio)
        # the prompt's umT5 copy (11 GB), the portrait's encode, then the caches (tens of GB):
        # ComfyUI's own models leave this GPU first, as they may have come back since loading
        engine = model.engine()                 # loads again if ComfyUI unloaded it since the loader ran
        make_room(engine.device, float("inf"))
        job = engine.prepare(portrait[0], voice, prompt, size=area, num_clips=num_clips, steps=steps, seed=seed)
        bar = comfy.utils.ProgressBar(job.plan.total_block_steps)

        def on_progress(event):
            mm.throw_exception_if_processing_interrupted()
            preview = None
            if event.latents is not None:
                preview = ("JPEG", latent_preview(event.latents), PREVIEW_MAX_SIDE)
            bar.update_absolute(event.done, event.total, preview)

        store = ClipLatents(job)
        # on_progress raises ComfyUI's own InterruptProcessingException, so the prompt ends as
        # "interrupted" (not as an error); the sampler drops its caches on the way out
        try:
            for clip in engine.sample(job, on_progress=on_progress, report=NodeStatus()):
                store.append(clip)
        finally:
            mm.soft_empty_cache()
        return io.NodeOutput(store.as_latent(soundtrack_of(audio)))
