"""The Wan2.1 VAE through diffusers' `AutoencoderKLWan` (spec §1.1, §3.4, §3.7).

`Wan2.1_VAE.pth` (the published file) and ComfyUI's `wan_2.1_vae.safetensors` use the original Wan
module names; `wan_to_diffusers_key` maps them onto diffusers' names, strictly: every key maps,
every diffusers parameter is filled, every shape matches. The architecture width is read from the
checkpoint, so tiny test VAEs load through the same code.

Latents are normalised per channel, z = (μ − mean) / std, like the official pipeline.

Streaming decode: the causal 3-D convs keep a cache of the previous frames; `StreamDecoder` keeps
that cache between calls, so a long video is decoded clip by clip with bounded memory and the
result equals one decode of all latents at once.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from .errors import CheckpointError

# spec §3.4: per-channel statistics of the Wan2.1 VAE latent space
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)            # spec §1.1
NUM_RES_BLOCKS = 2
# Temporal chunking of the causal VAE (any value gives the same result; measured in bench/bench_vae.py)
ENCODE_FRAMES_PER_CALL = 4         # after the lone first frame; a multiple of 4. 24 is 8 % faster, 4.7x the peak
DECODE_LATENTS_PER_CALL = 1        # 3 (one block) is 6 % faster at 2.6x the peak
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
             "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_TOP = {"encoder.conv1.": "encoder.conv_in.", "decoder.conv1.": "decoder.conv_in.",
        "encoder.head.0.": "encoder.norm_out.", "encoder.head.2.": "encoder.conv_out.",
        "decoder.head.0.": "decoder.norm_out.", "decoder.head.2.": "decoder.conv_out.",
        "conv1.": "quant_conv.", "conv2.": "post_quant_conv."}


def wan_to_diffusers_key(key: str, num_res_blocks: int = NUM_RES_BLOCKS) -> str:
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    match = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.*)", key)
    if match:
        part, index, rest = match.groups()
        if index == "1":
            return f"{part}.mid_block.attentions.0.{rest}"
        key = f"{part}.mid_block.resnets.{0 if index == '0' else 1}.{rest}"
    match = re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key)
    if match:
        key = f"encoder.down_blocks.{match.group(1)}.{match.group(2)}"
    match = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
    if match:
        n, rest = int(match.group(1)), match.group(2)
        group = num_res_blocks + 2                       # res blocks + 1, then an upsampler
        block, j = divmod(n, group)
        inner = f"resnets.{j}" if j <= num_res_blocks else "upsamplers.0"
        key = f"decoder.up_blocks.{block}.{inner}.{rest}"
    for old, new in _RESIDUAL.items():
        key = key.replace("." + old, "." + new)
    return key


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"{path}: VAE file not found (Wan2.1_VAE.pth or wan_2.1_vae.safetensors)")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the VAE ({exc}); the file may be truncated") from None
    if not isinstance(state, dict) or "encoder.conv1.weight" not in state:
        raise CheckpointError(f"{path}: key 'encoder.conv1.weight' missing; not a Wan2.1 VAE checkpoint")
    return state


def build_vae(base_dim: int):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    with init_empty_weights():
        return AutoencoderKLWan(base_dim=base_dim, z_dim=Z_DIM, dim_mult=list(DIM_MULT),
                                num_res_blocks=NUM_RES_BLOCKS, temperal_downsample=[False, True, True])


@contextlib.contextmanager
def cudnn_autotune(enabled: bool = True):
    """cuDNN times its algorithms per convolution shape (once per shape and process) instead of
    guessing: for the decoder's largest convs (padded channels-last input) its guess was an sm80
    kernel, and timing made the 704*384 decode 0.84x as long at the same peak (PERFORMANCE.md).
    Scoped to the VAE's calls, so the host process's own setting (ComfyUI's `--fast autotune`)
    holds for everything else. With `enabled` False the host's setting holds here too."""
    if not enabled:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def convert_state(state: dict[str, torch.Tensor], path: Path, expected: dict[str, torch.Size]) -> dict:
    out = {}
    for key, value in state.items():
        name = wan_to_diffusers_key(key)
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected VAE key {key!r}")
        if tuple(value.shape) != tuple(expected[name]):
            raise CheckpointError(f"{path}: {key!r} has shape {list(value.shape)}, expected {list(expected[name])}")
        out[name] = value
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} VAE keys missing (diffusers names, e.g. {missing[:3]})")
    return out


class WanVAE:
    """The VAE and how to run it: on a GPU in channels-last layout (NDHWC: cuDNN's tensor-core
    convolutions read it without a transpose), with timed cuDNN algorithms (`autotune_convs`;
    low_vram turns it off: its trial workspaces were not measured under that mode's memory cap),
    optionally through torch.compile."""

    def __init__(self, model, device, dtype):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.mean = torch.tensor(LATENT_MEAN, device=device).view(1, Z_DIM, 1, 1, 1)
        self.std = torch.tensor(LATENT_STD, device=device).view(1, Z_DIM, 1, 1, 1)
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() in (4, 5):
                        p.data = p.data.contiguous(memory_format=_CHANNELS_LAST[p.dim()])
        self.encoder, self.decoder = model.encoder, model.decoder     # or their compiled versions
        self.autotune_convs = self.device.type == "cuda"        # cuDNN: nothing to time on the CPU
        self.encode_frames_per_call, self.decode_latents_per_call = ENCODE_FRAMES_PER_CALL, DECODE_LATENTS_PER_CALL

    def enable_compile(self, backend="inductor") -> None:
        """Compile the encoder and decoder: fuses their norms, activations, padding and cache copies;
        0.55x diffusers' time (PERFORMANCE.md). diffusers' temporal upsampler compares its cache
        with the string "Rep", where dynamo breaks the decoder's graph (about a dozen pieces per
        call, each compiled once per chunk shape). Inductor's disk cache keeps them across runs."""
        from .block_ops import raise_recompile_limit
        raise_recompile_limit()
        self.encoder = torch.compile(self.model.encoder, backend=backend, dynamic=False)
        self.decoder = torch.compile(self.model.decoder, backend=backend, dynamic=False)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "WanVAE":
        path = Path(path)
        state = _read(path)
        model = build_vae(base_dim=state["encoder.conv1.weight"].shape[0])
        expected = {k: v.shape for k, v in model.state_dict().items()}
        converted = convert_state(state, path, expected)
        model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
        return cls(model.to(device).eval().requires_grad_(False), device, dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, frames_per_call: int | None = None) -> torch.Tensor:
        """[1, 3, T, H, W] in [−1, 1] -> normalised latents [1, 16, 1 + (T−1)//4, H/8, W/8] (float32).

        Like diffusers' `AutoencoderKLWan.encode` (which feeds the first frame, then 4 frames per
        call, and drops a trailing partial group), but `frames_per_call` frames per call after the
        first: the causal convs carry their cache across calls, so every multiple of 4 computes
        the same latents; larger calls keep the GPU busier (default: `encode_frames_per_call`)."""
        frames_per_call = self.encode_frames_per_call if frames_per_call is None else frames_per_call
        if frames_per_call <= 0 or frames_per_call % 4:
            raise ValueError(f"frames_per_call must be a positive multiple of 4 (the temporal compression), "
                             f"got {frames_per_call}")
        model = self.model
        video = self.layout(video[:, :, : 1 + 4 * ((video.shape[2] - 1) // 4)].to(self.device, self.dtype))
        chunks = _time_chunks(video, frames_per_call, first_alone=True)
        model.clear_cache()
        try:
            with cudnn_autotune(self.autotune_convs):
                out = []
                for chunk in chunks:
                    model._enc_conv_idx = [0]
                    out.append(self.encoder(chunk, feat_cache=model._enc_feat_map, feat_idx=model._enc_conv_idx))
                mu = model.quant_conv(torch.cat(out, dim=2))[:, :Z_DIM]
        finally:
            model.clear_cache()
        return (mu.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video [1, 3, T', H, W] in [−1, 1] (float32)."""
        return self.stream_decoder().decode(latents)

    def stream_decoder(self, latents_per_call: int | None = None) -> "StreamDecoder":
        return StreamDecoder(self, self.decode_latents_per_call if latents_per_call is None else latents_per_call)


def _time_chunks(x: torch.Tensor, size: int, first_alone: bool) -> list[torch.Tensor]:
    """x [B, C, T, H, W] cut along time into pieces of `size`, after a lone first frame if asked."""
    pieces = [x[:, :, :1]] if first_alone else []
    rest = x[:, :, 1:] if first_alone else x
    return pieces + [piece for piece in rest.split(size, dim=2) if piece.shape[2]]


class StreamDecoder:
    """Decodes consecutive latent chunks, keeping the causal conv caches between calls.

    diffusers decodes one latent per decoder call; any number gives the same frames as long as the
    stream's very first latent goes alone (its temporal upsampling differs: 1 frame, not 4), so
    after it `latents_per_call` latents go through each call."""

    def __init__(self, vae: WanVAE, latents_per_call: int):        # made by WanVAE.stream_decoder
        if latents_per_call < 1:
            raise ValueError(f"latents_per_call must be at least 1, got {latents_per_call}")
        self.vae, self.latents_per_call = vae, latents_per_call
        self.cache = [None] * vae.model._cached_conv_counts["decoder"]
        self.first = True

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [1, 16, T, h, w] -> frames [1, 3, T', H, W] in [−1, 1] (float32):
        1 frame for the very first latent of the stream, 4 for every later one."""
        vae = self.vae
        z = (latents.to(vae.device).float() * vae.std + vae.mean).to(vae.dtype)
        frames = []
        with cudnn_autotune(vae.autotune_convs):
            x = vae.model.post_quant_conv(vae.layout(z))
            for chunk in _time_chunks(x, self.latents_per_call, first_alone=self.first):
                frames.append(vae.decoder(chunk, feat_cache=self.cache, feat_idx=[0], first_chunk=self.first))
                self.first = False
        return torch.cat(frames, dim=2).float().clamp(-1, 1)

    def warm_up(self, latents: torch.Tensor) -> None:
        """Prime the caches with context latents whose frames are discarded (spec §3.7)."""
        self.decode(latents)


def write_tiny_vae(path: str | Path, *, base_dim: int = 8, seed: int = 0, fmt: str = "pth") -> Path:
    """A tiny random VAE with the ORIGINAL Wan key names (the published file's layout)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_vae(base_dim)
    generator = torch.Generator().manual_seed(seed)
    inverse = {}
    reference = {wan_to_diffusers_key(k): k for k in _wan_key_names(base_dim)}
    for name, tensor in model.state_dict().items():
        if name.endswith("gamma"):
            value = torch.ones(tensor.shape)
        elif name.endswith("bias"):
            value = torch.zeros(tensor.shape)
        else:
            fan_in = max(1, tensor[0].numel())
            value = torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5
        inverse[reference[name]] = value.contiguous()
    if fmt == "safetensors":
        save_file(inverse, str(path))
    else:
        torch.save(inverse, str(path))
    return path


def _wan_key_names(base_dim: int) -> list[str]:
    """The original Wan key names, derived from the diffusers names by inverting the mapping."""
    model = build_vae(base_dim)
    names = []
    for name in model.state_dict():
        for candidate in _candidates(name):
            if wan_to_diffusers_key(candidate) == name:
                names.append(candidate)
                break
        else:
            raise AssertionError(f"no Wan name maps to {name}")
    return names


def _candidates(name: str):
    """Plausible Wan spellings of a diffusers VAE name (used only to write test fixtures)."""
    rev_top = {v: k for k, v in _TOP.items()}
    for new, old in rev_top.items():
        if name.startswith(new):
            yield old + name[len(new):]
    rev_res = {v: k for k, v in _RESIDUAL.items()}
    base = name
    for new, old in rev_res.items():
        base = base.replace("." + new, "." + old)
    yield base
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", base)
    if m:
        part, kind, i, rest = m.groups()
        index = 1 if kind == "attentions" else (0 if i == "0" else 2)
        yield f"{part}.middle.{index}.{rest}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", base)
    if m:
        yield f"encoder.downsamples.{m.group(1)}.{m.group(2)}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", base)
    if m:
        block, j = int(m.group(1)), int(m.group(3)) if m.group(3) is not None else NUM_RES_BLOCKS + 1
        yield f"decoder.upsamples.{block * (NUM_RES_BLOCKS + 2) + j}.{m.group(4)}"
