"""Fixtures shared by the ComfyUI tests: tiny checkpoints in ComfyUI's model folders, the pack's
example inputs, a real ComfyUI 0.3.75 host (scripts/setup_host.sh) booted headless on CPU, and the
pack imported in this process beside ComfyUI's own modules (`pack`)."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("LIVEAVATAR_HOST_DIR", ROOT / ".comfyui-host"))
sys.path.insert(0, str(ROOT / "scripts"))

from comfy_client import ComfyClient  # noqa: E402

MODEL_FOLDERS = """liveavatar_tests:
  base_path: {models}
  liveavatar: .
  diffusion_models: comfyui/diffusion_models
  text_encoders: comfyui/text_encoders
  vae: comfyui/vae
  audio_encoders: comfyui/audio_encoders
  loras: comfyui/loras
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from liveavatar_backend.fixtures import make_tiny_checkpoints
    return make_tiny_checkpoints(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    """The tiny random model on the CPU, loaded by the engine from the published folder layout."""
    from liveavatar_backend.engine import LiveAvatarEngine, ModelSpec
    spec = ModelSpec.from_folder(tiny_models / "Wan2.2-S2V-14B", lora=tiny_models / "liveavatar.safetensors")
    return LiveAvatarEngine.load(spec, device="cpu")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, tiny_models):
    """(client, input_dir, output_dir) of a running ComfyUI with this pack and the tiny models."""
    python = HOST / "venv" / "bin" / "python"
    if not (HOST / "ComfyUI" / "main.py").exists():
        pytest.skip(f"no ComfyUI host at {HOST}: run scripts/setup_host.sh (scripts/test.sh does)")
    work = tmp_path_factory.mktemp("comfy")
    inputs, outputs = work / "input", work / "output"
    inputs.mkdir()
    subprocess.run([str(python), str(ROOT / "scripts" / "make_example_inputs.py"), str(inputs)], check=True)
    config = work / "extra_model_paths.yaml"
    config.write_text(MODEL_FOLDERS.format(models=tiny_models))
    port = _free_port()
    log = open(work / "comfyui.log", "w")
    process = subprocess.Popen(
        [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--dont-print-server", "--database-url", "sqlite:///:memory:", "--input-directory", str(inputs),
         "--output-directory", str(outputs), "--extra-model-paths-config", str(config), "--cache-none"],
        cwd=HOST / "ComfyUI", stdout=log, stderr=subprocess.STDOUT)
    client = ComfyClient(f"http://127.0.0.1:{port}")
    try:
        client.wait_ready()
    except TimeoutError:
        process.kill()
        raise RuntimeError((work / "comfyui.log").read_text()[-3000:]) from None
    yield client, inputs, outputs
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


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
