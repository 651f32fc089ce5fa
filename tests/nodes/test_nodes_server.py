"""The pack inside a real ComfyUI server (main.py on 127.0.0.1), driven over HTTP.

The server gets its own base directory: custom_nodes/ holds this repository (as ComfyUI-HyperAlign)
and the test-only node pack that builds tiny models (ComfyUI's loaders only read full-size
checkpoints); the predictors live in a folder that only an extra_model_paths.yaml names.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_testlib import REPO_ROOT, build_predictor
from safetensors.torch import load_file

import hyperalign

START_TIMEOUT = 180
PROMPT_TIMEOUT = 180
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, payload: dict, timeout: float = 10):
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _write_predictors(folder: Path, tiny) -> None:
    hyperalign.save_predictor(folder / "tiny_sd15_a.safetensors", build_predictor(tiny, "sd15", 1))
    hyperalign.save_predictor(folder / "tiny_sd15_b.safetensors", build_predictor(tiny, "sd15", 2))
    hyperalign.save_predictor(folder / "tiny_flux_a.safetensors", build_predictor(tiny, "flux", 1))
    whole = (folder / "tiny_sd15_a.safetensors").read_bytes()
    (folder / "broken_download.safetensors").write_bytes(whole[: len(whole) // 2])


@pytest.fixture(scope="module")
def server(comfy_host, hyperalign_pack, tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_server")
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / hyperalign_pack.path.name).symlink_to(REPO_ROOT, target_is_directory=True)
    (custom_nodes / "hyperalign_testing").symlink_to(Path(__file__).parent / "testing_pack", target_is_directory=True)
    models = tmp_path_factory.mktemp("extra_models")
    (models / "hyperalign").mkdir()
    _write_predictors(models / "hyperalign", tiny)
    extra = base / "extra_model_paths.yaml"
    extra.write_text(f"hyperalign_tests:\n    base_path: {models}\n    hyperalign: hyperalign\n")
    port = _free_port()
    log = open(base / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), "--extra-model-paths-config", str(extra),
         "--database-url", "sqlite:///:memory:", "--disable-api-nodes"],
        cwd=comfy_host.path, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny models: threads only add overhead
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{(base / 'server.log').read_text()[-4000:]}")
            try:
                _get(f"{url}/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"ComfyUI did not start in {START_TIMEOUT} s:\n{(base / 'server.log').read_text()[-4000:]}"
                    )
                time.sleep(0.5)
        yield SimpleNamespace(url=url, base=base, log=base / "server.log", pack=hyperalign_pack.path.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


def _run(server, graph: dict) -> dict:
    """Queue an API-format graph and wait for its /history entry."""
    prompt_id = _post(f"{server.url}/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:
        history = _get(f"{server.url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] in ("success", "error"):
                return entry
        time.sleep(0.25)
    pytest.fail(f"prompt {prompt_id} did not finish in {PROMPT_TIMEOUT} s:\n{server.log.read_text()[-4000:]}")


def _branch(prefix: str, family: str, predictor: str, tag: str, batch: int = 2) -> dict:
    """Tiny model + loader + apply + KSampler + SaveLatent; node ids start with `prefix`."""
    ids = {name: f"{prefix}{i}" for i, name in enumerate(["model", "loader", "apply", "cond", "latent", "ks", "save"])}
    return {
        ids["model"]: {"class_type": "HyperAlignTestTinyModel", "inputs": {"family": family, "seed": 0}},
        ids["loader"]: {"class_type": "HyperAlignLoader", "inputs": {"predictor_name": predictor}},
        ids["apply"]: {"class_type": "HyperAlignApply", "inputs": {
            "model": [ids["model"], 0], "predictor": [ids["loader"], 0], "mode": "S", "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0, "keysteps": ""}},
        ids["cond"]: {"class_type": "HyperAlignTestConditioning", "inputs": {"family": family, "batch": batch,
                                                                              "seed": 1}},
        ids["latent"]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        ids["ks"]: {"class_type": "KSampler", "inputs": {
            "model": [ids["apply"], 0], "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": [ids["cond"], 0], "negative": [ids["cond"], 1],
            "latent_image": [ids["latent"], 0], "denoise": 1.0}},
        ids["save"]: {"class_type": "SaveLatent", "inputs": {"samples": [ids["ks"], 0], "filename_prefix": tag}},
    }  # fmt: skip


def _saved_latent(server, entry: dict, node_id: str) -> torch.Tensor:
    (saved,) = entry["outputs"][node_id]["latents"]
    path = server.base / "output" / saved["subfolder"] / saved["filename"]
    return load_file(str(path))["latent_tensor"]


def _error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    (details,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    return details


@pytest.mark.comfy
@pytest.mark.slow
def test_object_info_lists_the_nodes_and_the_extra_model_folder(server):
    info = _get(f"{server.url}/object_info", timeout=60)
    for node_id in ("HyperAlignLoader", "HyperAlignApply", "HyperAlignKeysteps", "HyperAlignExportLoRA"):
        assert info[node_id]["category"] == "HyperAlign"
    assert info["HyperAlignLoader"]["output"] == ["HYPERALIGN_PREDICTOR"]
    apply_inputs = info["HyperAlignApply"]["input"]
    assert list(apply_inputs["required"]) == ["model", "predictor", "mode", "strength", "start_percent", "end_percent"]
    assert list(apply_inputs["optional"]) == ["keysteps"]
    assert apply_inputs["required"]["predictor"][0] == "HYPERALIGN_PREDICTOR"
    spec = info["HyperAlignLoader"]["input"]["required"]["predictor_name"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert set(options) >= {"tiny_sd15_a.safetensors", "tiny_flux_a.safetensors", "broken_download.safetensors"}


@pytest.mark.comfy
@pytest.mark.slow
def test_prompts_run_errors_are_reported_and_the_server_keeps_serving(server):
    good = _run(server, _branch("1", "sd15", "tiny_sd15_a.safetensors", "latents/good"))
    assert good["status"]["status_str"] == "success", good["status"]
    assert _saved_latent(server, good, "16").shape == (2, 4, 8, 8)
    assert "HyperAlign: mode S: 3 hypernet call(s) at step(s) [0,1,2]" in server.log.read_text()

    broken = _error(_run(server, _branch("2", "sd15", "broken_download.safetensors", "latents/broken")))
    assert broken["node_type"] == "HyperAlignLoader"
    assert "HyperAlign: 'broken_download.safetensors'" in broken["exception_message"]
    assert "truncated or corrupt" in broken["exception_message"]

    wrong = _error(_run(server, _branch("3", "sd15", "tiny_flux_a.safetensors", "latents/wrong")))
    assert wrong["node_type"] == "HyperAlignApply"
    assert (
        "'tiny_flux_a.safetensors' was trained for 'flux' but the connected MODEL is 'sd15'"
        in wrong["exception_message"]
    )

    again = _run(server, _branch("4", "flux", "tiny_flux_a.safetensors", "latents/again"))
    assert again["status"]["status_str"] == "success", again["status"]


@pytest.mark.comfy
@pytest.mark.slow
def test_two_apply_branches_in_one_graph_match_each_run_alone(server):
    both = _run(
        server,
        {
            **_branch("5", "sd15", "tiny_sd15_a.safetensors", "latents/both_a"),
            **_branch("6", "sd15", "tiny_sd15_b.safetensors", "latents/both_b"),
        },
    )
    alone_a = _run(server, _branch("7", "sd15", "tiny_sd15_a.safetensors", "latents/alone_a"))
    alone_b = _run(server, _branch("8", "sd15", "tiny_sd15_b.safetensors", "latents/alone_b"))
    for entry in (both, alone_a, alone_b):
        assert entry["status"]["status_str"] == "success", entry["status"]
    assert torch.equal(_saved_latent(server, both, "56"), _saved_latent(server, alone_a, "76"))
    assert torch.equal(_saved_latent(server, both, "66"), _saved_latent(server, alone_b, "86"))
    assert not torch.equal(_saved_latent(server, alone_a, "76"), _saved_latent(server, alone_b, "86"))


def _widget_inputs(spec: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of an /object_info node's widget inputs, in the order the UI lays them out."""
    inputs = []
    for section in ("required", "optional"):
        for name, entry in spec["input"].get(section, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                inputs.append((name, kind, options))
    return inputs


def _check_widget_values(node: dict, spec: dict) -> None:
    values = list(node.get("widgets_values", []))
    for name, kind, options in _widget_inputs(spec):
        assert values, f"{node['type']}: no widget value for {name}"
        value = values.pop(0)
        if kind == "INT":
            assert isinstance(value, int), (node["type"], name, value)
        elif kind == "FLOAT":
            assert isinstance(value, (int, float)), (node["type"], name, value)
        elif kind in ("STRING", "COMBO") or isinstance(kind, list):
            assert isinstance(value, str), (node["type"], name, value)
            choices = kind if isinstance(kind, list) else options.get("options")
            if choices and not name.endswith("_name") and not name.startswith("clip_name"):  # files differ per install
                assert value in choices, (node["type"], name, value)
        if options.get("control_after_generate"):
            assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), node["type"]
    assert not values, f"{node['type']}: extra widget values {values}"


@pytest.mark.comfy
@pytest.mark.slow
@pytest.mark.parametrize("workflow", ["hyperalign_sd15.json", "hyperalign_sdxl.json", "hyperalign_flux.json"])
def test_example_workflows_match_the_running_server(server, workflow):
    info = _get(f"{server.url}/object_info", timeout=60)
    document = json.loads((REPO_ROOT / "example_workflows" / workflow).read_text())
    nodes = {node["id"]: node for node in document["nodes"]}
    assert {node["type"] for node in nodes.values()} >= {"HyperAlignLoader", "HyperAlignApply", "KSampler"}
    for node in nodes.values():
        assert node["type"] in info, f"unknown node type {node['type']}"
        spec = info[node["type"]]
        sockets = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for slot in node.get("inputs", []):
            assert slot["name"] in sockets, f"{node['type']} has no input {slot['name']}"
            assert sockets[slot["name"]][0] == slot["type"], (node["type"], slot["name"])
        for index, slot in enumerate(node.get("outputs", [])):
            assert spec["output"][index] == slot["type"], (node["type"], index)
        _check_widget_values(node, spec)
    assert document["last_link_id"] == max(link[0] for link in document["links"])
    for link_id, source, source_slot, target, target_slot, kind in document["links"]:
        assert link_id in (nodes[source]["outputs"][source_slot]["links"] or [])
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == kind == nodes[target]["inputs"][target_slot]["type"]
    # served where the frontend's template browser looks for them
    templates = _get(f"{server.url}/workflow_templates")
    assert workflow[: -len(".json")] in templates[server.pack]
