"""Writes the pack's OWN example inputs into a ComfyUI input folder.

* liveavatar_example_portrait.png: the astronaut photo that scikit-image ships (NASA, public
  domain), cropped to a head-and-shoulders portrait;
* liveavatar_example_voice.wav: a short English sentence spoken by espeak-ng (Debian package).

usage: python scripts/make_example_inputs.py INPUT_DIR
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PORTRAIT = "liveavatar_example_portrait.png"
VOICE = "liveavatar_example_voice.wav"
SPEECH = "Hello! I am a talking portrait, made with Live Avatar in ComfyUI."   # ≈4 s: 3 clips


def write_portrait(folder: Path) -> Path:
    from PIL import Image
    from skimage import data
    image = Image.fromarray(data.astronaut())          # 512×512 RGB
    path = folder / PORTRAIT
    image.crop((96, 0, 416, 400)).save(path)           # centre the face: 320×400 portrait
    return path


def write_voice(folder: Path) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed: run scripts/setup_system.sh (apt-get install espeak-ng)")
    path = folder / VOICE
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(path), SPEECH], check=True)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    print(write_portrait(folder))
    print(write_voice(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
