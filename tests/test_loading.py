"""`loading.assemble_dit`: the DiT with its LoRA merged and FP8 linears, built one layer group at a
time so that the bf16 model is never on the device whole (32.6 GB at 14B: more than the 24 GB cards
of 'low_vram'), with the values of loading whole, merging and converting."""
import weakref

import pytest
import torch
from torch import nn

from liveavatar_backend.errors import CheckpointError
from liveavatar_backend.fixtures import tiny_dit, write_sharded_dit
from liveavatar_backend.fp8 import FP8_SKIPPED, convert_to_fp8
from liveavatar_backend.loading import assemble_dit, dit_parameter_groups, load_dit
from liveavatar_backend.memory_budget import dit_weight_bytes
from liveavatar_backend.lora import expected_lora_modules, merge_lora, read_lora, write_tiny_lora
from liveavatar_backend.pipeline_schedule import stage_layers
from liveavatar_backend.stage import stage_parameters


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    model = tiny_dit(seed=3)
    write_sharded_dit(model, folder / "Wan2.2-S2V-14B")
    lora = write_tiny_lora(folder / "liveavatar.safetensors", model, rank=4, spelling="peft", seed=3)
    return folder / "Wan2.2-S2V-14B", lora, model.cfg


def _bits(state: dict) -> dict:
    return {name: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for name, t in state.items()}


def _high_precision_linears(model: nn.Module) -> list[str]:
    """Loaded nn.Linear layers that the FP8 conversion would have replaced."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and not m.weight.is_meta
            and not any(s in name for s in FP8_SKIPPED)]


def test_fp8_assembly_equals_loading_whole_merging_and_converting(checkpoint):
    folder, lora_path, cfg = checkpoint
    whole = load_dit(folder)
    merge_lora(whole, read_lora(lora_path), path_for_errors=lora_path)
    convert_to_fp8(whole, out_dtype=torch.float32)
    assembled = assemble_dit(lambda keep: load_dit(folder, cfg=cfg, keep=keep), cfg, fp8=True,
                             lora=read_lora(lora_path), lora_path=lora_path, out_dtype=torch.float32)
    ours, theirs = _bits(assembled.state_dict()), _bits(whole.state_dict())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not _high_precision_linears(assembled)


def test_fp8_assembly_holds_one_group_in_high_precision_at_a_time(checkpoint):
    """When a group is read, every earlier group's high-precision weights are gone (freed, not
    only replaced), and each read holds exactly one group."""
    folder, lora_path, cfg = checkpoint
    groups, high_precision = dit_parameter_groups(cfg), []

    def make_part(keep):
        assert all(ref() is None for ref in high_precision)
        part = load_dit(folder, cfg=cfg, keep=keep)
        loaded = [name for name, t in part.state_dict().items() if not t.is_meta]
        assert sum(all(group(name) for name in loaded) for group in groups) == 1     # one group exactly
        modules = dict(part.named_modules())
        high_precision.extend(weakref.ref(modules[name].weight) for name in _high_precision_linears(part))
        return part
    model = assemble_dit(make_part, cfg, fp8=True, lora=read_lora(lora_path), lora_path=lora_path)
    assert len(high_precision) > cfg.num_layers and all(ref() is None for ref in high_precision)
    assert not _high_precision_linears(model)


@pytest.mark.parametrize("fp8", [True, False])
def test_the_weight_estimate_is_what_the_assembled_model_holds(checkpoint, fp8):
    """`memory_budget.dit_weight_bytes`, which refuses loads that cannot fit, counts what loading makes:
    what the model holds, and the most it held while a group was read."""
    folder, lora_path, cfg = checkpoint
    parts, live = [], []

    def make_part(keep):              # what the device holds when a group has been read
        parts.append(load_dit(folder, cfg=cfg, keep=keep, dtype=torch.float32))
        tensors = {t.data_ptr(): t for part in parts for t in part.state_dict().values() if not t.is_meta}
        live.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return parts[-1]
    model = assemble_dit(make_part, cfg, fp8=fp8, lora=read_lora(lora_path), lora_path=lora_path,
                         out_dtype=torch.float32)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert dit_weight_bytes(cfg, fp8=fp8, dtype=torch.float32) == (held, max(live + [held]))
    if fp8:
        assert held < 0.8 * dit_weight_bytes(cfg, fp8=False, dtype=torch.float32)[0]     # linears at 1 byte, not 4


@pytest.mark.parametrize("fp8", [True, False])
def test_a_pipeline_stage_gets_its_layer_range_and_nothing_else(checkpoint, fp8):
    """The middle rank of three (as a pipeline worker loads it): its parameters equal the whole
    model's, everything else stays on the meta device."""
    folder, lora_path, cfg = checkpoint
    layers = stage_layers(cfg.num_layers, 3)[1]
    keep = stage_parameters(cfg, layers, first=False, last=False)

    def build(keep_range):
        return assemble_dit(lambda wanted: load_dit(folder, cfg=cfg, keep=wanted), cfg, fp8=fp8,
                            lora=read_lora(lora_path), lora_path=lora_path, keep=keep_range)
    ours, theirs = _bits(build(keep).state_dict()), _bits(build(None).state_dict())
    assert any(not keep(name) for name in ours) and any(keep(name) for name in ours)
    for name, tensor in ours.items():
        if keep(name):
            assert torch.equal(tensor, theirs[name]), name
        else:
            assert tensor.is_meta, name


def test_a_lora_that_adapts_only_some_modules_fails_before_any_layer_is_read(checkpoint, tmp_path):
    folder, _, cfg = checkpoint
    model = tiny_dit(seed=0)
    attention_only = [name for name in expected_lora_modules(model) if "audio" not in name and "ffn" not in name]
    partial = write_tiny_lora(tmp_path / "partial.safetensors", model, rank=4, modules=attention_only)
    reads = []
    with pytest.raises(CheckpointError, match=rf"partial.safetensors: adapts {len(attention_only)} of the "
                                              rf"{len(expected_lora_modules(model))} modules"):
        assemble_dit(lambda keep: reads.append(keep) or load_dit(folder, cfg=cfg, keep=keep), cfg, fp8=False,
                     lora=read_lora(partial), lora_path=partial)
    assert reads == []


def test_a_mismatched_lora_fails_before_any_layer_is_read(checkpoint, tmp_path):
    folder, _, cfg = checkpoint
    other = tiny_dit(seed=0)
    other.blocks[0].self_attn.q = nn.Linear(cfg.dim, cfg.dim + 8)      # a LoRA for another shape
    bad = write_tiny_lora(tmp_path / "bad.safetensors", other, rank=4, spelling="peft")
    reads = []
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        assemble_dit(lambda keep: reads.append(keep) or load_dit(folder, cfg=cfg, keep=keep), cfg, fp8=True,
                     lora=read_lora(bad), lora_path=bad)
    assert reads == []


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_comfyui_scaled_fp8_single_file_loads_with_or_without_the_checkpoint_prefix(checkpoint, tmp_path, prefix):
    """ComfyUI marks scaled-fp8 files with a `scaled_fp8` key, prefixed like every other key in a
    full checkpoint; the marker and the `.scale_weight` factors are not parameters of the model."""
    from safetensors.torch import save_file
    _, _, cfg = checkpoint
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in tiny_dit(seed=4).state_dict().items()}
    name = "blocks.0.ffn.0.weight"
    scale = state[name].float().abs().max() / 448
    stored = {prefix + k: v for k, v in state.items()}
    stored[prefix + name] = (state[name].float() / scale).to(torch.float8_e4m3fn)
    stored[prefix + name.replace(".weight", ".scale_weight")] = scale.reshape(())
    stored[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan2.2_s2v_14B_fp8_scaled.safetensors"
    save_file(stored, str(path))
    loaded = load_dit(path, dtype=torch.float32, cfg=cfg).state_dict()
    assert set(loaded) == set(state)
    expected = stored[prefix + name].float() * scale
    assert torch.allclose(loaded[name], expected, rtol=1e-2) and torch.equal(loaded["head.head.weight"],
                                                                             state["head.head.weight"].float())


def test_the_load_reports_its_progress_and_stops_where_the_callback_raises(tiny_models):
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.loading import LoadProgress
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
    for memory_mode in ("quality", "balanced"):           # whole, and one layer group at a time
        heard = []
        LiveAvatarEngine.load(spec, device="cpu", memory_mode=memory_mode, progress=heard.append)
        assert heard == sorted(set(heard)) and heard[-1] == 1.0          # rising, at most once per percent
        dit_part = [f for f in heard if f <= LoadProgress.DIT_SHARE]
        assert len(dit_part) > 10 and dit_part[-1] == LoadProgress.DIT_SHARE       # tensor by tensor
        text_done = LoadProgress.DIT_SHARE + LoadProgress.TEXT_SHARE
        assert len([f for f in heard if LoadProgress.DIT_SHARE < f < text_done]) > 5     # the text encoder's too
        assert text_done in heard
        vae_done = text_done + LoadProgress.VAE_SHARE                 # the last stretch moves too
        assert [f for f in heard if f > text_done] == [vae_done, vae_done + LoadProgress.AUDIO_SHARE, 1.0]

    class Stop(Exception):
        pass

    def stop_at_a_third(fraction):
        if fraction > 0.33:
            raise Stop
        heard.append(fraction)
    heard = []
    with pytest.raises(Stop):
        LiveAvatarEngine.load(spec, device="cpu", memory_mode="quality", progress=stop_at_a_third)
    assert heard and max(heard) <= 0.33
