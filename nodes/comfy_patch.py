"""HyperAlign inside ComfyUI's sampler: which model this is, and the three sampling wrappers.

- OUTER_SAMPLE, once per sampler call: a fresh :class:`AlignRun` (the S/I/P decisions), torn down
  in ``finally``, then one summary log line and the per-step statistics for the UI.
- CALC_COND_BATCH, once per model evaluation: find the step from the evaluation's sigma, and, when
  the schedule says so, run the perception encoder and the hypernetwork once on the B positive rows.
- APPLY_MODEL, once per model call (a call may hold the cond and the uncond chunk, or only one):
  the LoRA is in force for exactly the duration of the call, then gone, also when the call raises.

How the LoRA gets into the model (merged weights or forward hooks, prepared once per prediction): see
:mod:`.fuse`.

Steps come from the evaluation's sigma against the run's schedule (``locate_step``): a schedule sigma
starts that step, a sigma between two (dpm_2's midpoint) belongs to the step in progress. Heun's
corrector evaluates at the next step's sigma and so already gets that step's LoRA; the sampler's
per-step callback cannot do better, since k-diffusion calls it between Heun's two evaluations.

The input MODEL is only cloned and its weight tensors are never written, so other patches (LoRA
loaders, other wrappers) compose, and the input MODEL is exactly as before after any run. The
hypernetwork is attached to the patched MODEL as an additional model, so ComfyUI's model management
loads and offloads it with the diffusion model.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
import torch

from ..hyperalign.io import Predictor
from ..hyperalign.lora import Factors, resolve_modules
from ..hyperalign.runtime import AlignRun, HypernetCall
from ..hyperalign.schedule import MODES, locate_step, validate_keysteps
from ..hyperalign.targets import FLUX, SD15, DiTArch, UNetArch, arch_to_dict
from . import encoders, fuse

logger = logging.getLogger(__name__)

KEY = "hyperalign"  # wrapper and additional-model key
FROM_FILE = "from_file"
_EPS = 1e-6
_FAMILY_LABEL = {SD15: "SD1.5", FLUX: "FLUX.1"}


# ---------------------------------------------------------------------------- which model is this


@dataclass(frozen=True)
class ModelInfo:
    family: str
    arch: UNetArch | DiTArch
    feature_dim: int  # width of the perception encoder's output
    context_dim: int  # width of the hypernet's prompt input (SD1.5 text tokens, FLUX pooled vector)


def _unsupported_unet(reason: str) -> ValueError:
    return ValueError(
        f"HyperAlign: this SD1.5-family UNet has an irregular layout ({reason}). HINT: HyperAlign supports "
        "standard SD1.5 UNets; connect one."
    )


def _unet_arch(config: dict) -> UNetArch:
    """UNetArch from ComfyUI's unet_config (model_channels, channel_mult, num_res_blocks, transformer depths)."""
    mult = list(config["channel_mult"])
    res = config["num_res_blocks"]
    res = [res] * len(mult) if isinstance(res, int) else list(res)
    if len(set(res)) != 1:
        raise _unsupported_unet(f"num_res_blocks {res}")
    per_level = res[0]
    depth_in = list(config["transformer_depth"])
    levels = [depth_in[i * per_level : (i + 1) * per_level] for i in range(len(mult))]
    if any(len(set(level)) != 1 for level in levels):
        raise _unsupported_unet(f"transformer_depth {depth_in}")
    depths = {level[0] for level in levels if level[0]} | ({config.get("transformer_depth_middle")} - {None, 0})
    depths = {d for d in depths if d > 0}
    if len(depths) > 1:
        raise _unsupported_unet(f"transformer depths {sorted(depths)}")
    attention = tuple(level[0] > 0 for level in levels)
    expected_out = [d for level in levels for d in [level[0]] * (per_level + 1)]  # ComfyUI pops from the end
    if list(config.get("transformer_depth_output", expected_out)) != expected_out:
        raise _unsupported_unet(f"transformer_depth_output {config.get('transformer_depth_output')}")
    middle = config.get("transformer_depth_middle")
    return UNetArch(
        block_channels=tuple(config["model_channels"] * m for m in mult),
        attention_levels=attention,
        layers_per_block=per_level,
        transformer_depth=depths.pop() if depths else 1,
        context_dim=int(config["context_dim"]),
        mid_attention=middle is not None and middle > 0,
    )


def identify_model(model) -> ModelInfo:
    """Family and architecture of a MODEL (a ModelPatcher), from ComfyUI's own model config."""
    base = model.model
    config = getattr(base, "model_config", None)
    unet = dict(getattr(config, "unet_config", None) or {})
    if isinstance(base, comfy.model_base.Flux) and unet.get("image_model") == "flux":
        arch = DiTArch(
            hidden_size=int(unet["hidden_size"]),
            depth=int(unet["depth"]),
            depth_single_blocks=int(unet["depth_single_blocks"]),
            mlp_ratio=float(unet["mlp_ratio"]),
        )
        return ModelInfo(FLUX, arch, arch.hidden_size, int(unet.get("vec_in_dim") or 0))
    if isinstance(config, comfy.supported_models.SD15):
        arch = _unet_arch(unet)
        return ModelInfo(SD15, arch, arch.block_channels[-1], arch.context_dim)
    raise ValueError(
        f"HyperAlign: the connected MODEL is a {type(config).__name__} model; HyperAlign predictors exist for "
        "SD1.5 and FLUX.1 models only. HINT: connect an SD1.5 or FLUX.1 MODEL."
    )


def _comfy_path(target) -> str:
    return target.comfy


def check_compatible(predictor: Predictor, model) -> ModelInfo:
    """Refuse a predictor made for another family or another target table, before anything is patched."""
    info = identify_model(model)
    name = os.path.basename(predictor.path or "predictor")
    if predictor.family != info.family:
        raise ValueError(
            f"HyperAlign: predictor {name!r} was trained for {predictor.family!r} but the connected MODEL is "
            f"{info.family!r}. HINT: choose a {_FAMILY_LABEL[info.family]} predictor or connect a "
            f"{_FAMILY_LABEL[predictor.family]} model."
        )
    wanted, found = arch_to_dict(predictor.table.arch), arch_to_dict(info.arch)
    if wanted != found:
        raise ValueError(
            f"HyperAlign: predictor {name!r} was trained for a different {info.family} architecture (its target "
            f"table is for {wanted}, the connected MODEL is {found}). HINT: use a predictor trained for this model."
        )
    cfg = predictor.hypernet.cfg
    if cfg.feature_dim != info.feature_dim or cfg.context_dim not in (0, info.context_dim):
        raise ValueError(
            f"HyperAlign: predictor {name!r} reads features of width {cfg.feature_dim} and prompts of width "
            f"{cfg.context_dim}, but this model gives {info.feature_dim} and {info.context_dim}. "
            "HINT: use a predictor trained for this model."
        )
    if info.family == FLUX and cfg.encoder_blocks > info.arch.depth:
        raise ValueError(
            f"HyperAlign: predictor {name!r} encodes with {cfg.encoder_blocks} double blocks, but the model has "
            f"{info.arch.depth}. HINT: use a predictor trained for this model."
        )
    resolve_modules(model.get_model_object("diffusion_model"), predictor.targets, _comfy_path)
    return info


def progress_of_sigma(model_sampling, sigma: torch.Tensor, family: str) -> torch.Tensor:
    """progress = 1 - t_norm in the model's own time (0 = pure noise): SD1.5 t/999, FLUX t = sigma."""
    timestep = model_sampling.timestep(torch.as_tensor(sigma)).float()
    t_norm = timestep / 999.0 if family == SD15 else timestep
    return (1.0 - t_norm).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------- settings and runs


@dataclass(frozen=True)
class AlignSettings:
    mode: str
    keysteps: tuple[float, ...]
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    node_id: str = ""

    def active_at(self, progress: float) -> bool:
        return self.start_percent - _EPS <= progress <= self.end_percent + _EPS


def make_settings(
    predictor: Predictor,
    mode: str,
    keysteps: str,
    strength: float,
    start_percent: float,
    end_percent: float,
    node_id: str = "",
) -> AlignSettings:
    """Node inputs -> settings; 'from_file' and an empty keysteps string take the predictor's own."""
    if mode != FROM_FILE and mode not in MODES:
        raise ValueError(f"HyperAlign: unknown mode {mode!r}; choose {FROM_FILE!r} or one of {MODES}.")
    if not all(math.isfinite(v) for v in (strength, start_percent, end_percent)):
        raise ValueError("HyperAlign: strength, start_percent and end_percent must be finite numbers.")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(
            f"HyperAlign: start_percent {start_percent} and end_percent {end_percent} must satisfy "
            "0 <= start <= end <= 1. HINT: start_percent is where HyperAlign begins, in fractions of the run."
        )
    chosen = predictor.meta.mode if mode == FROM_FILE else mode
    steps = validate_keysteps(keysteps) if (keysteps or "").strip() else tuple(predictor.meta.keysteps)
    return AlignSettings(chosen, tuple(steps), float(strength), float(start_percent), float(end_percent), node_id)


@dataclass
class _Run:
    """State of one sampler call."""

    align: AlignRun
    sample_sigmas: torch.Tensor
    sigma_list: list[float] = field(default_factory=list)  # the same, read once (no device sync per call)
    progress_list: list[float] | None = None  # progress of each schedule sigma, read once
    step: int | None = None
    applied: fuse.Applied | None = None  # the current prediction's LoRA, ready for model calls
    active: bool = False  # True only while one model evaluation is in flight
    resolved: list | None = None

    @property
    def steps(self) -> int:
        return max(len(self.sample_sigmas) - 1, 0)


def _call_dict(call: HypernetCall) -> dict:
    stats = call.stats or {}
    return {
        "step": call.step,
        "progress": call.progress,
        "seconds": call.seconds,
        "norm": stats.get("norm", 0.0),
        "cosine": stats.get("cosine", 1.0),
        "relative_change": stats.get("relative_change", 0.0),
    }


def _send_to_ui(event: str, payload: dict) -> None:
    """Send to the browser when a ComfyUI server runs in this process (never in headless use)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, payload)
    except Exception:  # the UI is optional: never fail a sampling run over it
        logger.warning("HyperAlign: could not send %r to the UI", event, exc_info=True)


# ------------------------------------------------------------------------------------ the wrappers


@dataclass(eq=False)  # identity hash: bound methods of it are stored as wrappers
class _Patch:
    """What one HyperAlign Apply adds to a MODEL; its bound methods are the three wrappers."""

    predictor: Predictor
    family: str
    settings: AlignSettings
    on_prediction: list = field(default_factory=list)  # callables(factors, call), e.g. the LoRA export
    to_ui: bool = True  # send per-step statistics to the browser (not for the export's internal run)
    run: _Run | None = None

    @property
    def scale(self) -> float:
        return self.predictor.hypernet.cfg.scale * self.settings.strength

    def outer_sample(self, executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        align = AlignRun(self.settings.mode, self.settings.keysteps, collect_stats=True)
        run = _Run(align, sigmas, sigmas.tolist())
        previous, self.run = self.run, run
        try:
            return executor(*args, **kwargs)
        finally:
            self.run = previous
            run.applied = None  # merged weights go now, not when the run object is collected
            self._report(run)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        if run is None:  # not inside a sampler call of this patch
            return executor(model, conds, x_in, timestep, model_options)
        if run.progress_list is None:
            run.progress_list = progress_of_sigma(model.model_sampling, run.sample_sigmas, self.family).tolist()
        run.step = locate_step(run.sigma_list, float(timestep[0]), run.step)
        progress = run.progress_list[run.step]
        if not self.settings.active_at(progress):
            return executor(model, conds, x_in, timestep, model_options)
        comfy.model_management.throw_exception_if_processing_interrupted()
        calls = len(run.align.calls)
        factors = run.align.factors_at(run.step, progress, lambda: self._predict(model, conds, x_in, timestep))
        if len(run.align.calls) > calls:
            self._announce(factors, run.align.calls[-1])
        if run.resolved is None:
            run.resolved = resolve_modules(model.diffusion_model, self.predictor.targets, _comfy_path)
        if run.applied is None or run.applied.factors is not factors:
            run.applied = None  # drop the previous merged weights before any new ones are made
            run.applied = fuse.for_prediction(
                model,
                factors,
                run.resolved,
                x_in,
                self.scale,
                mode=self.settings.mode,
                keysteps=self.settings.keysteps,
                step=run.step,
                progress=run.progress_list,
                active=self.settings.active_at,
            )
        run.active = True
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            run.active = False

    def apply_model(self, executor, *args, **kwargs):
        run = self.run
        if run is None or not run.active:
            return executor(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        with run.applied.in_force(x):
            return executor(*args, **kwargs)

    def _predict(self, model, conds, x_in, sigma) -> Factors:
        hypernet = self.predictor.hypernet
        param = next(hypernet.parameters())
        conditioning = encoders.positive_conditioning(conds, x_in.shape[0])
        with torch.no_grad():
            features = encoders.perception_features(model, self.family, hypernet.cfg, x_in, sigma, conditioning)
            context = encoders.prompt_context(self.family, hypernet.cfg, conditioning)
            progress = progress_of_sigma(model.model_sampling, sigma, self.family)
            return hypernet(
                features.to(param.device, param.dtype),
                progress.to(param.device),
                None if context is None else context.to(param.device, param.dtype),
            )

    def _announce(self, factors: Factors, call: HypernetCall) -> None:
        for listener in self.on_prediction:
            listener(factors, call)
        if self.to_ui:
            _send_to_ui("hyperalign.step", {"node": self.settings.node_id, "call": _call_dict(call)})

    def _report(self, run: _Run) -> None:
        summary = run.align.summary()
        logger.info("HyperAlign: %s", summary)
        if not self.to_ui:
            return
        _send_to_ui(
            "hyperalign.run",
            {
                "node": self.settings.node_id,
                "mode": self.settings.mode,
                "steps": run.steps,
                "keysteps": list(self.settings.keysteps),
                "seconds": sum(call.seconds for call in run.align.calls),
                "summary": summary,
                "calls": [_call_dict(call) for call in run.align.calls],
            },
        )


@dataclass(eq=False)
class LoadedPredictor:
    """What a HYPERALIGN_PREDICTOR socket carries: the predictor, and the ModelPatcher through which
    ComfyUI's model management loads and offloads its weights. Patched MODELs get clones of that
    patcher, so the cached predictor outlives them without looking like a leak to ComfyUI."""

    predictor: Predictor
    patcher: comfy.model_patcher.ModelPatcher

    @classmethod
    def wrap(cls, predictor: Predictor) -> LoadedPredictor:
        patcher = comfy.model_patcher.ModelPatcher(
            predictor.hypernet,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )
        return cls(predictor, patcher)


def patch_model(model, loaded: LoadedPredictor, settings: AlignSettings, on_prediction=(), to_ui: bool = True):
    """A clone of `model` that applies the predictor while sampling; `model` itself is not changed."""
    predictor = loaded.predictor
    info = check_compatible(predictor, model)
    patched = model.clone()
    patched.set_additional_models(KEY, patched.get_additional_models_with_key(KEY) + [loaded.patcher.clone()])
    patch = _Patch(predictor, info.family, settings, list(on_prediction), to_ui)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, KEY, patch.outer_sample)
    patched.add_wrapper_with_key(wrappers.CALC_COND_BATCH, KEY, patch.calc_cond_batch)
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, KEY, patch.apply_model)
    return patched
