"""Text shown on the running node (ComfyUI's progress text, under the node's widgets) as well as in
the log: what a user should see without reading the console, such as the memory mode 'auto' chose
or a warning about the portrait."""
from __future__ import annotations

import logging

log = logging.getLogger("liveavatar")


def _running_node_id() -> str | None:
    from comfy_execution.utils import get_executing_context
    context = get_executing_context()
    return None if context is None else context.node_id


class NodeStatus:
    """Lines said during one node's run: each is logged, and all of them are shown on the node that
    is running when the first is said (outside a prompt, e.g. in tests, only logged)."""

    def __init__(self, level: int = logging.INFO):
        self.level = level
        self.lines: list[str] = []
        self.node_id = _running_node_id()

    def __call__(self, line: str) -> None:
        log.log(self.level, line)
        self.lines.append(line)
        from server import PromptServer
        server = getattr(PromptServer, "instance", None)
        if self.node_id is not None and server is not None:
            server.send_progress_text("\n".join(self.lines), self.node_id)
