"""Node registration, the models/hyperalign folder, the loader, and everything Apply refuses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from comfy_testlib import REPO_ROOT, build_predictor
from safetensors.torch import save_file

import hyperalign

NODE_IDS = ["HyperAlignLoader", "HyperAlignApply", "HyperAlignKeysteps", "HyperAlignExportLoRA"]


def _inputs(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.comfy
def test_nodes_are_registered_with_tooltips(hyperalign_pack):
    for node_id in NODE_IDS:
        node_class = hyperalign_pack.nodes[node_id]
        schema = node_class.GET_SCHEMA()
        assert schema.category == "HyperAlign"
        missing = [name for name, (_, options) in _inputs(node_class).items() if not options.get("tooltip")]
        assert not missing, f"{node_id} inputs without a tooltip: {missing}"
    with open(REPO_ROOT / "node_list.json") as handle:
        assert sorted(json.load(handle)) == sorted(NODE_IDS)
    assert not hasattr(hyperalign_pack.module, "WEB_DIRECTORY")  # web/js is declared once, in pyproject.toml


@pytest.mark.comfy
def test_model_folder_keeps_extra_paths_and_lists_only_safetensors(comfy, hyperalign_pack, tmp_path, monkeypatch):
    register = hyperalign_pack.submodule("nodes").register_model_folder
    folder_paths = comfy.folder_paths
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "x.safetensors").write_bytes(b"")
    (extra / "notes.txt").write_text("not a predictor")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "hyperalign", ([str(extra)], set()))  # as the yaml does
    register()
    paths, extensions = folder_paths.folder_names_and_paths["hyperalign"]
    assert paths == [str(extra), os.path.join(folder_paths.models_dir, "hyperalign")]
    assert extensions == {".safetensors"}
    assert folder_paths.get_filename_list("hyperalign") == ["x.safetensors"]


@pytest.mark.comfy
def test_loader_lists_loads_and_caches_by_file_version(comfy, tiny, predictors, predictor_dir, node, hyperalign_pack):
    listed = _inputs(hyperalign_pack.nodes["HyperAlignLoader"])["predictor_name"]
    assert set(predictors.values()) <= set(listed[1]["options"] if isinstance(listed[0], str) else listed[0])
    first = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0]
    assert first.predictor.family == "sd15" and first.predictor.meta.mode == "S"
    assert node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0] is first
    name = "cache_probe.safetensors"
    hyperalign.save_predictor(predictor_dir / name, build_predictor(tiny, "flux", 7))
    loaded = node("HyperAlignLoader", predictor_name=name).args[0]
    hyperalign.save_predictor(predictor_dir / name, build_predictor(tiny, "sd15", 7))
    os.utime(predictor_dir / name, ns=(1, 1))
    reloaded = node("HyperAlignLoader", predictor_name=name).args[0]
    assert loaded.predictor.family == "flux" and reloaded.predictor.family == "sd15"


@pytest.mark.comfy
def test_loader_rejects_corrupt_and_foreign_files(predictors, predictor_dir, node):
    whole = (predictor_dir / predictors["sd15_a"]).read_bytes()
    (predictor_dir / "corrupt.safetensors").write_bytes(whole[: len(whole) - 64])  # a broken download
    with pytest.raises(ValueError, match=r"HyperAlign: 'corrupt\.safetensors' .*(truncated|corrupt)"):
        node("HyperAlignLoader", predictor_name="corrupt.safetensors")
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(predictor_dir / "a_lora.safetensors"))
    with pytest.raises(ValueError, match="not a HyperAlign predictor"):
        node("HyperAlignLoader", predictor_name="a_lora.safetensors")
    with pytest.raises(FileNotFoundError, match="HyperAlign: predictor 'gone.safetensors' is not in models/hyperalign"):
        node("HyperAlignLoader", predictor_name="gone.safetensors")


def _apply(node, model, loaded, **overrides):
    inputs = {"mode": "from_file", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, **overrides}
    return node("HyperAlignApply", model=model, predictor=loaded, **inputs).args[0]


@pytest.mark.comfy
def test_apply_refuses_a_predictor_of_the_other_family(base_models, predictors, node):
    flux = node("HyperAlignLoader", predictor_name=predictors["flux_a"]).args[0]
    with pytest.raises(
        ValueError,
        match=r"HyperAlign: predictor 'flux_a\.safetensors' was trained for 'flux' but the "
        r"connected MODEL is 'sd15'\. HINT",
    ):
        _apply(node, base_models["sd15"], flux)
    sd15 = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0]
    with pytest.raises(ValueError, match="trained for 'sd15' but the connected MODEL is 'flux'"):
        _apply(node, base_models["flux"], sd15)


@pytest.mark.comfy
@pytest.mark.parametrize(
    "arch",
    [
        None,  # hyperalign's defaults: the real SD1.5 table
        {
            "block_channels": [32, 64],
            "attention_levels": [True, True],
            "layers_per_block": 1,
            "transformer_depth": 1,
            "context_dim": 32,
            "mid_attention": True,
        },
    ],
)
def test_apply_refuses_a_predictor_for_another_target_table(tiny, base_models, predictor_dir, node, arch):
    predictor = hyperalign.new_predictor("sd15", build_predictor(tiny, "sd15", None).hypernet.cfg, arch)
    hyperalign.save_predictor(predictor_dir / "other_table.safetensors", predictor)
    loaded = node("HyperAlignLoader", predictor_name="other_table.safetensors").args[0]
    with pytest.raises(ValueError, match="was trained for a different sd15 architecture"):
        _apply(node, base_models["sd15"], loaded)


@pytest.mark.comfy
def test_apply_refuses_models_without_the_target_layers(tiny, predictors, node):
    model = tiny.build_model("sd15")
    loaded = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0]
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    block.attn1.to_q = torch.nn.Identity()  # what a fused / TensorRT-style replacement looks like
    with pytest.raises(TypeError, match="HyperAlign: .*attn1.to_q' is a Identity, not a Linear layer"):
        _apply(node, model, loaded)
    del block.attn1.to_q
    with pytest.raises(ValueError, match="HyperAlign: 1 of 56 target layers are missing from the model"):
        _apply(node, model, loaded)


@pytest.mark.comfy
def test_apply_refuses_other_model_families(comfy, base_models, predictors, node):
    import comfy.supported_models

    config = comfy.supported_models.SD20(dict(base_models["sd15"].model.model_config.unet_config, context_dim=32))
    model = comfy.model_patcher.ModelPatcher(config.get_model({}, "", device=torch.device("meta")), "cpu", "cpu")
    loaded = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0]
    with pytest.raises(
        ValueError,
        match="HyperAlign: the connected MODEL is a SD20 model; HyperAlign predictors exist "
        "for SD1.5, SDXL and FLUX.1 models only",
    ):
        _apply(node, model, loaded)


@pytest.mark.comfy
def test_apply_refuses_bad_keysteps_and_windows(base_models, predictors, node, hyperalign_pack):
    loaded = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0]
    model = base_models["sd15"]
    for text, message in (
        ("0, 0.5, 0.5", "strictly increasing"),
        ("0.2, 0.5", "first keystep must be 0"),
        ("0, a", "not a comma-separated list"),
        ("0, 1.5", r"fractions in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=f"HyperAlign: .*{message}"):
            _apply(node, model, loaded, mode="P", keysteps=text)
        assert message.split(" ")[0].strip("\\") in hyperalign_pack.nodes["HyperAlignApply"].validate_inputs(
            keysteps=text
        )
    with pytest.raises(ValueError, match="HyperAlign: start_percent 0.8 and end_percent 0.2 must satisfy"):
        _apply(node, model, loaded, start_percent=0.8, end_percent=0.2)
    assert "after end_percent" in hyperalign_pack.nodes["HyperAlignApply"].validate_inputs(
        start_percent=0.8, end_percent=0.2
    )
    assert hyperalign_pack.nodes["HyperAlignApply"].validate_inputs(keysteps="0, 0.4", start_percent=0.1) is True


@pytest.mark.comfy
def test_apply_clones_and_registers_its_wrappers(comfy, base_models, predictors, node):
    model = base_models["flux"]
    loaded = node("HyperAlignLoader", predictor_name=predictors["flux_a"]).args[0]
    patched = _apply(node, model, loaded, mode="I", strength=0.5)
    wrappers = comfy.patcher_extension.WrappersMP
    for kind in (wrappers.OUTER_SAMPLE, wrappers.CALC_COND_BATCH, wrappers.APPLY_MODEL):
        assert len(patched.get_wrappers(kind, "hyperalign")) == 1 and not model.get_wrappers(kind, "hyperalign")
    (attached,) = patched.get_additional_models_with_key("hyperalign")
    assert attached.model is loaded.predictor.hypernet and attached.parent is loaded.patcher
    assert patched.model is model.model and not model.get_additional_models_with_key("hyperalign")
    twice = _apply(node, patched, loaded)
    assert len(twice.get_additional_models_with_key("hyperalign")) == 2
    assert len(twice.get_wrappers(wrappers.APPLY_MODEL, "hyperalign")) == 2
