"""The memory modes a load runs in: what 'auto' picks by the free memory of the GPU (and says), what
GPUs without FP8 matrix units do with the FP8 modes, and the run that 'auto' moves to host RAM."""
import pytest
import torch

from liveavatar_backend.errors import InputError
from liveavatar_backend.memory_modes import MEMORY_MODES
from liveavatar_backend.pipeline import GenerationPlan

GB = 1e9


def plan(size: tuple[int, int], steps: int) -> GenerationPlan:
    return GenerationPlan(size[1], size[0], num_clips=2, steps=steps, seed=0)


@pytest.mark.parametrize("free_gb,gpus,expected", [
    (78.5, 1, "quality"),        # an 80 GB card
    (46.5, 1, "balanced"),       # 48 GB: quality's preview peaks at 48.1 GB
    (39.5, 1, "balanced"),       # an A100 40 GB
    (23.0, 1, "low_vram"),       # a 24 GB card
    (23.0, 2, "balanced"),       # two of them: 16 GB each (README)
    (46.5, 2, "quality"),
    (None, 1, "quality"),        # the CPU, or torchrun workers on other hosts
])
def test_auto_keeps_the_most_quality_whose_preview_fits(free_gb, gpus, expected):
    from liveavatar_backend.memory_modes import resolve_auto
    assert resolve_auto(None if free_gb is None else free_gb * GB, gpus).name == expected


def test_auto_is_resolved_at_load_and_said(tiny_engine, monkeypatch):
    from liveavatar_backend import engine as engine_module
    said = []
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 23.5e9)
    monkeypatch.setattr(engine_module, "fp8_matmul_unavailable", lambda device: None)
    assert engine_module._memory_mode("auto", ["cuda:1"], said.append).name == "low_vram"
    assert said == ["memory_mode 'auto': low_vram (23.5 GB free on cuda:1)"]
    assert engine_module._memory_mode("balanced", ["cuda:1"], said.append).name == "balanced" and len(said) == 1
    assert tiny_engine.mode.name == "quality"                 # the default, 'auto', on the CPU
    with pytest.raises(InputError, match="memory_mode 'best': choose one of auto, quality, balanced, fast, low_vram"):
        engine_module._memory_mode("best", ["cpu"], said.append)


def test_gpus_without_fp8_units_keep_fp8_weights_and_say_so(monkeypatch):
    from liveavatar_backend import engine as engine_module
    from liveavatar_backend import fp8

    def gpus_with_capability(capability):         # as the machine's GPUs would answer
        monkeypatch.setattr(fp8.torch.cuda, "get_device_capability", capability)
        fp8._gpu_has_fp8_matmul.cache_clear()      # asked once per GPU
    monkeypatch.setattr(fp8.torch.cuda, "get_device_name", lambda device: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(fp8.torch.version, "hip", None)
    monkeypatch.setattr(fp8.torch.cuda, "current_device", lambda: 0)
    gpus_with_capability(lambda device: (8, 6))
    ampere = fp8.fp8_matmul_unavailable("cuda:0")
    assert ampere == ("NVIDIA GeForce RTX 3090 (cuda:0, compute capability 8.6) has no FP8 matrix units (they need "
                      "8.9 or newer: Ada, Hopper, Blackwell)")
    assert not fp8.has_fp8_matmul("cuda:0")
    assert fp8.fp8_matmul_unavailable("cpu") is None and fp8.has_fp8_matmul("cpu")   # the CPU emulates FP8
    gpus_with_capability(lambda device: (8, 9))
    assert fp8.fp8_matmul_unavailable("cuda:0") is None and fp8.has_fp8_matmul("cuda")     # Ada
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 23.0e9)
    gpus_with_capability(lambda device: (8, 6) if device in (1, torch.device("cuda:1")) else (8, 9))   # Ada, Ampere
    said = []
    assert engine_module._memory_mode("auto", ["cuda:1"], said.append).name == "low_vram"
    assert said == ["memory_mode 'auto': low_vram (23.0 GB free on cuda:1)",
                    "NVIDIA GeForce RTX 3090 (cuda:1, compute capability 8.6) has no FP8 matrix units (they need 8.9 "
                    "or newer: Ada, Hopper, Blackwell): memory_mode 'low_vram' keeps the DiT's weights in FP8 and "
                    "multiplies them in bf16 (FP8's memory, not its speed)"]
    said.clear()
    assert engine_module._memory_mode("auto", ["cuda:0"], said.append).name == "low_vram" and len(said) == 1
    assert engine_module._memory_mode("balanced", ["cuda:0", "cuda:1"], said.append).name == "balanced"
    assert "(cuda:1, compute capability 8.6)" in said[-1]         # any of the GPUs of a split model
    said.clear()
    for mode in ("quality", "fast"):                               # nothing in FP8 to say; 'fast' refused at load
        assert engine_module._memory_mode(mode, ["cuda:1"], said.append).name == mode
    assert said == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_auto_follows_its_free_memory():
    from liveavatar_backend.engine import _memory_mode
    from liveavatar_backend.fp8 import fp8_matmul_unavailable
    fp8_units = torch.cuda.get_device_capability(0) >= (8, 9)
    assert (fp8_matmul_unavailable("cuda:0") is None) == fp8_units
    said = []
    total = torch.cuda.mem_get_info(0)[1]
    for cap_gb, expected in ((23, "low_vram"), (40, "balanced"), (60, "quality")):
        if cap_gb * GB > total:
            continue
        torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total, 0)
        try:
            assert _memory_mode("auto", ["cuda:0"], said.append).name == expected
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert said and all(line.startswith("memory_mode 'auto': ") or "no FP8 matrix units" in line for line in said)


def test_auto_moves_the_caches_to_host_ram_for_a_size_that_does_not_fit(tiny_engine, monkeypatch):
    """'auto' judged by the 384*256 preview; a 704*384 run on a 48 GB card takes low_vram's caches
    (the same FP8 weights); one where quality's bf16 weights leave too little keeps them in host RAM
    too, instead of being refused. A mode chosen by name is kept (and refused)."""
    from liveavatar_backend import engine as engine_module
    engine, run = tiny_engine, plan((704, 384), 4)
    assert engine.run_mode(run) is engine.mode                 # the CPU: nothing to move
    monkeypatch.setattr(engine, "mode", MEMORY_MODES["balanced"])
    monkeypatch.setattr(engine, "_cache_gpu_bytes", lambda plan, mode: 2e9 if mode.offload_caches else 48.4e9)
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 29.0e9)    # a 48 GB card, weights loaded
    assert engine.auto                                        # the fixture loads with the default, 'auto'
    monkeypatch.setattr(engine, "auto", False)
    assert engine.run_mode(run).name == "balanced"            # chosen by name
    monkeypatch.setattr(engine, "auto", True)
    assert engine.run_mode(run).name == "low_vram" and engine.cache_gpu_bytes(run) == 2e9
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 50.0e9)
    assert engine.run_mode(run).name == "balanced"            # where it fits, it stays
    monkeypatch.setattr(engine, "mode", MEMORY_MODES["quality"])
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 45.0e9)    # less than the 48.4 GB of caches
    host_cached = engine.run_mode(run)
    assert (host_cached.name, host_cached.fp8_weights, host_cached.offload_caches) == ("quality", False, True)
    assert engine.cache_gpu_bytes(run) == 2e9
    monkeypatch.setattr(engine, "auto", False)
    assert engine.run_mode(run) is MEMORY_MODES["quality"]    # chosen by name


def test_a_run_moved_to_host_ram_says_so(tiny_engine, monkeypatch):
    from liveavatar_backend.memory_modes import with_host_caches
    engine, said = tiny_engine, []
    job = engine.prepare(torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1, "a person", size="384*256",
                         num_clips=1, steps=2, seed=0)
    next(engine.sample(job, report=said.append))
    assert said == []                                          # the mode it was loaded in
    monkeypatch.setattr(engine, "run_mode", lambda plan: with_host_caches(engine.mode))
    next(engine.sample(job, report=said.append))
    assert said == [f"memory_mode 'auto': size {job.plan.width}*{job.plan.height} at 2 steps does not fit 'quality' "
                    "on this GPU; its caches go to host RAM, as in 'low_vram'"]
