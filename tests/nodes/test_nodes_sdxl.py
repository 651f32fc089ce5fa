"""SDXL in the nodes: what is refused (other families, the refiner, non-eps SDXL), what the perception encoder
reads (SDXL's pooled text and size conditioning), and keystep discovery. Identity, per-row exactness against the
merged-weight reference, LoRA export and the input model after a run, an error or an interrupt are the family-
parametrized tests in test_nodes_alignment.py, test_nodes_keysteps_export.py and test_nodes_safety.py."""

from __future__ import annotations

import pytest
import torch
from comfy_testlib import apply, runs, sample
from test_nodes_keysteps_export import _keysteps

import hyperalign

pytestmark = pytest.mark.comfy


def _meta_model(comfy, config_class, unet_config: dict, model_type=None):
    """A ModelPatcher of ComfyUI's model for `config_class` on the meta device (no weights: detection only)."""
    import comfy.model_base
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    if model_type is None:
        base = config.get_model({}, "", device=torch.device("meta"))
    else:
        base = comfy.model_base.SDXL(config, model_type=getattr(comfy.model_base.ModelType, model_type), device="meta")
    return comfy.model_patcher.ModelPatcher(base, "cpu", "cpu")


@pytest.mark.parametrize(
    "model_family, predictor_family, match",
    [
        ("sdxl", "sd15", r"trained for 'sd15' but the connected MODEL is 'sdxl'\. HINT: choose a SDXL predictor"),
        ("sd15", "sdxl", r"trained for 'sdxl' but the connected MODEL is 'sd15'\. HINT: choose a SD1.5 predictor"),
        ("flux", "sdxl", r"trained for 'sdxl' but the connected MODEL is 'flux'"),
        ("sdxl", "flux", r"trained for 'flux' but the connected MODEL is 'sdxl'"),
    ],
)
def test_other_families_are_refused(base_models, predictors, node, model_family, predictor_family, match):
    with pytest.raises(ValueError, match=match):
        apply(node, base_models[model_family], predictors[f"{predictor_family}_a"])


def test_refiner_is_refused_by_name(comfy, tiny, predictors, node):
    refiner = dict(
        tiny.SDXL_UNET_CONFIG,
        model_channels=32,
        context_dim=32,
        adm_in_channels=32 + 5 * 256,
        transformer_depth=[0, 1, 1],
    )
    model = _meta_model(comfy, "SDXLRefiner", refiner)
    for call in (lambda: apply(node, model, predictors["sdxl_a"]), lambda: _keysteps(node, tiny, model)):
        with pytest.raises(ValueError, match=r"HyperAlign: the connected MODEL is an SDXL refiner.*HINT: apply Hyper"):
            call()


def test_v_prediction_sdxl_is_refused(comfy, tiny, predictors, node):
    model = _meta_model(comfy, "SDXL", tiny.SDXL_UNET_CONFIG, model_type="V_PREDICTION")
    with pytest.raises(ValueError, match="predicts V_PREDICTION, but SDXL predictors are trained on eps-prediction"):
        apply(node, model, predictors["sdxl_a"])


def test_another_sdxl_architecture_is_refused(comfy, tiny, predictors, node):
    """An SDXL-class model with other depths (as SSD-1B or Vega are) needs a predictor trained for it."""
    other = dict(tiny.SDXL_UNET_CONFIG, transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="was trained for a different sdxl architecture"):
        apply(node, _meta_model(comfy, "SDXL", other), predictors["sdxl_a"])
    irregular = dict(tiny.SDXL_UNET_CONFIG, transformer_depth_output=[0, 0, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="this SDXL-family UNet has an irregular layout"):
        apply(node, _meta_model(comfy, "SDXL", irregular), predictors["sdxl_a"])


def _first_features(comfy, tiny, model, name, node, positive):
    """The perception features the hypernet saw at the first step of a run with this positive conditioning."""
    loaded = node("HyperAlignLoader", predictor_name=name).args[0]
    seen = []
    handle = loaded.predictor.hypernet.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    patched = node(
        "HyperAlignApply", model=model, predictor=loaded, mode="I", strength=1.0, start_percent=0.0,
        end_percent=1.0, keysteps="",
    ).args[0]  # fmt: skip
    latent = tiny.empty_latent("sdxl", 1)["samples"]
    try:
        comfy.sample.sample(
            patched, comfy.sample.prepare_noise(latent, 0), 2, 5.0, "euler", "normal", positive,
            tiny.conditioning("sdxl", 1, 99), latent, seed=0, disable_pbar=True,
        )  # fmt: skip
    finally:
        handle.remove()
    return seen[0]


def test_perception_encoder_reads_pooled_text_and_size_conditioning(comfy, tiny, base_models, predictors, node):
    model, name = base_models["sdxl"], predictors["sdxl_a"]
    positive = tiny.conditioning("sdxl", 1, 1)
    cond, extras = positive[0]
    base = _first_features(comfy, tiny, model, name, node, positive)
    again = _first_features(comfy, tiny, model, name, node, [[cond, dict(extras)]])
    pooled = _first_features(
        comfy, tiny, model, name, node, [[cond, dict(extras, pooled_output=extras["pooled_output"] + 1)]]
    )
    size = _first_features(comfy, tiny, model, name, node, [[cond, dict(extras, width=1024, height=768)]])
    assert torch.equal(again, base)
    assert not torch.allclose(pooled, base, atol=1e-4)  # y reaches the input blocks through the time embedding
    assert not torch.allclose(size, base, atol=1e-4)  # and so do CLIPTextEncodeSDXL's width and height


def test_keysteps_node_on_sdxl(comfy, tiny, base_models, predictors, node, ui_events):
    text, _ = _keysteps(node, tiny, base_models["sdxl"], family="sdxl").args
    keysteps = hyperalign.parse_keysteps(text)
    assert keysteps[0] == 0.0 and 2 <= len(keysteps) <= 3
    patched = apply(node, base_models["sdxl"], predictors["sdxl_a"], mode="P", keysteps=text)
    sample(comfy, tiny, patched, "sdxl", 1, steps=8)
    (report,) = runs(ui_events)
    assert len(report["calls"]) == len(keysteps)
