"""Live Avatar engine: the causal Wan2.2-S2V-14B talking-avatar model in plain PyTorch.

Importable without ComfyUI. Entry points: `engine.LiveAvatarEngine` (load once, then
prepare → sample → decode), `python -m liveavatar_backend` (command line). docs/ARCHITECTURE.md
maps the modules.
"""
