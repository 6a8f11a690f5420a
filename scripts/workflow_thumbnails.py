"""Thumbnails for the shipped workflows (workflows/<name>.jpg), drawn from the same description the
workflows are built from (`build_workflows.WORKFLOWS`): ComfyUI's template browser shows
`<name>.jpg` from a pack's workflow folder beside each template, and a broken image without one.

Drawn, not screenshotted, so that no example input ends up in the project.

usage: python scripts/workflow_thumbnails.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_workflows import ROOT, WORKFLOWS          # noqa: E402

SIZE = (640, 400)                                    # the cards letterbox a .jpg (object-contain)
BACKGROUND, PANEL, TEXT, MUTED, ACCENT = "#17191f", "#262a33", "#f2f2f2", "#9aa3b2", "#7fd16b"
TITLES = {"fast_check": "Fast check", "standard_preview": "Standard preview", "final_render": "Final render"}
BOX_LABELS = {                                       # node class -> what its box says
    "LiveAvatarLoadPortrait": "Portrait",
    "LiveAvatarLoadAudio16k": "Voice",
    "LiveAvatarSampler": "Sampler",
    "LiveAvatarVAEDecodeClips": "Decode",
    "LiveAvatarUpscaleVideo": "Upscale",
    "LiveAvatarSaveVideo": "Decode+mp4",
    "SaveVideo": "mp4",
}


def facts(nodes: dict) -> str:
    """'384*256 · 3 steps · up to 10 clips · 2x upscale' from the graph's own settings."""
    settings = {cls: inputs for cls, inputs in nodes.values()}
    sampler = settings["LiveAvatarSampler"]
    clips = f"up to {sampler['num_clips']} clips" if sampler["num_clips"] else "the whole voice"
    parts = [sampler["size"], f"{sampler['steps']} steps", clips]
    upscale = settings.get("LiveAvatarUpscaleVideo")
    if upscale is not None:
        parts.append(f"{upscale['factor']:g}x upscale")
    return "  ·  ".join(parts)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw(name: str, nodes: dict) -> Image.Image:
    image = Image.new("RGB", SIZE, BACKGROUND)
    pen = ImageDraw.Draw(image)
    pen.text((32, 28), "LIVE AVATAR", fill=ACCENT, font=font(20))
    pen.text((32, 58), TITLES[name], fill=TEXT, font=font(44))
    pen.text((32, 118), facts(nodes), fill=MUTED, font=font(20))
    inputs = [BOX_LABELS[cls] for cls, _ in nodes.values() if cls in ("LiveAvatarLoadPortrait", "LiveAvatarLoadAudio16k")]
    chain = [BOX_LABELS[cls] for cls, _ in nodes.values() if cls in BOX_LABELS and BOX_LABELS[cls] not in inputs]
    box_w, box_h, gap, top = 98, 50, 16, 250
    boxes = [(32, top - 36, inputs[0]), (32, top + 36, inputs[1])]
    boxes += [(32 + (box_w + gap) * (i + 1), top, label) for i, label in enumerate(chain)]
    for x, y, label in boxes:
        pen.rounded_rectangle((x, y - box_h // 2, x + box_w, y + box_h // 2), radius=8, fill=PANEL,
                              outline=ACCENT if label == "Sampler" else MUTED, width=2)
        pen.text((x + box_w // 2, y), label, fill=TEXT, font=font(17), anchor="mm")
    for (x0, y0, _), (x1, y1, _) in [(boxes[0], boxes[2]), (boxes[1], boxes[2])] + list(zip(boxes[2:], boxes[3:])):
        pen.line((x0 + box_w, y0, x1 - 6, y1), fill=MUTED, width=2)
        pen.polygon([(x1, y1), (x1 - 9, y1 - 5), (x1 - 9, y1 + 5)], fill=MUTED)
    pen.text((32, SIZE[1] - 44), "a portrait, a voice and a prompt in; a talking video out, 25 fps", fill=MUTED, font=font(18))
    return image


def main() -> int:
    for name, nodes in WORKFLOWS.items():
        path = ROOT / "workflows" / f"liveavatar_{name}.jpg"
        draw(name, nodes).save(path, quality=92, subsampling=0, optimize=True)
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
