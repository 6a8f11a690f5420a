"""ComfyUI-LiveAvatar: Live Avatar (streaming talking-avatar video from one portrait and a voice) as
ComfyUI nodes. The engine is `liveavatar_backend/` (plain PyTorch); `nodes/` are thin nodes over it."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES
from .nodes.paths import register_model_folders

register_model_folders()
WEB_DIRECTORY = "./web"          # web/liveavatar.js: the audio player of LiveAvatarLoadAudio16k


class LiveAvatarExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LiveAvatarExtension:
    return LiveAvatarExtension()
