"""The pack inside a real ComfyUI 0.3.75: it imports, its nodes are listed, every shipped workflow
runs to the end through /prompt, interrupting works, and bad inputs end the prompt with a clear
error while the server keeps serving."""
import io
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from liveavatar_backend.video import probe_mp4

ROOT = Path(__file__).resolve().parents[1]
NODES = ["LiveAvatarModelLoader", "LiveAvatarLoadPortrait", "LiveAvatarLoadAudio16k", "LiveAvatarSampler",
         "LiveAvatarVAEDecodeClips", "LiveAvatarSaveVideo", "LiveAvatarUpscaleVideo"]
EXAMPLE_VOICE_CLIPS = 3            # the 5.4 s example voice: int(160 / 57.6) + 1 (spec §3.2)
EXAMPLE_VOICE_RATE = 22050         # espeak-ng's: the videos keep it (the model hears 16 kHz)


def api(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"liveavatar_{name}.api.json").read_text())


def run(client, workflow: dict, timeout: float = 1500) -> dict:
    return client.wait(client.queue(workflow), timeout)


def test_command_line_overrides_keep_words_as_strings():
    from comfy_client import _widget_value
    assert [_widget_value(v) for v in ("7", "-1.5", "true", "[1, 2]")] == [7, -1.5, True, [1, 2]]
    assert [_widget_value(v) for v in ("fast", "the man speaks", "")] == ["fast", "the man speaks", ""]


def test_pack_imports_and_every_node_is_listed(comfy):
    client, _, _ = comfy
    assert "IMPORT FAILED" not in client.get("/internal/logs")
    info = client.get("/object_info")
    for node in NODES:
        assert info[node]["python_module"].startswith("custom_nodes.")
        required = info[node]["input"].get("required", {})
        optional = info[node]["input"].get("optional", {})
        assert all(spec[1].get("tooltip") for spec in {**required, **optional}.values()), node
        assert len(info[node]["output_tooltips"]) == len(info[node]["output"]) and all(info[node]["output_tooltips"])
    loader = info["LiveAvatarModelLoader"]["input"]["required"]
    assert "Wan2.2-S2V-14B" in loader["checkpoint"][1]["options"]
    loras = loader["lora"][1]["options"]
    assert "liveavatar.safetensors" in loras          # but not the checkpoint folder's own weights:
    assert not [name for name in loras if name.startswith("Wan2.2-S2V-14B/")]


def test_workflows_are_listed_as_templates_with_thumbnails(comfy):
    from PIL import Image
    client, _, _ = comfy
    templates = client.get("/workflow_templates")
    assert sorted(templates["ComfyUI-LiveAvatar"]) == ["liveavatar_fast_check", "liveavatar_final_render",
                                                        "liveavatar_standard_preview"]
    for name in templates["ComfyUI-LiveAvatar"]:   # where the template browser looks for each card's image
        with urllib.request.urlopen(f"{client.base}/api/workflow_templates/ComfyUI-LiveAvatar/{name}.jpg") as answer:
            assert answer.headers["Content-Type"] == "image/jpeg"
            assert Image.open(io.BytesIO(answer.read())).size == (640, 400)


def test_thumbnails_show_the_workflows_as_built():
    """A thumbnail left behind when its workflow changed differs from a fresh drawing by far more than
    JPEG's rounding in some 16x16 tile (one step more: 12-21 grey levels on average there; the
    rounding: 4.5)."""
    import copy

    import numpy as np
    from PIL import Image
    from workflow_thumbnails import WORKFLOWS, draw

    def worst_tile(a, b, tile=16):
        diff = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean(axis=2)
        rows, cols = diff.shape[0] // tile, diff.shape[1] // tile
        return diff[:rows * tile, :cols * tile].reshape(rows, tile, cols, tile).mean(axis=(1, 3)).max()
    for name, nodes in WORKFLOWS.items():
        shipped = Image.open(ROOT / "workflows" / f"liveavatar_{name}.jpg").convert("RGB")
        assert worst_tile(shipped, draw(name, nodes)) < 8, \
            f"workflows/liveavatar_{name}.jpg is stale: run python scripts/workflow_thumbnails.py"
        one_step_more = copy.deepcopy(nodes)
        next(inputs for cls, inputs in one_step_more.values() if cls == "LiveAvatarSampler")["steps"] += 1
        assert worst_tile(shipped, draw(name, one_step_more)) > 8      # the check sees a change that small


@pytest.mark.parametrize("name, frames, scale", [("fast_check", 48 * EXAMPLE_VOICE_CLIPS - 3, 1),
                                                   ("standard_preview", 48 * EXAMPLE_VOICE_CLIPS - 3, 2),
                                                   ("final_render", 48 * EXAMPLE_VOICE_CLIPS - 3, 1)])
def test_shipped_workflow_runs_to_an_mp4_with_audio(comfy, name, frames, scale):
    client, _, outputs = comfy
    entry = run(client, api(name))
    assert client.error_of(entry) is None, client.error_of(entry)
    videos = client.videos_of(entry)
    assert len(videos) == 1
    path = outputs / videos[0]["subfolder"] / videos[0]["filename"]
    info = probe_mp4(path)
    assert (info["frames"], info["fps"], info["has_audio"]) == (frames, 25.0, True)
    assert info["audio_sample_rate"] == EXAMPLE_VOICE_RATE
    import av
    with av.open(str(path)) as container:          # the prompt rides along, as core SaveVideo stores it
        assert json.loads(container.metadata["prompt"])["4"]["class_type"] == "LiveAvatarSampler"
    assert info["width"] % (64 * scale) == 0 and info["height"] % (64 * scale) == 0


def test_interrupt_stops_the_sampler_and_the_next_prompt_runs(comfy):
    client, _, _ = comfy
    workflow = api("fast_check")
    workflow["4"]["inputs"]["seed"] = 7            # a different prompt, not a cached one
    prompt_id = client.queue(workflow)
    started = time.time()
    while time.time() - started < 300:
        queue = client.get("/queue")
        if queue["queue_running"]:
            break
        time.sleep(0.2)
    time.sleep(3)                                   # inside model loading or sampling
    client.post("/interrupt", {})
    entry = client.wait(prompt_id, 600)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in json.dumps(entry["status"]["messages"])
    after = run(client, api("fast_check"))
    assert client.error_of(after) is None


def test_corrupt_audio_and_unreadable_image_fail_with_named_errors(comfy):
    client, inputs, _ = comfy
    (inputs / "broken_voice.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not really audio")
    (inputs / "broken_portrait.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    workflow = api("fast_check")
    workflow["3"]["inputs"]["audio"] = "broken_voice.wav"
    error = client.error_of(run(client, workflow))
    assert error and "broken_voice.wav" in error
    workflow = api("fast_check")
    workflow["2"]["inputs"]["image"] = "broken_portrait.png"
    error = client.error_of(run(client, workflow))
    assert error and "broken_portrait.png" in error
    assert client.get("/system_stats")["system"]          # still serving


def _frames(path: Path):
    import av
    import numpy as np
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _pipeline_workers() -> set[str]:
    import subprocess
    found = subprocess.run(["pgrep", "-f", "liveavatar_backend.parallel_worker"], capture_output=True, text=True)
    return set(found.stdout.split())


def test_a_model_split_over_two_devices_renders_the_same_video_and_ends_with_the_model(comfy):
    client, _, outputs = comfy
    videos = {}
    for devices in ("auto", "cpu,cpu"):
        workflow = api("fast_check")
        workflow["1"]["inputs"]["devices"] = devices
        workflow["4"]["inputs"]["seed"] = 11
        entry = run(client, workflow)
        assert client.error_of(entry) is None, client.error_of(entry)
        video = client.videos_of(entry)[0]
        videos[devices] = _frames(outputs / video["subfolder"] / video["filename"])
    assert len(_pipeline_workers()) == 2                          # the loaded model's two ranks
    assert videos["auto"].shape == videos["cpu,cpu"].shape
    assert abs(videos["auto"].astype(int) - videos["cpu,cpu"].astype(int)).max() <= 1
    client.post("/free", {"unload_models": True})                  # the menu's "Unload Models"
    deadline = time.time() + 60
    while _pipeline_workers() and time.time() < deadline:
        time.sleep(0.5)
    assert not _pipeline_workers()
    workflow["4"]["inputs"]["seed"] = 12                          # the cached loader output, used again
    entry = run(client, workflow)
    assert client.error_of(entry) is None, client.error_of(entry)
    assert len(_pipeline_workers()) == 2                          # loaded again
    workflow = api("fast_check")
    workflow["1"]["inputs"]["devices"] = "cuda:0,cuda:0"
    error = client.error_of(run(client, workflow))
    assert error and "cuda:0,cuda:0" in error and "twice" in error
    assert not _pipeline_workers()                                # unloading the model ended them


def test_the_loader_shows_its_progress_and_news_on_its_node(comfy):
    """Over ComfyUI's websocket, as the frontend hears it: the loader's progress bar rises to its end
    on the loader node, and its news (the memory mode, what it loads) arrive as that node's text."""
    import asyncio
    import struct
    import uuid

    import aiohttp
    client, _, _ = comfy
    workflow = api("fast_check")
    workflow["1"]["inputs"]["memory_mode"] = "quality"          # other settings than before: a fresh load
    workflow["4"]["inputs"]["num_clips"] = 1
    client_id = uuid.uuid4().hex
    progress, texts = [], []

    async def listen() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{client.base.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
                prompt_id = client.post("/prompt", {"prompt": workflow, "client_id": client_id})["prompt_id"]
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, = struct.unpack(">I", message.data[:4])
                        if event == 3:                    # BinaryEventTypes.TEXT: node id length, node id, text
                            length, = struct.unpack(">I", message.data[4:8])
                            texts.append((message.data[8:8 + length].decode(), message.data[8 + length:].decode()))
                        continue
                    data = json.loads(message.data)
                    if data["type"] == "progress":
                        progress.append((data["data"]["node"], data["data"]["value"], data["data"]["max"]))
                    if data["type"] == "executing" and data["data"]["node"] is None \
                            and data["data"]["prompt_id"] == prompt_id:
                        return
    asyncio.run(asyncio.wait_for(listen(), timeout=900))
    loader_bar = [value for node, value, total in progress if node == "1" and total == 100]
    assert len(loader_bar) > 10 and loader_bar == sorted(loader_bar) and loader_bar[-1] == 100
    loader_text = [text for node, text in texts if node == "1"]
    assert loader_text and loader_text[-1].startswith("loading DiT from ")
    assert "loading text encoder, VAE and audio encoder" in loader_text[-1]
