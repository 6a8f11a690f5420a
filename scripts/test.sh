#!/usr/bin/env bash
# README command two: install what the tests need (Debian packages, a real ComfyUI 0.3.75 host
# with this pack) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/setup_host.sh
exec "${LIVEAVATAR_HOST_DIR:-.comfyui-host}/venv/bin/python" -m pytest tests -q "$@"
