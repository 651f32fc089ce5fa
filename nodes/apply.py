"""HyperAlignApply: MODEL + predictor -> a MODEL that gets per-sample LoRA weights while it samples."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..hyperalign.schedule import MODES, validate_keysteps
from .schema import CATEGORY, PredictorType, node_id_of
from .settings import FROM_FILE, make_settings
from .wrappers import patch_model

MODE_OPTIONS = [FROM_FILE, *MODES]


class HyperAlignApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HyperAlignApply",
            display_name="HyperAlign Apply",
            category=CATEGORY,
            description="Patch a MODEL so the predictor generates per-sample LoRA weights during sampling.",
            is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5, SDXL or FLUX.1 model to align; it is cloned, not changed."),
                PredictorType.Input("predictor", tooltip="A predictor from HyperAlign Loader, made for this model."),
                io.Combo.Input(
                    "mode",
                    options=MODE_OPTIONS,
                    default=FROM_FILE,
                    tooltip="When the hypernetwork runs: from_file = as trained; S = every step; I = once at the "
                    "start; P = at each keystep.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Multiplies the predicted LoRA (1 = as trained, 0 = no change).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where in the run HyperAlign starts (0 = first step); before it the model runs unchanged.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where in the run HyperAlign stops (1 = last step); after it the model runs unchanged.",
                ),
                io.String.Input(
                    "keysteps",
                    default="",
                    optional=True,
                    tooltip="Mode P keysteps as fractions of the run, e.g. '0, 0.3, 0.6' (from HyperAlign "
                    "Keysteps); empty = the predictor's own.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with HyperAlign applied while sampling.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, keysteps="", **kwargs):
        if isinstance(start_percent, float) and isinstance(end_percent, float) and start_percent > end_percent:
            return f"HyperAlign: start_percent {start_percent} is after end_percent {end_percent}."
        if isinstance(keysteps, str) and keysteps.strip():
            try:
                validate_keysteps(keysteps)
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(
        cls, model, predictor, mode: str, strength: float, start_percent: float, end_percent: float, keysteps: str = ""
    ) -> io.NodeOutput:
        settings = make_settings(
            predictor.predictor, mode, keysteps, strength, start_percent, end_percent, node_id=node_id_of(cls)
        )
        return io.NodeOutput(patch_model(model, predictor, settings))
