"""The DiT: full-size structure against the published key manifest, RoPE positions, and the
cache layout against a naive re-implementation of the official per-step caches."""
import json
from pathlib import Path

import pytest
import torch

from liveavatar_backend import rope
from liveavatar_backend.config import DiTConfig
from liveavatar_backend.kv_cache import CacheLayout, KVCacheBank
from liveavatar_backend.loading import build_empty_dit
from liveavatar_backend.model import LiveAvatarDiT

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "liveavatar_dit_14b_keys.json"


@pytest.fixture(scope="module")
def manifest():
    if not MANIFEST.exists():
        pytest.skip(f"{MANIFEST} not found (it lives in ../shared beside the checkout)")
    return json.loads(MANIFEST.read_text())


def test_full_size_model_matches_manifest_exactly(manifest):
    model = build_empty_dit(DiTConfig.wan_s2v_14b())
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    published = {name: shape for name, shape in manifest["keys"]}
    assert len(ours) == len(published) == manifest["num_tensors"] == 1260
    assert ours == published
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["total_parameters"]
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_config_json_round_trip(tmp_path):
    cfg = DiTConfig.tiny()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    assert DiTConfig.from_json(tmp_path / "config.json") == cfg


def test_rope_positions_follow_the_official_layout():
    h, w = 24, 44                      # 384×704
    motion = rope.motion_positions(h, w)
    assert motion.shape[0] == h * w + (h // 2) * (w // 2) + 4 * (h // 4) * (w // 4)
    times = sorted(set(motion[:, 0].tolist()))
    assert times == [-19, -14, -9, -4, -3, -1]
    half = motion[h * w: h * w + (h // 2) * (w // 2)]
    assert half[:, 1].unique().tolist()[:3] == [0, 2, 4]            # linspace(0, 23, 12) truncated
    assert half[:, 1].max() == h - 1
    assert rope.rope_pair_split(128) == (22, 21, 21)


def test_rope_tables_are_fp16_quantised_and_unbounded():
    pos = torch.tensor([[44999.0, 3.0, 5.0], [1_000_000.0, 0.0, 0.0], [-4.0, 0.0, 0.0]], dtype=torch.float64)
    cos, sin = rope.rope_cos_sin(pos, 128)
    assert torch.equal(cos, cos.half().float()) and torch.isfinite(cos).all()
    # negative times are the conjugate of the positive table entry (official: .conj())
    cos4, sin4 = rope.rope_cos_sin(torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64), 128)
    assert torch.equal(cos[2, :22], cos4[0, :22]) and torch.equal(sin[2, :22], -sin4[0, :22])


def test_apply_rope_is_the_official_complex_rotation():
    """Adjacent channels (2i, 2i+1) as one complex number, multiplied by exp(i·angle) in float64
    (the official `rope_apply`); ours runs in float32 and must agree to float32 rounding."""
    pos = rope.noisy_positions(30, 3, 4, 6)
    cos, sin = rope.rope_cos_sin(pos, 128)
    x = torch.randn(1, pos.shape[0], 3, 128, generator=torch.Generator().manual_seed(0))
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(pairs * torch.complex(cos.double(), sin.double())[:, None]).flatten(-2)
    got = rope.apply_rope(x, cos, sin)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, x, atol=1e-3)                 # the positions do rotate
    low = x.bfloat16()                                            # bf16 in: float32 math, one rounding out
    assert torch.equal(rope.apply_rope(low, cos, sin), rope.apply_rope(low.float(), cos, sin).bfloat16())


class NaiveBank:
    """The official caches, written plainly: per step a list of (k, v) blocks in a 12-frame ring,
    plus one cond (k, v); attention over their concatenation."""

    def __init__(self, layout, steps, layers):
        self.layout = layout
        self.sink_ref_k = {}
        self.scales = None          # bf16 caches (the engine's interface: e4m3 ones carry scales)
        self.cond = {}
        self.views = [NaiveStep(self, layers) for _ in range(steps)]

    def step(self, i):
        return self.views[i]

    def all_steps(self):
        return self.views


class NaiveStep:
    def __init__(self, bank, layers):
        self.bank, self.layout = bank, bank.layout
        self.ring = {i: {} for i in layers}
        self.ref = {}

    def write_cond(self, layer, motion_k, v):
        self.bank.cond[layer] = (motion_k.clone(), v.clone())

    def write_block(self, layer, first_frame, k, v):
        self.ring[layer][first_frame % 12] = (k.clone(), v.clone())

    def write_reference(self, layer, k):
        self.ref[layer] = k.clone()

    def active(self, layer, first_frame, block_len):
        motion_k, cond_v = self.bank.cond[layer]
        ks = [b[0] for b in self.ring[layer].values()] + [self.ref[layer], motion_k]
        vs = [b[1] for b in self.ring[layer].values()] + [cond_v]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def advance(self, first_frame):
        pass


def _compare_banks(steps: int, banks) -> None:
    """Prefill both banks, then run 6 blocks (two clips: the ring wraps) at every step through both
    and require identical velocities."""
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    text_kv = model.text_context_kv(torch.randn(5, cfg.text_dim))
    ref, motion = torch.randn(16, 1, 8, 16), torch.randn(16, 19, 8, 16)
    audio = model.encode_audio_block(torch.randn(cfg.audio_layers, cfg.audio_dim, 12), 73, 19)
    layout = CacheLayout(4, 8)
    args = (layout, range(cfg.num_layers), steps, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    first_bank, second_bank = (make(*args) for make in banks)
    with torch.no_grad():
        for bank in (first_bank, second_bank):
            model.prefill_sink(ref, motion, text_kv, bank)
        for block in range(6):
            x = torch.randn(16, 3, 8, 16)
            for i in range(steps):
                outs = [model.denoise_block(x, 1000.0 - 100 * i, 3 * block, 30 + block, b, b.step(i), text_kv, audio)
                        for b in (first_bank, second_bank)]
                torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_paired_cache_bank_equals_naive_caches(steps):
    _compare_banks(steps, (KVCacheBank, lambda layout, layers, steps, *_: NaiveBank(layout, steps, layers)))


@pytest.mark.parametrize("steps", [3, 4])
def test_offloaded_cache_bank_equals_resident_bank(steps, monkeypatch):
    from liveavatar_backend import kv_offload
    # whatever the host chunks start with must not matter: poisoned with NaN, any region read
    # before it is written shows
    host_chunks = kv_offload.host_chunks

    def poisoned(*args):
        return [chunk.fill_(float("nan")) for chunk in host_chunks(*args)]
    monkeypatch.setattr(kv_offload, "host_chunks", poisoned)
    _compare_banks(steps, (KVCacheBank, kv_offload.OffloadedKVCacheBank))


def test_hidden_states_stay_contiguous_through_the_layers():
    """The patch embedding gives tokens as a transposed view of the conv output; elementwise ops
    (eager and Inductor) keep their input's layout, so unless the tokens are made contiguous every
    layer's norms reduce over strided memory (3x slower on a GPU). Every block must see
    contiguous hidden states, in the sink prefill and in the streaming pass."""
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    layout = CacheLayout(4, 8)
    bank = KVCacheBank(layout, range(cfg.num_layers), 2, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    text_kv = model.text_context_kv(torch.randn(5, cfg.text_dim))
    audio = model.encode_audio_block(torch.randn(cfg.audio_layers, cfg.audio_dim, 12), 73, 19)
    with torch.no_grad():
        model.prefill_sink(torch.randn(16, 1, 8, 16), torch.randn(16, 19, 8, 16), text_kv, bank)
        assert len(seen) == cfg.num_layers and all(seen)
        model.denoise_block(torch.randn(16, 3, 8, 16), 1000.0, 0, 30, bank, bank.step(0), text_kv, audio)
    assert len(seen) == 2 * cfg.num_layers and all(seen), seen


def test_block_keys_and_values_go_into_token_major_caches_as_dense_copies(monkeypatch):
    """`attention_inputs` gives keys/values over token-major memory and the caches are token-major
    too, so a block's ring-slot write (and the low-VRAM bank's transfer to the host) copies one
    dense range with equal strides on both sides, no gather. The un-rotated keys are computed
    for the sink prefill only."""
    from liveavatar_backend import block_ops
    from liveavatar_backend.kv_cache import StepCache, token_major
    from liveavatar_backend.kv_offload import OffloadedKVCacheBank
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    layout = CacheLayout(4, 8)
    writes, raw_keys = [], []
    write_block, attention_inputs = StepCache.write_block, block_ops.attention_inputs

    def record_write(cache, layer, first_frame, k, v):
        keys, values = cache._buffers(layer)
        where = cache._ring_range(layout.ring_slot(first_frame), k.shape[2])
        writes.append((k, v, keys[:, :, where], values[:, :, where]))
        write_block(cache, layer, first_frame, k, v)

    def record_inputs(*args):
        out = attention_inputs(*args)
        raw_keys.append(out[2] is not None)
        return out
    monkeypatch.setattr(StepCache, "write_block", record_write)
    monkeypatch.setattr(block_ops, "attention_inputs", record_inputs)
    text_kv = model.text_context_kv(torch.randn(5, cfg.text_dim))
    audio = model.encode_audio_block(torch.randn(cfg.audio_layers, cfg.audio_dim, 12), 73, 19)
    for bank_type in (KVCacheBank, OffloadedKVCacheBank):
        bank = bank_type(layout, range(cfg.num_layers), 2, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
        with torch.no_grad():
            model.prefill_sink(torch.randn(16, 1, 8, 16), torch.randn(16, 19, 8, 16), text_kv, bank)
            model.denoise_block(torch.randn(16, 3, 8, 16), 1000.0, 0, 30, bank, bank.step(0), text_kv, audio)
        assert all(token_major(bank.sink_ref_k[i]) is bank.sink_ref_k[i] for i in range(cfg.num_layers))
    assert raw_keys == 2 * ([True] * cfg.num_layers + [False] * cfg.num_layers)
    assert len(writes) == 2 * cfg.num_layers
    for k, v, key_slot, value_slot in writes:
        assert token_major(k) is k and token_major(v) is v
        assert key_slot.stride()[1:] == k.stride()[1:] and value_slot.stride()[1:] == v.stride()[1:]
    host_k, _ = bank.host_ring[(0, 0, 0)]
    assert token_major(host_k) is host_k and token_major(bank.staging[0][0]) is bank.staging[0][0]


def test_gelu_tanh_is_torch_gelu_tanh():
    """`layers.gelu_tanh` (x·σ(2u), the form the compiler turns into fast code) is the FFN's
    F.gelu(approximate="tanh"): equal in float64 up to rounding, and within two rounding steps of the
    output dtype in float32 and bfloat16, over the range the FFN sees and far into the tails. (Below
    x ≈ −4 the values are under 1e-4 and torch's own 1 + tanh(u) cancels; there the two forms
    differ by less than 1e-6 absolute.)"""
    from liveavatar_backend.layers import gelu_tanh
    x = torch.cat([torch.linspace(-12, 12, 20001, dtype=torch.float64), torch.randn(20000, dtype=torch.float64) * 3])
    reference = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.allclose(gelu_tanh(x), reference, rtol=1e-12, atol=1e-12)
    for dtype, ulp in ((torch.float32, 2.0 ** -23), (torch.bfloat16, 2.0 ** -8)):
        ours = gelu_tanh(x.to(dtype))
        theirs = torch.nn.functional.gelu(x.to(dtype), approximate="tanh")
        assert ours.dtype == dtype
        assert ((ours.double() - theirs.double()).abs() <= 2 * ulp * theirs.double().abs() + 1e-6).all()
    assert torch.isfinite(gelu_tanh(torch.tensor([-1e4, 1e4]))).all()
