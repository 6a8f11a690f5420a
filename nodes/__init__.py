"""The ComfyUI nodes of ComfyUI-LiveAvatar (thin wrappers over liveavatar_backend)."""
from .decode import LiveAvatarSaveVideo, LiveAvatarVAEDecodeClips
from .inputs import LiveAvatarLoadAudio16k, LiveAvatarLoadPortrait
from .loader import LiveAvatarModelLoader
from .sampler import LiveAvatarSampler
from .upscale import LiveAvatarUpscaleVideo

NODES = [LiveAvatarModelLoader, LiveAvatarLoadPortrait, LiveAvatarLoadAudio16k, LiveAvatarSampler,
         LiveAvatarVAEDecodeClips, LiveAvatarSaveVideo, LiveAvatarUpscaleVideo]
