"""What loading and a generation need in memory, and what is free.

Before it reads any file, a single-device load checks that the DiT's weights fit the device's free
memory, and otherwise stops naming the memory mode, what it needs and what to choose instead: a raw
out-of-memory error half-way through a 14B load (or, on the CPU, the system's out-of-memory killer)
says neither.

Before its first block the sampler checks that the run's caches fit (on the GPU, or in host memory
where `low_vram` offloads them) and otherwise stops with what it needs, what is free and what to
change, so that the loaded model stays as it was. The command line also uses the estimate of
sampling's whole GPU share to decide where the VAE decodes (render.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .constants import BLOCKS_PER_CLIP
from .errors import InputError
from .fp8 import FP8_DTYPE, converts_to_fp8
from .kv_offload import power_of_two_ceil, slab_chunk_counts
from .loading import build_empty_dit, dit_parameter_groups
from .memory_modes import MEMORY_MODES, MemoryMode

# Working memory of one block's forward besides the caches, in bytes per query token: the float32
# residual stream and its bf16 norm/q/k/v/attention copies (≈ 16 bytes per model dim) and the FFN's
# hidden states before and after the GELU (≈ 6 bytes per FFN dim, as bf16 with slack). On an H200 at
# 704*384, 4 steps, bf16 the DiT alone peaked at 80.0 GB against 79.3 GB of weights, caches and
# text keys/values (PERFORMANCE.md, 2026-12-03): ≈ 0.7 GB, which this estimate covers.
WORKSPACE_BYTES_PER_TOKEN_DIM = 16
WORKSPACE_BYTES_PER_TOKEN_FFN = 6
LIBRARY_WORKSPACE_BYTES = 512 * 2 ** 20   # cuBLAS/cuDNN workspaces, graph static buffers, rounding
GB = 1e9
# The compiled Wan VAE decoder, one latent per call: 4.8-5.0 GB peak at 704*384, its 0.25 GB of weights
# included (H200, docs/PERFORMANCE.md, "the Wan VAE"): about 19 kB per output pixel of a frame.
DECODE_BYTES_PER_PIXEL = 19_000


def cache_gpu_bytes(cfg, plan, *, offload_caches: bool, fp8_attention: bool,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """GPU memory a generation (`pipeline.GenerationPlan`) allocates before its first block, exactly
    as `KVCacheBank` (or, with the caches offloaded, `OffloadedKVCacheBank`'s two staging slots)
    allocates it, plus the sink's un-rotated keys (`fast`'s per-layer FP8 scales, a few bytes each,
    are not counted). A run for which this exceeds the free memory cannot fit at all."""
    lay = plan.layout
    cache_dtype = FP8_DTYPE if fp8_attention else dtype
    elem = torch.empty((), dtype=cache_dtype).element_size()
    if offload_caches:
        caches = 2 * 2 * (lay.cond_len + 2 * lay.ring_len) * cfg.dim * elem     # 2 slots × (k, v)
    else:
        caches = lay.bank_bytes(cfg.num_layers, plan.steps, cfg.dim, cache_dtype)
    sink_keys = cfg.num_layers * lay.ref_len * cfg.dim * torch.empty((), dtype=dtype).element_size()
    return caches + sink_keys


def host_cache_bytes(cfg, plan, *, offload_caches: bool, dtype: torch.dtype = torch.bfloat16,
                     pinned: bool = True) -> int:
    """Host memory the caches hold where they are offloaded (`low_vram`): per layer, a cond chunk per
    step pair and a chunk per ring block and step, keys and values, as `OffloadedKVCacheBank`
    allocates them; 0 where they stay on the GPU. `pinned`: as PyTorch's pinned-memory allocator
    holds them, each slab of chunks rounded up to a power of two (13.0 GB for 12.9 at 384*256, 3
    steps; 46.0 for 45.8 at 704*384, 4 steps)."""
    if not offload_caches:
        return 0
    lay = plan.layout
    token_bytes = cfg.dim * torch.empty((), dtype=dtype).element_size()

    def held(tokens: int, count: int) -> int:
        if not pinned:
            return count * tokens * token_bytes
        return sum(power_of_two_ceil(n * tokens * token_bytes) for n in slab_chunk_counts(tokens * token_bytes, count))

    keys_and_values = 2 * cfg.num_layers
    return (held(lay.cond_len, keys_and_values * ((plan.steps + 1) // 2))
            + held(lay.block_tokens, keys_and_values * plan.steps * BLOCKS_PER_CLIP))


def sampling_gpu_bytes(cfg, plan, *, offload_caches: bool, fp8_attention: bool,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """GPU memory one generation adds to the loaded model: `cache_gpu_bytes` and an estimate of one
    block's working memory. The command line compares it with the free memory to decide whether
    the VAE decoder fits beside it."""
    workspace = plan.layout.block_tokens * (WORKSPACE_BYTES_PER_TOKEN_DIM * cfg.dim
                                            + WORKSPACE_BYTES_PER_TOKEN_FFN * cfg.ffn_dim)
    return (cache_gpu_bytes(cfg, plan, offload_caches=offload_caches, fp8_attention=fp8_attention, dtype=dtype)
            + workspace + LIBRARY_WORKSPACE_BYTES)


def decode_gpu_bytes(height: int, width: int) -> int:
    """GPU memory decoding frames of height×width takes (the VAE's weights included), estimated."""
    return DECODE_BYTES_PER_PIXEL * height * width


def free_gpu_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: what the allocator may still reserve
    (the driver's free memory, within any `torch.cuda.set_per_process_memory_fraction` cap) plus
    what it holds reserved but unused."""
    device = torch.device(device)
    if device.index is None:               # the memory-fraction getter wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    driver_free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    try:
        fraction = torch.cuda.get_per_process_memory_fraction(device)
    except (AttributeError, RuntimeError):    # torch < 2.6; an allocator without it
        fraction = 1.0
    # under the cudaMallocAsync backend (ComfyUI's default) torch 2.11 returned 2.2e8 on an H100
    # (PERFORMANCE.md, 2026-12-06): a value that is no fraction means no cap
    cap = int(fraction * total) if 0 < fraction <= 1 else total
    return min(driver_free, max(0, cap - reserved)) + reserved - torch.cuda.memory_allocated(device)


def free_host_bytes() -> int | None:
    """Host memory available to new allocations without swapping; None where it cannot be read."""
    try:
        import psutil                     # ComfyUI's own dependency
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024          # the value is in kB
    except (OSError, KeyError, ValueError):
        return None


def check_caches_fit(mode: MemoryMode, plan, device, *, gpu_need: int, gpu_free: int,
                     host_need: int = 0, host_free: int | None = None) -> None:
    """An InputError naming the size, steps and memory mode, what the caches need and what is free,
    and what to change, where they cannot fit on the GPU or in host memory (None: not known)."""
    run = f"size {plan.width}*{plan.height} at {plan.steps} steps"
    if gpu_need > gpu_free:
        fixes = ", ".join(part for part in (mode.lighter, "a smaller size", "fewer steps") if part)
        several = "" if mode.fp8_attention else ", or split the DiT over several GPUs (devices such as 'cuda:0,cuda:1')"
        raise InputError(f"{run} needs {gpu_need / GB:.1f} GB of GPU memory for its attention caches in "
                         f"memory_mode {mode.name!r}, but {gpu_free / GB:.1f} GB are free on {device}. Choose "
                         f"{fixes}{several}.")
    if host_free is not None and host_need > host_free:
        raise InputError(f"{run} keeps {host_need / GB:.1f} GB of attention caches in host memory (RAM) in "
                         f"memory_mode {mode.name!r}, but {host_free / GB:.1f} GB are available. Choose a "
                         "smaller size or fewer steps, close other programs, or keep the caches on a GPU with "
                         "room for them (memory_mode 'balanced', or several GPUs).")


def dit_weight_bytes(cfg, *, fp8: bool, dtype: torch.dtype = torch.bfloat16,
                     keep: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """(bytes the loaded DiT holds, peak bytes while `loading.assemble_dit` builds it) on one device;
    `keep`: the parameters of one pipeline stage (as `assemble_dit`'s), else all.

    bf16/float32: every parameter in `dtype`. FP8: the linears `fp8.convert_to_fp8` converts in e4m3
    (one byte each plus a float32 scale), the rest in `dtype`; the model is built one parameter group
    at a time, so the peak is the groups converted so far plus the next one still in `dtype`. The
    temporaries of the one linear being merged or converted are not counted: a lower bound."""
    model = build_empty_dit(cfg)
    elem = torch.empty((), dtype=dtype).element_size()
    in_fp8 = {f"{name}.weight" for name, module in model.named_modules() if fp8 and converts_to_fp8(name, module)}
    sizes = {name: tensor.numel() for name, tensor in model.state_dict().items() if keep is None or keep(name)}
    groups = dit_parameter_groups(cfg) if fp8 else [lambda name: True]
    held = peak = 0
    for group in groups:
        names = [name for name in sizes if group(name)]
        peak = max(peak, held + sum(sizes[name] for name in names) * elem)
        held += sum(sizes[name] + 4 if name in in_fp8 else sizes[name] * elem for name in names)
    return held, max(peak, held)


def load_device_bytes(cfg, mode: MemoryMode, device, keep: Callable[[str], bool] | None = None) -> int:
    """Peak memory the DiT (or a stage's share, `keep`) takes on its device while it loads
    (`dit_weight_bytes`): bf16 on a GPU and float32 on the CPU, the linears in FP8 in the FP8 modes.
    The VAE and wav2vec2 (1.5 GB together at full size) are not counted: a load that this estimate
    refuses surely cannot fit."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dit_weight_bytes(cfg, fp8=mode.fp8_weights, dtype=dtype, keep=keep)[1]


def check_weights_fit(cfg, mode: MemoryMode, device, free: int | None,
                      keep: Callable[[str], bool] | None = None) -> None:
    """An InputError, before any file is read, where loading cannot fit the device (free None: not
    known); `keep`: a pipeline stage's share of the weights."""
    need = load_device_bytes(cfg, mode, device, keep)
    if free is None or need <= free:
        return
    on_cpu = torch.device(device).type == "cpu"
    fixes = ["run it on a GPU ('cuda:0')"] if on_cpu else []
    if not mode.fp8_weights:
        fp8_need = load_device_bytes(cfg, MEMORY_MODES["balanced"], device, keep)
        if fp8_need <= free:
            fixes.append(f"choose memory_mode 'balanced' or 'low_vram' (FP8 weights: {fp8_need / GB:.1f} GB; "
                         "'low_vram' also keeps the attention caches in host RAM, for 24 GB cards)")
    if not on_cpu:
        fixes.append(f"split the DiT over {'more' if keep else 'several'} GPUs (devices such as 'cuda:0,cuda:1')")
    fixes.append("close other programs" if on_cpu else "free the GPU of other programs")
    advice = ", ".join(fixes[:-1]) + f" or {fixes[-1]}" if len(fixes) > 1 else fixes[0]
    where = "the CPU (RAM)" if on_cpu else str(device)
    what = "the DiT's weights" if keep is None else "its share of the DiT's weights"
    raise InputError(f"loading the model in memory_mode {mode.name!r} needs {need / GB:.1f} GB on {where} for "
                     f"{what} alone, but {free / GB:.1f} GB are free. {advice[0].upper()}{advice[1:]}.")
