"""FP8 attention over e4m3 caches (the `fast` mode): the fixed cache scales bound every key and
value the caches can hold, the emulated path tracks the FP8-weights path, the prequantised
o-projection is exact, and the mode fails at load where it cannot run. The cuDNN kernel itself is
checked against the emulation on a GPU (skipped elsewhere)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from liveavatar_backend import block_ops, fp8_attention as fa
from liveavatar_backend.block_ops import linear_weights
from liveavatar_backend.engine import _check_fp8_attention
from liveavatar_backend.errors import InputError
from liveavatar_backend.fixtures import tiny_dit
from liveavatar_backend.fp8 import FP8_DTYPE, FP8_MAX, convert_to_fp8, quantize_per_tensor, quantize_static
from liveavatar_backend.pipeline import BlockSampler, Conditioning, GenerationPlan
from liveavatar_backend.schedule import flow_match_schedule

TIMESTEPS = flow_match_schedule(3)[0]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp8_dit():
    dit = tiny_dit(seed=3)
    with torch.no_grad():                 # norm gains and modulation far from their init values
        for block in dit.blocks:
            block.self_attn.norm_k.weight.uniform_(0.2, 3.0)
            block.modulation.normal_(0, 2.0)
            block.self_attn.v.bias.normal_(0, 1.0)
    convert_to_fp8(dit, out_dtype=torch.float32)         # as the engine does on the CPU
    return dit


def _attention_inputs(dit, block, x, t, seed=0):
    sa = block.self_attn
    angles = torch.rand(x.shape[1], dit.cfg.head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    _, e0 = dit.time_modulation(float(t))
    return block_ops.attention_inputs(x, e0, block.modulation, linear_weights(sa.q), linear_weights(sa.k),
                                      linear_weights(sa.v), sa.norm_q.weight, sa.norm_k.weight, angles.cos(),
                                      angles.sin(), block.num_heads, block.eps)


@pytest.mark.parametrize("kind", ["gaussian", "spiky"])
def test_cache_scales_bound_every_key_and_value(fp8_dit, kind):
    dim = fp8_dit.cfg.dim
    scales = fa.cache_scales(fp8_dit, range(fp8_dit.cfg.num_layers), TIMESTEPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, dim, generator=g)
    if kind == "spiky":                   # one channel dominates: LayerNorm puts ≈sqrt(dim) there
        x = x * 0.01
        x[0, torch.arange(256), torch.randint(0, dim, (256,), generator=g)] = 50.0
    for i in range(fp8_dit.cfg.num_layers):
        for t in (*TIMESTEPS.tolist(), 0.0):
            _, k_rot, _, v = _attention_inputs(fp8_dit, fp8_dit.blocks[i], x, t, seed=i)
            k_scaled, v_scaled = (k_rot * scales.key[i]).abs(), (v * scales.value[i]).abs()
            assert k_scaled.max() <= FP8_MAX and v_scaled.max() <= FP8_MAX
            # loose by design, but typical values stay in e4m3's normal range (≥ 2^-6)
            assert k_scaled.median() > 2 ** -6 and v_scaled.median() > 2 ** -6
        assert torch.allclose(scales.key[i] * scales.key_inverse[i], torch.ones(1, 1, 1, 1))
    assert scales.key[0].shape == (1, 1, 1, 1) and scales.value[0].dtype == torch.float32
    assert math.isfinite(scales.value[0].item())


@torch.no_grad()
def test_key_scale_is_reached_by_the_worst_key(fp8_dit):
    from liveavatar_backend.layers import rms_norm
    block = fp8_dit.blocks[1]
    weight = block.self_attn.norm_k.weight
    worst = torch.zeros(1, fp8_dit.cfg.dim)
    worst[0, weight.abs().argmax()] = 3.0                  # all of the RMS norm in the largest gain's channel
    k = rms_norm(worst, weight, block.eps)
    assert 0.97 * fa.key_bound(block) <= k.abs().max() <= fa.key_bound(block)


@torch.no_grad()
def test_input_norm_bound_is_reached_by_a_spike_at_the_largest_gain(fp8_dit):
    block = copy.deepcopy(fp8_dit.blocks[0])
    _, e0 = fp8_dit.time_modulation(float(TIMESTEPS[1]))
    block.modulation[0, 0] = -e0[0]                       # no shift: the bound's first term alone
    gain = 1 + block.modulation[0, 1] + e0[1]             # uneven gains (modulation ~ N(0, 2))
    x = torch.zeros(1, 1, fp8_dit.cfg.dim)
    x[..., gain.abs().argmax()] = 1.0                     # LayerNorm puts ≈ sqrt(dim) into that channel
    h = block_ops.layer_norm32(x, block.eps) * gain      # as attention_inputs modulates (shift 0)
    assert 0.95 * fa.input_norm_bound(block, [e0]) <= h.norm() <= fa.input_norm_bound(block, [e0])


@torch.no_grad()
def test_value_scale_is_reached_through_attention_inputs(fp8_dit):
    """A block whose modulation at one timestep is a uniform gain without shift, given the input
    along the largest row of W_v (mean removed, as LayerNorm does): its own v comes within the
    bound's slack (the e4m3 rounding of h, 1 + 2^-4, and the bf16 margins)."""
    block = copy.deepcopy(fp8_dit.blocks[2])
    _, e0 = fp8_dit.time_modulation(float(TIMESTEPS[0]))
    gain = 1.7
    block.modulation[0, 0] = -e0[0]                       # shift 0
    block.modulation[0, 1] = gain - 1 - e0[1]             # 1 + scale = gain on every channel
    w8, w_inverse, bias = linear_weights(block.self_attn.v)
    weight = w8.float() * w_inverse
    bound = fa.value_bound(block, [e0])
    row = (weight.norm(dim=1) * fa.input_norm_bound(block, [e0]) + bias.abs()).argmax()
    direction = (weight[row] - weight[row].mean()) * bias[row].sign()
    _, _, _, v = _attention_inputs(fp8_dit, block, direction.reshape(1, 1, -1), TIMESTEPS[0])
    assert 0.88 * bound <= v.abs().max() <= bound                  # 0.92 measured
    assert v.flatten()[row].abs() == v.abs().max()


def test_emulated_attention_costs_about_fp8_rounding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (64, 300, 300))
    (q8, qi), (k8, ki), (v8, vi) = (quantize_per_tensor(t) for t in (q, k, v))
    shaped = [s.reshape(1, 1, 1, 1) for s in (qi, ki, vi)]
    out8 = fa.emulated_attention(q8, shaped[0], k8, v8, shaped[1], shaped[2], shaped[2].reciprocal())
    assert out8.dtype == FP8_DTYPE
    err = _rel(out8.float() * vi, F.scaled_dot_product_attention(q, k, v))
    assert 1e-3 < err < 0.1               # e4m3 has 3 mantissa bits: a few per cent, never exact


def test_prequantised_o_projection_is_the_dequantised_matmul(fp8_dit):
    sa = fp8_dit.blocks[0].self_attn
    g = torch.Generator().manual_seed(1)
    heads, head_dim = fp8_dit.cfg.num_heads, fp8_dit.cfg.head_dim
    out = torch.randn(1, 10, heads, head_dim, generator=g).transpose(1, 2)
    out8, inverse = quantize_per_tensor(out)
    got = block_ops.attention_output((out8, inverse.reshape(1, 1, 1, 1)), linear_weights(sa.o), torch.float32)
    w8, w_inverse, bias = linear_weights(sa.o)
    want = F.linear(out8.float().transpose(1, 2).flatten(2) * inverse, w8.float() * w_inverse, bias)
    torch.testing.assert_close(got, want)
    plain = tiny_dit(seed=4).blocks[0].self_attn.o           # bf16/float32 weights: dequantised input
    got = block_ops.attention_output((out8, inverse.reshape(1, 1, 1, 1)), linear_weights(plain), torch.float32)
    torch.testing.assert_close(got, F.linear(out8.float().transpose(1, 2).flatten(2) * inverse, plain.weight, plain.bias))


def test_fp8_attention_generation_tracks_the_fp8_weights_path(fp8_dit):
    cfg, (height, width) = fp8_dit.cfg, (128, 192)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text_kv = fp8_dit.text_context_kv(torch.randn(20, cfg.text_dim, generator=g))
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 48, generator=g)
    cond = Conditioning(torch.randn(16, 1, height // 8, width // 8, generator=g),
                        torch.randn(16, 19, height // 8, width // 8, generator=g), text_kv,
                        lambda first, count: audio[..., :count])
    plan = GenerationPlan(height, width, 2, 3, seed=0)
    plain = list(BlockSampler(fp8_dit, plan, cond).clips())
    sampler = BlockSampler(fp8_dit, plan, cond, fp8_attention=True)
    assert sampler.bank.k[0][0].dtype == FP8_DTYPE and sampler.bank.scales is not None
    fast = list(sampler.clips())
    errors = [_rel(a, b) for a, b in zip(fast, plain)]
    assert all(0 < e < 0.02 for e in errors), errors
    with pytest.raises(ValueError, match="offload"):
        BlockSampler(fp8_dit, plan, cond, fp8_attention=True, offload_caches=True)


def test_fast_mode_says_why_it_cannot_run():
    assert "Hopper" in fa.unavailable_reason((8, 9), 91900, None)
    assert fa.unavailable_reason((9, 0), 91900, "not installed") == "not installed"
    assert "finds cuDNN 9.10.0" in fa.unavailable_reason((9, 0), 91000, None)
    assert "no cuDNN" in fa.unavailable_reason((9, 0), None, None)
    assert fa.unavailable_reason((9, 0), 91900, None) is None and fa.unavailable_reason((10, 0), 91900, None) is None
    assert fa.unavailable_on(torch.device("cpu")) is None           # emulated on the CPU
    with pytest.raises(InputError, match="balanced"):
        _check_fp8_attention(True, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or fa.unavailable_on(torch.device("cuda")) is not None,
                    reason="needs a GPU with cuDNN FP8 attention")
def test_cudnn_fp8_attention_matches_the_emulation_and_replays_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, head_dim, queries, keys = 8, 128, 384, 1500

    def fresh_q8():
        q = torch.randn(1, queries, heads, head_dim, device="cuda", generator=g).transpose(1, 2)
        q8, inverse = quantize_per_tensor(q)
        return q8, inverse.reshape(1, 1, 1, 1)
    buffers = [torch.randn(1, heads, keys + 300, head_dim, device="cuda", generator=g) for _ in range(2)]
    k, v = (b[:, :, 100: 100 + keys] for b in buffers)              # a slice of a cache buffer, as the engine reads
    k_amax, v_amax = k.abs().amax(), v.abs().amax() * (1 + fa.FP8_ROUNDING)
    scales = fa.CacheScales(*({0: s.reshape(1, 1, 1, 1)} for s in
                              (FP8_MAX / k_amax, k_amax / FP8_MAX, FP8_MAX / v.abs().amax(), v.abs().amax() / FP8_MAX,
                               FP8_MAX / v_amax, v_amax / FP8_MAX)))
    k8, v8 = (torch.empty(b.shape, device="cuda", dtype=FP8_DTYPE)[:, :, 100: 100 + keys] for b in buffers)
    k8.copy_(quantize_static(k, scales.key[0]))
    v8.copy_(quantize_static(v, scales.value[0]))
    q8, q_inverse = fresh_q8()

    def emulated():
        return fa.emulated_attention(q8, q_inverse, k8, v8, scales.key_inverse[0], scales.value_inverse[0],
                                     scales.output[0])
    got = fa.fp8_attention(q8, q_inverse, k8, v8, scales, 0)
    assert got.dtype == FP8_DTYPE and got.transpose(1, 2).is_contiguous()
    assert _rel(got.float(), emulated().float()) < 0.05              # both e4m3; cuDNN also rounds P
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fa.fp8_attention(q8, q_inverse, k8, v8, scales, 0)
    new_q8, new_inverse = fresh_q8()                                 # the graph reads the buffers, not values
    q8.copy_(new_q8)
    q_inverse.copy_(new_inverse)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.float(), fa.fp8_attention(q8, q_inverse, k8, v8, scales, 0).float())
    assert _rel(captured.float(), got.float()) > 0.5
    # the o-projection's torch._scaled_mm reads the e4m3 output with its inverse scale
    weight = torch.randn(256, heads * head_dim, device="cuda", generator=g) * 0.02
    w8, w_inverse = quantize_per_tensor(weight)
    bias = torch.randn(256, device="cuda", generator=g).to(torch.bfloat16)
    projected = block_ops.attention_output((got, scales.output_inverse[0]), (w8, w_inverse, bias), torch.bfloat16)
    dequantised = got.float().transpose(1, 2).flatten(2) * scales.output_inverse[0].reshape(())
    assert _rel(projected, F.linear(dequantised, w8.float() * w_inverse, bias.float())) < 1e-2
