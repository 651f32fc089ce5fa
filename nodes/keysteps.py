"""HyperAlignKeysteps: run the base trajectory once and find its keysteps (paper §4.2, Fig. 4)."""

from __future__ import annotations

import os
import uuid

import comfy.samplers
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageDraw

from ..hyperalign.schedule import discover_keysteps, format_keysteps
from . import sampling
from .model_info import identify_model, progress_of_sigma
from .schema import CATEGORY

_SIZE = (640, 360)
_MARGIN = (48, 28, 16, 40)  # left, top, right, bottom
_COLOURS = {"distance": (52, 120, 246), "curvature": (245, 130, 32), "keystep": (220, 40, 60)}


def _polyline(values: list[float], width: int, height: int, steps: int) -> list[tuple[float, float]]:
    """Points of a curve scaled to its own maximum; value j belongs to the start of step j + 1."""
    top = max(max(values), 1e-12)
    left, upper = _MARGIN[0], _MARGIN[1]
    return [
        (left + (j + 1) / max(steps - 1, 1) * width, upper + height - v / top * height) for j, v in enumerate(values)
    ]


def draw_plot(curves: dict, keystep_steps: list[int], steps: int, text: str) -> Image.Image:
    """Relative distance and curvature per step (each scaled to its maximum), keysteps as vertical lines."""
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    width = _SIZE[0] - _MARGIN[0] - _MARGIN[2]
    height = _SIZE[1] - _MARGIN[1] - _MARGIN[3]
    left, top = _MARGIN[0], _MARGIN[1]
    draw.rectangle((left, top, left + width, top + height), outline=(160, 160, 160))
    for step in keystep_steps:
        x = left + step / max(steps - 1, 1) * width
        draw.line((x, top, x, top + height), fill=_COLOURS["keystep"], width=2)
    for name in ("distance", "curvature"):
        if len(curves.get(name) or []) > 1:
            draw.line(_polyline(curves[name], width, height, steps), fill=_COLOURS[name], width=2)
    draw.text((left, 6), "relative distance", fill=_COLOURS["distance"])
    draw.text((left + 140, 6), "curvature", fill=_COLOURS["curvature"])
    draw.text((left + 230, 6), f"keysteps: {text}", fill=_COLOURS["keystep"])
    draw.text((left, top + height + 8), f"step 0 .. {steps - 1}", fill=(90, 90, 90))
    return image


def _save_preview(image: Image.Image) -> dict:
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    filename = f"hyperalign_keysteps_{uuid.uuid4().hex[:12]}.png"
    image.save(os.path.join(folder, filename))
    return {"filename": filename, "subfolder": "", "type": "temp"}


def _steps_of(keysteps: list[float], progress: list[float]) -> list[int]:
    return [next((i for i, p in enumerate(progress) if p >= k - 1e-6), 0) for k in keysteps]


class HyperAlignKeysteps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperAlignKeysteps",
            display_name="HyperAlign Keysteps",
            category=CATEGORY,
            description="Choose the sampling steps at which the predictor runs (keystep schedule).",
            is_experimental=True,
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5, SDXL or FLUX.1 model whose base trajectory is analysed."),
                io.Conditioning.Input("positive", tooltip="The prompt to sample with."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to start from, e.g. an Empty Latent Image."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The noise seed.",
                ),
                io.Int.Input("steps", default=20, min=2, max=1000, tooltip="Sampling steps of the analysed run."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The scheduler."),
                io.Int.Input(
                    "count",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="How many keysteps to choose (the first step is always one).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="keysteps", tooltip="Keysteps for HyperAlign Apply's keysteps input."),
                io.Image.Output(display_name="plot", tooltip="Relative distance and curvature per step."),
            ],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, count
    ) -> io.NodeOutput:
        family = identify_model(model).family
        sigmas = sampling.schedule(model, steps, sampler_name, scheduler)
        predictions, bar = [], comfy.utils.ProgressBar(len(sigmas) - 1)

        def collect(step, x0, x, total_steps):
            predictions.append(x0.detach().float().cpu())
            bar.update_absolute(step + 1, total_steps)

        sampling.sample_latent(
            model, latent_image, seed, steps, cfg, sampler_name, scheduler, positive, negative, callback=collect
        )
        model_sampling = model.get_model_object("model_sampling")
        progress = progress_of_sigma(model_sampling, sigmas[: len(predictions)], family).tolist()
        keysteps, curves = discover_keysteps(torch.stack(predictions), count, progress)
        text = format_keysteps(keysteps)
        plot = draw_plot(curves, _steps_of(keysteps, progress), len(predictions), text)
        tensor = torch.from_numpy(np.asarray(plot, dtype=np.float32) / 255.0)[None]
        ui = {"images": [_save_preview(plot)], "hyperalign_keysteps": [text]}
        return io.NodeOutput(text, tensor, ui=ui)
