"""The per-layer functions of `block_ops`: the compiled path traces as one graph each and computes
what the eager path computes; the fused audio injection equals the module formulation."""
import pytest
import torch
import torch.nn.functional as F

from liveavatar_backend import block_ops
from liveavatar_backend.config import DiTConfig
from liveavatar_backend.fp8 import FP8_DTYPE, convert_to_fp8
from liveavatar_backend.fp8_attention import cache_scales
from liveavatar_backend.kv_cache import CacheLayout, KVCacheBank
from liveavatar_backend.layers import layer_norm
from liveavatar_backend.model import LiveAvatarDiT
from liveavatar_backend.model_audio import AUDIO_ADALN_EPS


def _two_blocks(model, cfg, fp8_caches=False):
    """Prefill, then two blocks of 3 steps; returns every step's velocity."""
    g = torch.Generator().manual_seed(1)
    text_kv = model.text_context_kv(torch.randn(5, cfg.text_dim, generator=g))
    ref, motion = torch.randn(16, 1, 8, 16, generator=g), torch.randn(16, 19, 8, 16, generator=g)
    audio = model.encode_audio_block(torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g), 73, 19)
    bank = KVCacheBank(CacheLayout(4, 8), range(cfg.num_layers), 3, cfg.num_heads, cfg.head_dim,
                       FP8_DTYPE if fp8_caches else torch.float32, "cpu")
    if fp8_caches:                    # FP8 attention over e4m3 caches (memory_mode 'fast')
        bank.scales = cache_scales(model, range(cfg.num_layers), [1000.0, 750.0, 500.0])
    outs = []
    with torch.no_grad():
        model.prefill_sink(ref, motion, text_kv, bank)
        for block in range(2):
            x = torch.randn(16, 3, 8, 16, generator=g)
            for i in range(3):
                outs.append(model.denoise_block(x, 1000.0 - 250 * i, 3 * block, 30 + block, bank, bank.step(i),
                                                text_kv, audio))
    return outs


@pytest.mark.parametrize("fp8_caches", [False, True])
def test_compiled_functions_trace_whole_and_match_eager(fp8_caches):
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    if fp8_caches:
        convert_to_fp8(model, out_dtype=torch.float32)
    eager = _two_blocks(model, cfg, fp8_caches)
    graphs = []

    def record(graph_module, example_inputs):        # a dynamo backend that runs the traced graph as is
        graphs.append(graph_module)
        return graph_module.forward

    block_ops.enable_compile(backend=record)
    quantised = []                        # calls of FP8 attention's compiled input quantisation
    compiled_quantisation = block_ops._compiled["fp8_attention_inputs"]
    block_ops._compiled["fp8_attention_inputs"] = lambda *a: quantised.append(1) or compiled_quantisation(*a)
    try:
        traced = _two_blocks(model, cfg, fp8_caches)
    finally:
        block_ops.disable_compile()
    assert len(block_ops._compiled) == 0
    traced_ops = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert len(graphs) >= 4 and F.scaled_dot_product_attention in traced_ops   # all four, incl. the injector
    # every layer of every block-step quantises its attention inputs through the compiled function
    assert len(quantised) == (2 * 3 * cfg.num_layers if fp8_caches else 0)
    assert len(graphs) >= (5 if fp8_caches else 4)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _relative_error(outputs, reference) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(outputs, reference))


def test_weight_only_fp8_traces_whole_and_rounds_only_the_weights(monkeypatch):
    """GPUs without FP8 matrix units multiply the e4m3 weights in the input's dtype: compiled and
    eager agree, and the result is nearer the unquantised model than the official recipe's (which
    rounds the activations too), but not equal to it (the weights' rounding stays)."""
    from liveavatar_backend import fp8
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    reference = _two_blocks(model, cfg)
    convert_to_fp8(model, out_dtype=torch.float32)
    official = _two_blocks(model, cfg)
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: False)      # as on an RTX 3090
    assert isinstance(block_ops.linear_weights(model.blocks[0].ffn[0]), fp8.WeightOnlyFP8)
    weight_only = _two_blocks(model, cfg)
    block_ops.enable_compile(backend=lambda graph_module, example_inputs: graph_module.forward)
    try:
        traced = _two_blocks(model, cfg)
    finally:
        block_ops.disable_compile()
    for a, b in zip(traced, weight_only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # two roundings of similar size against one: about 1/sqrt(2) of the error (0.71x measured on this model)
    assert 1e-4 < _relative_error(weight_only, reference) < 0.85 * _relative_error(official, reference)


def test_weight_only_linear_is_the_dequantised_matmul_in_bf16():
    """bf16's roundings only (about 2^-8), where the official recipe adds the activations' e4m3 one."""
    from liveavatar_backend.fp8 import WeightOnlyFP8, fp8_linear, quantize_per_tensor, weight_only_linear
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64) * 0.05, torch.randn(96) * 0.1, torch.randn(2, 7, 64)
    w8, inverse_scale = quantize_per_tensor(weight)
    exact = F.linear(x, w8.float() * inverse_scale, bias)

    def error(out):
        return float((out.float() - exact).norm() / exact.norm())
    out = weight_only_linear(x.bfloat16(), WeightOnlyFP8(w8, inverse_scale, bias.bfloat16()))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 96)
    assert error(out) < 8e-3 < error(fp8_linear(x, w8, inverse_scale, bias)) / 2


def test_audio_injection_equals_the_module_formulation():
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    model = LiveAvatarDiT(cfg).eval()
    injector = model.audio_injector
    frames, hw = 3, 10
    x = torch.randn(1, frames * hw, cfg.dim)
    audio_tokens, audio_global = torch.randn(frames, 5, cfg.dim), torch.randn(frames, cfg.dim)
    with torch.no_grad():
        for p in injector.parameters():          # zero-initialised layers would hide mistakes
            p.normal_(0, 0.2)
        attn, adain = injector.injector[1], injector.injector_adain_layers[1]
        shift, scale = adain.linear(F.silu(audio_global)).chunk(2, dim=-1)
        normed = layer_norm(x.view(frames, hw, -1), AUDIO_ADALN_EPS) * (1 + scale[:, None]) + shift[:, None]
        expected = x + attn(normed, attn.context_kv(audio_tokens)).reshape(1, frames * hw, -1)
        got = injector.inject(1, x, audio_tokens, audio_global)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, x, atol=1e-3)        # the injector did contribute


def test_compile_is_declined_with_a_reason(monkeypatch):
    import torch.utils._triton as triton_probe
    monkeypatch.setattr(triton_probe, "has_triton", lambda: True)
    monkeypatch.delenv(block_ops.COMPILE_SWITCH, raising=False)
    assert block_ops.compile_supported() == (True, "")
    monkeypatch.setenv(block_ops.COMPILE_SWITCH, "0")
    ok, why = block_ops.compile_supported()
    assert not ok and "LIVEAVATAR_COMPILE=0" in why
    monkeypatch.setenv(block_ops.COMPILE_SWITCH, "1")
    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)    # e.g. a Windows PyTorch wheel
    ok, why = block_ops.compile_supported()
    assert not ok and "Triton" in why
