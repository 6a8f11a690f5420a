#!/usr/bin/env bash
# Debian packages the tests and the example inputs need: espeak-ng (the example voice),
# chromium (the browser test of the workflows) and python3-venv where Debian leaves it out.
# Idempotent; needs root (CI runs as root).
set -euo pipefail
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v chromium >/dev/null || need+=(chromium)
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)    # Debian splits venv out
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
