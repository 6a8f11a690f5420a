"""Text shown on the running node (ComfyUI's progress text, under the node's widgets) as well as in
the log: what a user should see without reading the console, such as the memory mode 'auto' chose
or a warning about the portrait."""
from __future__ import annotations

import logging

log = logging.getLogger("liveavatar")


def _running_node_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context     # ComfyUI 0.3.4x and newer
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else context.node_id


class NodeStatus:
    """Lines said during one node's run: each is logged, and all of them are shown on the node that
    was running when this was made (outside a prompt, e.g. in tests, only logged). Showing them is a
    courtesy: it never fails the work that reports."""

    def __init__(self, level: int = logging.INFO):
        self.level = level
        self.lines: list[str] = []
        self.node_id = _running_node_id()

    def __call__(self, line: str) -> None:
        log.log(self.level, line)
        self.lines.append(line)
        if self.node_id is None:
            return
        try:
            from server import PromptServer            # ComfyUI's, loaded by its main before any node runs
            PromptServer.instance.send_progress_text("\n".join(self.lines), self.node_id)
        except Exception:
            log.debug("could not show the line on node %s", self.node_id, exc_info=True)
