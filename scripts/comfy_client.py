"""A small client for a running ComfyUI (HTTP only): queue an API-format workflow, wait for it,
find the files it wrote. Used by scripts/run_preview.sh and by the tests."""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid


class ComfyClient:
    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=30) as answer:
            body = answer.read().decode()
        return json.loads(body) if body[:1] in "[{" else body

    def post(self, path: str, payload) -> dict:
        request = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                body = answer.read().decode()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"POST {path} -> {error.code}: {error.read().decode()[:2000]}") from None
        return json.loads(body) if body else {}

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                self.get("/system_stats")
                return
            except Exception:
                if time.time() > deadline:
                    raise TimeoutError(f"ComfyUI at {self.base} did not start in {timeout} s") from None
                time.sleep(0.5)

    def queue(self, workflow: dict) -> str:
        return self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800) -> dict:
        """The /history entry once the prompt has finished (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} still running after {timeout} s")

    @staticmethod
    def error_of(entry: dict) -> str | None:
        for event, data in entry.get("status", {}).get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                return f"{event}: {data.get('node_type')}: {data.get('exception_message', '').strip()}"
        return None

    @staticmethod
    def videos_of(entry: dict) -> list[dict]:
        """Files written by SaveVideo / LiveAvatarSaveVideo ({filename, subfolder, type})."""
        found = []
        for output in entry.get("outputs", {}).values():
            found += output.get("images", []) + output.get("videos", [])
        return [f for f in found if str(f.get("filename", "")).endswith(".mp4")]


def _widget_value(text: str):
    """A number, true/false or JSON list/object as such; anything else (a prompt, 'fast') as the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str]) -> int:
    """python scripts/comfy_client.py URL WORKFLOW.api.json [key=value overrides as node.input=value]"""
    client = ComfyClient(argv[0])
    workflow = json.loads(open(argv[1]).read())
    for override in argv[2:]:
        target, value = override.split("=", 1)
        node, field = target.split(".", 1)
        workflow[node]["inputs"][field] = _widget_value(value)
    entry = client.wait(client.queue(workflow))
    error = client.error_of(entry)
    if error:
        print(error, file=sys.stderr)
        return 1
    for video in client.videos_of(entry):
        print(f"{video.get('subfolder', '')}/{video['filename']}".lstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
