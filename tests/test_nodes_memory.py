"""The nodes with ComfyUI's own model management, in this process (CPU): ComfyUI does not count the
pack's memory, so before loading and before sampling the pack asks ComfyUI to move its own models
out of the way."""
import importlib.util
import sys

import pytest
import torch

from conftest import HOST, ROOT


@pytest.fixture(scope="module")
def pack():
    """The pack imported as ComfyUI imports a custom node package, beside ComfyUI's own modules."""
    if not (HOST / "ComfyUI" / "main.py").exists():
        pytest.skip(f"no ComfyUI host at {HOST}: run scripts/setup_host.sh (scripts/test.sh does)")
    path, modules = list(sys.path), set(sys.modules)
    sys.path.append(str(HOST / "ComfyUI"))
    from comfy.cli_args import args
    args.cpu = True                       # as the host tests boot it: no GPU driver is probed
    spec = importlib.util.spec_from_file_location("liveavatar_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["liveavatar_pack"] = module
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path                    # ComfyUI's modules and the pack's copy leave with it
    comfyui = str(HOST / "ComfyUI")
    for name in set(sys.modules) - modules:
        source = getattr(sys.modules[name], "__file__", None) or ""
        if name.split(".")[0] == "liveavatar_pack" or source.startswith(comfyui):
            del sys.modules[name]


def load_a_comfyui_model():
    """A core model as ComfyUI holds one after a workflow: in `current_loaded_models` on its device.
    Returns (the model, the list); ComfyUI forgets a model nobody references, so keep the first."""
    import comfy.model_management as mm
    import comfy.model_patcher
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=mm.get_torch_device(),
                                               offload_device=torch.device("cpu"))
    mm.load_models_gpu([patcher])
    return patcher, mm.current_loaded_models


def test_make_room_unloads_comfyuis_models_only_as_far_as_needed(pack):
    from liveavatar_pack.nodes.loader import make_room
    model, loaded = load_a_comfyui_model()
    assert len(loaded) == 1
    make_room("cpu", 1)                   # one byte: there is room, nothing is unloaded
    assert len(loaded) == 1
    make_room("cpu", float("inf"))        # what the loader asks for before loading 14B parameters
    assert loaded == [] and model.model is not None   # unloaded by ComfyUI, not garbage-collected


def test_the_sampler_makes_room_then_samples(pack, tiny_engine):
    from liveavatar_pack.nodes.sampler import LiveAvatarSampler
    model, loaded = load_a_comfyui_model()
    assert len(loaded) == 1
    voice = {"waveform": torch.randn(1, 1, 16000 * 2) * 0.1, "sample_rate": 16000}
    output = LiveAvatarSampler.execute(tiny_engine, torch.rand(1, 400, 720, 3), voice, "a person", "custom",
                                       "256*192", 1, 2, 7)
    assert loaded == [] and model.model is not None   # ComfyUI's model left before the prompt was encoded
    latent = output.result[0]
    assert latent["samples"].shape[:3] == (1, 16, 12)
