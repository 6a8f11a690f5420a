"""The Live Avatar LoRA (spec §1.2): reading it in every spelling it circulates in, and merging it.

The published `liveavatar.safetensors` (Quark-Vision/Live-Avatar) is a PEFT LoRA of rank 128,
alpha 64, on 448 linears of the DiT (896 tensors). The official loader adds `base_model.model.`
when missing and loads non-strictly, so a file spelled any other way (e.g. without PEFT's
`.default.` adapter infix, or in ComfyUI/kohya style) is silently NOT merged and the distilled
4-step model quietly turns into the undistilled one (spec §1.2, §11). Here every spelling is
normalised to plain DiT module names, and anything that does not fit the model fails loudly.

Accepted key spellings, `<module>` being the DiT module path (e.g. `blocks.0.self_attn.q`):
* prefixes: `base_model.model.` (PEFT), none, `diffusion_model.`, `model.diffusion_model.`
  (ComfyUI), `lora_unet_` / `lora_unet__` (kohya / Wan-Fun, dots written as underscores);
* suffixes: `.lora_A.default.weight`/`.lora_B.default.weight` (PEFT), `.lora_A.weight`/
  `.lora_B.weight` (PEFT without adapter name, diffusers), `.lora_down.weight`/`.lora_up.weight`
  (kohya), plus an optional per-module scalar `.alpha` (then scale = alpha / rank, as ComfyUI).
One file uses one spelling; mixing them is treated as a broken file.

The merge happens before any FP8 conversion (spec §1.4, §8.13): W ← W + scale·B·A, computed in
float32 on the weight's device and rounded once to the weight's dtype. PEFT merges in the weight
dtype (bf16); the difference is below one bf16 rounding step.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import CheckpointError

OFFICIAL_RANK = 128                      # s2v_causal_sft.yaml lora_rank (spec §1.2)
OFFICIAL_ALPHA = 64.0                    # s2v_causal_sft.yaml lora_alpha (spec §1.2)
DEFAULT_LORA_SCALE = OFFICIAL_ALPHA / OFFICIAL_RANK   # 0.5: plain LoRA scaling, not rsLoRA
TARGET_MODULES = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # LoraConfig target_modules (spec §1.2)

# Longest prefixes first so that `model.diffusion_model.` is not read as `diffusion_model.`.
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
UNDERSCORE_PREFIXES = ("lora_unet__", "lora_unet_")   # `lora_unet__`: Wan-Fun (comfy/lora_convert.py)
SUFFIXES = {                              # suffix -> (spelling family, role)
    ".lora_A.default.weight": ("peft", "down"), ".lora_B.default.weight": ("peft", "up"),
    ".lora_A.weight": ("peft_nodefault", "down"), ".lora_B.weight": ("peft_nodefault", "up"),
    ".lora_down.weight": ("kohya", "down"), ".lora_up.weight": ("kohya", "up"),
}
ALPHA_SUFFIX = ".alpha"
# DiT name segments that contain underscores; needed to turn `lora_unet_blocks_0_self_attn_q`
# back into `blocks.0.self_attn.q` (spec §2.9 key families).
UNDERSCORED_SEGMENTS = ("self_attn", "cross_attn", "audio_injector", "injector_adain_layers",
                        "casual_audio_encoder", "final_linear", "text_embedding", "time_embedding",
                        "time_projection", "norm_q", "norm_k", "frame_packer", "cond_encoder",
                        "patch_embedding", "trainable_cond_mask", "conv1_local", "conv1_global",
                        "proj_2x", "proj_4x")
WRITE_SPELLINGS = {                       # write_tiny_lora spelling -> (prefix, down suffix, up suffix)
    "peft": ("base_model.model.", ".lora_A.default.weight", ".lora_B.default.weight"),
    "peft_noprefix": ("", ".lora_A.default.weight", ".lora_B.default.weight"),
    "peft_nodefault": ("base_model.model.", ".lora_A.weight", ".lora_B.weight"),
    "comfy": ("diffusion_model.", ".lora_down.weight", ".lora_up.weight"),
    "kohya": ("lora_unet_", ".lora_down.weight", ".lora_up.weight"),
}


class LoraPair(NamedTuple):
    """One adapted linear: down = A [rank, in], up = B [out, rank], alpha from the file or None."""
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


class LoraWeights(dict[str, LoraPair]):
    """{DiT module name: LoraPair}, plus the file it came from and each module's original key."""

    def __init__(self, pairs: Mapping[str, LoraPair], source: str, keys: Mapping[str, str]):
        super().__init__(pairs)
        self.source, self.keys = source, dict(keys)

    def subset(self, keep_module) -> "LoraWeights":
        """The modules `keep_module(name)` accepts (one device's layer range when sharded)."""
        return LoraWeights({m: p for m, p in self.items() if keep_module(m)}, self.source, self.keys)


@dataclass(frozen=True)
class MergeReport:
    modules_merged: int
    ranks: tuple[int, ...]                # distinct ranks (one value for the official LoRA)
    scales: tuple[float, ...]             # distinct scales used
    targets_not_in_lora: int              # expected target modules the file does not adapt

    def __str__(self) -> str:
        return (f"merged LoRA into {self.modules_merged} modules (rank {'/'.join(map(str, self.ranks))}, "
                f"scale {'/'.join(f'{s:g}' for s in self.scales)})")


def _module_from_underscores(name: str) -> str:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` (kohya writes every dot as an underscore)."""
    tokens, parts, i = name.split("_"), [], 0
    compounds = sorted((s.split("_") for s in UNDERSCORED_SEGMENTS), key=len, reverse=True)
    while i < len(tokens):
        match = next((c for c in compounds if tokens[i:i + len(c)] == c), [tokens[i]])
        parts.append("_".join(match))
        i += len(match)
    return ".".join(parts)


def _split_key(key: str, source: str) -> tuple[str, str, str, str]:
    """key -> (prefix, module, family, role); role is 'down', 'up' or 'alpha'."""
    for suffix, (family, role) in SUFFIXES.items():
        if key.endswith(suffix):
            stem = key[:-len(suffix)]
            break
    else:
        if not key.endswith(ALPHA_SUFFIX):
            raise CheckpointError(
                f"{source}: unexpected key {key!r}: a LoRA key ends in .lora_A[.default].weight, "
                f".lora_B[.default].weight, .lora_down.weight, .lora_up.weight or .alpha")
        stem, family, role = key[:-len(ALPHA_SUFFIX)], "", "alpha"
    for prefix in UNDERSCORE_PREFIXES:
        if stem.startswith(prefix):
            return prefix.rstrip("_") + "_", _module_from_underscores(stem[len(prefix):]), family, role
    prefix = next((p for p in DOTTED_PREFIXES if stem.startswith(p)), "")
    return prefix, stem[len(prefix):], family, role


def parse_lora_state(state: Mapping[str, torch.Tensor], source: str | Path) -> LoraWeights:
    """Normalise a LoRA state dict (any accepted spelling) to {module: LoraPair}; strict."""
    source = str(source)
    if not state:
        raise CheckpointError(f"{source}: the LoRA file holds no tensors")
    split = {}
    spellings: dict[tuple[str, str], str] = {}
    prefixes: dict[str, str] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: key {key!r} is a {type(tensor).__name__}, not a tensor")
        split[key] = prefix, module, family, role = _split_key(key, source)
        prefixes.setdefault(prefix, key)
        if family:
            spellings.setdefault((prefix, family), key)
    if len(spellings) > 1 or len(prefixes) > 1:
        examples = sorted(set(spellings.values()) | set(prefixes.values()))[:3]
        raise CheckpointError(f"{source}: mixes LoRA key spellings (e.g. {', '.join(map(repr, examples))}); "
                              "a LoRA file uses one spelling throughout")
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, (_, module, _, role) in split.items():
        slot = found.setdefault(module, {})
        if role in slot:
            raise CheckpointError(f"{source}: keys {slot[role][0]!r} and {key!r} both name the {role} "
                                  f"weight of module {module!r}")
        slot[role] = (key, state[key])
    pairs, keys = {}, {}
    for module, slot in found.items():
        for role, other in (("down", "up"), ("up", "down"), ("alpha", "down")):
            if role in slot and other not in slot:
                raise CheckpointError(f"{source}: key {slot[role][0]!r} has no matching {other} "
                                      f"(LoRA {'A' if other == 'down' else 'B'}) weight for module {module!r}")
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise CheckpointError(f"{source}: keys {down_key!r} {tuple(down.shape)} and {up_key!r} "
                                  f"{tuple(up.shape)} do not form a LoRA pair: expected A [rank, in] "
                                  "and B [out, rank] with the same rank")
        alpha = None
        if "alpha" in slot:
            alpha_key, alpha_tensor = slot["alpha"]
            if alpha_tensor.numel() != 1:
                raise CheckpointError(f"{source}: key {alpha_key!r} has shape {tuple(alpha_tensor.shape)}; "
                                      "expected a scalar alpha")
            alpha = float(alpha_tensor.item())
        pairs[module], keys[module] = LoraPair(down, up, alpha), down_key
    with_alpha = [m for m, p in pairs.items() if p.alpha is not None]
    if with_alpha and len(with_alpha) != len(pairs):
        missing = next(m for m, p in pairs.items() if p.alpha is None)
        raise CheckpointError(f"{source}: module {keys[missing]!r} has no .alpha while others have one; "
                              "the scale would be ambiguous")
    return LoraWeights(pairs, source, keys)


def read_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA from .safetensors (or .pt/.pth/.bin, loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        elif path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: unknown LoRA file type; expected .safetensors, .pt, .pth or .bin")
    except CheckpointError:
        raise
    except Exception as exc:                   # truncated/corrupt file: say which and why
        raise CheckpointError(f"{path}: cannot read the LoRA file ({exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(state).__name__}")
    return parse_lora_state(state, path)


def expected_lora_modules(model: nn.Module) -> list[str]:
    """The linears PEFT targets: named exactly like a target or ending in '.<target>' (spec §1.2)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and any(name == t or name.endswith("." + t) for t in TARGET_MODULES)]


def validate_lora(model: nn.Module, lora: LoraWeights, *, path_for_errors: str | Path | None = None) -> None:
    """Check every LoRA module exists in `model` as an nn.Linear of the right shape; changes nothing."""
    source = str(path_for_errors or getattr(lora, "source", "LoRA"))
    keys = getattr(lora, "keys", {})
    if not lora:
        raise CheckpointError(f"{source}: the LoRA adapts no modules")
    modules = dict(model.named_modules())
    if not any(name in modules for name in lora):
        first = keys.get(next(iter(lora)), next(iter(lora)))
        raise CheckpointError(f"{source}: no LoRA key matches a module of the model (first key {first!r}); "
                              f"expected names like 'blocks.0.self_attn.q' for the Live Avatar DiT")
    for name, pair in lora.items():
        key = keys.get(name, name)
        target = modules.get(name)
        if target is None:
            raise CheckpointError(f"{source}: key {key!r} names module {name!r}, which the model does not have")
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"{source}: key {key!r} targets {name!r}, a {type(target).__name__}, not an "
                                  "nn.Linear (the LoRA must be merged before FP8 conversion)")
        expected = (pair.up.shape[0], pair.down.shape[1])
        if tuple(target.weight.shape) != expected:
            raise CheckpointError(f"{source}: key {key!r}: B·A has shape {list(expected)} but {name}.weight "
                                  f"is {list(target.weight.shape)}")


def check_lora_covers_model(model: nn.Module, lora: LoraWeights, *,
                            path_for_errors: str | Path | None = None) -> None:
    """The Live Avatar LoRA adapts every target linear of the DiT (896 tensors, spec §1.2); a file
    that adapts only some of them (truncated, converted without the audio injectors, made for
    another model) would be half applied, so it is refused."""
    source = str(path_for_errors or getattr(lora, "source", "LoRA"))
    expected = expected_lora_modules(model)
    missing = [name for name in expected if name not in lora]
    if missing:
        raise CheckpointError(f"{source}: adapts {len(expected) - len(missing)} of the {len(expected)} modules the "
                              f"Live Avatar LoRA adapts; missing e.g. {', '.join(missing[:3])}. The file may "
                              "be truncated or made for another model: download liveavatar.safetensors again "
                              "(Quark-Vision/Live-Avatar)")


def merge_lora(model: nn.Module, lora: LoraWeights, *, scale: float | None = None,
               path_for_errors: str | Path | None = None) -> MergeReport:
    """W ← W + scale·B·A for every module, after validating all of them (the model is left
    untouched when anything does not fit). scale=None: alpha/rank where the file carries alpha,
    else 0.5 (the official α/r). One module at a time, so no second copy of the model is made."""
    source = str(path_for_errors or getattr(lora, "source", "LoRA"))
    validate_lora(model, lora, path_for_errors=source)
    modules = dict(model.named_modules())
    for name in lora:
        if modules[name].weight.is_meta:
            raise CheckpointError(f"{source}: {name}.weight is not loaded (meta device); load the DiT first")
    scales, ranks = set(), set()
    with torch.no_grad():
        for name, pair in lora.items():
            weight = modules[name].weight
            rank = pair.down.shape[0]
            module_scale = scale if scale is not None else (
                pair.alpha / rank if pair.alpha is not None else DEFAULT_LORA_SCALE)
            merged = weight.detach().to(torch.float32, copy=True)
            merged.addmm_(pair.up.to(weight.device, torch.float32), pair.down.to(weight.device, torch.float32),
                          alpha=module_scale)
            weight.copy_(merged)                 # the single rounding to the weight's dtype
            scales.add(float(module_scale))
            ranks.add(int(rank))
    missing = len(set(expected_lora_modules(model)) - set(lora))
    return MergeReport(len(lora), tuple(sorted(ranks)), tuple(sorted(scales)), missing)


def write_tiny_lora(path: str | Path, model: nn.Module, *, rank: int = 4, alpha: float | None = None,
                    spelling: str = "peft", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    modules: Iterable[str] | None = None) -> Path:
    """Random A/B (and optionally `.alpha`) for every target module of `model`, in one of the
    spellings of WRITE_SPELLINGS, for tests and the tiny smoke checkpoints. B is random rather
    than PEFT's zero init so that a merge visibly changes the model."""
    if spelling not in WRITE_SPELLINGS:
        raise ValueError(f"spelling must be one of {sorted(WRITE_SPELLINGS)}, not {spelling!r}")
    prefix, down_suffix, up_suffix = WRITE_SPELLINGS[spelling]
    linears = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in (expected_lora_modules(model) if modules is None else modules):
        out_features, in_features = linears[name].weight.shape
        stem = prefix + (name.replace(".", "_") if prefix.startswith("lora_unet") else name)
        down = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
        up = torch.randn(out_features, rank, generator=generator) * 0.05
        state[stem + down_suffix], state[stem + up_suffix] = down.to(dtype), up.to(dtype)
        if alpha is not None:
            state[stem + ALPHA_SUFFIX] = torch.tensor(float(alpha))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path
