"""The nodes with ComfyUI's own model management, in this process (CPU): ComfyUI does not count the
pack's memory, so before loading and before sampling the pack asks ComfyUI to move its own models
out of the way."""
import gc
import sys
import types
import weakref

import pytest
import torch

from conftest import load_a_comfyui_model


def test_make_room_unloads_comfyuis_models_only_as_far_as_needed(pack):
    from liveavatar_pack.nodes.loader import make_room
    model, loaded = load_a_comfyui_model()
    assert len(loaded) == 1
    make_room("cpu", 1)                   # one byte: there is room, nothing is unloaded
    assert len(loaded) == 1
    make_room("cpu", float("inf"))        # what the loader asks for before loading 14B parameters
    assert loaded == [] and model.model is not None   # unloaded by ComfyUI, not garbage-collected


def test_the_sampler_makes_room_then_samples(pack, tiny_engine):
    from liveavatar_pack.nodes.loader import LoadedModel
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    model, loaded = load_a_comfyui_model()
    assert len(loaded) == 1
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    liveavatar = LoadedModel(("tiny",), lambda: tiny_engine)
    output = LiveAvatarSampler.execute(liveavatar, torch.rand(1, 400, 720, 3), voice, "a person", "custom",
                                       "256*192", 1, 2, 7)
    assert loaded == [] and model.model is not None   # ComfyUI's model left before the prompt was encoded
    latent = output.result[0]
    assert latent["samples"].shape[:3] == (1, 16, 12)


def test_comfyuis_unload_models_frees_the_model_and_the_next_node_loads_it_again(pack, tiny_models):
    import comfy.model_management as mm
    from liveavatar_pack.liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    from liveavatar_pack.nodes import loader
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    engines = []

    def load():
        spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
        engine = LiveAvatarEngine.load(spec, device="cpu")
        engines.append(weakref.ref(engine))
        return engine

    model = loader.current_model(("tiny", "unload test"), load)
    assert model.engine() is model.engine() and len(engines) == 1
    mm.unload_all_models()                  # what ComfyUI's "Unload Models" and its OOM handler run
    gc.collect()
    assert not model.loaded and engines[0]() is None          # no reference left: its memory is free
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    output = LiveAvatarSampler.execute(model, torch.rand(1, 400, 720, 3), voice, "a person", "custom",
                                       "256*192", 1, 2, 7)       # the cached model output, used again
    assert len(engines) == 2 and output.result[0]["samples"].shape[:3] == (1, 16, 12)
    assert loader.current_model(("tiny", "unload test"), load) is model     # same settings: kept
    other = loader.current_model(("another",), load)           # new settings: the old model goes
    assert not model.loaded
    other.engine()
    model.engine()            # a handle that ComfyUI still caches (a second loader node) loads again:
    assert model.loaded and not other.loaded and len(engines) == 4       # the other one makes room
    loader.unload_current()


def test_a_load_that_fails_midway_frees_what_it_read_and_the_next_use_loads_again(pack):
    """ComfyUI keeps the exception of a failed node (an interrupt, a bad file) for its report; the
    weights the load had read must not live on in its frames."""
    import comfy.model_management as mm
    from liveavatar_pack.nodes import loader
    read, attempts = [], []

    def load():
        attempts.append(1)
        weights = torch.zeros(1000)                 # what a load holds when it stops
        read.append(weakref.ref(weights))
        if len(attempts) == 1:
            raise mm.InterruptProcessingException()
        return engine
    engine = types.SimpleNamespace(close=lambda: None)

    model = loader.current_model(("fails once",), load)
    with pytest.raises(mm.InterruptProcessingException) as failure:
        model.engine()
    assert failure.value.__traceback__ is not None and read[0]() is None    # freed while the error lives
    assert not model.loaded
    assert model.engine() is engine and len(attempts) == 2
    loader.current_model(("another",), load)
    loader.unload_current()


def test_the_loaders_progress_bar_follows_the_load_and_cancel_stops_it(pack, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils
    from liveavatar_pack.nodes import loader
    shown = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        shown.append((value, total)))
    show = loader._load_progress_bar()
    show(0.5)
    show(1.0)
    assert shown == [(50, 100), (100, 100)]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            show(0.6)
    finally:
        mm.interrupt_current_processing(False)
    assert len(shown) == 2


def test_what_the_user_should_see_is_shown_on_the_running_node(pack, tiny_models, tmp_path, monkeypatch):
    """The memory mode 'auto' chose (and the load's other news) on the loader, a small portrait's
    warning on Load Portrait: as ComfyUI's progress text of the node that runs, not only in the log."""
    from PIL import Image
    from comfy_execution.utils import CurrentNodeContext
    from liveavatar_pack.liveavatar_backend.engine import ModelSpec
    from liveavatar_pack.nodes import loader
    from liveavatar_pack.nodes.inputs import LiveAvatarLoadPortrait
    shown = []
    server = types.SimpleNamespace(send_progress_text=lambda text, node_id: shown.append((node_id, text)))
    # ComfyUI's server module, as the host has it loaded (importing it here would pull in the host's app)
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server)))
    Image.new("RGB", (400, 300)).save(tmp_path / "small.png")
    with CurrentNodeContext("prompt", "7"):
        portrait = LiveAvatarLoadPortrait.execute(str(tmp_path / "small.png")).result[0]
    assert portrait.shape == (1, 300, 400, 3)
    assert shown == [("7", f"portrait {str(tmp_path / 'small.png')!r} is 400x300 px; below 512 px on the short "
                           "side the face loses detail")]
    shown.clear()
    monkeypatch.setattr(loader, "_spec", lambda *settings: ModelSpec.from_folder(
        tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors"))
    with CurrentNodeContext("prompt", "3"):
        engine = loader._load_engine("tiny", "lora", "auto", "cpu", None, None, None)
    assert engine.mode.name == "quality"
    assert {node for node, _ in shown} == {"3"} and len(shown) >= 3
    assert shown[-1][1].startswith("memory_mode 'auto': quality\nloading DiT from ")       # every line so far
    said = len(shown)
    LiveAvatarLoadPortrait.execute(str(tmp_path / "small.png"))          # outside a prompt: the log only
    assert len(shown) == said
    monkeypatch.setitem(sys.modules, "server", None)                     # a host without ComfyUI's server
    with CurrentNodeContext("prompt", "7"):
        assert LiveAvatarLoadPortrait.execute(str(tmp_path / "small.png")).result[0].shape == (1, 300, 400, 3)


def test_after_an_unload_the_decoders_load_the_vae_alone(pack, tiny_models, tmp_path, monkeypatch):
    """Decoding clips sampled before ComfyUI unloaded the model reads the VAE alone, not the whole set,
    with the same frames, after asking ComfyUI for room; the sampler then loads the whole set again."""
    import comfy.model_management as mm
    from liveavatar_pack.liveavatar_backend.engine import DecoderOnly, LiveAvatarEngine, ModelSpec
    from liveavatar_pack.liveavatar_backend.errors import CheckpointError
    from liveavatar_pack.nodes import loader
    from liveavatar_pack.nodes.decode import LiveAvatarVAEDecodeClips
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
    loads = []

    def load():
        loads.append("everything")
        return LiveAvatarEngine.load(spec, device="cpu")

    def load_decoder():
        loads.append("vae")
        return DecoderOnly.load(spec, device="cpu")

    model = loader.current_model(("tiny", "decode test"), load, load_decoder)
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    args = (torch.rand(1, 400, 720, 3), voice, "a person", "custom", "256*192", 1, 2, 7)
    clips = LiveAvatarSampler.execute(model, *args).result[0]
    frames = LiveAvatarVAEDecodeClips.execute(model, clips).result[0]
    mm.unload_all_models()
    comfy_model, comfy_loaded = load_a_comfyui_model()
    rooms = []
    monkeypatch.setattr(loader, "decode_gpu_bytes", lambda height, width: rooms.append((height, width)) or 1e30)
    again = LiveAvatarVAEDecodeClips.execute(model, clips).result[0]
    assert rooms == [(192, 256)] and comfy_loaded == []         # ComfyUI's model made room for the decode
    assert loads == ["everything", "vae"] and not model.loaded
    assert frames.shape[0] == 45 and torch.equal(again, frames)
    LiveAvatarVAEDecodeClips.execute(model, clips)                # the VAE stays loaded for the next decode
    LiveAvatarSampler.execute(model, *args)
    assert loads == ["everything", "vae", "everything"] and model.loaded
    loader.unload_current()
    missing = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", vae=tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: not found \(vae\)"):
        DecoderOnly.load(missing, device="cpu")


def test_the_model_hears_16_khz_and_the_video_keeps_the_voices_own_rate(pack, tiny_engine, tmp_path, monkeypatch):
    import wave

    import folder_paths
    from liveavatar_pack.liveavatar_backend.audio import LOUDNESS_TARGET_DBFS
    from liveavatar_pack.nodes.clips import SOUNDTRACK_KEY, soundtrack_of
    from liveavatar_pack.nodes.inputs import LiveAvatarLoadAudio16k
    from liveavatar_pack.nodes.loader import LoadedModel
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    rate, seconds = 48000, 4
    tone = (0.05 * torch.sin(torch.arange(rate * seconds) * 2 * torch.pi * 440 / rate) * 32767).to(torch.int16)
    with wave.open(str(tmp_path / "voice.wav"), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes(tone.numpy().tobytes())
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    audio, seconds_kept = LiveAvatarLoadAudio16k.execute("voice.wav", 0.5, 3.0, True).result
    track = audio[SOUNDTRACK_KEY]
    assert (audio["sample_rate"], audio["waveform"].shape, seconds_kept) == (16000, (1, 1, 48000), 3.0)
    assert (track["sample_rate"], track["waveform"].shape) == (48000, (1, 1, 144000))
    loudness = [t["waveform"].pow(2).mean().sqrt().item() for t in (audio, track)]
    assert loudness[0] == pytest.approx(10 ** (LOUDNESS_TARGET_DBFS / 20), rel=1e-3)     # normalised, both
    assert loudness[1] == pytest.approx(loudness[0], rel=0.02)
    core = {"waveform": torch.stack([torch.ones(44100), -torch.ones(44100) / 2])[None], "sample_rate": 44100}
    mono, core_rate = soundtrack_of(core)                 # core Load Audio: the file's rate, mixed to mono
    assert core_rate == 44100 and torch.allclose(mono, torch.full((44100,), 0.25))
    model = LoadedModel(("tiny",), lambda: tiny_engine)
    clips = LiveAvatarSampler.execute(model, torch.rand(1, 400, 720, 3), audio, "a person", "custom", "256*192",
                                      1, 2, 7).result[0]
    sound = clips["liveavatar"]["audio"]                  # one clip: 45 frames, 1.8 s of the 3 s voice
    assert sound["sample_rate"] == 48000 and sound["waveform"].shape == (1, 1, 45 * 48000 // 25)
    assert torch.equal(sound["waveform"][0, 0], track["waveform"][0, 0, : 45 * 48000 // 25])


def test_the_videos_voice_is_peak_safe_current_and_in_a_rate_aac_carries(pack, tmp_path, monkeypatch):
    import wave

    import folder_paths
    from liveavatar_pack.liveavatar_backend.audio import PEAK_LIMIT
    from liveavatar_pack.nodes.clips import SOUNDTRACK_KEY, soundtrack_of
    from liveavatar_pack.nodes.inputs import LiveAvatarLoadAudio16k
    rate = 48000
    t = torch.arange(rate * 2) / rate        # a quiet voice and a loud 12 kHz tone, which 16 kHz cannot hold
    signal = 0.02 * torch.sin(2 * torch.pi * 220 * t) + 0.6 * torch.sin(2 * torch.pi * 12000 * t)
    with wave.open(str(tmp_path / "hiss.wav"), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes((signal * 32767).to(torch.int16).numpy().tobytes())
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    audio = LiveAvatarLoadAudio16k.execute("hiss.wav", 0.0, 0.0, True).result[0]
    track = audio[SOUNDTRACK_KEY]["waveform"]
    assert track.abs().max() == pytest.approx(PEAK_LIMIT, abs=1e-3)       # scaled to the limit, not clipped
    assert (track.abs() > PEAK_LIMIT + 1e-3).sum() == 0
    assert soundtrack_of(audio)[1] == 48000
    edited = {**audio, "waveform": audio["waveform"][..., :16000]}       # a node that cut the voice, copying the dict
    assert soundtrack_of(edited)[1] == 16000 and soundtrack_of(edited)[0].shape == (16000,)
    odd = {"waveform": torch.zeros(1, 2, 37800), "sample_rate": 37800}     # a rate AAC cannot carry
    assert soundtrack_of(odd)[1] == 48000 and soundtrack_of(odd)[0].shape == (48000,)


def test_a_failing_unload_is_logged_and_comfyui_still_unloads_its_models(pack, caplog):
    import comfy.model_management as mm
    from liveavatar_pack.nodes import loader

    class Broken:
        def close(self):
            raise RuntimeError("the device went away")

    comfy_model, loaded = load_a_comfyui_model()
    loader.LoadedModel(("broken",), Broken).engine()
    mm.unload_all_models()                # called outside any try in ComfyUI's prompt loop: must not raise
    assert loaded == [] and "the device went away" in caplog.text
    assert not loader._current.loaded


def test_long_render_latents_live_in_an_unlinked_file(pack, tiny_engine, tmp_path, monkeypatch):
    """Past IN_MEMORY_LIMIT_BYTES the LATENT is a file-backed tensor; its file is unlinked once mapped,
    so no render leaves gigabytes in ComfyUI's temp folder, and the values are those kept in RAM."""
    import folder_paths
    from liveavatar_pack.nodes import clips
    from liveavatar_pack.nodes.loader import LoadedModel
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    model = LoadedModel(("tiny",), lambda: tiny_engine)
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    args = (torch.rand(1, 400, 720, 3), voice, "a person", "custom", "256*192", 1, 2, 7)
    in_ram = LiveAvatarSampler.execute(model, *args).result[0]["samples"]
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    monkeypatch.setattr(clips, "IN_MEMORY_LIMIT_BYTES", 0)
    in_file = LiveAvatarSampler.execute(model, *args).result[0]["samples"]
    assert list(tmp_path.iterdir()) == []
    assert in_file.untyped_storage().filename is not None and torch.equal(in_file, in_ram)


def test_foreign_latents_and_empty_audio_fail_naming_the_input(pack):
    from liveavatar_pack.nodes.clips import audio_to_16k_mono
    from liveavatar_pack.nodes.decode import LiveAvatarSaveVideo, LiveAvatarVAEDecodeClips
    from liveavatar_pack.nodes.loader import LoadedModel
    model = LoadedModel(("never loaded",), lambda: pytest.fail("the input is checked before the model is used"))
    core_latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}           # e.g. from core's Empty Latent
    with pytest.raises(ValueError, match="clips: this LATENT does not come from LiveAvatarSampler"):
        LiveAvatarSaveVideo.execute(model, core_latent, "video/test", 1.0, "bicubic", 19)
    with pytest.raises(ValueError, match="clips: this LATENT does not come from LiveAvatarSampler"):
        LiveAvatarVAEDecodeClips.execute(model, core_latent)
    for waveform in (torch.zeros(1, 2, 0), torch.zeros(1, 0, 100), torch.zeros(2, 100)):
        with pytest.raises(ValueError, match=r"audio: the waveform is \("):
            audio_to_16k_mono({"waveform": waveform, "sample_rate": 44100})


@pytest.mark.parametrize("method", ["bilinear", "lanczos"])
@pytest.mark.parametrize("with_model", [False, True])
def test_upscale_keeps_an_alpha_channel(pack, monkeypatch, method, with_model):
    """An upscale model sees RGB only (core's models take 3 channels); alpha is resized beside it."""
    from liveavatar_pack.nodes import upscale
    seen = []

    def upscale_with_model(model, image):                   # stands in for core's 2x model
        seen.append(image.shape[-1])
        return type("Output", (), {"args": (image.repeat_interleave(2, 1).repeat_interleave(2, 2),)})()

    monkeypatch.setattr(upscale.ImageUpscaleWithModel, "execute", upscale_with_model)
    frames = torch.rand(3, 16, 16, 4)
    frames[..., 3] = 0.25
    out = upscale.LiveAvatarUpscaleVideo.execute(frames, "factor", 4.0 if with_model else 2.0, 0, 0, method, 2,
                                                 upscale_model=object() if with_model else None).result[0]
    size = 64 if with_model else 32
    assert out.shape == (3, size, size, 4) and seen == ([3, 3] if with_model else [])
    assert torch.allclose(out[..., 3], torch.full((3, size, size), 0.25), atol=1e-2)
