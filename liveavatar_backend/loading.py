"""Finding and strictly loading the DiT checkpoint (spec §1.1, §9).

Accepted layouts:
* the published Wan2.2-S2V-14B folder: `config.json`, `diffusion_pytorch_model.safetensors.index.json`
  and the shards it names (`diffusion_pytorch_model-0000N-of-00004.safetensors`);
* ComfyUI's repackaged single file (`wan2.2_s2v_14B_bf16.safetensors` / `_fp16` / `_fp8_scaled`),
  with or without the `model.diffusion_model.` prefix; scaled-fp8 weights (`.scale_weight`) are
  dequantised (weight × scale) so that the LoRA merge sees real weights.

Loading is strict: every expected key present exactly once, nothing unexpected, every shape right.
`assemble_dit` adds the LoRA merge and the FP8 conversion (in FP8, one layer group at a time).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .config import DiTConfig
from .errors import CheckpointError
from .model import LiveAvatarDiT

DIT_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIT_CONFIG_NAME = "config.json"
COMFY_PREFIX = "model.diffusion_model."        # ComfyUI's full-checkpoint prefix
SCALED_FP8_MARKER = "scaled_fp8"               # ComfyUI marker key of scaled-fp8 files
SCALE_SUFFIX = ".scale_weight"                 # per-tensor dequantisation factor (comfy/ops.py)
INPUT_SCALE_SUFFIX = ".scale_input"            # activation scale, unused here


def build_empty_dit(cfg: DiTConfig) -> LiveAvatarDiT:
    """The DiT with its parameters on the meta device (no memory), ready for `assign` loading."""
    with torch.device("meta"):
        return LiveAvatarDiT(cfg)


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in build_empty_dit(cfg).state_dict().items()}


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as exc:   # safetensors raises its own error type for truncated / corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); "
                              "the download may be incomplete — download it again") from None


def _shard_map(folder: Path) -> dict[str, str]:
    index_path = folder / DIT_INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"{index_path}: missing; the Wan2.2-S2V-14B folder must contain it "
                              "next to the diffusion_pytorch_model-0000N-of-00004.safetensors shards") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a safetensors index ({exc})") from None
    return weight_map


def _iter_folder(folder: Path) -> Iterator[tuple[str, Path, object]]:
    """(key, file, open handle) for every key of a sharded folder, checking the index against the shards."""
    weight_map = _shard_map(folder)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        path = folder / shard
        if not path.exists():
            raise CheckpointError(f"{path}: shard missing (the index lists {len(keys)} keys in it, e.g. "
                                  f"{keys[0]!r}); download every diffusion_pytorch_model-*.safetensors file")
        handle = _open_safetensors(path)
        present = set(handle.keys())
        for key in keys:
            if key not in present:
                raise CheckpointError(f"{path}: key {key!r} listed in {DIT_INDEX_NAME} is not in this shard")
            yield key, path, handle


def _iter_single_file(path: Path) -> Iterator[tuple[str, Path, object]]:
    handle = _open_safetensors(path)
    keys = list(handle.keys())
    prefixed = all(k.startswith(COMFY_PREFIX) for k in keys if k != SCALED_FP8_MARKER)
    for key in keys:
        name = key[len(COMFY_PREFIX):] if prefixed else key     # a full checkpoint prefixes its marker too
        if name == SCALED_FP8_MARKER or name.endswith(SCALE_SUFFIX) or name.endswith(INPUT_SCALE_SUFFIX):
            continue
        yield name, path, (handle, key)


def read_tensor(entry, name: str) -> torch.Tensor:
    """Read one tensor (dequantising ComfyUI scaled fp8) from a (_iter_*) entry."""
    if isinstance(entry, tuple):
        handle, key = entry
        tensor = handle.get_tensor(key)
        scale_key = key[: -len(".weight")] + SCALE_SUFFIX if key.endswith(".weight") else None
        if scale_key and scale_key in handle.keys():
            tensor = tensor.to(torch.float32) * handle.get_tensor(scale_key).to(torch.float32)
        return tensor
    return entry.get_tensor(name)


def dit_config_for(path: Path) -> DiTConfig:
    """The DiT configuration of a checkpoint folder (config.json) or single file (14B values)."""
    if path.is_dir():
        return DiTConfig.from_json(path / DIT_CONFIG_NAME)
    sibling = path.with_suffix(".json")
    return DiTConfig.from_json(sibling) if sibling.exists() else DiTConfig.wan_s2v_14b()


def _header_shape(entry, name: str) -> tuple[int, ...]:
    handle, key = entry if isinstance(entry, tuple) else (entry, name)
    return tuple(handle.get_slice(key).get_shape())


def load_dit(path: str | Path, *, device="cpu", dtype=torch.bfloat16, cfg: DiTConfig | None = None,
             keep: Callable[[str], bool] | None = None, on_read: Callable[[int], None] | None = None) -> LiveAvatarDiT:
    """Load the DiT from a Wan2.2-S2V-14B folder or a single safetensors file, strictly.

    Tensors are read one at a time, converted and placed on `device`; `on_read` hears each one's
    element count (a progress bar; it may raise to stop). With `keep`, only the parameters it
    accepts are read (a GPU holding a range of layers); the others stay on the meta device, but
    every key is still checked for presence and shape."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; point it at the Wan2.2-S2V-14B folder or a "
                              "wan2.2_s2v_14B*.safetensors file")
    cfg = cfg or dit_config_for(path)
    model = build_empty_dit(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    entries = _iter_folder(path) if path.is_dir() else _iter_single_file(path)
    loaded: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name, file, entry in entries:
        if name not in shapes:
            raise CheckpointError(f"{file}: unexpected key {name!r}; this is not a Wan2.2-S2V-14B DiT "
                                  "checkpoint (or it was saved by a different model class)")
        if name in seen:
            raise CheckpointError(f"{file}: key {name!r} appears twice")
        seen.add(name)
        if keep is not None and not keep(name):
            shape = _header_shape(entry, name)
        else:
            try:
                tensor = read_tensor(entry, name)
            except Exception as exc:
                raise CheckpointError(f"{file}: cannot read {name!r} ({exc}); the file may be truncated") from None
            shape = tuple(tensor.shape)
            loaded[name] = tensor.to(device=device, dtype=dtype)
            if on_read is not None:
                on_read(tensor.numel())
        if shape != shapes[name]:
            raise CheckpointError(f"{file}: {name!r} has shape {list(shape)}, expected "
                                  f"{list(shapes[name])} for {cfg.dim=} {cfg.num_layers=}")
    missing = [name for name in shapes if name not in seen]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} DiT keys missing, e.g. {missing[:3]}; "
                              "the checkpoint is incomplete or of another model")
    model.load_state_dict(loaded, strict=keep is None, assign=True)
    return model.eval().requires_grad_(False)


class LoadProgress:
    """A model set's load as fractions 0..1 for a progress bar, said at most once per percent; the
    DiT's and the text encoder's parts move with every tensor read (a split DiT's with its workers'
    reports), the VAE and the audio encoder each move it once. `say` may raise (ComfyUI's interrupt)
    to stop the load."""
    # shares of the load's time: the full-size set on one H100, four loads (quality and balanced, from
    # the page cache and cold; PERFORMANCE.md, 2026-12-07): DiT 52 %, umT5 28 %, the rest 20 %
    DIT_SHARE, TEXT_SHARE = 0.52, 0.28
    # the rest split as the full-size files load on a CPU (VAE 0.48 s with its model built, wav2vec2
    # 0.18 s; 2026-12-08); the last 3 %, for the compile and graph checks after them, is a guess
    VAE_SHARE, AUDIO_SHARE = 0.12, 0.05

    def __init__(self, say: Callable[[float], None] | None, cfg: DiTConfig):
        self._say = say
        self._cfg = cfg
        self._dit_elements = None          # counted at the first tensor read
        self._read = 0
        self._percent = -1

    def dit_read(self, elements: int) -> None:
        if self._dit_elements is None:
            self._dit_elements = sum(math.prod(shape) for shape in expected_shapes(self._cfg).values())
        self._read += elements
        self._at(self.DIT_SHARE * min(1.0, self._read / self._dit_elements))

    def dit_done(self) -> None:
        self._at(self.DIT_SHARE)

    def text_encoder_read(self, fraction: float) -> None:
        self._at(self.DIT_SHARE + self.TEXT_SHARE * fraction)

    def text_encoder_done(self) -> None:
        self._at(self.DIT_SHARE + self.TEXT_SHARE)

    def vae_done(self) -> None:
        self._at(self.DIT_SHARE + self.TEXT_SHARE + self.VAE_SHARE)

    def audio_encoder_done(self) -> None:
        self._at(self.DIT_SHARE + self.TEXT_SHARE + self.VAE_SHARE + self.AUDIO_SHARE)

    def done(self) -> None:
        self._at(1.0)

    def _at(self, fraction: float) -> None:
        percent = int(100 * fraction)
        if self._say is not None and percent > self._percent:
            self._percent = percent
            self._say(fraction)


def dit_parameter_groups(cfg: DiTConfig) -> list[Callable[[str], bool]]:
    """The order `assemble_dit` builds the DiT in: everything outside the blocks, then each block."""
    def block(i: int) -> Callable[[str], bool]:
        prefix = f"blocks.{i}."
        return lambda name: name.startswith(prefix)
    return [lambda name: not name.startswith("blocks.")] + [block(i) for i in range(cfg.num_layers)]


def assemble_dit(make_part: Callable[[Callable[[str], bool] | None], LiveAvatarDiT], cfg: DiTConfig, *,
                 fp8: bool, lora=None, lora_scale: float | None = None, lora_path=None,
                 keep: Callable[[str], bool] | None = None, out_dtype=torch.bfloat16) -> LiveAvatarDiT:
    """The DiT with its LoRA merged and, with `fp8`, its linears in FP8 (`fp8.convert_to_fp8`).

    `make_part(keep)` gives the DiT holding the parameters `keep` accepts (all for None), the rest on
    the meta device: `load_dit` of a checkpoint, or `fixtures.random_dit`. `keep` here limits the
    whole model (a device's layer range). The LoRA is checked whole before anything is read.

    With `fp8` the model is built one parameter group (`dit_parameter_groups`) at a time, each merged
    and converted before the next is read: the 14B DiT takes about 17 GB with FP8 linears but 32.6 GB
    in bf16, so reading it whole before converting would not fit the 24 GB cards that 'low_vram' is
    for. The device holds the converted groups plus one group in bf16 (at most 4.5 GB: the one outside
    the blocks, with the time projection and the audio injectors) and the temporaries of one linear
    (its float32 copy during the LoRA merge, its quantisation). The values are those of reading
    everything, merging (first, as the official code does) and converting."""
    from .fp8 import convert_to_fp8
    from .lora import check_lora_covers_model, merge_lora, validate_lora
    if lora is not None:
        whole = build_empty_dit(cfg)
        validate_lora(whole, lora, path_for_errors=lora_path)
        check_lora_covers_model(whole, lora, path_for_errors=lora_path)

    def read_and_merge(wanted):
        part = make_part(wanted)
        adapted = lora.subset(lambda module: wanted is None or wanted(module + ".weight")) if lora else None
        if adapted:
            merge_lora(part, adapted, scale=lora_scale, path_for_errors=lora_path)
        return part
    if not fp8:
        return read_and_merge(keep)
    names = list(expected_shapes(cfg))
    model = None
    for index, group in enumerate(dit_parameter_groups(cfg)):
        wanted = group if keep is None else (lambda name, group=group: group(name) and keep(name))
        if not any(wanted(name) for name in names):
            continue                                   # a layer of another device
        part = read_and_merge(wanted)
        convert_to_fp8(part, out_dtype=out_dtype)
        if model is None:
            model = part
        else:                                          # group index > 0: block index - 1
            model.blocks[index - 1] = part.blocks[index - 1]
        del part
    return model
