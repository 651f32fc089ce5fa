"""What the pack asks of the ComfyUI it runs in: the numbered Comfy API, the host's patcher class for the
predictor, and MultiGPU refused in words (ComfyUI 0.33's MultiGPU path, run for real where the host has it
and replayed step by step where it does not)."""

from __future__ import annotations

import re

import pytest
import torch
from comfy_testlib import REPO_ROOT, apply, sample


def test_nodes_import_only_the_numbered_comfy_api():
    """comfy_api.latest moves between releases; comfy_api.v0_0_2 exists from 0.3.64 to 0.33."""
    imports = {}
    for path in sorted((REPO_ROOT / "nodes").glob("*.py")):
        for module in re.findall(r"^\s*(?:from|import)\s+(comfy_api\S*)", path.read_text(), re.MULTILINE):
            imports.setdefault(module, []).append(path.name)
    assert set(imports) == {"comfy_api.v0_0_2"}, imports


@pytest.fixture
def predictor_module(hyperalign_pack):
    return hyperalign_pack.submodule("nodes.predictor")


@pytest.mark.comfy
def test_predictor_rides_on_the_hosts_patcher_class(comfy, predictors, node, predictor_module, monkeypatch):
    """ComfyUI 0.16+ builds its models with comfy.model_patcher.CoreModelPatcher (ModelPatcherDynamic under
    dynamic VRAM): the predictor gets the same class, so memory management treats both alike."""
    patcher_module = comfy.model_patcher
    expected = getattr(patcher_module, "CoreModelPatcher", patcher_module.ModelPatcher)
    predictor = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0].predictor
    loaded = predictor_module.LoadedPredictor.wrap(predictor)
    assert type(loaded.patcher) is expected

    class HostPatcher(patcher_module.ModelPatcher):  # stands for a newer host's class
        pass

    monkeypatch.setattr(patcher_module, "CoreModelPatcher", HostPatcher, raising=False)
    loaded = predictor_module.LoadedPredictor.wrap(loaded.predictor)
    assert type(loaded.patcher) is HostPatcher
    assert type(loaded.clone_for_model()) is HostPatcher


@pytest.mark.comfy
def test_apply_refuses_a_model_set_up_for_multigpu(comfy, tiny, base_models, predictors, node):
    """MultiGPU CFG Split before HyperAlign Apply: the MODEL carries copies for other GPUs under 'multigpu'."""
    model = base_models["sd15"].clone()
    copy = base_models["sd15"].clone()
    copy.load_device = torch.device("cpu", 1)
    model.set_additional_models("multigpu", [copy])
    with pytest.raises(
        ValueError, match=r"HyperAlign: the connected MODEL is set up for MultiGPU .*cpu:1.*HINT: remove"
    ):
        apply(node, model, predictors["sd15_a"], mode="I")
    assert not model.get_additional_models_with_key("hyperalign")


def _multigpu_message():
    return r"HyperAlign: ComfyUI asked for a copy of the HyperAlign predictor on another device .*HINT: remove MultiGPU"


@pytest.mark.comfy
def test_a_per_device_copy_of_the_predictor_is_refused(comfy, tiny, base_models, predictors, node, predictor_module):
    """MultiGPU after HyperAlign Apply. ComfyUI 0.33's ModelPatcher.deepclone_multigpu makes each additional
    model's copy by calling its cached_patcher_init factory (and fails with its own RuntimeError deep in the
    run when there is none); this replays that step on any host."""
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode="I")
    (attached,) = patched.get_additional_models_with_key("hyperalign")
    factory, args = attached.cached_patcher_init[:2]
    with pytest.raises(predictor_module.MultiGPUUnsupported, match=_multigpu_message()):
        factory(*args)
    with pytest.raises(RuntimeError, match=_multigpu_message()):  # ComfyUI's Select Model Device catches these
        factory(*args, disable_dynamic=True)
    latent = sample(comfy, tiny, patched, "sd15", 1)  # one device: sampling is unaffected
    assert torch.isfinite(latent).all()


@pytest.mark.comfy
def test_multigpu_cfg_split_after_apply_stops_with_a_hyperalign_error(
    comfy, tiny, base_models, predictors, node, monkeypatch
):
    """The real MultiGPU path of hosts that have it (ComfyUI 0.33): create_multigpu_deepclones on a patched
    MODEL, with a second device and a reloadable main model, as a core loader makes one."""
    multigpu = pytest.importorskip("comfy.multigpu", reason="this ComfyUI has no MultiGPU (before 2026-05)")
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode="I")
    patched.cached_patcher_init = (tiny.build_model, ("sd15",))  # what CheckpointLoaderSimple registers
    devices = [patched.load_device, torch.device("cpu", 1)]
    monkeypatch.setattr(comfy.mm, "get_all_torch_devices", lambda exclude_current=False: devices)
    with pytest.raises(RuntimeError, match=_multigpu_message()):
        multigpu.create_multigpu_deepclones(patched, 2)
