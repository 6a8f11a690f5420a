"""`make-tiny-checkpoints`: tiny random checkpoints in the exact published layouts.

Same file names, folder names and key names as the real downloads, small dimensions. Every test,
the CI and the ComfyUI smoke run load these through the real loading code.

    OUT/Wan2.2-S2V-14B/                          (Wan-AI/Wan2.2-S2V-14B)
        config.json
        diffusion_pytorch_model-0000N-of-00004.safetensors, diffusion_pytorch_model.safetensors.index.json
        models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/
        Wan2.1_VAE.pth
        wav2vec2-large-xlsr-53-english/
    OUT/liveavatar.safetensors                    (Quark-Vision/Live-Avatar, PEFT names)
    OUT/comfyui/{diffusion_models,text_encoders,vae,audio_encoders,loras}/…   (ComfyUI repackaged files)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .audio import write_tiny_wav2vec2, write_tiny_wav2vec2_comfy
from .config import DiTConfig
from .engine import T5_FILE, VAE_FILE, WAV2VEC_DIR
from .lora import write_tiny_lora
from .loading import DIT_INDEX_NAME
from .model import LiveAvatarDiT
from .text import write_tiny_umt5, write_tiny_umt5_comfy
from .vae import write_tiny_vae

CHECKPOINT_DIR = "Wan2.2-S2V-14B"
LORA_FILE = "liveavatar.safetensors"
NUM_SHARDS = 4                                 # the published DiT comes in 4 shards
SHARD_NAME = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"
TINY_LORA_RANK = 4
TINY_VAE_BASE_DIM = 4                          # the CPU cost of tests is mostly VAE convolutions
COMFY_FILES = {                                # ComfyUI's repackaged file names (Comfy-Org/Wan_2.2_ComfyUI_Repackaged)
    "dit": "diffusion_models/wan2.2_s2v_14B_bf16.safetensors",
    "text": "text_encoders/umt5_xxl_fp16.safetensors",
    "vae": "vae/wan_2.1_vae.safetensors",
    "audio": "audio_encoders/wav2vec2_large_english_fp16.safetensors",
    "lora": "loras/liveavatar.safetensors",
}


def tiny_dit(seed: int = 0) -> LiveAvatarDiT:
    torch.manual_seed(seed)
    return LiveAvatarDiT(DiTConfig.tiny()).eval()


def write_sharded_dit(model: LiveAvatarDiT, folder: Path, num_shards: int = NUM_SHARDS) -> None:
    """config.json + N bf16 safetensors shards + the index, named like the published files (a
    model on the GPU is copied to host memory one shard at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.cfg.to_json_dict(), indent=2))
    names = list(model.state_dict())
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    weight_map = {}
    per_shard = -(-len(names) // num_shards)
    for shard in range(num_shards):
        keys = names[shard * per_shard: (shard + 1) * per_shard]
        file = SHARD_NAME.format(shard + 1, num_shards)
        save_file({k: state[k].cpu() for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / DIT_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))


def make_tiny_checkpoints(out: str | Path, seed: int = 0) -> Path:
    out = Path(out)
    folder = out / CHECKPOINT_DIR
    model = tiny_dit(seed)
    write_sharded_dit(model, folder)
    write_tiny_umt5(folder, d_model=model.cfg.text_dim, seed=seed)
    write_tiny_vae(folder / VAE_FILE, base_dim=TINY_VAE_BASE_DIM, seed=seed, fmt="pth")
    write_tiny_wav2vec2(folder / WAV2VEC_DIR, hidden=model.cfg.audio_dim, layers=model.cfg.audio_layers - 1,
                        seed=seed)
    write_tiny_lora(out / LORA_FILE, model, rank=TINY_LORA_RANK, spelling="peft", seed=seed)

    comfy = out / "comfyui"
    for rel in COMFY_FILES.values():
        (comfy / rel).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(comfy / COMFY_FILES["dit"]))
    write_tiny_umt5_comfy(comfy / COMFY_FILES["text"], d_model=model.cfg.text_dim, seed=seed)
    write_tiny_vae(comfy / COMFY_FILES["vae"], base_dim=TINY_VAE_BASE_DIM, seed=seed, fmt="safetensors")
    write_tiny_wav2vec2_comfy(comfy / COMFY_FILES["audio"], hidden=model.cfg.audio_dim,
                              layers=model.cfg.audio_layers - 1, seed=seed)
    write_tiny_lora(comfy / COMFY_FILES["lora"], model, rank=TINY_LORA_RANK, spelling="kohya", seed=seed)
    (out / "README.txt").write_text(
        "TINY RANDOM SMOKE MODEL — random weights in the published file layouts, made by\n"
        "`python -m liveavatar_backend make-tiny-checkpoints`. It produces noise, not an avatar.\n")
    return out


def random_dit(cfg: DiTConfig, device, dtype=torch.bfloat16, seed: int = 0, keep=None) -> LiveAvatarDiT:
    """The DiT with random weights (std 0.02, norms 1, biases 0) made directly on `device`, for
    benchmarks at full size without a checkpoint. Each tensor is drawn from a generator seeded by
    its name, so a device holding a layer range (`keep`) gets the same values as the whole model."""
    import zlib
    from .loading import build_empty_dit
    model = build_empty_dit(cfg)
    state = {}
    for name, meta in model.state_dict().items():
        if keep is not None and not keep(name):
            continue
        tensor = torch.empty(meta.shape, dtype=torch.float32, device=device)
        if name.endswith("bias"):
            tensor.zero_()
        elif "norm" in name and tensor.dim() == 1:
            tensor.fill_(1.0)
        else:
            generator = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=keep is None, assign=True)
    return model.eval().requires_grad_(False)
