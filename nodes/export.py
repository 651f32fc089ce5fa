"""HyperAlignExportLoRA: one I-mode prediction, saved as a standard LoRA file any LoRA loader reads.

An I-mode prediction is static for the whole run, so it *is* an ordinary LoRA: ``alpha / rank *
up @ down`` per layer. SD1.5 and SDXL files use kohya keys (``lora_unet_<diffusers path>.lora_down.weight``),
FLUX files diffusers keys (``transformer.<diffusers path>.lora_A.weight``); ComfyUI's LoraLoader maps
both, including the slices of FLUX's fused qkv / linear1 layers.
"""

from __future__ import annotations

import json
import os
import tempfile

import folder_paths
import torch
from comfy_api.v0_0_2 import io
from safetensors.torch import save_file

from .. import hyperalign
from ..hyperalign.atomic import new_file_mode
from ..hyperalign.lora import Factors
from . import sampling
from .model_info import UNET_FAMILIES, identify_model
from .schema import CATEGORY, PredictorType
from .settings import AlignSettings
from .wrappers import patch_model


def first_factors(model, loaded, positive, latent: dict, seed: int, strength: float) -> Factors:
    """The factors an I-mode run of `latent` with `seed` predicts (full denoise: it starts at sigma_max).

    It samples one step with the real sampler, so the latent, noise and conditioning reach the
    hypernetwork exactly as in a KSampler run.
    """
    captured = []
    settings = AlignSettings(mode="I", keysteps=(0.0,), strength=strength)
    patched = patch_model(model, loaded, settings, on_prediction=[lambda f, call: captured.append(f)], to_ui=False)
    sampling.sample_latent(patched, latent, seed, 1, 1.0, "euler", "simple", positive, positive)
    return captured[0]


def lora_state_dict(predictor, family: str, factors: Factors, index: int, strength: float) -> dict:
    alpha = torch.tensor(float(predictor.hypernet.cfg.alpha))
    state = {}
    for target in predictor.targets:
        down, up = factors[target.id]
        down = down[index].detach().float().cpu().contiguous()  # (r, i)
        up = (up[index].detach().float() * strength).cpu().contiguous()  # (o, r)
        if target.kernel is not None:  # kohya's LoCon layout: a (r, c, kh, kw) kernel, then a 1x1 (o, r, 1, 1)
            down, up = down.reshape(down.shape[0], target.in_channels, *target.kernel), up[..., None, None]
        if family in UNET_FAMILIES:
            key, names = "lora_unet_" + target.id.replace(".", "_"), ("lora_down", "lora_up")
        else:
            key, names = "transformer." + target.id, ("lora_A", "lora_B")
        state[f"{key}.{names[0]}.weight"] = down
        state[f"{key}.{names[1]}.weight"] = up
        state[f"{key}.alpha"] = alpha.clone()
    return state


def save_lora(state: dict, filename_prefix: str, metadata: dict) -> str:
    """Write under the output folder, atomically and never over an existing file; returns the relative path."""
    output_dir = folder_paths.get_output_directory()
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
    fd, tmp = tempfile.mkstemp(prefix=".hyperalign-", suffix=".safetensors.tmp", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would hide the LoRA from other users
        while True:
            name = f"{filename}_{counter:05}_.safetensors"
            try:  # claim the name first: an existing file is never replaced
                os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                counter += 1
        os.replace(tmp, os.path.join(folder, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.join(subfolder, name) if subfolder else name


class HyperAlignExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperAlignExportLoRA",
            display_name="HyperAlign Export LoRA",
            category=CATEGORY,
            description="Export the LoRA weights predicted for one sample as a standard LoRA file.",
            is_experimental=True,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRA is for (without HyperAlign Apply)."),
                PredictorType.Input("predictor", tooltip="A predictor from HyperAlign Loader, made for this model."),
                io.Conditioning.Input("positive", tooltip="The prompt the LoRA is predicted for."),
                io.Latent.Input("latent_image", tooltip="The starting latent of the run, e.g. an Empty Latent Image."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The noise seed of the run (as in the KSampler).",
                ),
                io.Int.Input(
                    "batch_index", default=0, min=0, max=4095, tooltip="Which sample of the latent batch to export."
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Baked into the file: the LoRA at strength 1 is HyperAlign at this strength.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default="loras/hyperalign",
                    tooltip="File name prefix under ComfyUI's output folder; a number is appended.",
                ),
            ],
            outputs=[io.String.Output(display_name="lora_file", tooltip="The written file, relative to output/.")],
        )

    @classmethod
    def execute(
        cls, model, predictor, positive, latent_image, seed, batch_index, strength, filename_prefix
    ) -> io.NodeOutput:
        batch = latent_image["samples"].shape[0]
        if batch_index >= batch:
            raise ValueError(f"HyperAlign: batch_index {batch_index} is outside the latent batch of {batch}.")
        family = identify_model(model).family
        factors = first_factors(model, predictor, positive, latent_image, seed, strength)
        state = lora_state_dict(predictor.predictor, family, factors, batch_index, strength)
        source = {
            "predictor": os.path.basename(predictor.predictor.path or ""),
            "family": family,
            "seed": seed,
            "batch_index": batch_index,
            "strength": strength,
            "package_version": hyperalign.__version__,
        }
        path = save_lora(state, filename_prefix, {"format": "pt", "hyperalign_lora": json.dumps(source)})
        return io.NodeOutput(path, ui={"hyperalign_lora": [path]})
