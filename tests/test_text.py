"""umT5 text encoder: key conversion, strict loading, prompt cleaning, trimming, tiny fixtures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar_backend.errors import CheckpointError, InputError
from liveavatar_backend.text import (
    COMFY_SPIECE_KEY, PAD_ID, TEXT_LEN, TOKENIZER_SUBDIR, WAN_T5_FILE, SentencePieceTokenizer,
    TextEncoder, build_empty_umt5, check_names_and_shapes, clean_prompt, load_umt5_tokenizer,
    token_ids, umt5_config_from_shapes, wan_to_hf_name, write_tiny_umt5, write_tiny_umt5_comfy)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "liveavatar_dit_14b_keys.json"
PROMPT = "A young woman with short dark hair talks calmly and smiles."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("umt5")
    pth = write_tiny_umt5(root)
    fp16 = write_tiny_umt5_comfy(root / "umt5_xxl_fp16.safetensors")
    fp8 = write_tiny_umt5_comfy(root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", scaled_fp8=True)
    return {"root": root, "pth": pth, "fp16": fp16, "fp8": fp8, "tok": root / TOKENIZER_SUBDIR}


@pytest.fixture(scope="module")
def encoder(tiny):
    return TextEncoder.load(tiny["pth"], tiny["tok"], "cpu", torch.float32)


def wan_reference_encode(state: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Wan's T5Encoder forward (modules/t5.py), written from its description, in float32:
    RMS norm eps 1e-6, unscaled attention plus a per-layer bidirectional bucket bias,
    FFN fc2(fc1(x) * gelu_tanh(gate.0(x)))."""
    w = {k: v.float() for k, v in state.items()}
    n_heads = w["blocks.0.pos_embedding.embedding.weight"].shape[1]
    num_buckets = w["blocks.0.pos_embedding.embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def bucket(rel: int) -> int:
        half = num_buckets // 2
        out = half if rel > 0 else 0
        rel, exact = abs(rel), half // 2
        if rel < exact:
            return out + rel
        large = exact + int(math.log(rel / exact) / math.log(128 / exact) * (half - exact))
        return out + min(half - 1, large)

    n = len(ids)
    buckets = torch.tensor([[bucket(j - i) for j in range(n)] for i in range(n)])
    x = w["token_embedding.weight"][torch.tensor(ids)]
    for i in range(layers):
        b = f"blocks.{i}."
        h = rms(x, w[b + "norm1.weight"])
        q, k, v = (h @ w[b + f"attn.{m}.weight"].T for m in "qkv")
        q, k, v = (t.view(n, n_heads, -1).transpose(0, 1) for t in (q, k, v))
        bias = w[b + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1) @ v
        x = x + attn.transpose(0, 1).reshape(n, -1) @ w[b + "attn.o.weight"].T
        h = rms(x, w[b + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ w[b + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ w[b + "ffn.fc1.weight"].T) * gate) @ w[b + "ffn.fc2.weight"].T
    return rms(x, w["norm.weight"])


def test_encoding_matches_wan_reference_forward(tiny, encoder):
    state = torch.load(tiny["pth"], map_location="cpu", weights_only=True)
    ids = token_ids(encoder.tokenizer, PROMPT)  # unpadded: also checks the 512-padding is masked out
    out = encoder.encode(PROMPT)
    assert out.shape == (len(ids), 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, wan_reference_encode(state, ids), rtol=1e-4, atol=1e-4)


def test_pth_and_comfy_fp16_encode_identically(tiny, encoder):
    comfy = TextEncoder.load(tiny["fp16"], tiny["tok"], "cpu", torch.float32)
    assert torch.equal(comfy.encode(PROMPT), encoder.encode(PROMPT))


def test_comfy_scaled_fp8_is_dequantised_with_scale_weight(tiny, encoder):
    raw = load_file(str(tiny["fp8"]))
    key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    assert raw[key].dtype == torch.float8_e4m3fn and "scaled_fp8" in raw and COMFY_SPIECE_KEY in raw
    comfy = TextEncoder.load(tiny["fp8"], tiny["tok"], "cpu", torch.float32)
    loaded = comfy.model.state_dict()[key]
    torch.testing.assert_close(loaded, raw[key].float() * raw[key[:-6] + "scale_weight"], rtol=0, atol=0)
    exact = encoder.model.state_dict()[key]
    assert 0 < (loaded - exact).abs().max() <= exact.abs().max() / 8  # fp8 has 3 mantissa bits
    assert comfy.encode(PROMPT).shape == encoder.encode(PROMPT).shape


def test_bf16_output_and_real_length(tiny):
    enc = TextEncoder.load(tiny["pth"], tiny["tok"], "cpu", torch.bfloat16)
    ids = token_ids(enc.tokenizer, "Zoe smiles")
    assert ids[-1] == enc.tokenizer.eos_token_id == 1 and PAD_ID not in ids
    out = enc.encode("Zoe smiles")
    assert out.dtype == torch.bfloat16 and out.shape == (len(ids), 32)
    assert enc.model.shared.weight.dtype == torch.bfloat16


def test_tiny_vocab_equals_tokenizer_length(tiny, encoder):
    assert encoder.model.config.vocab_size == len(encoder.tokenizer)
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight  # one table
    assert sorted(encoder.tokenizer.get_vocab().values()) == list(range(len(encoder.tokenizer)))


@pytest.mark.parametrize("text", [PROMPT, "Zoe smiles, a lot!", "The anchorwoman reads the evening news.",
                                  "x" * 40, "Übermensch 12345 ,,,", "talks " * 600])
def test_comfy_spiece_tokenizer_matches_the_folder_tokenizer(tiny, encoder, text):
    spiece = SentencePieceTokenizer.from_checkpoint(tiny["fp16"])
    assert len(spiece) == len(encoder.tokenizer)
    assert token_ids(spiece, clean_prompt(text)) == token_ids(encoder.tokenizer, clean_prompt(text))


def test_comfy_file_alone_supplies_its_tokenizer(tiny, encoder):
    comfy = TextEncoder.load(tiny["fp16"], None, "cpu", torch.float32)
    assert isinstance(comfy.tokenizer, SentencePieceTokenizer)
    assert torch.equal(comfy.encode(PROMPT), encoder.encode(PROMPT))
    with pytest.raises(CheckpointError, match=f"no key '{COMFY_SPIECE_KEY}'") as info:
        TextEncoder.load(tiny["pth"], None, "cpu", torch.float32)
    assert str(tiny["pth"]) in str(info.value)


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  a &amp;lt;b&amp;gt;\t\n c   &amp;amp; d \u3000") == "a <b> c & d"
    assert clean_prompt("one\r\n\r\ntwo") == "one two"


def test_encode_cleans_the_prompt(encoder):
    messy = f"  {PROMPT.replace(' ', '  &#32;')}\n"
    torch.testing.assert_close(encoder.encode(messy), encoder.encode(PROMPT), rtol=0, atol=0)


@pytest.mark.parametrize("prompt", ["", "   \n\t", "&amp;#10;"])
def test_empty_prompt_is_input_error(encoder, prompt):
    with pytest.raises(InputError, match="prompt"):
        encoder.encode(prompt)


def test_long_prompt_is_truncated_to_512(encoder):
    long_prompt = " ".join(["talks"] * 700)
    assert len(encoder.tokenizer(long_prompt)["input_ids"]) > TEXT_LEN
    ids = token_ids(encoder.tokenizer, long_prompt)
    assert len(ids) == TEXT_LEN and ids[-1] == 1  # HF truncation keeps </s> last
    assert encoder.encode(long_prompt).shape == (TEXT_LEN, 32)


def test_unload_frees_the_model(tiny):
    enc = TextEncoder.load(tiny["pth"], tiny["tok"], "cpu", torch.float32)
    assert enc.to("cpu") is enc
    enc.unload()
    assert enc.model is None
    with pytest.raises(RuntimeError, match="unloaded"):
        enc.encode(PROMPT)


def _save_modified_pth(tiny, tmp_path, edit) -> Path:
    state = torch.load(tiny["pth"], map_location="cpu", weights_only=True)
    edit(state)
    path = tmp_path / WAN_T5_FILE
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.ffn.fc1.weight"), r"missing key 'blocks\.1\.ffn\.fc1\.weight'"),
    (lambda s: s.__setitem__("blocks.0.attn.k.weight", torch.zeros(32, 16)),
     r"'blocks\.0\.attn\.k\.weight' has shape \[32, 16\], expected \[32, 32\]"),
    (lambda s: s.__setitem__("blocks.0.attn.bias", torch.zeros(32)),
     r"unexpected key 'blocks\.0\.attn\.bias'"),
    (lambda s: s.__setitem__("blocks.2.norm1.weight", torch.ones(32)),  # a third block, incomplete
     r"missing key 'blocks\.2\.attn\.q\.weight'"),
    (lambda s: s.pop("blocks.0.ffn.gate.0.weight"), r"missing key 'blocks\.0\.ffn\.gate\.0\.weight'"),
    (lambda s: s.__setitem__("blocks.0.attn.q.weight", torch.zeros(30, 32)),
     r"'blocks\.0\.attn\.q\.weight' has 30 rows"),
])
def test_bad_wan_checkpoint_names_file_and_key(tiny, tmp_path, edit, message):
    path = _save_modified_pth(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        TextEncoder.load(path, tiny["tok"], "cpu", torch.float32)
    assert str(path) in str(info.value)


def test_bad_comfy_checkpoint_names_file_and_key(tiny, tmp_path):
    state = load_file(str(tiny["fp16"]))
    del state["encoder.final_layer_norm.weight"]
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing key 'encoder\.final_layer_norm\.weight'") as info:
        TextEncoder.load(path, tiny["tok"], "cpu", torch.float32)
    assert str(path) in str(info.value)


def test_comfy_file_with_tied_embedding_alias_loads(tiny, tmp_path, encoder):
    state = load_file(str(tiny["fp16"]))
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()  # as HF save_pretrained writes it
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file(state, str(path))
    loaded = TextEncoder.load(path, None, "cpu", torch.float32)
    assert torch.equal(loaded.encode(PROMPT), encoder.encode(PROMPT))


@pytest.mark.parametrize("name", ["pth", "fp16"])
def test_truncated_file_is_checkpoint_error(tiny, tmp_path, name):
    data = tiny[name].read_bytes()
    path = tmp_path / tiny[name].name
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="cannot read") as info:
        TextEncoder.load(path, tiny["tok"], "cpu", torch.float32)
    assert str(path) in str(info.value)


def test_missing_files_are_checkpoint_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer folder not found") as info:
        TextEncoder.load(tiny["pth"], tmp_path / "google" / "umt5-xxl", "cpu", torch.float32)
    assert str(tmp_path / "google" / "umt5-xxl") in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.load(tmp_path / WAN_T5_FILE, tiny["tok"], "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_umt5_tokenizer(tmp_path)  # exists but holds no tokenizer files


def test_tokenizer_larger_than_embedding_is_rejected(tiny, tmp_path):
    state = torch.load(tiny["pth"], map_location="cpu", weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"][:100]
    path = tmp_path / WAN_T5_FILE
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="100 rows"):
        TextEncoder.load(path, tiny["tok"], "cpu", torch.float32)


def test_full_size_manifest_converts_to_meta_umt5():
    if not MANIFEST.is_file():
        pytest.skip(f"manifest not present at {MANIFEST}")
    sections = json.loads(MANIFEST.read_text())["other_checkpoints"]
    (keys,) = [v["keys"] for k, v in sections.items() if k.startswith("t5_umt5_xxl_encoder")]
    assert len(keys) == 242
    shapes = {wan_to_hf_name(name): tuple(shape) for name, shape in keys}
    assert None not in shapes and len(shapes) == 242
    config = umt5_config_from_shapes(shapes, "manifest")
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_kv,
            config.d_ff, config.relative_attention_num_buckets) == (256384, 4096, 24, 64, 64, 10240, 32)
    model = build_empty_umt5(config)
    check_names_and_shapes(model, shapes, "manifest", is_wan=True)  # raises on any mismatch
    assert model.shared.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
