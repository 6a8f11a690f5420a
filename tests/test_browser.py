"""The shipped UI workflows in the real ComfyUI frontend (headless Debian Chromium via Playwright):
no missing node types, no node with errors, convertible to API format; a screenshot per workflow
is saved under tests/artifacts/."""
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]
LOAD = """async (wf) => {
  const reg = window.LiteGraph.registered_node_types;
  const missing = wf.nodes.filter(n => !(n.type in reg)).map(n => n.type);
  await window.app.loadGraphData(wf, true, true, null, {showMissingNodesDialog: false});
  const errors = window.app.graph.nodes.filter(n => n.has_errors).map(n => n.type);
  const {output} = await window.app.graphToPrompt();
  return {missing, errors, output};
}"""


@pytest.fixture(scope="module")
def page(comfy):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (scripts/setup_system.sh installs it)")
    client, _, _ = comfy
    client.post("/settings/Comfy.TutorialCompleted", True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        tab.goto(client.base)
        tab.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                              "Object.keys(window.LiteGraph.registered_node_types).length > 100", timeout=60_000)
        yield tab
        browser.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_cleanly_in_the_frontend(page, path):
    workflow = json.loads(path.read_text())
    result = page.evaluate(LOAD, workflow)
    assert result["missing"] == [] and result["errors"] == []
    assert not page.locator("text=Invalid workflow").count(), "the frontend rejected the workflow schema"
    api = json.loads((ROOT / "workflows" / "api" / f"{path.stem}.api.json").read_text())
    converted = {node_id: node["class_type"] for node_id, node in result["output"].items()}
    assert converted == {node_id: node["class_type"] for node_id, node in api.items()}
    for node_id, node in api.items():            # the frontend reads the same widget values
        for key, value in node["inputs"].items():
            if not isinstance(value, list):
                assert result["output"][node_id]["inputs"][key] == value, (node["class_type"], key)
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / f"{path.stem}.png"))
