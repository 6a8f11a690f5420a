"""CUDA graphs of whole denoising steps (`cuda_graphs.StepGraphs`), on a GPU: from clip 1 on, every
(step, ring slot) is captured once and then replayed, after a single warm-up pass per job, and the
replays give the blocks that the passes without graphs give, with the layer functions eager and
compiled (as the engine runs them). Under PyTorch's cudaMallocAsync allocator compiled steps cannot
be captured and eager ones keep every graph's memory apart: the sampler then runs without graphs.
The GPU tests are skipped without a GPU (the CPU never uses graphs); run them under both allocators:
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python -m pytest --noconftest tests/test_cuda_graphs.py"""
import pytest
import torch

from liveavatar_backend import block_ops, constants as C
from liveavatar_backend.cuda_graphs import ASYNC_ALLOCATOR, StepGraphs, capture_blocked
from liveavatar_backend.fixtures import tiny_dit
from liveavatar_backend.pipeline import BlockSampler, Conditioning, GenerationPlan

HEIGHT, WIDTH = 128, 192


def conditioning(dit, device) -> Conditioning:
    g = torch.Generator(device=device).manual_seed(0)
    cfg = dit.cfg
    with torch.no_grad():
        text_kv = dit.text_context_kv(torch.randn(20, cfg.text_dim, generator=g, device=device, dtype=dit.dtype))
    audio = torch.randn(cfg.audio_layers, cfg.audio_dim, 48, generator=g, device=device)
    latents = [torch.randn(16, n, HEIGHT // 8, WIDTH // 8, generator=g, device=device, dtype=dit.dtype) for n in (1, 19)]
    return Conditioning(*latents, text_kv, lambda first, count: audio[..., :count])


def record_forward_passes(monkeypatch) -> list[bool]:
    """StepGraphs' passes, each as True (inside a capture) or False (a warm-up run outside)."""
    passes, forward = [], StepGraphs._forward

    def counted(self, *args):
        passes.append(torch.cuda.is_current_stream_capturing())
        return forward(self, *args)
    monkeypatch.setattr(StepGraphs, "_forward", counted)
    return passes


@pytest.fixture(params=["eager", "compiled"])
def layer_functions(request):
    if request.param == "compiled":
        supported, why = block_ops.compile_supported()
        if not supported:
            pytest.skip(why)
        block_ops.enable_compile()
    yield request.param
    block_ops.disable_compile()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_give_the_blocks_of_plain_passes(monkeypatch, layer_functions):
    if capture_blocked():
        pytest.skip(capture_blocked())
    dit = tiny_dit(seed=0).to("cuda", torch.bfloat16)
    plan = GenerationPlan(HEIGHT, WIDTH, 3, 3, seed=0)        # clip 1 captures, clip 2 only replays
    cond = conditioning(dit, "cuda")
    plain = [clip.float() for clip in BlockSampler(dit, plan, cond).clips()]
    passes = record_forward_passes(monkeypatch)
    graphed = [clip.float() for clip in BlockSampler(dit, plan, cond, cuda_graphs=True).clips()]
    ring_slots = C.BLOCKS_PER_CLIP                             # a ring holds one clip of blocks
    assert passes.count(True) == plan.steps * ring_slots       # one capture per (step, ring slot)
    assert passes.count(False) == 1                            # one warm-up pass per job, not per capture
    errors = [((g - p).norm() / p.norm()).item() for g, p in zip(graphed, plain)]
    assert errors[0] < 1e-5, errors                            # clip 0 never uses graphs
    assert max(errors) < 1e-2, errors                          # same kernels; cuBLAS may pick others under capture


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_allocator_backend() != ASYNC_ALLOCATOR,
                    reason=f"needs a GPU under PYTORCH_CUDA_ALLOC_CONF=backend:{ASYNC_ALLOCATOR}")
def test_under_cuda_malloc_async_steps_run_without_graphs(layer_functions):
    dit = tiny_dit(seed=0).to("cuda", torch.bfloat16)
    plan = GenerationPlan(HEIGHT, WIDTH, 3, 3, seed=0)
    cond = conditioning(dit, "cuda")
    sampler = BlockSampler(dit, plan, cond, cuda_graphs=True)
    assert sampler.graphs is None
    without_graphs = [clip.float() for clip in sampler.clips()]
    block_ops.disable_compile()
    eager = [clip.float() for clip in BlockSampler(dit, plan, cond).clips()]
    assert max(((c - p).norm() / p.norm()).item() for c, p in zip(without_graphs, eager)) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_weight_only_fp8_replays_in_graphs_without_fp8_matmuls(monkeypatch, layer_functions):
    """As on a GPU without FP8 matrix units (an RTX 3090): the FP8 weights are multiplied in bf16,
    eager and compiled, captured in graphs; no `torch._scaled_mm` runs, and the blocks stay near
    bf16's and nearer than the official recipe's (which rounds the activations too)."""
    from liveavatar_backend import fp8
    if capture_blocked():
        pytest.skip(capture_blocked())
    dit = tiny_dit(seed=0).to("cuda", torch.bfloat16)
    plan = GenerationPlan(HEIGHT, WIDTH, 2, 3, seed=0)
    cond = conditioning(dit, "cuda")

    def relative_errors(clips, reference):
        return [((c - r).norm() / r.norm()).item() for c, r in zip(clips, reference)]
    bf16 = [clip.float() for clip in BlockSampler(dit, plan, cond).clips()]
    fp8.convert_to_fp8(dit)
    official = [clip.float() for clip in BlockSampler(dit, plan, cond, cuda_graphs=True).clips()]
    monkeypatch.setattr(fp8, "has_fp8_matmul", lambda device: False)

    def no_fp8_units(*args, **kwargs):
        raise AssertionError("torch._scaled_mm called on a GPU without FP8 matrix units")
    monkeypatch.setattr(torch, "_scaled_mm", no_fp8_units)
    weight_only = [clip.float() for clip in BlockSampler(dit, plan, cond, cuda_graphs=True).clips()]
    assert max(relative_errors(weight_only, bf16)) < max(relative_errors(official, bf16)) < 0.2


@pytest.mark.parametrize("backend,blocked", [(ASYNC_ALLOCATOR, True), ("native", False)])
def test_which_allocators_allow_captures(monkeypatch, backend, blocked):
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    reason = capture_blocked()
    assert (reason is not None) == blocked
    if blocked:
        assert "--disable-cuda-malloc" in reason and ASYNC_ALLOCATOR in reason
