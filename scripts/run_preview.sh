#!/usr/bin/env bash
# README command one: set up a ComfyUI host with this pack, put the pack's example inputs in its
# input folder, and run the standard preview workflow headless. Writes out/preview.mp4.
# With the real weights in .comfyui-host/ComfyUI/models/liveavatar/ (see README) it renders a real
# avatar; otherwise it uses a TINY RANDOM SMOKE MODEL (noise, not an avatar) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/setup_host.sh
HOST=${LIVEAVATAR_HOST_DIR:-.comfyui-host}
PY=$HOST/venv/bin/python
COMFY=$HOST/ComfyUI
MODELS=$COMFY/models/liveavatar
WORKFLOW=workflows/api/liveavatar_standard_preview.api.json
EXTRA=()
LORA=""
for candidate in "$MODELS/liveavatar.safetensors" "$COMFY/models/loras/liveavatar.safetensors"; do
  [ -f "$candidate" ] && LORA=$candidate && break
done
if [ -f "$MODELS/Wan2.2-S2V-14B/diffusion_pytorch_model.safetensors.index.json" ]; then
  if [ -z "$LORA" ]; then
    echo "Found $MODELS/Wan2.2-S2V-14B but not liveavatar.safetensors (in $MODELS/ or $COMFY/models/loras/):"
    echo "download it from Quark-Vision/Live-Avatar (README, Model files)."
    exit 1
  fi
  echo "Using the real Wan2.2-S2V-14B from $MODELS and the Live Avatar LoRA $LORA"
  DEVICE=()
else
  if [ -n "$LORA" ]; then     # the pack would pick it before the smoke model's own LoRA
    echo "Found $LORA but not the Wan2.2-S2V-14B folder in $MODELS/: put the folder there (README, Model files),"
    echo "or move the LoRA away to run the tiny smoke model."
    exit 1
  fi
  SMOKE=$HOST/smoke-model
  echo "!! Real weights not found in $MODELS — using a TINY RANDOM SMOKE MODEL (the video will be noise)."
  [ -d "$SMOKE/Wan2.2-S2V-14B" ] || $PY -m liveavatar_backend make-tiny-checkpoints "$SMOKE"
  printf 'liveavatar_smoke:\n  base_path: %s\n  liveavatar: .\n' "$(cd "$SMOKE" && pwd)" > "$HOST/smoke-model-paths.yaml"
  EXTRA=(--extra-model-paths-config "$(cd "$HOST" && pwd)/smoke-model-paths.yaml")
  DEVICE=(--cpu)
fi
$PY scripts/make_example_inputs.py "$COMFY/input" >/dev/null
PORT=${PORT:-8190}
if ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then DEVICE=(--cpu); fi
(cd "$COMFY" && exec ../venv/bin/python main.py "${DEVICE[@]}" --listen 127.0.0.1 --port "$PORT" \
   --disable-auto-launch --dont-print-server --database-url sqlite:///:memory: "${EXTRA[@]}") \
   > "$HOST/preview-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
$PY - "$PORT" <<'PY'
import sys; sys.path.insert(0, "scripts")
from comfy_client import ComfyClient
ComfyClient(f"http://127.0.0.1:{sys.argv[1]}").wait_ready()
PY
OUTFILE=$($PY scripts/comfy_client.py "http://127.0.0.1:$PORT" "$WORKFLOW") || {
  echo "The preview workflow failed; ComfyUI's log: $HOST/preview-server.log"; exit 1; }
[ -n "$OUTFILE" ] || { echo "The preview workflow wrote no mp4; ComfyUI's log: $HOST/preview-server.log"; exit 1; }
mkdir -p out
cp "$COMFY/output/$OUTFILE" out/preview.mp4
$PY -c "from liveavatar_backend.video import probe_mp4; print('out/preview.mp4:', probe_mp4('out/preview.mp4'))"
