"""LiveAvatarUpscaleVideo: resize video frames in chunks, by a factor or to a size, with core's
resamplers or a core UPSCALE_MODEL; output sizes are even so video encoders accept them."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.utils
from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel

METHODS = ["bicubic", "lanczos", "bilinear", "area"]
MODES = ["factor", "target size"]


def even(n: float) -> int:
    """Nearest even integer ≥ 2 (libx264 needs even width and height)."""
    return max(2, int(round(n / 2)) * 2)


def output_size(height: int, width: int, mode: str, factor: float, target_w: int, target_h: int) -> tuple[int, int]:
    if mode == "factor":
        return even(height * factor), even(width * factor)
    if target_w <= 0 or target_h <= 0:
        raise ValueError("width/height: give both a positive target width and height for 'target size'")
    return even(target_h), even(target_w)


def resize_frames(frames: torch.Tensor, height: int, width: int, method: str, upscale_model=None) -> torch.Tensor:
    """IMAGE chunk [N, H, W, C] -> [N, height, width, C] in [0, 1]. An upscale model sees RGB only;
    an alpha channel is resized beside it with `method`."""
    if upscale_model is not None:
        rgb = ImageUpscaleWithModel.execute(upscale_model, frames[..., :3]).args[0]
        if frames.shape[-1] > 3:          # as 3 channels: lanczos goes through PIL, which wants RGB
            alpha = frames[..., 3:].to(rgb.device).expand(*frames.shape[:-1], 3).movedim(-1, 1)
            alpha = comfy.utils.common_upscale(alpha, rgb.shape[2], rgb.shape[1], method, "disabled")
            rgb = torch.cat([rgb, alpha[:, :1].movedim(1, -1).to(rgb.dtype)], dim=-1)
        frames = rgb
    if frames.shape[1:3] != (height, width):
        frames = comfy.utils.common_upscale(frames.movedim(-1, 1), width, height, method, "disabled").movedim(1, -1)
    return frames.clamp(0, 1)


class LiveAvatarUpscaleVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarUpscaleVideo",
            display_name="Live Avatar Upscale Video",
            category="LiveAvatar",
            description="Resizes video frames chunk by chunk (bounded memory), by a factor or to a size; "
                        "optionally through an upscale model first. Width and height are made even.",
            inputs=[
                io.Image.Input("images", tooltip="Video frames (IMAGE batch)."),
                io.Combo.Input("mode", options=MODES, default="factor",
                               tooltip="'factor' multiplies both sides; 'target size' uses width and height."),
                io.Float.Input("factor", default=2.0, min=0.25, max=8.0, step=0.05,
                               tooltip="Scale factor for 'factor' mode (2.0 turns 384×256 into 768×512)."),
                io.Int.Input("width", default=0, min=0, max=8192, step=2, tooltip="Target width for 'target size'."),
                io.Int.Input("height", default=0, min=0, max=8192, step=2, tooltip="Target height for 'target size'."),
                io.Combo.Input("method", options=METHODS, default="bicubic",
                               tooltip="Resampling filter (after the upscale model, if one is connected)."),
                io.Int.Input("chunk_size", default=16, min=1, max=1024,
                             tooltip="Frames processed at once; lower it if memory runs short."),
                io.UpscaleModel.Input("upscale_model", optional=True,
                                      tooltip="Optional core upscale model (Load Upscale Model) applied first."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The frames at the new size.")],
        )

    @classmethod
    def execute(cls, images, mode, factor, width, height, method, chunk_size, upscale_model=None) -> io.NodeOutput:
        out_h, out_w = output_size(images.shape[1], images.shape[2], mode, factor, width, height)
        out = torch.empty(images.shape[0], out_h, out_w, images.shape[-1], dtype=images.dtype)
        bar = comfy.utils.ProgressBar(images.shape[0])
        for start in range(0, images.shape[0], chunk_size):
            mm.throw_exception_if_processing_interrupted()
            chunk = images[start: start + chunk_size]
            out[start: start + chunk.shape[0]] = resize_frames(chunk, out_h, out_w, method, upscale_model).cpu()
            bar.update_absolute(start + chunk.shape[0])
        return io.NodeOutput(out)
