"""Fixtures for the node tests: tiny models, predictor files, node calls, a UI event recorder."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from comfy_testlib import build_predictor

import hyperalign


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by per-op overhead, which a second thread only adds to."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny(comfy_host):
    from testing_pack import tiny as module  # needs ComfyUI importable first

    return module


@pytest.fixture(scope="session")
def base_models(tiny):
    """One tiny model per family, shared: tests must leave them exactly as they found them."""
    return {family: tiny.build_model(family, seed=0) for family in ("sd15", "flux", "sdxl")}


@pytest.fixture(scope="session")
def predictor_dir(comfy_host, hyperalign_pack, tmp_path_factory):
    """A models/hyperalign folder registered with ComfyUI, holding the standard test predictors."""
    folder = tmp_path_factory.mktemp("hyperalign_models")
    comfy_host.folder_paths.add_model_folder_path("hyperalign", str(folder), is_default=True)
    return folder


@pytest.fixture(scope="session")
def predictors(tiny, predictor_dir):
    """File names of the standard predictors: <family>_identity, <family>_a, <family>_b, and sd15_conv_a."""
    names = {}
    for family in ("sd15", "flux", "sdxl"):
        for tag, seed in (("identity", None), ("a", 1), ("b", 2)):
            name = f"{family}_{tag}.safetensors"
            hyperalign.save_predictor(predictor_dir / name, build_predictor(tiny, family, seed))
            names[f"{family}_{tag}"] = name
    # attention plus the ResNet convolutions (LoCon targets)
    hyperalign.save_predictor(
        predictor_dir / "sd15_conv_a.safetensors", build_predictor(tiny, "sd15", 1, targets="attn_conv")
    )
    names["sd15_conv_a"] = "sd15_conv_a.safetensors"
    return names


@pytest.fixture(scope="session")
def node(hyperalign_pack):
    """Call a node's V3 execute() the way ComfyUI does, returning its outputs (NodeOutput.args)."""

    def call(node_id: str, **inputs):
        return hyperalign_pack.nodes[node_id].execute(**inputs)

    return call


@pytest.fixture
def ui_events(monkeypatch):
    """Records what the nodes send to the browser (a stand-in for PromptServer.instance)."""
    events = []

    class Recorder:
        def send_sync(self, event, data, sid=None):
            events.append((event, data))

    fake = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=Recorder()))
    monkeypatch.setitem(sys.modules, "server", fake)
    return events


@pytest.fixture(scope="session")
def comfy(comfy_host, hyperalign_pack):
    """ComfyUI's modules the tests use (imported only after the host is set up, never at collection)."""
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    return types.SimpleNamespace(
        lora=comfy.lora,
        mm=comfy.model_management,
        model_patcher=comfy.model_patcher,
        patcher_extension=comfy.patcher_extension,
        sample=comfy.sample,
        samplers=comfy.samplers,
        sd=comfy.sd,
        utils=comfy.utils,
        nodes=comfy_host.nodes,
        folder_paths=comfy_host.folder_paths,
    )
