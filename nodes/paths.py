"""Where the pack finds model files, through ComfyUI's folder_paths.

* `models/liveavatar/`: the Wan2.2-S2V-14B folder as published (any folder holding a config.json
  and the DiT shards) and the Live Avatar LoRA `liveavatar.safetensors`.
* ComfyUI's own folders for the repackaged single files: `diffusion_models` (wan2.2_s2v_14B_*),
  `text_encoders` (umt5_xxl_*), `vae` (wan_2.1_vae*), `audio_encoders` (wav2vec2_large_english*),
  `loras` (the LoRA, also accepted there).
"""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

LIVEAVATAR_FOLDER = "liveavatar"
FROM_FOLDER = "(from checkpoint folder)"
NO_LORA = "none"
CHECKPOINT_MARKER = "config.json"            # a Wan2.2-S2V-14B folder has it next to its DiT shards
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def register_model_folders() -> None:
    """Add models/liveavatar (merged with any extra_model_paths.yaml entries, not replacing them)."""
    default = os.path.join(folder_paths.models_dir, LIVEAVATAR_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(LIVEAVATAR_FOLDER, ([], set()))
    if default not in paths:
        paths = [default, *paths]
    # an empty extension set would mean "all files"; the LoRA list wants weights files only
    folder_paths.folder_names_and_paths[LIVEAVATAR_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def checkpoint_folders() -> list[str]:
    """Names (relative to a liveavatar folder) of every folder that looks like Wan2.2-S2V-14B."""
    found = []
    for root in folder_paths.get_folder_paths(LIVEAVATAR_FOLDER):
        base = Path(root)
        if not base.is_dir():
            continue
        for marker in base.rglob(DIT_INDEX):
            found.append(marker.parent.relative_to(base).as_posix())
    return sorted(set(found))


def single_file_dits() -> list[str]:
    return [f for f in folder_paths.get_filename_list("diffusion_models") if "s2v" in f.lower()]


def checkpoint_choices() -> list[str]:
    return checkpoint_folders() + single_file_dits()


def resolve_checkpoint(name: str) -> Path:
    for root in folder_paths.get_folder_paths(LIVEAVATAR_FOLDER):
        candidate = Path(root) / name
        if (candidate / DIT_INDEX).exists():
            return candidate
    path = folder_paths.get_full_path("diffusion_models", name)
    if path is None:
        raise ValueError(f"checkpoint {name!r} not found: put the Wan2.2-S2V-14B folder in "
                         f"models/{LIVEAVATAR_FOLDER}/ or a wan2.2_s2v_14B file in models/diffusion_models/")
    return Path(path)


def lora_choices() -> list[str]:
    """LoRA files of models/liveavatar and models/loras, without the checkpoint folders' own weights."""
    inside_checkpoints = tuple(f"{folder}/" for folder in checkpoint_folders() if folder != ".")
    ours = {name for name in folder_paths.get_filename_list(LIVEAVATAR_FOLDER)
            if not name.replace(os.sep, "/").startswith(inside_checkpoints)}
    return [NO_LORA] + sorted(ours | set(folder_paths.get_filename_list("loras")))


def resolve_lora(name: str) -> Path | None:
    if name == NO_LORA:
        return None
    path = folder_paths.get_full_path(LIVEAVATAR_FOLDER, name) or folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"LoRA {name!r} not found in models/{LIVEAVATAR_FOLDER}/ or models/loras/")
    return Path(path)


def component_choices(folder: str) -> list[str]:
    return [FROM_FOLDER] + folder_paths.get_filename_list(folder)


def resolve_component(folder: str, name: str) -> Path | None:
    """None means: take it from the checkpoint folder."""
    if name == FROM_FOLDER:
        return None
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name!r} not found in models/{folder}/")
    return Path(path)
