"""HyperAlignKeysteps (keystep discovery and its plot) and HyperAlignExportLoRA (I-mode LoRA files)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from comfy_testlib import SCHEDULER, apply, runs
from safetensors import safe_open

import hyperalign
from hyperalign.atomic import new_file_mode


def _keysteps(node, tiny, model, count=3, steps=8, family="sd15"):
    return node(
        "HyperAlignKeysteps", model=model, positive=tiny.conditioning(family, 1, 1),
        negative=tiny.conditioning(family, 1, 99), latent_image=tiny.empty_latent(family, 1), seed=0, steps=steps,
        cfg=5.0, sampler_name="euler", scheduler="normal", count=count,
    )  # fmt: skip


@pytest.mark.comfy
def test_keysteps_node_finds_keysteps_apply_accepts(comfy, tiny, base_models, predictors, node, ui_events):
    output = _keysteps(node, tiny, base_models["sd15"])
    text, plot = output.args
    keysteps = hyperalign.parse_keysteps(text)
    assert keysteps[0] == 0.0 and 2 <= len(keysteps) <= 3
    assert plot.shape == (1, 360, 640, 3) and plot.dtype == torch.float32 and 0 <= float(plot.min()) < 1
    assert float(plot.max()) == 1.0 and plot.std() > 0.05  # white background with curves drawn on it
    (image,) = output.ui["images"]
    assert image["type"] == "temp" and image["subfolder"] == ""
    assert os.path.isfile(os.path.join(comfy.folder_paths.get_temp_directory(), image["filename"]))
    assert output.ui["hyperalign_keysteps"] == [text]
    # the string drives Apply's P mode: a prediction at the first step of each keystep segment
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode="P", keysteps=text)
    comfy.nodes.KSampler().sample(
        patched,
        0,
        8,
        5.0,
        "euler",
        "normal",
        tiny.conditioning("sd15", 1, 1),
        tiny.conditioning("sd15", 1, 99),
        tiny.empty_latent("sd15", 1),
    )
    (report,) = runs(ui_events)
    assert len(report["calls"]) == len(keysteps)
    # each keystep, as printed, still selects the step it was found at
    assert [round(c["progress"], 3) for c in report["calls"][1:]] == [round(k, 3) for k in keysteps[1:]]
    assert all(0 <= c["progress"] - k < 1e-3 for c, k in zip(report["calls"], keysteps))


@pytest.mark.comfy
def test_keysteps_refuses_unsupported_models(comfy, tiny, node):
    import comfy.supported_models

    unet = dict(tiny.SD15_UNET_CONFIG, context_dim=32)
    model = comfy.model_patcher.ModelPatcher(
        comfy.supported_models.SD20(unet).get_model({}, "", device=torch.device("meta")), "cpu", "cpu"
    )
    with pytest.raises(ValueError, match="SD1.5, SDXL and FLUX.1 models only"):
        _keysteps(node, tiny, model)


def _export(node, tiny, model, family, loaded, batch, index, strength=1.0, prefix="loras/test"):
    return node(
        "HyperAlignExportLoRA", model=model, predictor=loaded, positive=tiny.conditioning(family, batch, 1),
        latent_image=tiny.empty_latent(family, batch), seed=5, batch_index=index, strength=strength,
        filename_prefix=prefix,
    )  # fmt: skip


@pytest.mark.comfy
@pytest.mark.parametrize(
    ("family", "predictor"), [("sd15", "sd15_a"), ("sd15", "sd15_conv_a"), ("flux", "flux_a"), ("sdxl", "sdxl_a")]
)
def test_exported_lora_in_loraloader_equals_the_i_mode_run(
    comfy, tiny, base_models, predictors, node, family, predictor
):
    """sd15_conv_a also targets the ResNet convolutions: kohya's LoCon layout, which ComfyUI loads as conv LoRA."""
    model = base_models[family]
    loaded = node("HyperAlignLoader", predictor_name=predictors[predictor]).args[0]
    strength, batch, index = 0.7, 2, 1
    output = _export(node, tiny, model, family, loaded, batch, index, strength, prefix=f"loras/{family}")
    (path,) = output.args
    assert output.ui == {"hyperalign_lora": [path]} and path.startswith("loras/")
    full = os.path.join(comfy.folder_paths.get_output_directory(), path)
    lora = comfy.utils.load_torch_file(full, safe_load=True)
    # every key is one ComfyUI maps onto the model (kohya for SD1.5, diffusers for FLUX, fused slices included)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map)
    assert len(lora) == 3 * len(loaded.predictor.targets)  # down, up, alpha per target
    assert len(patches) == len(loaded.predictor.targets)  # and each one lands on its own weight (or slice)
    with safe_open(full, "pt") as handle:
        source = json.loads(handle.metadata()["hyperalign_lora"])
    assert source["seed"] == 5 and source["batch_index"] == index and source["family"] == family

    def run(m):
        positive, negative = tiny.conditioning(family, batch, 1), tiny.conditioning(family, 1, 99)
        (out,) = comfy.nodes.KSampler().sample(
            m, 5, 4, 3.0, "euler", SCHEDULER[family], positive, negative, tiny.empty_latent(family, batch)
        )
        return out["samples"]

    aligned = run(apply(node, model, predictors[predictor], mode="I", strength=strength))
    (with_lora,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path_for_loader(comfy, full), 1.0)
    exported = run(with_lora)
    plain = run(model)
    scale = float(aligned[index].abs().max())
    torch.testing.assert_close(exported[index], aligned[index], rtol=0, atol=2e-5 * scale)
    assert float((aligned[index] - plain[index]).abs().max()) > 1e-2 * scale


def path_for_loader(comfy, full_path: str) -> str:
    """Make `full_path` visible to LoraLoader (a user would copy the file into models/loras)."""
    folder = os.path.dirname(full_path)
    if folder not in comfy.folder_paths.get_folder_paths("loras"):
        comfy.folder_paths.add_model_folder_path("loras", folder)
    return os.path.basename(full_path)


@pytest.mark.comfy
def test_export_never_overwrites_and_checks_the_batch_index(comfy, tiny, base_models, predictors, node, ui_events):
    loaded = node("HyperAlignLoader", predictor_name=predictors["sd15_b"]).args[0]
    first = _export(node, tiny, base_models["sd15"], "sd15", loaded, 1, 0, prefix="loras/again").args[0]
    output_dir = comfy.folder_paths.get_output_directory()
    content = open(os.path.join(output_dir, first), "rb").read()
    second = _export(node, tiny, base_models["sd15"], "sd15", loaded, 1, 0, prefix="loras/again").args[0]
    assert first != second and open(os.path.join(output_dir, first), "rb").read() == content
    assert os.path.isfile(os.path.join(output_dir, second))
    mode = os.stat(os.path.join(output_dir, second)).st_mode & 0o777
    assert mode == new_file_mode() != 0o600, oct(mode)  # as a plain open() makes it, not mkstemp's 0600
    assert not [name for name in os.listdir(os.path.join(output_dir, "loras")) if name.endswith(".tmp")]
    assert ui_events == []  # its internal one-step run is not shown as an Apply run
    with pytest.raises(ValueError, match="HyperAlign: batch_index 2 is outside the latent batch of 1"):
        _export(node, tiny, base_models["sd15"], "sd15", loaded, 1, 2)
