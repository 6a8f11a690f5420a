"""An engine parked in host RAM (when ComfyUI's own models need the GPU, `nodes/loader.py`) frees
its GPU and, back on it, renders the same video as before it left."""
import pytest
import torch

from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
from liveavatar_backend.fixtures import make_tiny_checkpoints
from liveavatar_backend.render import render


def _render(engine, spill_dir):
    job = engine.prepare(torch.rand(400, 720, 3), torch.randn(16000 * 3) * 0.1, "a person", size="384*256",
                         num_clips=2, steps=2, seed=7)
    frames = []
    render(engine, job, frames.append, spill_dir=spill_dir)
    return torch.cat(frames)


def test_a_cpu_engine_is_not_parked(tiny_models):      # a split one: test_parallel.py
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
    engine = LiveAvatarEngine.load(spec, device="cpu")
    assert not engine.parkable and engine.gpu_weight_bytes() == 0      # the loader unloads these instead


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory_mode", ["quality", "balanced"])
def test_a_parked_engine_frees_its_gpu_and_renders_the_same_video_back_on_it(tmp_path, memory_mode):
    tiny = make_tiny_checkpoints(tmp_path / "tiny")
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    engine = LiveAvatarEngine.load(spec, device="cuda", memory_mode=memory_mode)
    before = _render(engine, tmp_path)
    torch.cuda.empty_cache()
    held, weights = torch.cuda.memory_allocated(), engine.gpu_weight_bytes()
    assert engine.parkable and weights > 0
    engine.park()
    torch.cuda.empty_cache()
    assert held - torch.cuda.memory_allocated() >= weights            # nothing kept the GPU copies alive
    assert all(t.device.type == "cpu" for t in [*engine.dit.parameters(), *engine.dit.buffers()])
    engine.unpark()
    assert torch.equal(_render(engine, tmp_path), before)
