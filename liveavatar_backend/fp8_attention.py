"""FP8 self-attention over e4m3 caches (issue 4; the `fast` mode, beyond the official FP8 recipe).

At 704*384 the self-attention of a block over its 15312 cached keys is the largest single cost of
an FP8 step (1.64 ms of about 4.4 ms per layer on an H200). cuDNN's FP8 flash attention does it in
1.21 ms (bench/bench_attention.py). It needs q, k and v in e4m3, each with ONE scale, so the caches
hold e4m3 keys/values written at a fixed scale per layer, from bounds no input can exceed:

* keys are RMS-normed over all `dim` channels (the squares of the normed vector sum to at most
  dim) and then rotated in pairs (norm-preserving), so |k| ≤ sqrt(dim) · max|norm_k.weight|;
* values are v = W_v h + b with h the modulated LayerNorm of the block input: ‖LN(x)‖₂ ≤ sqrt(dim),
  so ‖h‖₂ ≤ sqrt(dim) · max|1 + scale| + ‖shift‖₂ for each modulation the caches see (every step's
  timestep and t = 0 of the sink), and |v_j| ≤ ‖W_v[j]‖₂ · max‖h‖₂ + |b_j|.

The bounds are loose (typical values land near 1-10 of e4m3's ±448), which costs nothing: e4m3
keeps its 3-bit mantissa from 2^-6 up. Queries are scaled per call (dynamic per tensor, as the
FP8 linears scale their inputs). The output comes back in e4m3 at the values' scale with one more
e4m3 step of room (an output row is a convex combination of value rows, but cuDNN rounds the
probabilities to e4m3 and normalises with their unrounded sum), which the o-projection takes as
its FP8 input directly (bf16 output of FP8 attention is Blackwell-only in cuDNN 9.19). Every
conversion to e4m3 saturates, so rounding slack beyond the margins clips instead of overflowing.

On the CPU the same rounding of q, k, v and the output is emulated around a float32 attention
(the rounding of the softmax probabilities inside cuDNN is not), so the whole path runs in tests.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE, FP8_MAX, quantize_static

MIN_CUDNN = 91400        # cuDNN 9.14: FP8 attention forward on Hopper (the cuDNN frontend's own test gate)
MIN_FRONTEND = "1.32"    # the nvidia-cudnn-frontend release this was built and measured with
MIN_CAPABILITY = (9, 0)  # Hopper
INSTALL_HINT = f"pip install 'nvidia-cudnn-frontend>={MIN_FRONTEND}'"
FP8_ROUNDING = 2.0 ** -4          # largest relative rounding error of e4m3 (3 mantissa bits)
BOUND_MARGIN = 1.0 + 2.0 ** -6    # bf16 rounding of the normed/modulated activations


@dataclasses.dataclass
class CacheScales:
    """Per-layer e4m3 scales of the cached keys and values and of the attention output:
    stored value = x · scale. Each tensor is a float32 [1, 1, 1, 1] on the model's device."""
    key: dict[int, torch.Tensor]
    key_inverse: dict[int, torch.Tensor]
    value: dict[int, torch.Tensor]
    value_inverse: dict[int, torch.Tensor]
    output: dict[int, torch.Tensor]
    output_inverse: dict[int, torch.Tensor]


def _dequantised_weight(linear) -> torch.Tensor:
    if hasattr(linear, "weight_fp8"):
        return linear.weight_fp8.float() * linear.weight_scale
    return linear.weight.float()


def key_bound(block) -> torch.Tensor:
    """max |k| of a block's RMS-normed, rotated keys."""
    weight = block.self_attn.norm_k.weight.float()
    return math.sqrt(weight.numel()) * weight.abs().max() * BOUND_MARGIN


def input_norm_bound(block, e0s) -> torch.Tensor:
    """max ‖h‖₂ of the modulated LayerNorm output that feeds q/k/v, over the modulations `e0s`."""
    dim = block.modulation.shape[-1]
    mods = [block.modulation[0].float() + e0 for e0 in e0s]
    return max(math.sqrt(dim) * (1 + m[1]).abs().max() + m[0].norm() for m in mods) * BOUND_MARGIN


def value_bound(block, e0s) -> torch.Tensor:
    """max |v| of a block's values: ‖W_v[j]‖₂ · max‖h‖₂ + |b_j| (h rounded to e4m3 by FP8 linears)."""
    v = block.self_attn.v
    bias = v.bias.float().abs() if v.bias is not None else 0.0
    h_norm = input_norm_bound(block, e0s) * (1 + FP8_ROUNDING)
    return (_dequantised_weight(v).norm(dim=1) * h_norm + bias).max() * BOUND_MARGIN


def cache_scales(dit, layers, timesteps) -> CacheScales:
    """Scales from the bounds above for `layers`, covering the modulations of `timesteps` and t=0."""
    e0s = [dit.time_modulation(float(t))[1] for t in (*timesteps, 0.0)]
    scales = CacheScales({}, {}, {}, {}, {}, {})
    for i in layers:
        block = dit.blocks[i]
        values = value_bound(block, e0s)
        for bound, scale, inverse in ((key_bound(block), scales.key, scales.key_inverse),
                                      (values, scales.value, scales.value_inverse),
                                      (values * (1 + FP8_ROUNDING), scales.output, scales.output_inverse)):
            bound = bound.clamp(min=1e-12).reshape(1, 1, 1, 1).to(dit.device, torch.float32)
            scale[i], inverse[i] = FP8_MAX / bound, bound / FP8_MAX
    return scales


def _cudnn_version_text(version: int) -> str:
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"     # 91900 -> 9.19.0


def unavailable_reason(capability: tuple[int, int], cudnn_version: int | None, frontend: str | None) -> str | None:
    """Why cuDNN FP8 attention cannot run with these properties (None: it can). `frontend`: why the
    cuDNN frontend cannot be used, None if it can."""
    if capability < MIN_CAPABILITY:
        return f"it needs a Hopper or newer GPU (compute capability 9.0+), this one is {capability[0]}.{capability[1]}"
    if frontend is not None:
        return frontend
    if cudnn_version is None or cudnn_version < MIN_CUDNN:
        found = "no cuDNN" if cudnn_version is None else f"cuDNN {_cudnn_version_text(cudnn_version)}"
        return f"it needs cuDNN 9.14 or newer and finds {found} (PyTorch 2.11's CUDA 13 wheels bring 9.19)"
    return None


def _frontend_problem() -> tuple[str | None, int | None]:
    """(why the cuDNN frontend cannot be used or None, the cuDNN version it loaded)."""
    try:
        import cudnn
    except ImportError:
        return f"the cuDNN frontend is not installed ({INSTALL_HINT})", None
    except Exception as exc:                           # e.g. its libcudnn failed to load
        return f"the cuDNN frontend failed to load ({type(exc).__name__}: {exc})", None
    if not hasattr(cudnn.pygraph, "sdpa_fp8"):
        return f"the installed cuDNN frontend has no FP8 attention ({INSTALL_HINT})", None
    return None, cudnn.backend_version()


def unavailable_on(device: torch.device) -> str | None:
    """`unavailable_reason` for a device; None off CUDA (the engine runs the emulation there, as
    every mode computes in float32 on the CPU)."""
    if device.type != "cuda":
        return None
    frontend, version = _frontend_problem()
    return unavailable_reason(torch.cuda.get_device_capability(device), version, frontend)


def emulated_attention(q8, q_inverse, k8, v8, k_inverse, v_inverse, o_scale) -> torch.Tensor:
    """The CPU stand-in: dequantise, float32 attention, output in e4m3 at `o_scale`."""
    q, k, v = q8.float() * q_inverse, k8.float() * k_inverse, v8.float() * v_inverse
    return quantize_static(F.scaled_dot_product_attention(q, k, v), o_scale)


class CudnnFP8Attention:
    """cuDNN's FP8 flash attention, one graph per (shapes, strides, device), built on first use.

    Runs on the caller's current stream, so it can be captured in a CUDA graph. Graphs (about 8 per
    size: the ring's fill lengths and sides) are kept for the process's life: captured CUDA graphs
    point at their workspaces."""

    def __init__(self):
        self._graphs: dict[tuple, tuple] = {}
        self._handles: dict[torch.device, int] = {}

    def __call__(self, q8, q_inverse, k8, v8, k_inverse, v_inverse, o_scale) -> torch.Tensor:
        import cudnn
        key = (q8.shape, q8.stride(), k8.shape, k8.stride(), v8.stride(), q8.device)
        with torch.cuda.device(q8.device):             # cuDNN handles belong to the current device
            if key not in self._graphs:
                self._graphs[key] = self._build(q8, k8, v8)
            graph, names, constants, workspace = self._graphs[key]
            batch, heads, length, head_dim = q8.shape
            out = torch.empty(batch, length, heads, head_dim, device=q8.device, dtype=FP8_DTYPE).transpose(1, 2)
            handle = self._handles[q8.device]
            cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
            values = dict(q=q8, k=k8, v=v8, q_inverse=q_inverse, k_inverse=k_inverse, v_inverse=v_inverse,
                          o_scale=o_scale, out=out, **constants)
            graph.execute({names[n]: t for n, t in values.items()}, workspace, handle=handle)
        return out

    def _build(self, q8, k8, v8):
        import cudnn
        device = q8.device
        if device not in self._handles:
            self._handles[device] = cudnn.create_handle()

        def scalar(value=0.0):
            return torch.full((1, 1, 1, 1), value, device=device, dtype=torch.float32)
        # softmax probabilities (before normalisation) lie in [0, 1]: ×448 uses the whole e4m3 range
        constants = dict(s_scale=scalar(FP8_MAX), s_inverse=scalar(1 / FP8_MAX), s_amax=scalar(), o_amax=scalar())
        try:
            graph, names = self._graph(cudnn, q8, k8, v8, scalar)
            graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        except Exception as exc:                       # the frontend raises its own error types
            raise RuntimeError(f"cuDNN could not build FP8 attention for q {tuple(q8.shape)}, k {tuple(k8.shape)}: "
                               f"{exc}. Use memory_mode 'balanced' (bf16 attention).") from exc
        workspace = torch.empty(max(1, graph.get_workspace_size()), device=device, dtype=torch.uint8)
        return graph, names, constants, workspace

    def _graph(self, cudnn, q8, k8, v8, scalar):
        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self._handles[q8.device])
        names = {n: graph.tensor_like(t) for n, t in (("q", q8), ("k", k8), ("v", v8))}
        for n in ("q_inverse", "k_inverse", "v_inverse", "o_scale", "s_scale", "s_inverse"):
            names[n] = graph.tensor_like(scalar())
        out, _, s_amax, o_amax = graph.sdpa_fp8(
            q=names["q"], k=names["k"], v=names["v"], descale_q=names["q_inverse"], descale_k=names["k_inverse"],
            descale_v=names["v_inverse"], descale_s=names["s_inverse"], scale_s=names["s_scale"],
            scale_o=names["o_scale"], generate_stats=False, attn_scale=1 / math.sqrt(q8.shape[-1]))
        batch, heads, length, head_dim = q8.shape
        out.set_output(True).set_dim([batch, heads, length, head_dim]) \
            .set_stride([length * heads * head_dim, head_dim, heads * head_dim, 1]).set_data_type(cudnn.data_type.FP8_E4M3)
        for amax in (s_amax, o_amax):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        names.update(out=out, s_amax=s_amax, o_amax=o_amax)
        return graph, names


_cudnn_attention = CudnnFP8Attention()


def fp8_attention(q8, q_inverse, k8, v8, scales: CacheScales, layer: int) -> torch.Tensor:
    """softmax(q kᵀ/√d) v of e4m3 queries (with their inverse scale) over e4m3 cached keys/values of
    `layer`; the output is e4m3 at the layer's output scale (`scales.output_inverse[layer]` reads
    it back), [B, heads, L, head_dim] over [B, L, heads, head_dim] memory on the GPU (the
    o-projection reads it as [L, dim] rows)."""
    args = (q8, q_inverse, k8, v8, scales.key_inverse[layer], scales.value_inverse[layer], scales.output[layer])
    return _cudnn_attention(*args) if q8.is_cuda else emulated_attention(*args)
