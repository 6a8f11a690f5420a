"""Hyper-parameters of the causal S2V DiT.

The published `config.json` of Wan2.2-S2V-14B carries the architecture; the official loader ignores
some of its keys and hard-codes them (spec §11), so we read what is there and fall back to the
14B values (spec §2.1) for the rest.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import CheckpointError

# spec §2.1: the 12 DiT layers after which audio is injected (index j = injector j)
WAN_S2V_14B_AUDIO_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16              # Wan2.1 VAE latent channels
    out_dim: int = 16
    cond_dim: int = 16            # pose-latent channels of cond_encoder
    text_dim: int = 4096          # umT5-XXL hidden size
    text_len: int = 512           # text rows the cross-attention sees (zero-padded)
    freq_dim: int = 256           # timestep sinusoid size
    audio_dim: int = 1024         # wav2vec2-large hidden size
    audio_layers: int = 25        # wav2vec2 hidden states used (embeddings + 24 layers); hard-coded officially
    num_audio_token: int = 4      # +1 learned padding token per frame
    audio_inject_layers: tuple[int, ...] = WAN_S2V_14B_AUDIO_INJECT_LAYERS
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if any(not 0 <= layer < self.num_layers for layer in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")

    @classmethod
    def wan_s2v_14b(cls) -> "DiTConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """A few-MB configuration with the same structure, for CPU tests and fixtures."""
        return cls(dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=32, audio_dim=32,
                   audio_layers=3, audio_inject_layers=(0, 2))

    # keys of config.json that map onto fields (the published file uses these names)
    _JSON_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "cond_dim",
                    "text_dim", "text_len", "freq_dim", "audio_dim", "audio_layers", "num_audio_token",
                    "audio_inject_layers", "patch_size", "eps")

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found; it ships with Wan2.2-S2V-14B") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if raw.get("model_type", "s2v") != "s2v":
            raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 's2v' "
                                  "(this is not the Wan2.2-S2V-14B config)")
        values = {}
        for key in cls._JSON_FIELDS:
            if key in raw:
                value = raw[key]
                values[key] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: inconsistent DiT configuration ({exc})") from None

    def to_json_dict(self) -> dict:
        """The config.json content for this configuration (same keys as the published file)."""
        out = {"_class_name": "WanModel_S2V", "model_type": "s2v"}
        for key in self._JSON_FIELDS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        out.update(enable_adain=True, adain_mode="attn_norm", zero_init=True, zero_timestep=True,
                   enable_framepack=True, framepack_drop_mode="padd", add_last_motion=True,
                   enable_motioner=False, qk_norm=True, cross_attn_norm=True, window_size=[-1, -1])
        return out
