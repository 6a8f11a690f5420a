"""The Live Avatar LoRA (spec §1.2, §8.13, §11): every spelling merges to W + 0.5·B·A; anything
that does not fit the model fails loudly and leaves the model untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from liveavatar_backend.errors import CheckpointError
from liveavatar_backend.lora import (
    DEFAULT_LORA_SCALE, OFFICIAL_ALPHA, OFFICIAL_RANK, WRITE_SPELLINGS, expected_lora_modules,
    merge_lora, parse_lora_state, read_lora, validate_lora, write_tiny_lora)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "liveavatar_dit_14b_keys.json"
DIM, FFN, TEXT = 8, 12, 6                         # non-square FFN catches a transposed B·A


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q = nn.LayerNorm(DIM)
        self.norm_k = nn.LayerNorm(DIM)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM))
        self.self_attn, self.cross_attn = Attention(), Attention()
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, DIM))


class AdaLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIM, 2 * DIM)


class Injector(nn.Module):
    def __init__(self):
        super().__init__()
        self.injector = nn.ModuleList([Attention()])
        self.injector_adain_layers = nn.ModuleList([AdaLN()])


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(DIM, 4)


class StandInDiT(nn.Module):
    """The DiT's module names at toy size: 2 blocks, 1 audio injector, some non-target linears."""

    def __init__(self):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(TEXT, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.audio_injector = Injector()
        self.head = Head()


STANDIN_TARGETS = ([f"blocks.{b}.{a}.{p}" for b in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
                   + [f"blocks.{b}.ffn.{i}" for b in range(2) for i in (0, 2)]
                   + [f"audio_injector.injector.0.{p}" for p in "qkvo"])


@pytest.fixture
def model() -> StandInDiT:
    torch.manual_seed(0)
    return StandInDiT()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def reference_merge(before, lora, scale):
    """float64 W + scale·B·A for every adapted module."""
    return {m: before[f"{m}.weight"].double() + scale * (pair.up.double() @ pair.down.double())
            for m, pair in lora.items()}


def peft_state(model: nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(write_tiny_lora(tmp_path / "l.safetensors", model, rank=3)))


# ------------------------------------------------------------------------------------ target set
def test_expected_modules_are_the_peft_targets(model):
    assert sorted(expected_lora_modules(model)) == sorted(STANDIN_TARGETS)


def test_target_rule_matches_whole_name_segments():
    """PEFT: the name equals a target or ends in '.<target>'; only nn.Linear is adapted here."""
    tree = nn.Module()
    tree.q = nn.Linear(2, 2)                                   # equal to a target
    tree.a = nn.Module()
    tree.a.proj_k = nn.Linear(2, 2)                            # ends in 'k' but not '.k'
    tree.a.xffn = nn.Sequential(nn.Linear(2, 2))               # 'a.xffn.0' is not '.ffn.0'
    tree.a.ffn = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))
    tree.b = nn.Module()
    tree.b.v = nn.Conv1d(2, 2, 1)                              # a target name, but not a linear
    assert expected_lora_modules(tree) == ["q", "a.ffn.0", "a.ffn.2"]


# -------------------------------------------------------------------------------- good spellings
@pytest.mark.parametrize("spelling", sorted(WRITE_SPELLINGS))
def test_every_spelling_merges_w_plus_half_ba(model, tmp_path, spelling):
    path = write_tiny_lora(tmp_path / "lora.safetensors", model, rank=4, spelling=spelling, seed=3)
    lora = read_lora(path)
    assert sorted(lora) == sorted(STANDIN_TARGETS)
    assert all(p.down.shape[0] == 4 and p.up.shape[1] == 4 and p.alpha is None for p in lora.values())
    before = snapshot(model)
    expected = reference_merge(before, lora, 0.5)
    assert min((expected[m] - before[f"{m}.weight"].double()).abs().max() for m in lora) > 1e-3
    report = merge_lora(model, lora, path_for_errors=path)
    assert (report.modules_merged, report.ranks, report.scales, report.targets_not_in_lora) == (24, (4,), (0.5,), 0)
    after = model.state_dict()
    for m in lora:
        torch.testing.assert_close(after[f"{m}.weight"].double(), expected[m], rtol=0, atol=1e-6)
    untouched = [k for k in before if k.removesuffix(".weight") not in lora]
    assert "head.head.weight" in untouched and "text_embedding.0.weight" in untouched
    assert all(torch.equal(after[k], before[k]) for k in untouched)


def test_default_scale_is_the_official_alpha_over_rank():
    assert DEFAULT_LORA_SCALE == OFFICIAL_ALPHA / OFFICIAL_RANK == 0.5


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_files_read_like_safetensors(model, tmp_path, suffix):
    from_st = read_lora(write_tiny_lora(tmp_path / "a.safetensors", model, seed=5))
    from_pt = read_lora(write_tiny_lora(tmp_path / f"a{suffix}", model, seed=5))
    assert sorted(from_st) == sorted(from_pt)
    assert all(torch.equal(from_st[m].down, from_pt[m].down) and torch.equal(from_st[m].up, from_pt[m].up)
               for m in from_st)


def test_alpha_in_the_file_sets_the_scale_and_explicit_scale_wins(model, tmp_path):
    lora = read_lora(write_tiny_lora(tmp_path / "k.safetensors", model, rank=4, alpha=1.0, spelling="kohya"))
    assert {p.alpha for p in lora.values()} == {1.0}
    before = snapshot(model)
    report = merge_lora(model, lora)
    assert report.scales == (0.25,)                 # alpha / rank = 1 / 4
    for m, w in reference_merge(before, lora, 0.25).items():
        torch.testing.assert_close(model.get_submodule(m).weight.double(), w, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    fresh = StandInDiT()
    assert merge_lora(fresh, lora, scale=2.0).scales == (2.0,)
    for m, w in reference_merge(before, lora, 2.0).items():
        torch.testing.assert_close(fresh.get_submodule(m).weight.double(), w, rtol=0, atol=1e-6)


def test_bf16_weights_are_rounded_once(model, tmp_path):
    model.to(torch.bfloat16)
    lora = read_lora(write_tiny_lora(tmp_path / "l.safetensors", model, rank=4))
    before = snapshot(model)
    merge_lora(model, lora)
    for m, w in reference_merge(before, lora, 0.5).items():
        merged = model.get_submodule(m).weight
        assert merged.dtype == torch.bfloat16
        # rounding the exact result once: at most one bf16 step (2^-7 relative) from it, mostly equal
        torch.testing.assert_close(merged.double(), w.to(torch.bfloat16).double(), rtol=2 ** -7, atol=1e-30)
        assert (merged.double() != w.to(torch.bfloat16).double()).float().mean() < 0.05


@pytest.mark.parametrize("prefix,suffixes", [
    ("model.diffusion_model.", (".lora_A.weight", ".lora_B.weight")),
    ("diffusion_model.", (".lora_A.default.weight", ".lora_B.default.weight")),
    ("lora_unet__", (".lora_down.weight", ".lora_up.weight")),      # Wan-Fun (comfy/lora_convert.py)
])
def test_other_prefixes_normalise_to_module_names(model, tmp_path, prefix, suffixes):
    peft = peft_state(model, tmp_path)
    renamed = {}
    for key, tensor in peft.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        stem = prefix + (module.replace(".", "_") if prefix.startswith("lora_unet") else module)
        renamed[stem + suffixes[".lora_B." in key]] = tensor
    lora = parse_lora_state(renamed, "x.safetensors")
    assert sorted(lora) == sorted(STANDIN_TARGETS)
    assert torch.equal(lora["audio_injector.injector.0.q"].up,
                       peft["base_model.model.audio_injector.injector.0.q.lora_B.default.weight"])


# ------------------------------------------------------------------------------- loud failures
def test_a_lora_for_another_model_fails_and_changes_nothing(model, tmp_path):
    foreign = {f"transformer_blocks.{i}.attn.to_q.lora_{r}.weight": torch.ones(2, 2)
               for i in range(3) for r in "AB"}
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"other\.safetensors.*no LoRA key matches.*transformer_blocks"):
        merge_lora(model, parse_lora_state(foreign, "other.safetensors"))
    assert_unchanged(model, before)


def test_a_key_for_a_missing_module_fails_before_any_merge(model, tmp_path):
    state = peft_state(model, tmp_path)              # the bad module comes last: nothing may be merged
    state["base_model.model.blocks.5.self_attn.q.lora_A.default.weight"] = torch.ones(3, DIM)
    state["base_model.model.blocks.5.self_attn.q.lora_B.default.weight"] = torch.ones(DIM, 3)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*blocks\.5\.self_attn\.q\.lora_A.*does not have"):
        merge_lora(model, parse_lora_state(state, "bad.safetensors"))
    assert_unchanged(model, before)


def test_wrong_shape_fails_and_changes_nothing(model, tmp_path):
    state = peft_state(model, tmp_path)
    state["base_model.model.blocks.1.ffn.2.lora_A.default.weight"] = torch.ones(3, DIM)   # in should be FFN
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*blocks\.1\.ffn\.2\.lora_A.*\[8, 8\].*\[8, 12\]"):
        merge_lora(model, parse_lora_state(state, "s.safetensors"))
    assert_unchanged(model, before)


def test_a_non_linear_target_fails(model, tmp_path):
    state = {"blocks.0.norm3.lora_A.default.weight": torch.ones(2, DIM),
             "blocks.0.norm3.lora_B.default.weight": torch.ones(DIM, 2)}
    with pytest.raises(CheckpointError, match=r"n\.pt.*blocks\.0\.norm3.*LayerNorm, not an nn\.Linear"):
        validate_lora(model, parse_lora_state(state, "n.pt"))


def test_meta_weights_are_refused(tmp_path):
    with torch.device("meta"):
        empty = StandInDiT()
    lora = read_lora(write_tiny_lora(tmp_path / "l.safetensors", StandInDiT()))
    validate_lora(empty, lora)                        # names and shapes fit
    with pytest.raises(CheckpointError, match="meta device"):
        merge_lora(empty, lora)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("base_model.model.blocks.0.ffn.0.lora_B.default.weight"),
     r"blocks\.0\.ffn\.0\.lora_A\.default\.weight.*no matching up"),
    (lambda s: s.pop("base_model.model.blocks.0.ffn.0.lora_A.default.weight"),
     r"blocks\.0\.ffn\.0\.lora_B\.default\.weight.*no matching down"),
    (lambda s: s.update({"base_model.model.blocks.0.self_attn.k.lora_B.default.weight": torch.ones(DIM, 2)}),
     r"self_attn\.k\.lora_A.*\(3, 8\).*\(8, 2\).*same rank"),
    (lambda s: s.update({"blocks.0.self_attn.k.lora_A.weight": torch.ones(3, DIM)}), "mixes LoRA key spellings"),
    (lambda s: s.update({"base_model.model.blocks.0.self_attn.k.dora_scale": torch.ones(DIM)}),
     r"unexpected key 'base_model\.model\.blocks\.0\.self_attn\.k\.dora_scale'"),
    (lambda s: s.update({"base_model.model.blocks.0.self_attn.k.alpha": torch.tensor(3.0)}),
     r"no \.alpha while others"),
    (lambda s: s.update({"base_model.model.blocks.3.self_attn.k.alpha": torch.tensor(3.0)}),
     r"blocks\.3\.self_attn\.k\.alpha.*no matching down"),
    (lambda s: s.update({"base_model.model.blocks.0.self_attn.k.lora_A.default.weight": torch.ones(3, DIM, 1)}),
     r"self_attn\.k\.lora_A.*do not form a LoRA pair"),
])
def test_broken_files_are_refused_naming_file_and_key(model, tmp_path, change, message):
    state = peft_state(model, tmp_path)
    change(state)
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*" + message):
        parse_lora_state(state, "broken.safetensors")


def test_truncated_and_missing_files_are_checkpoint_errors(model, tmp_path):
    path = write_tiny_lora(tmp_path / "cut.safetensors", model)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*cannot read"):
        read_lora(path)
    with pytest.raises(CheckpointError, match=r"absent\.safetensors.*not found"):
        read_lora(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="no tensors"):
        parse_lora_state({}, "empty.safetensors")


# ------------------------------------------------------------------------- the published names
@pytest.fixture(scope="module")
def manifest():
    if not MANIFEST.exists():
        pytest.skip(f"{MANIFEST} not found (it lives in ../shared beside the checkout)")
    return json.loads(MANIFEST.read_text())


def meta_linears_from_manifest(keys: dict[str, list[int]]) -> nn.Module:
    """A module tree holding an nn.Linear (on meta) wherever the DiT manifest has weight+bias 2-D."""
    root = nn.Module()
    for name, shape in keys.items():
        stem = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2 or f"{stem}.bias" not in keys:
            continue
        parent = root
        *path, leaf = stem.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(shape[1], shape[0], device="meta"))
    return root


def test_manifest_lora_names_parse_to_the_448_targets(manifest):
    spec = manifest["lora_expected_keys"]
    assert (spec["rank"], spec["lora_alpha"], spec["merge_scale_alpha_over_r"]) == (
        OFFICIAL_RANK, OFFICIAL_ALPHA, DEFAULT_LORA_SCALE)
    state = {name: torch.empty(shape, device="meta") for name, shape in spec["keys"]}
    assert len(state) == spec["num_tensors"] == 896
    lora = parse_lora_state(state, "liveavatar.safetensors")
    assert len(lora) == spec["num_target_modules"] == 448
    dit = dict(manifest["keys"])
    for module, pair in lora.items():
        assert pair.down.shape[0] == pair.up.shape[1] == OFFICIAL_RANK
        assert dit[f"{module}.weight"] == [pair.up.shape[0], pair.down.shape[1]]
    tree = meta_linears_from_manifest(dit)
    assert sorted(expected_lora_modules(tree)) == sorted(lora)
    validate_lora(tree, lora)
    assert sum(m.startswith("audio_injector.injector.") for m in lora) == 48


def test_the_real_dit_has_the_448_targets(manifest):
    from liveavatar_backend.config import DiTConfig
    from liveavatar_backend.loading import build_empty_dit
    model = build_empty_dit(DiTConfig.wan_s2v_14b())
    state = {name: torch.empty(shape, device="meta") for name, shape in manifest["lora_expected_keys"]["keys"]}
    lora = parse_lora_state(state, "liveavatar.safetensors")
    assert sorted(expected_lora_modules(model)) == sorted(lora)
    validate_lora(model, lora)
