"""Where the command line decodes: alongside sampling where the decoder fits beside the DiT's caches,
after it (latents parked on disk) where it does not; both give the same frames."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liveavatar_backend.errors import InputError
from liveavatar_backend.fixtures import make_tiny_checkpoints
from liveavatar_backend.render import LatentSpill, choose_placement, render
from test_memory_budget import BF16_WEIGHTS, FP8_WEIGHTS, GB, H100_USABLE, OTHER_MODELS, full_size_bytes

DECODER_704 = 4.2 * GB           # 84.2 GB with the overlapped decoder against 80.0 GB without (H200)


@pytest.mark.parametrize("weights,size,steps,expected", [
    (BF16_WEIGHTS, (704, 384), 4, "after"),     # quality at 704*384: ran out of memory on 2026-12-05
    (FP8_WEIGHTS, (704, 384), 4, "alongside"),  # balanced: 68.2 GB peak with the decoder on an H100
    (BF16_WEIGHTS, (384, 256), 3, "alongside"),  # quality at 384*256: 48.1 GB peak
])
def test_auto_placement_on_an_80_gb_card(weights, size, steps, expected):
    free = H100_USABLE - weights - OTHER_MODELS
    decoder = DECODER_704 if size == (704, 384) else 1.5 * GB
    placement, why = choose_placement("auto", full_size_bytes(size, steps), int(decoder), int(free))
    assert placement == expected
    assert ("balanced" in why) == (expected == "after")       # the log says how to stream instead


def test_placement_choices():
    assert choose_placement("auto", None, 10 ** 12, 0)[0] == "alongside"     # the DiT is not on this GPU
    assert choose_placement("after", 1, 1, 10 ** 12)[0] == "after"           # as asked
    assert choose_placement("alongside", 10 ** 12, 1, 0)[0] == "alongside"
    with pytest.raises(InputError, match="decode 'later'"):
        choose_placement("later", 1, 1, 1)


def test_latent_spill_round_trip_leaves_no_file(tmp_path):
    tensors = [torch.randn(16, 12, 6, 8).to(torch.bfloat16), torch.randn(2, 3), torch.arange(5)]
    with LatentSpill(tmp_path) as spill:
        for tensor in tensors:
            spill.append(tensor)
        assert os.listdir(tmp_path) == []        # unnamed: nothing to clean up after a crash
        back = list(spill)
        assert len(spill) == 3 and list(spill)[0].dtype == torch.bfloat16
    for a, b in zip(back, tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_decoding_after_sampling_gives_the_same_frames(tiny_engine, tmp_path, monkeypatch):
    engine = tiny_engine
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 3) * 0.1
    videos, bars = {}, []

    class Bar:
        def __init__(self, total, unit, desc):
            self.n, self.total, self.desc = 0, total, desc
            bars.append(self)

        def update(self, count):
            self.n += count

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    job = engine.prepare(portrait, voice, "a person", size="256*192", num_clips=2, steps=2, seed=7)
    assert engine.sampling_gpu_bytes(job.plan) is None      # on the CPU `auto` streams: no VRAM to share
    frames, messages = [], []
    assert render(engine, job, frames.append, spill_dir=tmp_path, progress=Bar) == "alongside"
    videos["alongside"] = torch.cat(frames)
    # as on an 80 GB card in `quality` at 704*384: sampling would leave the decoder no room
    from liveavatar_backend import render as module
    monkeypatch.setattr(engine, "sampling_gpu_bytes", lambda plan: 47 * 10 ** 9)
    monkeypatch.setattr(module, "free_gpu_bytes", lambda device: 47 * 10 ** 9 + 5 * 10 ** 8)
    frames = []
    assert render(engine, job, frames.append, spill_dir=tmp_path, progress=Bar, report=messages.append) == "after"
    videos["after"] = torch.cat(frames)
    assert len(messages) == 1 and "decoding after sampling" in messages[0]
    assert videos["after"].shape == (2 * 48 - 3, 192, 256, 3)
    assert torch.equal(videos["after"], videos["alongside"])
    assert [(b.desc, b.n, b.total) for b in bars] == [("generating", 2 * 4 * 2, 16), ("generating", 16, 16),
                                                      ("decoding", 2, 2)]
    assert os.listdir(tmp_path) == []
    # where 'auto' moves a run's caches to host RAM, the command line says so too
    from liveavatar_backend.memory_modes import with_host_caches
    monkeypatch.setattr(engine, "run_mode", lambda plan: with_host_caches(engine.mode))
    messages.clear()
    render(engine, job, lambda frames: None, spill_dir=tmp_path, progress=Bar, report=messages.append)
    assert any("its caches go to host RAM" in message for message in messages)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_auto_measures_the_decoder_and_streams_where_it_fits(tmp_path):
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.render import primed_decoder
    tiny = make_tiny_checkpoints(tmp_path / "tiny")
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    engine = LiveAvatarEngine.load(spec, device="cuda", memory_mode="quality")
    assert all(weight.is_pinned() for weight in engine.text_encoder.model.parameters())   # fast per-prompt copies
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 4) * 0.1     # 4 s of voice: 3 clips
    job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=3, steps=2, seed=7)
    assert primed_decoder(engine, job)[1] > 0            # the decoder's working memory, measured
    videos = {}
    for placement in ("auto", "after"):
        job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=3, steps=2, seed=7)
        frames = []
        placed = render(engine, job, frames.append, decode=placement, spill_dir=tmp_path)
        videos[placed] = torch.cat(frames)
    assert set(videos) == {"alongside", "after"}         # a tiny model fits beside its decoder
    assert videos["after"].shape == (3 * 48 - 3, 256, 384, 3)
    torch.testing.assert_close(videos["after"], videos["alongside"], atol=2e-3, rtol=0)


def test_own_processes_prefer_expandable_segments_unless_told_otherwise(monkeypatch):
    from liveavatar_backend.render import ALLOCATOR_SETTINGS, allocator_env_var, prefer_expandable_segments
    assert allocator_env_var("2.11.0+cu130") == allocator_env_var("2.12.0.dev20261101") == "PYTORCH_ALLOC_CONF"
    for older in ("2.9.1+cu128", "2.10.0", "2.4.1+cpu", "not a version"):     # 2.9.1 ignores the new name
        assert allocator_env_var(older) == "PYTORCH_CUDA_ALLOC_CONF"
    ours = allocator_env_var(torch.__version__)          # the name this torch reads without a warning
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.8")   # torch ≥ 2.9's name
    prefer_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert os.environ["PYTORCH_ALLOC_CONF"] == "garbage_collection_threshold:0.8"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    prefer_expandable_segments()
    assert os.environ[ours] == ALLOCATOR_SETTINGS == "expandable_segments:True"
    monkeypatch.delenv(ours)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"      # the user's choice stands
    assert "PYTORCH_ALLOC_CONF" not in os.environ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_command_lines_allocator_setting_takes_effect_without_a_warning():
    from liveavatar_backend.kv_offload import ALLOCATOR_ENV_VARS
    from liveavatar_backend.render import allocator_env_var
    code = ("from liveavatar_backend.render import prefer_expandable_segments; prefer_expandable_segments(); "
            "import torch; x = torch.empty(2 ** 20, device='cuda'); "
            "print([segment.get('is_expandable') for segment in torch.cuda.memory_snapshot()])")
    env = {name: value for name, value in os.environ.items() if name not in ALLOCATOR_ENV_VARS}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[True]"
    if allocator_env_var(torch.__version__) == "PYTORCH_ALLOC_CONF":
        assert "deprecated" not in done.stderr
