"""Where the command line decodes: alongside sampling where the decoder fits beside the DiT's caches,
after it (latents parked on disk) where it does not; both give the same frames."""
import os

import pytest
import torch

from liveavatar_backend.config import DiTConfig
from liveavatar_backend.errors import InputError
from liveavatar_backend.fixtures import make_tiny_checkpoints
from liveavatar_backend.memory_modes import MEMORY_MODES, caches_do_not_fit
from liveavatar_backend.pipeline import BlockSampler, GenerationPlan, cache_gpu_bytes, sampling_gpu_bytes
from liveavatar_backend.render import LatentSpill, choose_placement, render

GB = 1e9
FULL = DiTConfig.wan_s2v_14b()
BF16_WEIGHTS = 32.59 * GB        # 16.30 B parameters of the manifest, 2 bytes each
FP8_WEIGHTS = 17.0 * GB          # e4m3 linears plus the bf16 rest (engine load, PERFORMANCE.md)
TEXT_KV = 2 * FULL.num_layers * FULL.text_len * FULL.dim * 2
H100_USABLE = 79.18 * 2 ** 30 - 0.6 * GB    # the card's memory less a CUDA context
OTHER_MODELS = 1.3 * GB          # VAE, wav2vec2 and the prompt's text keys/values
DECODER_704 = 4.2 * GB           # 84.2 GB with the overlapped decoder against 80.0 GB without (H200)


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


def test_free_memory_honours_a_per_process_cap(monkeypatch):
    from liveavatar_backend import pipeline as module
    fake = dict(mem_get_info=lambda device: (50 * GB, 80 * GB), memory_reserved=lambda device: 10 * GB,
                memory_allocated=lambda device: 8 * GB, get_per_process_memory_fraction=lambda device: 1.0)
    for name, value in fake.items():
        monkeypatch.setattr(module.torch.cuda, name, value)
    assert module.free_gpu_bytes("cuda") == 52 * GB          # the driver's free + cached, unused
    monkeypatch.setattr(module.torch.cuda, "get_per_process_memory_fraction", lambda device: 0.5)
    assert module.free_gpu_bytes("cuda") == 32 * GB          # a 40 GB cap of which 10 are reserved


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


@pytest.mark.parametrize("mode,suggested", [("quality", ["'balanced'", "'low_vram'"]),
                                            ("balanced", ["'fast'", "'low_vram'"]),
                                            ("fast", ["'low_vram'"]), ("low_vram", [])])
def test_the_refusal_says_what_to_change(mode, suggested):
    message = caches_do_not_fit(MEMORY_MODES[mode], 1088, 640, 4, 123_420_000_000, 45_060_000_000, "cuda:0")
    assert message.startswith("size 1088*640 at 4 steps needs 123.4 GB of GPU memory")
    assert f"in memory_mode '{mode}', but 45.1 GB are free on cuda:0" in message
    others = [f"'{name}'" for name in MEMORY_MODES if name != mode]
    assert [name for name in others if name in message] == suggested
    assert "a smaller size, fewer steps" in message and "'cuda:0,cuda:1'" in message


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


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    return LiveAvatarEngine.load(spec, device="cpu")


def test_decoding_after_sampling_gives_the_same_frames(engine, tmp_path, monkeypatch):
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_auto_measures_the_decoder_and_streams_where_it_fits(tmp_path):
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_backend.render import primed_decoder
    tiny = make_tiny_checkpoints(tmp_path / "tiny")
    spec = ModelSpec.from_folder(tiny / "Wan2.2-S2V-14B", lora=tiny / "liveavatar.safetensors")
    engine = LiveAvatarEngine.load(spec, device="cuda")
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 3) * 0.1
    job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=3, steps=2, seed=7)
    assert primed_decoder(engine, job)[1] > 0            # the decoder's working memory, measured
    videos = {}
    for placement in ("auto", "after"):
        job = engine.prepare(portrait, voice, "a person", size="384*256", num_clips=3, steps=2, seed=7)
        frames = []
        videos[render(engine, job, frames.append, decode=placement, spill_dir=tmp_path)] = torch.cat(frames)
    assert set(videos) == {"alongside", "after"}         # a tiny model fits beside its decoder
    assert videos["after"].shape == (3 * 48 - 3, 256, 384, 3)
    torch.testing.assert_close(videos["after"], videos["alongside"], atol=2e-3, rtol=0)


@pytest.mark.parametrize("offload", [False, True])
def test_cache_bytes_are_what_a_generation_allocates(engine, offload):
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=3, seed=7)
    sampler = BlockSampler(engine.dit, job.plan, job.cond, offload_caches=offload)
    sampler.prefill(job.cond.ref_latent)
    bank = sampler.bank
    if offload:
        on_gpu = [tensor for slot in bank.staging for tensor in slot]
    else:
        on_gpu = [tensor for layers in (bank.k, bank.v) for per_layer in layers.values() for tensor in per_layer]
    on_gpu += list(bank.sink_ref_k.values())
    assert len(bank.sink_ref_k) == engine.dit.cfg.num_layers
    expected = cache_gpu_bytes(engine.dit.cfg, job.plan, offload_caches=offload, fp8_attention=False,
                               dtype=engine.dtype)
    assert sum(tensor.numel() * tensor.element_size() for tensor in on_gpu) == expected
    sampler.release()


def test_a_run_whose_caches_do_not_fit_fails_before_sampling_and_the_model_stays_usable(engine, monkeypatch):
    from liveavatar_backend import engine as engine_module
    portrait, voice = torch.rand(400, 720, 3), torch.randn(16000 * 2) * 0.1
    job = engine.prepare(portrait, voice, "a person", size="256*192", num_clips=1, steps=2, seed=7)
    steps_run = []
    monkeypatch.setattr(engine, "cache_gpu_bytes", lambda plan: 123_420_000_000)     # as 1024*704 in bf16
    monkeypatch.setattr(engine_module, "free_gpu_bytes", lambda device: 45_060_000_000)
    with pytest.raises(InputError, match=r"size 256\*192 at 2 steps needs 123.4 GB .* 'quality', but 45.1 GB"):
        next(engine.sample(job, on_progress=steps_run.append))
    assert steps_run == []                                    # refused before the first block
    monkeypatch.undo()
    assert engine.sampling_gpu_bytes(job.plan) is None        # the CPU: nothing to check
    latents = list(engine.sample(job, on_progress=steps_run.append))
    assert len(latents) == 1 and latents[0].shape[:2] == (16, 12)
    assert steps_run[-1].done == steps_run[-1].total == 4 * 2          # 4 blocks x 2 steps
