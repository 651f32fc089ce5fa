"""HyperAlign inside ComfyUI's sampler: three wrappers around a cloned MODEL, in the pattern of ComfyUI's own
EasyCache (comfy_extras/nodes_easycache.py): OUTER_SAMPLE keeps per-run state in a copy of the guider's
model_options, the inner wrappers read it from there, and ``finally`` tears it down.

- OUTER_SAMPLE, once per sampler call: a fresh :class:`Sampling` (with its :class:`AlignRun`, the S/I/P
  decisions), then one summary log line and the per-step statistics for the UI.
- CALC_COND_BATCH, once per model evaluation: find the step from the evaluation's sigma, and, when
  the S/I/P rule says so, run the perception encoder and the hypernetwork once on the B positive rows.
- APPLY_MODEL, once per model call (a call may hold the cond and the uncond chunk, or only one):
  the LoRA is in force for exactly the duration of the call, then gone, also when the call raises.
  How it gets into the model (merged weights or forward hooks): :mod:`.fuse`.

Steps come from the evaluation's sigma against the run's schedule (``locate_step``): a schedule sigma
starts that step, a sigma between two (dpm_2's midpoint) belongs to the step in progress. Heun's
corrector evaluates at the next step's sigma and so already gets that step's LoRA; the sampler's
per-step callback cannot do better, since k-diffusion calls it between Heun's two evaluations.

The input MODEL is only cloned and its weight tensors are never written, so other patches (LoRA
loaders, other wrappers, a second HyperAlign Apply) compose, and the input MODEL is exactly as before
after any run. The hypernetwork rides on the patched MODEL as an additional model, so ComfyUI's model
management loads and offloads it with the diffusion model (:mod:`.predictor`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..hyperalign.io import Predictor
from ..hyperalign.lora import Factors, resolve_modules
from ..hyperalign.runtime import AlignRun, HypernetCall
from ..hyperalign.schedule import locate_step
from . import encoders, fuse, ui
from .model_info import check_compatible, comfy_path, progress_of_sigma
from .predictor import LoadedPredictor, refuse_multigpu
from .settings import AlignSettings

logger = logging.getLogger(__name__)

KEY = "hyperalign"  # wrapper, additional-model and transformer_options key


@dataclass(eq=False)  # identity hash: it keys its Sampling in transformer_options[KEY]
class Alignment:
    """What one HyperAlign Apply adds to a MODEL: the predictor, its settings and who hears of predictions."""

    predictor: Predictor
    family: str
    settings: AlignSettings
    on_prediction: list = field(default_factory=list)  # callables(factors, call), e.g. the LoRA export
    to_ui: bool = True  # send per-step statistics to the browser (not for the export's internal run)

    @property
    def scale(self) -> float:
        return self.predictor.hypernet.cfg.scale * self.settings.strength


@dataclass
class Sampling:
    """One sampler call's state (what ComfyUI calls a sampling run; :class:`AlignRun` decides within it)."""

    align: AlignRun
    sample_sigmas: torch.Tensor
    sigma_list: list[float] = field(default_factory=list)  # the same, read once (no device sync per call)
    progress_list: list[float] | None = None  # progress of each schedule sigma, read once
    step: int | None = None
    applied: fuse.Applied | None = None  # the current prediction's LoRA, ready for model calls
    active: bool = False  # True only while one of this alignment's model evaluations is in flight
    resolved: list | None = None

    @property
    def steps(self) -> int:
        return max(len(self.sample_sigmas) - 1, 0)


def _sampling_in(transformer_options: dict, alignment: Alignment) -> Sampling | None:
    return transformer_options.get(KEY, {}).get(alignment)


def outer_sample(alignment: Alignment, executor, *args, **kwargs):
    """OUTER_SAMPLE: this sampler call's Sampling rides in a copy of the guider's model_options."""
    guider = executor.class_obj
    sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
    sampling = Sampling(AlignRun(alignment.settings.mode, alignment.settings.keysteps, collect_stats=True), sigmas)
    sampling.sigma_list = sigmas.tolist()
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    options[KEY] = {**options.get(KEY, {}), alignment: sampling}  # one entry per HyperAlign Apply
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original
        sampling.applied = None  # merged weights go now, not when the Sampling is collected
        _report(alignment, sampling)


def calc_cond_batch(alignment: Alignment, executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH: the step of this evaluation, a prediction when the rule asks for one, and this
    evaluation's model calls marked as ours."""
    sampling = _sampling_in(model_options["transformer_options"], alignment)
    if sampling is None:  # not inside a sampler call of this alignment
        return executor(model, conds, x_in, timestep, model_options)
    if sampling.progress_list is None:
        progress = progress_of_sigma(model.model_sampling, sampling.sample_sigmas, alignment.family)
        sampling.progress_list = progress.tolist()
    sampling.step = locate_step(sampling.sigma_list, float(timestep[0]), sampling.step)
    progress = sampling.progress_list[sampling.step]
    if not alignment.settings.active_at(progress):
        return executor(model, conds, x_in, timestep, model_options)
    comfy.model_management.throw_exception_if_processing_interrupted()
    align = sampling.align
    calls = len(align.calls)
    factors = align.factors_at(sampling.step, progress, lambda: _predict(alignment, model, conds, x_in, timestep))
    if len(align.calls) > calls:
        _announce(alignment, factors, align.calls[-1])
    if sampling.resolved is None:
        sampling.resolved = resolve_modules(model.diffusion_model, alignment.predictor.targets, comfy_path)
    if sampling.applied is None or sampling.applied.factors is not factors:
        sampling.applied = None  # drop the previous merged weights before any new ones are made
        sampling.applied = fuse.for_prediction(
            model,
            factors,
            sampling.resolved,
            x_in,
            alignment.scale,
            mode=alignment.settings.mode,
            keysteps=alignment.settings.keysteps,
            step=sampling.step,
            progress=sampling.progress_list,
            active=alignment.settings.active_at,
        )
    sampling.active = True
    try:
        return executor(model, conds, x_in, timestep, model_options)
    finally:
        sampling.active = False


def apply_model(alignment: Alignment, executor, *args, **kwargs):
    """APPLY_MODEL (x, t, c_concat, c_crossattn, control, transformer_options, ...): the LoRA in force."""
    transformer_options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
    sampling = _sampling_in(transformer_options, alignment)
    if sampling is None or not sampling.active:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    with sampling.applied.in_force(x):
        return executor(*args, **kwargs)


def _predict(alignment: Alignment, model, conds, x_in, sigma) -> Factors:
    hypernet = alignment.predictor.hypernet
    param = next(hypernet.parameters())
    conditioning = encoders.positive_conditioning(conds, x_in.shape[0])
    with torch.no_grad():
        features = encoders.perception_features(model, alignment.family, hypernet.cfg, x_in, sigma, conditioning)
        context = encoders.prompt_context(alignment.family, hypernet.cfg, conditioning)
        progress = progress_of_sigma(model.model_sampling, sigma, alignment.family)
        return hypernet(
            features.to(param.device, param.dtype),
            progress.to(param.device),
            None if context is None else context.to(param.device, param.dtype),
        )


def _announce(alignment: Alignment, factors: Factors, call: HypernetCall) -> None:
    for listener in alignment.on_prediction:
        listener(factors, call)
    if alignment.to_ui:
        ui.send_step(alignment.settings, call)


def _report(alignment: Alignment, sampling: Sampling) -> None:
    summary = sampling.align.summary()
    logger.info("HyperAlign: %s", summary)
    if alignment.to_ui:
        ui.send_run(alignment.settings, sampling.align, sampling.steps, summary)


def patch_model(model, loaded: LoadedPredictor, settings: AlignSettings, on_prediction=(), to_ui: bool = True):
    """A clone of `model` that applies the predictor while sampling; `model` itself is not changed."""
    predictor = loaded.predictor
    info = check_compatible(predictor, model)
    refuse_multigpu(model)
    alignment = Alignment(predictor, info.family, settings, list(on_prediction), to_ui)
    patched = model.clone()
    patched.set_additional_models(KEY, patched.get_additional_models_with_key(KEY) + [loaded.clone_for_model()])
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, KEY, partial(outer_sample, alignment))
    patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, KEY, partial(calc_cond_batch, alignment))
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, KEY, partial(apply_model, alignment))
    return patched
