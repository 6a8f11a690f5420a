"""What loading and a generation need in memory: the DiT's weights in each format and the refusal,
before any file is read, of a load that cannot fit; the caches exactly as the banks allocate them,
the estimate of sampling's whole GPU share against measured peaks, and the refusal, before the
first block, of a run whose caches cannot fit, after which the model still samples."""
import pytest
import torch

from liveavatar_backend import memory_budget
from liveavatar_backend.config import DiTConfig
from liveavatar_backend.errors import InputError
from liveavatar_backend.kv_offload import PINNED_SLAB_BYTES, power_of_two_ceil, slab_chunk_counts
from liveavatar_backend.memory_budget import (cache_gpu_bytes, check_caches_fit, check_weights_fit, dit_weight_bytes,
                                             host_cache_bytes, sampling_gpu_bytes)
from liveavatar_backend.memory_modes import MEMORY_MODES
from liveavatar_backend.pipeline import BlockSampler, GenerationPlan

GB = 1e9
MiB = 2 ** 20
FULL = DiTConfig.wan_s2v_14b()
BF16_WEIGHTS = 32.59 * GB        # 16.30 B parameters of the manifest, 2 bytes each
FP8_WEIGHTS = 17.0 * GB          # e4m3 linears plus the bf16 rest (engine load, PERFORMANCE.md)
TEXT_KV = 2 * FULL.num_layers * FULL.text_len * FULL.dim * 2
H100_USABLE = 79.18 * 2 ** 30 - 0.6 * GB    # the card's memory less a CUDA context
OTHER_MODELS = 1.3 * GB          # VAE, wav2vec2 and the prompt's text keys/values


def test_the_14b_weights_in_each_format():
    bf16, bf16_peak = dit_weight_bytes(FULL, fp8=False)
    assert bf16 == bf16_peak == 2 * 16_295_755_609             # the manifest's parameters, 2 bytes each
    assert dit_weight_bytes(FULL, fp8=False, dtype=torch.float32)[0] == 2 * bf16
    fp8, fp8_peak = dit_weight_bytes(FULL, fp8=True)
    assert fp8 == pytest.approx(16.65 * GB, abs=0.01 * GB)
    # built one group at a time: at most one block in bf16 on top; 17.4 GB was measured with the VAE
    # beside it (H200, 2026-12-03, PERFORMANCE.md)
    assert fp8 + 0.3 * GB < fp8_peak < 17.2 * GB


@pytest.mark.parametrize("mode,free_gb,loads", [
    ("quality", 78.5, True), ("quality", 32.0, False), ("balanced", 23.0, True), ("low_vram", 16.5, False),
])
def test_which_loads_a_card_refuses_before_reading_a_file(mode, free_gb, loads):
    if loads:
        check_weights_fit(FULL, MEMORY_MODES[mode], "cuda:0", free_gb * GB)
    else:
        with pytest.raises(InputError, match=rf"memory_mode '{mode}' needs .* GB on cuda:0 .* {free_gb} GB are free"):
            check_weights_fit(FULL, MEMORY_MODES[mode], "cuda:0", free_gb * GB)
    check_weights_fit(FULL, MEMORY_MODES[mode], "cuda:0", None)       # free memory not known: no refusal


def test_a_refused_load_says_what_to_choose():
    with pytest.raises(InputError, match=r"'quality' needs 32.6 GB on cuda:0 for the DiT's weights alone, but 23.0 "
                                         r"GB are free. Choose memory_mode 'balanced' or 'low_vram' \(FP8 weights: "
                                         r"17.0 GB.*several GPUs"):
        check_weights_fit(FULL, MEMORY_MODES["quality"], "cuda:0", 23.0 * GB)
    with pytest.raises(InputError, match=r"'balanced' needs 17.0 GB on cuda:0 .* Split the DiT over several GPUs"):
        check_weights_fit(FULL, MEMORY_MODES["balanced"], "cuda:0", 12.0 * GB)
    with pytest.raises(InputError, match=r"'quality' needs 65.2 GB on the CPU \(RAM\) .* but 30.0 GB are free. "
                                         r"Run it on a GPU .* choose memory_mode 'balanced' or 'low_vram' \(FP8 "
                                         r"weights: 18.4 GB"):
        check_weights_fit(FULL, MEMORY_MODES["quality"], "cpu", 30.0 * GB)      # float32, or FP8 linears
    with pytest.raises(InputError, match=r"'balanced' needs 18.4 GB on the CPU \(RAM\) .* Run it on a GPU "
                                         r"\('cuda:0'\) or close other programs\.$"):
        check_weights_fit(FULL, MEMORY_MODES["balanced"], "cpu", 10.0 * GB)
    with pytest.raises(InputError, match=r"12.0 GB are free. Split the DiT over several GPUs .* or free the GPU of "
                                         r"other programs\.$"):                  # FP8 would not fit either
        check_weights_fit(FULL, MEMORY_MODES["quality"], "cuda:0", 12.0 * GB)


def test_each_gpu_of_a_split_model_checks_its_own_share(tiny_models, monkeypatch):
    from liveavatar_backend import engine as engine_module
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.pipeline_schedule import stage_layers
    from liveavatar_backend.stage import stage_parameters
    first = stage_parameters(FULL, stage_layers(FULL.num_layers, 2)[0], True, False)
    share = dit_weight_bytes(FULL, fp8=False, keep=first)[0]
    assert 0.45 < share / BF16_WEIGHTS < 0.55
    with pytest.raises(InputError, match=r"'quality' needs 16.\d GB on cuda:0 for its share of the DiT's weights "
                                         r"alone, but 12.0 GB are free. Choose memory_mode 'balanced' .* "
                                         r"split the DiT over more GPUs"):
        check_weights_fit(FULL, MEMORY_MODES["quality"], "cuda:0", 12.0 * GB, first)
    check_weights_fit(FULL, MEMORY_MODES["quality"], "cuda:0", 17.0 * GB, first)    # what one card would refuse
    started = []                       # the workers are told the mode, so that each checks its share

    class Workers:
        def __init__(self, devices, load, report):
            started.append(load)
            raise InputError("stop here")
    monkeypatch.setattr(engine_module, "PipelineWorkers", Workers)
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B")
    with pytest.raises(InputError, match="stop here"):
        LiveAvatarEngine.load(spec, device="cpu,cpu", memory_mode="balanced")
    assert started[0]["memory_mode"] == "balanced" and started[0]["fp8"]


def test_a_load_that_cannot_fit_fails_before_any_file_is_read(tiny_models, monkeypatch):
    from liveavatar_backend import engine as engine_module
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
    reads = []
    monkeypatch.setattr(engine_module, "load_dit", lambda *args, **kwargs: reads.append("dit"))
    monkeypatch.setattr(engine_module, "_load_encoders_and_vae", lambda *args: reads.append("encoders"))
    monkeypatch.setattr(engine_module, "free_host_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"memory_mode 'quality' needs 0.0 GB on the CPU \(RAM\)"):
        LiveAvatarEngine.load(spec, device="cpu")
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_capped_like_a_24_gb_card_quality_is_refused_and_fp8_goes_on_to_read(tmp_path):
    """The real free memory of a GPU under a 23 GB cap: 14B in bf16 is refused before any file is read
    (the files here are empty: reading one fails differently), the FP8 modes pass on to reading."""
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.errors import CheckpointError
    names = ("wan2.2_s2v_14B_bf16.safetensors", "umt5_xxl_fp16.safetensors", "wan_2.1_vae.safetensors",
             "wav2vec2_large_english.safetensors")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    spec = ModelSpec.single_files(tmp_path / names[0], text_encoder=tmp_path / names[1],
                                  vae=tmp_path / names[2], audio_encoder=tmp_path / names[3])
    torch.cuda.set_per_process_memory_fraction(23 * GB / torch.cuda.mem_get_info(0)[1], 0)
    try:
        with pytest.raises(InputError, match=r"'quality' needs 32.6 GB on cuda:0 .* but 2[0-3].\d GB are free"):
            LiveAvatarEngine.load(spec, device="cuda:0", memory_mode="quality")
        with pytest.raises(CheckpointError, match="wan2.2_s2v_14B_bf16.safetensors: not a readable safetensors"):
            LiveAvatarEngine.load(spec, device="cuda:0", memory_mode="balanced")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def plan(size: tuple[int, int], steps: int) -> GenerationPlan:
    return GenerationPlan(size[1], size[0], num_clips=2, steps=steps, seed=0)


def full_size_bytes(size, steps, **mode) -> int:
    defaults = dict(offload_caches=False, fp8_attention=False)
    return sampling_gpu_bytes(FULL, plan(size, steps), **{**defaults, **mode})


def test_estimate_covers_the_measured_peak_without_wasting_a_card():
    # H200, 704*384, 4 steps, bf16, DiT alone: 80.0 GB peak (PERFORMANCE.md, 2026-12-03)
    estimate = BF16_WEIGHTS + TEXT_KV + full_size_bytes((704, 384), 4)
    assert 80.0 * GB <= estimate <= 82.0 * GB
    low_vram = full_size_bytes((704, 384), 4, offload_caches=True)
    assert low_vram < 3 * GB                    # two layers' staging instead of 46 GB of caches
    assert full_size_bytes((704, 384), 4, fp8_attention=True) < 0.55 * full_size_bytes((704, 384), 4)


def test_free_gpu_memory_honours_a_per_process_cap(monkeypatch):
    fake = dict(mem_get_info=lambda device: (50 * GB, 80 * GB), memory_reserved=lambda device: 10 * GB,
                memory_allocated=lambda device: 8 * GB, get_per_process_memory_fraction=lambda device: 1.0)
    for name, value in fake.items():
        monkeypatch.setattr(memory_budget.torch.cuda, name, value)
    assert memory_budget.free_gpu_bytes("cuda:0") == 52 * GB          # the driver's free + cached, unused
    monkeypatch.setattr(memory_budget.torch.cuda, "get_per_process_memory_fraction", lambda device: 0.5)
    assert memory_budget.free_gpu_bytes("cuda:0") == 32 * GB          # a 40 GB cap of which 10 are reserved

    def no_fraction(device):                # torch < 2.6 has no getter; an allocator may have none
        raise RuntimeError("not supported by this allocator")
    monkeypatch.setattr(memory_budget.torch.cuda, "get_per_process_memory_fraction", no_fraction)
    assert memory_budget.free_gpu_bytes("cuda:0") == 52 * GB          # no cap known: the driver's word
    monkeypatch.setattr(memory_budget.torch.cuda, "get_per_process_memory_fraction", lambda device: 216975863.6)
    assert memory_budget.free_gpu_bytes("cuda:0") == 52 * GB          # cudaMallocAsync's answer on an H100
    monkeypatch.setattr(memory_budget.torch.cuda, "current_device", lambda: 0)
    assert memory_budget.free_gpu_bytes("cuda") == 52 * GB            # 'cuda' is the current GPU


def test_free_host_memory_is_what_the_system_says_is_available():
    available = memory_budget.free_host_bytes()
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    expected = int(fields["MemAvailable"].split()[0]) * 1024
    assert abs(available - expected) < 0.25 * expected      # read a moment apart, by psutil or from /proc


@pytest.mark.parametrize("mode,size,steps,fits", [
    ("quality", (704, 384), 4, True),        # 46.3 GB of caches in the 50.5 GB left after loading
    ("quality", (1024, 704), 4, False),      # 2.7x the tokens: 123.4 GB of caches
    ("balanced", (1024, 704), 4, False),     # the same bf16 caches
    ("fast", (1024, 704), 4, True),          # e4m3 caches: 62.3 GB in the 66.1 GB left
    ("low_vram", (1280, 720), 4, True),      # two layers' staging slots
])
def test_which_full_size_runs_an_80_gb_card_refuses(mode, size, steps, fits):
    name = MEMORY_MODES[mode]
    weights = BF16_WEIGHTS if not name.fp8_weights else FP8_WEIGHTS
    free = H100_USABLE - weights - OTHER_MODELS
    need = cache_gpu_bytes(FULL, plan(size, steps), offload_caches=name.offload_caches,
                           fp8_attention=name.fp8_attention)
    assert (need <= free) == fits


def test_low_vram_host_memory_at_full_size():
    # what README's VRAM table says low_vram keeps in RAM: the whole bank, as on the GPU otherwise;
    # pinned, in slabs that PyTorch's pinned-memory allocator rounds up to a power of two
    def host(size, steps, pinned):
        return host_cache_bytes(FULL, plan(size, steps), offload_caches=True, pinned=pinned) / GB
    assert host((384, 256), 3, False) == pytest.approx(12.9, abs=0.05)
    assert host((704, 384), 4, False) == pytest.approx(45.8, abs=0.05)
    assert host((384, 256), 3, True) == pytest.approx(13.0, abs=0.05)      # 18.8 with a chunk per allocation
    assert host((704, 384), 4, True) == pytest.approx(46.0, abs=0.05)      # 48.3 with a chunk per allocation
    for size in ((384, 256), (704, 384), (1024, 704)):                     # 1024*704: 193 GB for 122 chunk by chunk
        assert host(size, 4, True) < 1.02 * host(size, 4, False)
    assert host_cache_bytes(FULL, plan((704, 384), 4), offload_caches=False) == 0


@pytest.mark.parametrize("chunk_bytes", [31 * MiB + 5, 4 * MiB, 300 * MiB + 1, 5 * 2 ** 30])
@pytest.mark.parametrize("count", [1, 2, 7, 133, 1000])
def test_pinned_slabs_hold_every_chunk_and_waste_less_than_a_chunk_each(chunk_bytes, count):
    counts = slab_chunk_counts(chunk_bytes, count)
    assert sum(counts) == count and min(counts) >= 1
    for in_slab in counts:
        held = power_of_two_ceil(in_slab * chunk_bytes)          # what the pinned allocator reserves
        assert held - in_slab * chunk_bytes < chunk_bytes
        assert held <= max(PINNED_SLAB_BYTES, power_of_two_ceil(chunk_bytes))
    # packed: full slabs, then a few slabs of halving sizes for the rest
    per_full_slab = max(1, max(PINNED_SLAB_BYTES, power_of_two_ceil(chunk_bytes)) // chunk_bytes)
    assert len(counts) <= count // per_full_slab + 2 * per_full_slab.bit_length()
    assert slab_chunk_counts(chunk_bytes, 0) == []


@pytest.mark.parametrize("mode,suggested", [("quality", ["'balanced'", "'fast'", "'low_vram'"]),
                                            ("balanced", ["'fast'", "'low_vram'"]),
                                            ("fast", ["'low_vram'"]), ("low_vram", [])])
def test_the_gpu_refusal_says_what_to_change(mode, suggested):
    with pytest.raises(InputError) as error:
        check_caches_fit(MEMORY_MODES[mode], plan((1088, 640), 4), "cuda:0", gpu_need=123_420_000_000,
                         gpu_free=45_060_000_000)
    message = str(error.value)
    assert message.startswith("size 1088*640 at 4 steps needs 123.4 GB of GPU memory")
    assert f"in memory_mode '{mode}', but 45.1 GB are free on cuda:0" in message
    others = [f"'{name}'" for name in MEMORY_MODES if name != mode]
    assert [name for name in others if name in message] == suggested
    assert "a smaller size, fewer steps" in message
    assert ("'cuda:0,cuda:1'" in message) == (mode != "fast")       # FP8 attention runs on one GPU only


def test_the_host_refusal_and_what_passes():
    low_vram = MEMORY_MODES["low_vram"]
    with pytest.raises(InputError, match=r"size 704\*384 at 4 steps keeps 45.8 GB of attention caches in host "
                                         r"memory \(RAM\) in memory_mode 'low_vram', but 31.5 GB are available"):
        check_caches_fit(low_vram, plan((704, 384), 4), "cuda:0", gpu_need=5 * 10 ** 9, gpu_free=20 * 10 ** 9,
                         host_need=45_800_000_000, host_free=31_500_000_000)
    check_caches_fit(low_vram, plan((704, 384), 4), "cuda:0", gpu_need=5 * 10 ** 9, gpu_free=20 * 10 ** 9,
                     host_need=45_800_000_000, host_free=None)           # not known: not refused
    check_caches_fit(low_vram, plan((704, 384), 4), "cuda:0", gpu_need=20 * 10 ** 9, gpu_free=20 * 10 ** 9,
                     host_need=45_800_000_000, host_free=45_800_000_000)  # exactly fits


@pytest.mark.parametrize("offload", [False, True])
def test_cache_bytes_are_what_a_generation_allocates(tiny_engine, offload):
    engine = tiny_engine
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=3, seed=7)
    sampler = BlockSampler(engine.dit, job.plan, job.cond, offload_caches=offload)
    sampler.prefill(job.cond.ref_latent)
    bank = sampler.bank

    def size(tensors):
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    if offload:
        on_gpu = [tensor for slot in bank.staging for tensor in slot]
        on_host = [tensor for chunks in (bank.host_cond, bank.host_ring) for pair in chunks.values() for tensor in pair]
        slabs = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in on_host}
        assert sum(slabs.values()) == size(on_host)          # chunks packed into slabs, no byte twice
        assert len(slabs) < len(on_host) / 4
    else:
        on_gpu = [tensor for layers in (bank.k, bank.v) for per_layer in layers.values() for tensor in per_layer]
        on_host = []
    on_gpu += list(bank.sink_ref_k.values())
    assert len(bank.sink_ref_k) == engine.dit.cfg.num_layers

    cfg = engine.dit.cfg
    assert size(on_gpu) == cache_gpu_bytes(cfg, job.plan, offload_caches=offload, fp8_attention=False,
                                           dtype=engine.dtype)
    assert size(on_host) == host_cache_bytes(cfg, job.plan, offload_caches=offload, dtype=engine.dtype,
                                             pinned=False)       # on the CPU nothing is pinned
    sampler.release()


def test_low_vram_hands_its_pinned_memory_back_when_released(tiny_engine, monkeypatch):
    from liveavatar_backend.kv_offload import OffloadedKVCacheBank
    emptied = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(True), raising=False)
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = tiny_engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=2, seed=7)
    cfg = tiny_engine.dit.cfg
    bank = OffloadedKVCacheBank(job.plan.layout, range(cfg.num_layers), 2, cfg.num_heads, cfg.head_dim,
                                torch.float32, "cpu")
    bank.release()
    assert emptied == []                              # nothing was pinned on the CPU
    bank = OffloadedKVCacheBank(job.plan.layout, range(cfg.num_layers), 2, cfg.num_heads, cfg.head_dim,
                                torch.float32, "cpu")
    bank.copy_stream = type("Stream", (), {"synchronize": lambda self: None})()   # as on a GPU
    bank.release()
    assert emptied == [True] and bank.host_ring == {} and bank.host_cond == {}


def test_low_vram_prefetches_every_layer_while_the_one_before_computes(tiny_engine):
    """Each layer's cache copy is queued when the layer before it asks for its own buffers (so the copy
    runs beside that layer's attention); only the first layer of each pass waits for its copy."""
    from liveavatar_backend.kv_offload import OffloadedKVCacheBank
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = tiny_engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=2, seed=7)
    cfg = tiny_engine.dit.cfg
    layers = 6
    bank = OffloadedKVCacheBank(job.plan.layout, range(layers), 2, cfg.num_heads, cfg.head_dim, torch.float32, "cpu")
    copies, computing = [], [None]
    fill = bank._fill
    bank._fill = lambda slot, layer, view: (copies.append((computing[0], layer, view.step)), fill(slot, layer, view))
    for step in (0, 1):
        for layer in range(layers):
            computing[0] = layer
            bank.staged(layer, bank.step_views[step])
            bank.staged(layer, bank.step_views[step])        # asked twice in a layer: copied once
    assert copies == [(0, 0, 0)] + [(l - 1, l, 0) for l in range(1, layers)] + \
                     [(0, 0, 1)] + [(l - 1, l, 1) for l in range(1, layers)]
    bank.release()


def test_low_vram_asks_for_parallel_pinning_unless_the_user_configured_pinning(monkeypatch):
    """PyTorch's pinned allocator is switched to malloc + page touching on 8 threads + register
    (3x faster setup, PERFORMANCE.md 2026-12-07), but a pinned_ option in the user's allocator
    settings stands, and a PyTorch that refuses the switch only loses the speed."""
    from liveavatar_backend import kv_offload
    settings = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append, raising=False)
    for name in kv_offload.ALLOCATOR_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert kv_offload.prefer_parallel_pinning()
    assert settings == ["pinned_use_cuda_host_register:True,pinned_num_register_threads:8"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")      # not about pinning
    assert kv_offload.prefer_parallel_pinning() and len(settings) == 2
    for name in kv_offload.ALLOCATOR_ENV_VARS:
        monkeypatch.setenv(name, "pinned_use_cuda_host_register:False")
        assert not kv_offload.prefer_parallel_pinning() and len(settings) == 2
        monkeypatch.delenv(name)

    def refuse(_):
        raise RuntimeError("Unrecognized key 'pinned_use_cuda_host_register' in CUDA allocator config.")
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", refuse)
    assert not kv_offload.prefer_parallel_pinning()


def test_only_a_bank_that_pins_host_memory_switches_the_pinned_allocator(monkeypatch):
    from liveavatar_backend import kv_offload
    from liveavatar_backend.kv_cache import CacheLayout

    class Stop(Exception):
        pass

    def first_chunks(count, tokens, num_heads, head_dim, dtype, pin):
        calls.append(pin)
        raise Stop                            # the switch comes before any host memory
    calls = []
    monkeypatch.setattr(kv_offload, "prefer_parallel_pinning", lambda: calls.append("switch"))
    monkeypatch.setattr(kv_offload, "host_chunks", first_chunks)
    for device, expected in (("cpu", [False]), ("cuda", ["switch", True])):
        calls.clear()
        with pytest.raises(Stop):
            kv_offload.OffloadedKVCacheBank(CacheLayout(4, 8), range(2), 2, 2, 32, torch.float32, device)
        assert calls == expected


@pytest.mark.parametrize("short_of", ["gpu", "host"])
def test_a_run_whose_caches_do_not_fit_fails_before_sampling_and_the_model_stays_usable(tiny_engine, monkeypatch,
                                                                                       short_of):
    from liveavatar_backend import engine as engine_module
    engine = tiny_engine
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=2, seed=7)
    steps_run = []
    # as on a GPU: 1024*704 in bf16 on an 80 GB card; or low_vram on a host with little RAM left
    if short_of == "gpu":
        monkeypatch.setattr(engine, "cache_gpu_bytes", lambda plan: 123_420_000_000)
        monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 45_060_000_000)
        expected = r"size 256\*192 at 2 steps needs 123.4 GB of GPU memory .* 'quality', but 45.1 GB are free"
    else:
        monkeypatch.setattr(engine, "mode", MEMORY_MODES["low_vram"])
        monkeypatch.setattr(engine, "cache_gpu_bytes", lambda plan: 10 ** 6)
        monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 10 ** 9)
        monkeypatch.setattr(engine_module, "free_host_bytes", lambda: 1000)
        expected = r"keeps 0.0 GB of attention caches in host memory \(RAM\) in memory_mode 'low_vram'"
    with pytest.raises(InputError, match=expected):
        next(engine.sample(job, on_progress=steps_run.append))
    assert steps_run == []                                    # refused before the first block
    monkeypatch.undo()
    assert engine.cache_gpu_bytes(job.plan) is None           # the CPU: nothing to check
    latents = list(engine.sample(job, on_progress=steps_run.append))
    assert len(latents) == 1 and latents[0].shape[:2] == (16, 12)
    assert steps_run[-1].done == steps_run[-1].total == 4 * 2          # 4 blocks x 2 steps
