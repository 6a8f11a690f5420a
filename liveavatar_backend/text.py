"""umT5-XXL text encoder: Wan's `.pth` or ComfyUI's single file → transformers `UMT5EncoderModel`.

Live Avatar encodes the prompt once per run with the umT5-XXL encoder in bf16 and hands the DiT
the hidden states of the real tokens only (spec §1.1, §1.3, §2.2, §3.3); the DiT zero-pads them
to 512 rows itself. Wan ships its own T5 module; transformers' UMT5 computes the same function
(RMS norms with eps 1e-6, no attention scaling, a relative-position bias table in every layer,
bidirectional buckets with max distance 128, gated tanh-GELU FFN), so we load the weights into
`UMT5EncoderModel` under the HF names and keep no T5 code of our own.

Wan's FFN is `fc2(fc1(x) * gelu(gate.0(x)))`; HF's is `wo(gelu(wi_0(x)) * wi_1(x))`, hence
gate.0 → wi_0, fc1 → wi_1, fc2 → wo (Wan `modules/t5.py` T5FeedForward vs HF UMT5DenseGatedActDense).
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .errors import CheckpointError, InputError

try:  # the official cleaner runs ftfy first; it is optional here (not a dependency of the pack)
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"     # spec §1.1 (Wan2.2-S2V-14B ckpt_dir)
TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"      # spec §1.1: AutoTokenizer folder inside ckpt_dir
TEXT_LEN = 512                                      # spec §3.3: tokenise to 512 with padding + truncation
REL_POS_MAX_DISTANCE = 128                          # Wan t5.py T5RelativeEmbedding(max_dist=128)
RMS_NORM_EPS = 1e-6                                 # Wan t5.py T5LayerNorm(eps=1e-6)
REL_POS_BUCKETS = 32                                # Wan t5.py umt5_xxl(num_buckets=32)
FP8_MAX = 448.0                                     # largest finite float8_e4m3fn value
_TIED_EMBEDDING = "encoder.embed_tokens.weight"     # HF alias of shared.weight (same module)
_COMFY_FP8_EXTRAS = (".scale_weight", ".scale_input")  # ComfyUI comfy/ops.py scaled_fp8_ops buffers
_COMFY_FP8_MARKER = "scaled_fp8"                    # ComfyUI sd3_clip.t5_xxl_detect marker key
COMFY_SPIECE_KEY = "spiece_model"                   # ComfyUI sd.py (CLIPType.WAN): tokenizer bytes
PAD_ID = 0                                          # umT5 <pad> (</s> is 1); masked out, so any id would do

# Wan name ↔ HF name; "{i}" is the block index.
_KEY_TABLE = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    ("blocks.{i}.attn.q.weight", "encoder.block.{i}.layer.0.SelfAttention.q.weight"),
    ("blocks.{i}.attn.k.weight", "encoder.block.{i}.layer.0.SelfAttention.k.weight"),
    ("blocks.{i}.attn.v.weight", "encoder.block.{i}.layer.0.SelfAttention.v.weight"),
    ("blocks.{i}.attn.o.weight", "encoder.block.{i}.layer.0.SelfAttention.o.weight"),
    ("blocks.{i}.pos_embedding.embedding.weight",
     "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
)


def _translate(key: str, src: int) -> str | None:
    """Map `key` from column `src` (0 = Wan, 1 = HF) of _KEY_TABLE to the other column."""
    for row in _KEY_TABLE:
        pattern = r"(\d+)".join(re.escape(part) for part in row[src].split("{i}"))
        match = re.fullmatch(pattern, key)
        if match:
            return row[1 - src].replace("{i}", match.group(1)) if match.groups() else row[1 - src]
    return None


def wan_to_hf_name(key: str) -> str | None:
    return _translate(key, 0)


def hf_to_wan_name(key: str) -> str | None:
    return _translate(key, 1)


def _file_key(hf: str, is_wan: bool) -> str:
    """How an HF-named tensor is spelled in the file, for error messages."""
    return (hf_to_wan_name(hf) or hf) if is_wan else hf


def clean_prompt(prompt: str) -> str:
    """Wan's `whitespace` cleaning: ftfy (if installed), html-unescape twice, collapse whitespace."""
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    text = ftfy.fix_text(prompt) if ftfy is not None else prompt
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- reading the checkpoint file
def _open_tensors(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """Names → shapes, and a getter that reads one tensor at a time (mmap / safetensors slices),
    so an 11 GB file is never held twice in memory."""
    if not path.is_file():
        raise CheckpointError(f"{path}: text encoder file not found (expected {WAN_T5_FILE} "
                              "or a ComfyUI umt5_xxl_*.safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            handle = safe_open(str(path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            return shapes, handle.get_tensor
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        raise CheckpointError(f"{path}: cannot read the file (truncated or not a checkpoint): {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def _hf_to_file_names(names: list[str], path: Path) -> tuple[dict[str, str], bool]:
    """HF name → key in the file. A file with any Wan-named key is read as Wan's layout."""
    is_wan = any(wan_to_hf_name(key) for key in names)
    mapping: dict[str, str] = {}
    for key in names:
        if is_wan:
            hf = wan_to_hf_name(key)
            if hf is None:
                raise CheckpointError(f"{path}: unexpected key {key!r} in a Wan umT5 checkpoint")
        elif key in (_COMFY_FP8_MARKER, COMFY_SPIECE_KEY):
            continue
        elif key.endswith(_COMFY_FP8_EXTRAS):
            if key.rsplit(".", 1)[0] + ".weight" not in names:
                raise CheckpointError(f"{path}: unexpected key {key!r} (no matching .weight)")
            continue
        else:
            hf = key
        mapping[hf] = key
    if _TIED_EMBEDDING in mapping:  # HF-saved files repeat the embedding under its tied alias
        mapping.setdefault("shared.weight", mapping[_TIED_EMBEDDING])
        del mapping[_TIED_EMBEDDING]
    return mapping, is_wan


def umt5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], path: Path | str,
                            is_wan: bool = False) -> UMT5Config:
    """Infer the encoder hyper-parameters from HF-named shapes, so tiny test files load with the
    same code as the 5.7 B original."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{path}: missing key {_file_key(key, is_wan)!r} "
                                  "(needed to infer the umT5 config)")
        return shapes[key]

    vocab, d_model = shape("shared.weight")
    attn = "encoder.block.0.layer.0.SelfAttention."
    num_buckets, num_heads = shape(attn + "relative_attention_bias.weight")
    inner = shape(attn + "q.weight")[0]
    if inner % num_heads:
        raise CheckpointError(f"{path}: key {_file_key(attn + 'q.weight', is_wan)!r} has {inner} rows, "
                              f"not a multiple of the {num_heads} heads of the position bias")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, num_heads=num_heads,
        d_ff=shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0], num_layers=max(blocks) + 1,
        relative_attention_num_buckets=num_buckets, relative_attention_max_distance=REL_POS_MAX_DISTANCE,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=RMS_NORM_EPS, dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_empty_umt5(config: UMT5Config) -> UMT5EncoderModel:
    """The model on the meta device: no memory until real tensors are assigned."""
    with torch.device("meta"):
        return UMT5EncoderModel(config)


def check_names_and_shapes(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]],
                           path: Path | str, is_wan: bool) -> None:
    """Strict comparison of HF-named file shapes with the model; messages use the file's names."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _TIED_EMBEDDING}
    for hf, want in expected.items():
        if hf not in shapes:
            raise CheckpointError(f"{path}: missing key {_file_key(hf, is_wan)!r} "
                                  f"(expected shape {list(want)})")
        if shapes[hf] != want:
            raise CheckpointError(f"{path}: key {_file_key(hf, is_wan)!r} has shape {list(shapes[hf])}, "
                                  f"expected {list(want)}")
    for hf in shapes:
        if hf not in expected:
            raise CheckpointError(f"{path}: unexpected key {_file_key(hf, is_wan)!r}")


def load_umt5_encoder(path: Path | str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, *, pin_memory: bool = False,
                      on_read: Callable[[float], None] | None = None) -> UMT5EncoderModel:
    """Strictly load Wan's `.pth` or ComfyUI's fp16 / scaled-fp8 safetensors into UMT5EncoderModel.

    ComfyUI's scaled fp8 stores each Linear `weight` in float8 plus a scalar `scale_weight`
    (default 1); the real weight is weight.float() * scale_weight (comfy/ops.py convert_weight).

    `pin_memory` page-locks each host tensor as it is read (a `.pth` is memory-mapped, so for it
    this is where the file is read); `on_read` hears the fraction of the file's elements done so
    far after each tensor, and may raise to stop the load.
    """
    path = Path(path)
    shapes_in_file, read = _open_tensors(path)
    hf_to_file, is_wan = _hf_to_file_names(list(shapes_in_file), path)
    shapes = {hf: shapes_in_file[key] for hf, key in hf_to_file.items()}
    model = build_empty_umt5(umt5_config_from_shapes(shapes, path, is_wan))
    check_names_and_shapes(model, shapes, path, is_wan)

    state: dict[str, torch.Tensor] = {}
    total, done = sum(math.prod(shape) for shape in shapes.values()), 0
    for hf, key in hf_to_file.items():
        try:
            tensor = read(key)
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale_key = key.rsplit(".", 1)[0] + ".scale_weight"
                scale = read(scale_key).float() if scale_key in shapes_in_file else torch.tensor(1.0)
                tensor = tensor.float() * scale
            tensor = tensor.to(device=device, dtype=dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # a file cut short inside the data region fails here
            raise CheckpointError(f"{path}: cannot read key {key!r}: {exc}") from exc
        # page-locked host memory can run out: that error is not the file's
        state[hf] = tensor.pin_memory() if pin_memory else tensor
        done += tensor.numel()
        if on_read is not None:
            on_read(done / total)
    if _TIED_EMBEDDING in model.state_dict():
        state[_TIED_EMBEDDING] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    # transformers 5 gives the encoder its own embedding module (4.x shares one): share it again
    # so that .to(device) moves one 2 GB table, not two
    model.encoder.embed_tokens = model.shared
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: tensors left unloaded: {leftover[:5]}")
    return model.eval().requires_grad_(False)


def load_umt5_tokenizer(folder: Path | str):
    """The `google/umt5-xxl` tokenizer folder of the model folder, loaded offline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found (expected {TOKENIZER_SUBDIR} "
                              "inside the Wan2.2-S2V-14B folder, with tokenizer.json / spiece.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/TypeError for broken folders
        raise CheckpointError(f"{folder}: cannot load the umT5 tokenizer: {exc}") from exc


class SentencePieceTokenizer:
    """ComfyUI's umT5 files carry their sentencepiece model as a uint8 tensor `spiece_model`;
    ComfyUI tokenises with it directly (no BOS, EOS appended: comfy/text_encoders/spiece_tokenizer.py),
    so a ComfyUI-only install needs no tokenizer folder."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece  # a ComfyUI requirement; only needed on this path
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto, add_eos=True)

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> "SentencePieceTokenizer":
        path = Path(path)
        shapes, read = _open_tensors(path)
        if COMFY_SPIECE_KEY not in shapes:
            raise CheckpointError(f"{path}: no key {COMFY_SPIECE_KEY!r} to build the tokenizer from; "
                                  f"pass the {TOKENIZER_SUBDIR} tokenizer folder instead")
        try:
            return cls(read(COMFY_SPIECE_KEY).numpy().tobytes())
        except Exception as exc:  # sentencepiece raises RuntimeError for a bad proto
            raise CheckpointError(f"{path}: key {COMFY_SPIECE_KEY!r} is not a sentencepiece model: "
                                  f"{exc}") from exc


def token_ids(tokenizer, text: str) -> list[int]:
    """Real token ids with </s>, cut like HF truncation to 512: the first 511 tokens, then </s>."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        ids = tokenizer.processor.encode(text)
        return ids if len(ids) <= TEXT_LEN else ids[: TEXT_LEN - 1] + ids[-1:]
    return tokenizer(text, truncation=True, max_length=TEXT_LEN, add_special_tokens=True)["input_ids"]


class TextEncoder:
    """Prompt → umT5 hidden states of the real tokens, [L, d_model] (L ≤ 512)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, source: Path | str = "") -> None:
        self.model: UMT5EncoderModel | None = model
        self.tokenizer = tokenizer
        self.source = str(source)

    @classmethod
    def load(cls, t5_path: Path | str, tokenizer_dir: Path | str | None = None,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, *,
             pin_memory: bool = False, on_read: Callable[[float], None] | None = None) -> "TextEncoder":
        """tokenizer_dir: the `google/umt5-xxl` folder; None takes the tokenizer stored in a
        ComfyUI file (`spiece_model`). The tokenizer is read first: it fails fast and cheaply.
        `pin_memory`, `on_read`: see `load_umt5_encoder`."""
        if tokenizer_dir is None:
            tokenizer, source = SentencePieceTokenizer.from_checkpoint(t5_path), t5_path
        else:
            tokenizer, source = load_umt5_tokenizer(tokenizer_dir), tokenizer_dir
        model = load_umt5_encoder(t5_path, device, dtype, pin_memory=pin_memory, on_read=on_read)
        if len(tokenizer) > model.config.vocab_size:
            raise CheckpointError(f"{t5_path}: embedding has {model.config.vocab_size} rows but the "
                                  f"tokenizer in {source} has {len(tokenizer)} tokens")
        return cls(model, tokenizer, t5_path)

    @property
    def device(self) -> torch.device:
        return self._loaded().shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded().shared.weight.dtype

    def _loaded(self) -> UMT5EncoderModel:
        if self.model is None:
            raise RuntimeError(f"text encoder {self.source} was unloaded; load it again")
        return self.model

    def encode(self, prompt: str) -> torch.Tensor:
        """Like Wan: clean, pad/truncate to 512 with an attention mask, encode, keep the real rows."""
        model = self._loaded()
        text = clean_prompt(prompt)
        if not text:
            raise InputError("prompt is empty: describe the video, e.g. 'A woman talks to the camera'")
        real = token_ids(self.tokenizer, text)
        ids = torch.full((1, TEXT_LEN), PAD_ID, dtype=torch.long)
        ids[0, : len(real)] = torch.tensor(real)
        mask = (torch.arange(TEXT_LEN) < len(real)).long()[None]
        with torch.no_grad():
            hidden = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return hidden.last_hidden_state[0, : len(real)].clone()

    def to(self, device: torch.device | str) -> "TextEncoder":
        self._loaded().to(device)
        return self

    def unload(self) -> None:
        """Drop the weights (≈11 GB in bf16); the DiT needs the memory more."""
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = None
        if on_cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- tiny fixtures (tests, make-tiny)
_TINY_TEXT = """A young woman with short dark hair looks into the camera and talks calmly about her day.
She smiles, nods and moves her hands while the light from a window falls on her face. Behind her
is a quiet room with a plant, a lamp, a wooden shelf and some books. An old man in a blue shirt
sings a slow song; his voice is warm and his eyes are closed. A cartoon cat on a surfboard rides
a big wave in the ocean under a bright summer sky. The anchorwoman reads the evening news in a
studio with a city at night on the screen. The boy laughs, the girl waves, and the teacher
explains a simple idea with clear words. Natural head motion, realistic skin, sharp details,
soft shadows, high quality video, stable background, no text, no watermark, good lip sync.
One two three four five six seven eight nine ten people walk, talk, speak, listen and think."""


def _tiny_spiece_model() -> bytes:
    """A small sentencepiece unigram model trained on _TINY_TEXT (T5 ids: <pad> 0, </s> 1, <unk> 2,
    no BOS; identity normalisation so the `tokenizers` twin below matches it exactly)."""
    import io

    import sentencepiece
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_TEXT.splitlines()), model_writer=proto, vocab_size=256,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return proto.getvalue()


def _tiny_tokenizer(model_proto: bytes):
    """The same pieces and scores as a `tokenizers` Unigram shaped like HF's T5 conversion
    (Metaspace, '</s>' appended), so AutoTokenizer loads it without sentencepiece or protobuf."""
    import sentencepiece
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", sp.eos_id())])
    tok.add_special_tokens([sp.id_to_piece(i) for i in (sp.pad_id(), sp.eos_id(), sp.unk_id())])
    return tok


def _tiny_wan_state(vocab: int, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """Random weights in Wan's layout, on a 1/64 grid within ±2 so bf16, fp16 and fp32 hold them
    exactly (the .pth and the ComfyUI file then encode identically)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        values = torch.randn(shape, generator=gen) * std
        return (torch.round(values * 64) / 64).clamp(-2, 2).to(torch.bfloat16)

    state = {"token_embedding.weight": rand(vocab, d_model, std=0.5)}
    for i in range(num_layers):
        b = f"blocks.{i}."
        state[b + "norm1.weight"] = 1 + rand(d_model, std=0.1)
        for name in "qkvo":
            state[b + f"attn.{name}.weight"] = rand(d_model, d_model, std=d_model ** -0.5)
        state[b + "norm2.weight"] = 1 + rand(d_model, std=0.1)
        state[b + "ffn.gate.0.weight"] = rand(d_ff, d_model, std=d_model ** -0.5)
        state[b + "ffn.fc1.weight"] = rand(d_ff, d_model, std=d_model ** -0.5)
        state[b + "ffn.fc2.weight"] = rand(d_model, d_ff, std=d_ff ** -0.5)
        state[b + "pos_embedding.embedding.weight"] = rand(REL_POS_BUCKETS, num_heads, std=0.5)
    state["norm.weight"] = 1 + rand(d_model, std=0.1)
    return state


def write_tiny_umt5(model_dir: Path | str, *, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                    d_ff: int = 64, seed: int = 0) -> Path:
    """Write `models_t5_umt5-xxl-enc-bf16.pth` (Wan layout, bf16) and `google/umt5-xxl/` into
    model_dir; returns the .pth path. The embedding has exactly len(tokenizer) rows."""
    model_dir = Path(model_dir)
    proto = _tiny_spiece_model()
    tok = _tiny_tokenizer(proto)
    tok_dir = model_dir / TOKENIZER_SUBDIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "spiece.model").write_bytes(proto)
    tok.save(str(tok_dir / "tokenizer.json"))
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "additional_special_tokens": [],
              "model_max_length": TEXT_LEN, **specials}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    state = _tiny_wan_state(tok.get_vocab_size(), d_model, num_layers, num_heads, d_ff, seed)
    path = model_dir / WAN_T5_FILE
    torch.save(state, path)
    return path


def write_tiny_umt5_comfy(path: Path | str, *, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                          d_ff: int = 64, seed: int = 0, scaled_fp8: bool = False) -> Path:
    """The same tiny weights as write_tiny_umt5 in ComfyUI's single-file layout: HF names, fp16
    (`umt5_xxl_fp16.safetensors`), the tokenizer as `spiece_model`; with scaled_fp8 every Linear
    weight is float8_e4m3fn with a float32 `scale_weight`, plus the `scaled_fp8` marker
    (`umt5_xxl_fp8_e4m3fn_scaled.safetensors`)."""
    from safetensors.torch import save_file
    path = Path(path)
    proto = _tiny_spiece_model()
    wan = _tiny_wan_state(_tiny_tokenizer(proto).get_vocab_size(), d_model, num_layers, num_heads, d_ff, seed)
    state: dict[str, torch.Tensor] = {COMFY_SPIECE_KEY: torch.frombuffer(bytearray(proto), dtype=torch.uint8)}
    for key, value in wan.items():
        hf = wan_to_hf_name(key)
        is_linear = (".SelfAttention." in hf and "relative" not in hf) or ".DenseReluDense." in hf
        if scaled_fp8 and is_linear:
            scale = value.float().abs().max().clamp(min=1e-12) / FP8_MAX
            state[hf] = (value.float() / scale).to(torch.float8_e4m3fn)
            state[hf[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            state[hf] = value.to(torch.float16)
    if scaled_fp8:
        state[_COMFY_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
