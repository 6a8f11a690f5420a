"""Builds the shipped workflows (workflows/*.json in ComfyUI's UI format, workflows/api/*.json in API
format) from one Python description, using the node definitions of a running ComfyUI
(GET /object_info) to order widget values exactly as the frontend expects, and their template
thumbnails (workflows/*.jpg, scripts/workflow_thumbnails.py).

usage: python scripts/build_workflows.py http://127.0.0.1:8188
"""
from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FROM_FOLDER = "(from checkpoint folder)"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")     # inputs the frontend shows as widgets
PROMPT = ("An astronaut in a white spacesuit talks warmly to the camera in front of the American flag. "
          "Soft studio light, natural colours, photographic.")
NOTE = {
    "fast_check": "FAST CHECK — 384*256, up to 5 clips, 2 steps. Does everything load and run? Seconds per clip "
                  "on a GPU, after loading (and, the first time, compiling for up to 1.5 minutes).\n",
    "standard_preview": "STANDARD PREVIEW — 384*256, up to 10 clips (≈19 s; fewer where the voice is shorter), "
                        "3 steps, 2× bicubic upscale, mp4 with audio.\n",
    "final_render": "FINAL RENDER — 704*384, the whole audio, 4 steps (what the LoRA was distilled for); decodes "
                    "clip by clip straight into the mp4, so any length fits in memory.\n",
}
MEMORY_NOTE = ("memory_mode 'auto' picks by the GPU's free memory at load: quality (bf16) from 49 GB, balanced "
               "(FP8) from 33 GB, else low_vram (24 GB cards); the loader node says which, and a size whose caches "
               "do not fit keeps them in host RAM. GPUs before Ada (RTX 3090, A100) multiply the FP8 weights in "
               "bf16. 704*384 fits 80 GB cards in "
               "quality or balanced, 48 GB ones in fast (Hopper or newer), 24 GB ones in low_vram (with about 58 GB "
               "of RAM) (README, VRAM guidance).\n")
MODELS_NOTE = ("Model files (see README): models/liveavatar/Wan2.2-S2V-14B/ (the Wan-AI/Wan2.2-S2V-14B folder) and "
               "models/liveavatar/liveavatar.safetensors (Quark-Vision/Live-Avatar). Example inputs: "
               "liveavatar_example_portrait.png and liveavatar_example_voice.wav in ComfyUI's input folder "
               "(scripts/make_example_inputs.py).")


def graph(name: str, size: str, clips: int, steps: int, final: bool) -> dict:
    """{id: (class, {input: value or (from_id, slot)})} — the one description both formats come from."""
    nodes = {
        1: ("LiveAvatarModelLoader", {"checkpoint": "Wan2.2-S2V-14B", "lora": "liveavatar.safetensors",
                                      "memory_mode": "auto", "devices": "auto", "text_encoder": FROM_FOLDER,
                                      "vae": FROM_FOLDER, "audio_encoder": FROM_FOLDER}),
        2: ("LiveAvatarLoadPortrait", {"image": "liveavatar_example_portrait.png"}),
        3: ("LiveAvatarLoadAudio16k", {"audio": "liveavatar_example_voice.wav", "start_seconds": 0.0,
                                       "duration_seconds": 0.0, "normalize_loudness": False}),
        4: ("LiveAvatarSampler", {"model": (1, 0), "portrait": (2, 0), "audio": (3, 0), "prompt": PROMPT,
                                  "size": size, "custom_size": "512*512", "num_clips": clips, "steps": steps,
                                  "seed": 420}),
    }
    if final:
        nodes[5] = ("LiveAvatarSaveVideo", {"model": (1, 0), "clips": (4, 0), "filename_prefix": f"video/LiveAvatar_{name}",
                                            "scale": 1.0, "method": "bicubic", "crf": 19})
        return nodes
    nodes[5] = ("LiveAvatarVAEDecodeClips", {"model": (1, 0), "clips": (4, 0)})
    images = (5, 0)
    if name == "standard_preview":
        nodes[6] = ("LiveAvatarUpscaleVideo", {"images": (5, 0), "mode": "factor", "factor": 2.0, "width": 0,
                                               "height": 0, "method": "bicubic", "chunk_size": 16})
        images = (6, 0)
    nodes[7] = ("CreateVideo", {"images": images, "fps": (5, 2), "audio": (5, 1)})
    nodes[8] = ("SaveVideo", {"video": (7, 0), "filename_prefix": f"video/LiveAvatar_{name}", "format": "auto",
                              "codec": "auto"})
    return nodes


WORKFLOWS = {
    "fast_check": graph("fast_check", "384*256", 5, 2, final=False),
    "standard_preview": graph("standard_preview", "384*256", 10, 3, final=False),
    "final_render": graph("final_render", "704*384", 0, 4, final=True),
}


def is_link(value) -> bool:
    return isinstance(value, tuple)


def to_api(nodes: dict) -> dict:
    return {str(i): {"class_type": cls, "inputs": {k: [str(v[0]), v[1]] if is_link(v) else v for k, v in inputs.items()},
                     "_meta": {"title": cls}} for i, (cls, inputs) in nodes.items()}


def widget_values(definition: dict, inputs: dict) -> list:
    """Positional widget values in the frontend's order; the upload widgets the frontend appends
    (image: one value; audio: its player and button) come last."""
    values, extras = [], []
    order = definition["input_order"].get("required", []) + definition["input_order"].get("optional", [])
    specs = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
    for name in order:
        kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
        if name not in inputs or not (isinstance(kind, list) or kind in WIDGET_TYPES):
            continue
        # a widget fed by a link keeps a (default) value in the list, like the frontend saves it
        values.append(options.get("default") if is_link(inputs[name]) else inputs[name])
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            extras.append("image")
        if options.get("audio_upload"):
            extras.extend([None, None])
    return values + extras


def to_ui(name: str, nodes: dict, info: dict) -> dict:
    links, ui_nodes, link_id = [], [], 0
    outgoing: dict[tuple[int, int], list[int]] = {}
    incoming: dict[int, dict[str, int]] = {}
    for i, (cls, inputs) in nodes.items():
        for key, value in inputs.items():
            if is_link(value):
                link_id += 1
                src, slot = value
                kind = info[nodes[src][0]]["output"][slot]
                links.append([link_id, src, slot, i, None, kind])
                outgoing.setdefault((src, slot), []).append(link_id)
                incoming.setdefault(i, {})[key] = link_id
    for order, (i, (cls, inputs)) in enumerate(nodes.items()):
        definition = info[cls]
        specs = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
        link_inputs = []
        for key in definition["input_order"].get("required", []) + definition["input_order"].get("optional", []):
            kind = specs[key][0]
            is_widget = not isinstance(kind, str) or kind in WIDGET_TYPES
            if not is_widget:
                link_inputs.append({"name": key, "type": kind, "link": incoming.get(i, {}).get(key)})
            elif key in incoming.get(i, {}):           # a widget converted to an input by a link
                link_inputs.append({"name": key, "type": kind, "widget": {"name": key},
                                    "link": incoming[i][key]})
        for slot_index, entry in enumerate(link_inputs):
            for link in links:
                if link[0] == entry["link"]:
                    link[4] = slot_index
        outputs = [{"name": out_name, "type": kind, "links": outgoing.get((i, slot), []), "slot_index": slot}
                   for slot, (kind, out_name) in enumerate(zip(definition["output"], definition["output_name"]))]
        ui_nodes.append({"id": i, "type": cls, "pos": [40 + 380 * (order % 4), 80 + 460 * (order // 4)],
                         "size": [340, 200], "flags": {}, "order": order, "mode": 0, "inputs": link_inputs,
                         "outputs": outputs, "properties": {"Node name for S&R": cls},
                         "widgets_values": widget_values(definition, inputs)})
    note_id = max(nodes) + 1
    ui_nodes.append({"id": note_id, "type": "Note", "pos": [40, -220], "size": [720, 180], "flags": {},
                     "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                     "widgets_values": [NOTE[name] + MEMORY_NOTE + MODELS_NOTE]})
    return {"last_node_id": note_id, "last_link_id": link_id, "nodes": ui_nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [80, 300]}}, "version": 0.4}


def main(argv: list[str]) -> int:
    base = (argv[0] if argv else "http://127.0.0.1:8188").rstrip("/")
    info = json.load(urllib.request.urlopen(f"{base}/object_info"))
    (ROOT / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, nodes in WORKFLOWS.items():
        (ROOT / "workflows" / f"liveavatar_{name}.json").write_text(json.dumps(to_ui(name, nodes, info), indent=1))
        (ROOT / "workflows" / "api" / f"liveavatar_{name}.api.json").write_text(json.dumps(to_api(nodes), indent=1))
        print(f"workflows/liveavatar_{name}.json")
    from workflow_thumbnails import main as draw_thumbnails      # it imports this module's WORKFLOWS
    return draw_thumbnails()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
