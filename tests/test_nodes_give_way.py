"""ComfyUI's own models get the GPU when they need it: when ComfyUI loads one of its models and
unloading its own others does not free enough, the pack's model leaves too (ComfyUI does not
know it, so it would squeeze its model into what is left or run out of memory): to host RAM where
there is room, else unloaded. The pack's own requests for room never move the pack's model.

A GPU is played by the meta device: ComfyUI loads a model there as onto a GPU (a CPU device it
skips), and its free memory is what the test says."""
import logging
import types

import pytest
import torch

from conftest import load_a_comfyui_model

GPU = torch.device("meta")


@pytest.fixture
def free_on_gpu(pack, monkeypatch):
    """Set the free memory ComfyUI sees on every device (bytes); 40 GB to begin with."""
    import comfy.model_management as mm
    free = {"bytes": 40e9}

    def get_free_memory(dev=None, torch_free_too=False):
        return (free["bytes"], free["bytes"]) if torch_free_too else free["bytes"]
    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    yield free
    from liveavatar_pack.nodes import loader
    loader.unload_current()
    # ComfyUI's models "on the GPU" cannot go back to the CPU (a meta tensor has no data): forget them
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.device != GPU]


def fake_engine(device=GPU, worker_devices=None):
    """An engine that cannot park (as a split model): giving way unloads it."""
    workers = types.SimpleNamespace(devices=worker_devices) if worker_devices else None
    return types.SimpleNamespace(device=torch.device(device), workers=workers, close=lambda: None, parkable=False)


class ParkableEngine:
    """An engine on one GPU with 20 GB of weights there; says what was done to it."""

    def __init__(self, fail=None, error=torch.OutOfMemoryError):
        self.device, self.workers, self.parkable = GPU, None, True
        self.vae = types.SimpleNamespace(device=GPU)
        self.done, self.fail, self.error = [], fail, error

    def gpu_weight_bytes(self):
        return 20e9

    def park(self):
        self._do("park")

    def unpark(self):
        self._do("unpark")

    def unpark_vae(self):
        self._do("unpark_vae")

    def decoder(self, warm_up):
        return "a decoder"

    def close(self):
        self._do("close")

    def _do(self, what):
        if what == self.fail:
            raise self.error(f"{what} failed")
        self.done.append(what)


@pytest.fixture
def host_ram(pack, monkeypatch):
    """Set the host RAM the loader sees free (bytes); 64 GB to begin with."""
    from liveavatar_pack.nodes import loader
    free = {"bytes": 64e9}
    monkeypatch.setattr(loader, "free_host_bytes", lambda: free["bytes"])
    return free


def comfyui_loads_a_model_on(device):
    """ComfyUI's own load of a small model (its VAE, an upscaler...) onto `device`: it asks for about
    1.3 GB there (the model and ComfyUI's inference reserve)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=device,
                                               offload_device=torch.device("cpu"))
    mm.load_models_gpu([patcher])
    return patcher


def test_comfyuis_model_that_does_not_fit_beside_it_unloads_it(pack, free_on_gpu, caplog):
    from liveavatar_pack.nodes import loader
    caplog.set_level(logging.INFO, logger="liveavatar")
    loads = []

    def load():
        loads.append(1)
        return fake_engine()
    model = loader.current_model(("gives way",), load)
    model.engine()
    comfyui_loads_a_model_on(GPU)             # 40 GB free: room enough, the model stays
    assert model.loaded and "unloading" not in caplog.text
    free_on_gpu["bytes"] = 0.5e9
    comfyui_loads_a_model_on(GPU)
    assert not model.loaded
    assert "ComfyUI needs 1.3 GB on meta for its own models: the Live Avatar model leaves it" in caplog.text
    assert "Live Avatar model unloaded" in caplog.text
    model.engine()                            # the next node that uses it loads it again
    assert model.loaded and len(loads) == 2


def test_a_model_on_another_gpu_stays_and_any_gpu_of_a_split_model_counts(pack, free_on_gpu):
    from liveavatar_pack.nodes import loader
    free_on_gpu["bytes"] = 0.5e9
    model = loader.current_model(("elsewhere",), lambda: fake_engine("cuda:1"))
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert model.loaded
    split = loader.current_model(("split",), lambda: fake_engine("cuda:1", ["cuda:1", "meta"]))
    split.engine()
    comfyui_loads_a_model_on(GPU)             # the second worker's GPU
    assert not split.loaded


def test_the_vae_alone_gives_way_too(pack, free_on_gpu):
    from liveavatar_pack.nodes import loader
    free_on_gpu["bytes"] = 0.5e9
    vae_alone = types.SimpleNamespace(vae=types.SimpleNamespace(device=GPU))
    model = loader.current_model(("vae alone",), lambda: fake_engine(), lambda: vae_alone)
    model._decoder_only = vae_alone           # as after `decoder` loaded it while the engine was unloaded
    loader._current = model
    assert model.devices() == {GPU}
    comfyui_loads_a_model_on(GPU)
    assert model._decoder_only is None


def test_the_packs_own_requests_for_room_never_unload_it(pack, free_on_gpu, tiny_engine):
    from liveavatar_pack.nodes import loader
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    model = loader.current_model(("own",), fake_engine)
    model.engine()
    loader.make_room(GPU, float("inf"))      # what the loader and the sampler ask for before they work
    assert model.loaded
    core_model, loaded = load_a_comfyui_model()
    liveavatar = loader.current_model(("tiny engine",), lambda: tiny_engine)
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    LiveAvatarSampler.execute(liveavatar, torch.rand(1, 400, 720, 3), voice, "a person", "custom",
                              "256*192", 1, 2, 7)
    assert liveavatar.loaded and loaded == []   # ComfyUI's model made room; the pack's stayed


def test_with_smart_memory_off_any_comfyui_load_there_unloads_it(pack, free_on_gpu, monkeypatch):
    """--disable-smart-memory: ComfyUI unloads all its models on a device before loading one there."""
    import comfy.model_management as mm
    from liveavatar_pack.nodes import loader
    monkeypatch.setattr(mm, "DISABLE_SMART_MEMORY", True)
    model = loader.current_model(("smart memory off",), fake_engine)
    model.engine()
    comfyui_loads_a_model_on(GPU)             # 40 GB free, and still
    assert not model.loaded


def test_a_failing_unload_is_logged_and_comfyuis_load_goes_on(pack, free_on_gpu, caplog):
    from liveavatar_pack.nodes import loader
    free_on_gpu["bytes"] = 0.5e9

    def close():
        raise RuntimeError("the device went away")
    model = loader.current_model(("broken",), lambda: types.SimpleNamespace(device=GPU, workers=None, close=close,
                                                                           parkable=False))
    model.engine()
    patcher = comfyui_loads_a_model_on(GPU)
    assert patcher.model.weight.device == GPU and "the device went away" in caplog.text


def test_with_room_in_host_ram_it_waits_there_and_comes_back_for_the_next_node(pack, free_on_gpu, host_ram,
                                                                               caplog, monkeypatch):
    from liveavatar_pack.nodes import loader
    caplog.set_level(logging.INFO, logger="liveavatar")
    rooms = []
    monkeypatch.setattr(loader, "make_room", lambda device, required: rooms.append((device, required)))
    free_on_gpu["bytes"] = 0.5e9
    engine = ParkableEngine()
    model = loader.current_model(("parks",), lambda: engine)
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert engine.done == ["park"] and model.parked and model.loaded and model.devices() == set()
    assert "Live Avatar model moved to host RAM (20.0 GB)" in caplog.text
    comfyui_loads_a_model_on(GPU)             # nothing more of the pack's to move
    assert engine.done == ["park"]
    assert model.engine() is engine           # back, not read again, once ComfyUI's models made room
    assert engine.done == ["park", "unpark"] and not model.parked and rooms == [(GPU, 22e9)]


def test_without_room_in_host_ram_or_when_the_move_fails_it_is_unloaded(pack, free_on_gpu, host_ram, caplog):
    from liveavatar_pack.nodes import loader
    caplog.set_level(logging.INFO, logger="liveavatar")
    free_on_gpu["bytes"] = 0.5e9
    host_ram["bytes"] = 22e9                  # 20 GB of weights and 4 GB kept free do not fit
    engine = ParkableEngine()
    model = loader.current_model(("no room",), lambda: engine)
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert engine.done == ["close"] and not model.loaded and "22.0 GB of host RAM free, 24.0 GB needed" in caplog.text
    host_ram["bytes"] = 64e9
    failing = ParkableEngine(fail="park")
    model = loader.current_model(("park fails",), lambda: failing)
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert not model.loaded and "moving the Live Avatar model to host RAM failed" in caplog.text


def test_an_interrupted_move_to_host_ram_unloads_it(pack, free_on_gpu, host_ram):
    from liveavatar_pack.nodes import loader
    free_on_gpu["bytes"] = 0.5e9
    interrupted = ParkableEngine(fail="park", error=KeyboardInterrupt)
    model = loader.current_model(("park interrupted",), lambda: interrupted)
    model.engine()
    with pytest.raises(KeyboardInterrupt):
        comfyui_loads_a_model_on(GPU)
    assert not model.loaded and not model.parked      # no half-moved model stays


def test_a_decode_brings_back_only_the_vae_of_a_parked_model(pack, free_on_gpu, host_ram, monkeypatch):
    from liveavatar_pack.nodes import loader
    monkeypatch.setattr(loader, "make_room", lambda device, required: None)
    free_on_gpu["bytes"] = 0.5e9
    engine = ParkableEngine()
    model = loader.current_model(("decodes parked",), lambda: engine)
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert model.decoder(torch.zeros(1), 256, 384) == "a decoder"
    assert engine.done == ["park", "unpark_vae"] and model.parked and model.devices() == {GPU}
    comfyui_loads_a_model_on(GPU)             # the VAE leaves again; the rest was never back
    assert engine.done == ["park", "unpark_vae", "park"] and model.parked and model.devices() == set()


def test_a_failed_return_to_the_gpu_unloads_it_and_the_next_use_loads_it_again(pack, free_on_gpu, host_ram):
    from liveavatar_pack.nodes import loader
    free_on_gpu["bytes"] = 0.5e9
    engines, loads = [ParkableEngine(fail="unpark"), ParkableEngine()], []

    def load():
        loads.append(1)
        return engines[len(loads) - 1]
    model = loader.current_model(("unpark fails",), load)
    model.engine()
    comfyui_loads_a_model_on(GPU)
    assert model.parked
    with pytest.raises(torch.OutOfMemoryError):
        model.engine()
    assert not model.loaded and not model.parked
    assert model.engine() is engines[1] and len(loads) == 2
