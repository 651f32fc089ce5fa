"""The training configuration: nested dataclasses, filled from a YAML preset plus dotted overrides.

``load_config("training/configs/sd15.yaml", ["optim.lr=3e-5", "objective.mode='P'"])`` reads the
YAML, applies each override (its value parsed with ``ast.literal_eval``; text that is not a Python
literal stays a string), checks every key against the dataclasses below (an unknown key gets a
``difflib`` suggestion) and every value against its field's type. ``check_files`` then refuses
missing files; both run before any model loads.

Why one file over 300 lines: the sections below are the whole schema, read top to bottom as one table of every
key, its type, default and check; the parser that walks them sits with them.
"""

from __future__ import annotations

import ast
import difflib
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, make_dataclass
from types import NoneType, UnionType
from typing import Any, Literal

from hyperalign.config import HypernetConfig
from hyperalign.schedule import validate_keysteps

from .paths import check_model_source, looks_local, require_path
from .rewards import RewardSpec, check_spec, metric_only

Precision = Literal["fp32", "bf16", "fp16"]


def _positive(section: str, **values) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"HyperAlign: {section}.{name} must be positive, got {value!r}.")


@dataclass
class ModelConfig:
    family: Literal["sd15", "flux", "sdxl"] = "sd15"
    path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local diffusers folder or Hub id
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    base_dtype: Precision = "bf16"  # frozen UNet/DiT, VAE, text encoders and rewards
    resolution: int = 512
    targets: str | list[str] = "attn"  # a preset of hyperalign.targets, or explicit target ids
    gradient_checkpointing: bool = True
    vae_checkpointing: bool = True
    shard_base: bool = False  # FSDP2-shard the frozen denoiser's blocks across ranks (FLUX on small cards)
    max_sequence_length: int = 512  # FLUX T5 tokens (schnell: 256)
    # SD1.5 and SDXL DDIM timesteps: "trailing" = ComfyUI's "simple" (its default) and "sgm_uniform" schedulers,
    # "linspace" = its "normal" one, each to within one timestep (tests/parity); "leading" is diffusers' default
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"

    def __post_init__(self):
        _positive("model", resolution=self.resolution, max_sequence_length=self.max_sequence_length)
        multiple = 16 if self.family == "flux" else 8
        if self.resolution % multiple:
            raise ValueError(
                f"HyperAlign: model.resolution must be a multiple of {multiple} for {self.family}, "
                f"got {self.resolution}."
            )


@dataclass
class SamplingConfig:
    num_steps: int = 50
    guidance: float = 7.5  # SD1.5: classifier-free guidance scale; FLUX dev: embedded guidance

    def __post_init__(self):
        _positive("sampling", num_steps=self.num_steps)
        if self.guidance < 0:
            raise ValueError(f"HyperAlign: sampling.guidance must be >= 0, got {self.guidance}.")


@dataclass
class ObjectiveConfig:
    mode: Literal["S", "I", "P"] = "S"
    keysteps: list[float] | None = None  # P mode; None: read keysteps_file (python -m training.keysteps)
    keysteps_file: str | None = None  # None: <run dir>/keysteps.json
    step_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # where the gradient step is drawn
    pref_weight: float = 1.0  # lambda of the preference regulariser L_G (0 turns it off)
    # x0: the paper's reward on the one-step x0 prediction at step k. final: a variant beyond the paper, the reward
    # on the final decoded image with gradient through the last grad_steps sampling steps (each model call
    # checkpointed; earlier steps rolled without gradient)
    reward_on: Literal["x0", "final"] = "x0"
    grad_steps: int | None = None  # reward_on final: K, the steps the gradient flows through; None: all
    # noise: L_G's LoRA predicted from x_t at its random noise level (the paper). mode: predicted where the mode
    # predicts (I: from x_T at progress 0; P: at the keystep in force at that noise level; S: as noise)
    pref_where: Literal["noise", "mode"] = "noise"
    pref_drop_prompt: float = 0.0  # share of L_G rows whose denoiser sees the empty prompt (the CFG uncond branch)
    pref_share: float | None = None  # None: lambda = pref_weight; else lambda * |grad L_G| = pref_share * |grad L_R|
    step_per_sample: bool = False  # reward_on x0: draw step k per sample instead of per optimizer step

    def __post_init__(self):
        if self.keysteps is not None:
            self.keysteps = list(validate_keysteps(self.keysteps))
        lo_hi = self.step_range
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
            raise ValueError(f"HyperAlign: objective.step_range must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}.")
        if self.pref_weight < 0 or not math.isfinite(self.pref_weight):
            raise ValueError(f"HyperAlign: objective.pref_weight must be >= 0, got {self.pref_weight}.")
        if self.grad_steps is not None and self.grad_steps < 1:
            raise ValueError(f"HyperAlign: objective.grad_steps must be >= 1 or null (all), got {self.grad_steps}.")
        if not 0.0 <= self.pref_drop_prompt <= 1.0:
            raise ValueError(f"HyperAlign: objective.pref_drop_prompt must be in [0, 1], got {self.pref_drop_prompt}.")
        if self.pref_share is not None:
            if self.pref_share <= 0 or not math.isfinite(self.pref_share):
                raise ValueError(f"HyperAlign: objective.pref_share must be > 0 or null, got {self.pref_share}.")
            if self.pref_weight == 0:
                raise ValueError(
                    "HyperAlign: objective.pref_share sets lambda of L_G, but objective.pref_weight=0 turns L_G "
                    "off. HINT: set pref_weight > 0 (it then only switches L_G on) or pref_share=null."
                )
        if self.step_per_sample and self.reward_on != "x0":
            raise ValueError(
                "HyperAlign: objective.step_per_sample draws the x0 reward's step k; reward_on='final' has no k. "
                "HINT: set step_per_sample=false or reward_on='x0'."
            )


@dataclass
class DataConfig:
    preference: Literal["local", "pickapic", "hpdv2", "none"] = "local"
    path: str | None = None  # local: pairs.jsonl; pickapic: parquet file/folder or dataset id; hpdv2: train.json
    split: str = "train"  # pickapic Hub split
    image_root: str | None = None  # hpdv2 images (default: the folder of train.json)
    prompts: str | None = None  # reward prompts, one per line (default: the preference captions)
    latents_dir: str | None = None  # cached preferred-image latents (python -m training.cache_latents)
    num_workers: int = 2

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"HyperAlign: data.num_workers must be >= 0, got {self.num_workers}.")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    max_steps: int = 10000
    batch_size: int = 1  # per device, per micro-step
    grad_accum_steps: int = 1

    def __post_init__(self):
        _positive(
            "optim",
            lr=self.lr,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            grad_accum_steps=self.grad_accum_steps,
        )
        if len(self.betas) != 2:
            raise ValueError(f"HyperAlign: optim.betas must be two numbers, got {self.betas}.")


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = "hyperalign"  # the run directory is <output_dir>/<name>
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast of the fp32 hypernet
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 10
    sample_every: int = 500  # 0: no sample grids
    save_every: int = 500
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a watercolor of a lighthouse"])
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1])
    export_dtype: Precision = "fp32"
    progress: bool = True
    cpu: bool = False  # force CPU even when a GPU is present
    dist_timeout_minutes: int = 60

    def __post_init__(self):
        _positive(
            "run",
            log_every=self.log_every,
            save_every=self.save_every,
            keep_last=self.keep_last,
            dist_timeout_minutes=self.dist_timeout_minutes,
        )


@dataclass
class EvalConfig:
    prompts: str | None = None  # text file, one prompt per line
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    modes: list[str] = field(default_factory=lambda: ["S", "I", "P"])
    metrics: list[RewardSpec] = field(default_factory=list)
    base: bool = True  # also generate with the base model
    out: str | None = None  # default: <run dir>/eval
    batch_size: int = 1

    def __post_init__(self):
        bad = [m for m in self.modes if m not in ("S", "I", "P")]
        if bad:
            raise ValueError(f"HyperAlign: eval.modes may contain S, I and P, got {self.modes}.")
        _positive("eval", batch_size=self.batch_size)


def _hypernet_section():
    """HypernetConfig's fields, with feature_dim/context_dim optional (None: taken from the base model)."""
    hints = typing.get_type_hints(HypernetConfig)
    specs = []
    for f in fields(HypernetConfig):
        if f.name in ("feature_dim", "context_dim"):
            specs.append((f.name, int | None, field(default=None)))
        else:
            specs.append((f.name, hints[f.name], field(default=f.default)))

    def __post_init__(self):
        self.resolve(self.feature_dim or 8, self.context_dim if self.context_dim is not None else 8)  # validates

    def resolve(self, feature_dim: int, context_dim: int) -> HypernetConfig:
        values = asdict(self)
        values["feature_dim"] = self.feature_dim if self.feature_dim is not None else feature_dim
        values["context_dim"] = self.context_dim if self.context_dim is not None else context_dim
        return HypernetConfig(**values)

    return make_dataclass("HypernetSection", specs, namespace={"__post_init__": __post_init__, "resolve": resolve})


HypernetSection = _hypernet_section()


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hypernet: HypernetSection = field(default_factory=HypernetSection)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("brightness")])
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)

    @property
    def keysteps_path(self) -> str:
        return self.objective.keysteps_file or os.path.join(self.run_dir, "keysteps.json")

    def to_dict(self) -> dict:
        return asdict(self)


# Parsing: dict -> dataclass with typed, key-checked values.


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns={**globals(), "HypernetSection": HypernetSection})


def _fail_key(key: str, allowed: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {sorted(allowed)}"
    return ValueError(f"HyperAlign: unknown config key {key!r}; {hint}")


def _coerce(value, tp, key: str):
    """`value` as type `tp`, or a ValueError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, UnionType):
        if value is None and NoneType in args:
            return None
        errors = []
        for arm in (a for a in args if a is not NoneType):
            try:
                return _coerce(value, arm, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(
            errors[-1]
            if len(errors) == 1
            else f"HyperAlign: config key {key!r} got {value!r}, "
            f"which is not a {' or '.join(_type_name(a) for a in args)}."
        )
    if origin is Literal:
        if value not in args:
            raise ValueError(f"HyperAlign: config key {key!r} must be one of {list(args)}, got {value!r}.")
        return value
    if is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"HyperAlign: config key {key!r} must be a list, got {value!r}.")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"HyperAlign: config key {key!r} must be a mapping, got {value!r}.")
        return dict(value)
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value, tp, key: str):
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"HyperAlign: config key {key!r} must be {_type_name(tp)}, got {value!r}.")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls, data, prefix: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"HyperAlign: config section {prefix!r} must be a mapping, got {data!r}.")
    hints = _type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise _fail_key(f"{prefix}.{key}" if prefix else key, [f"{prefix}.{n}" if prefix else n for n in names])
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        raise ValueError(f"HyperAlign: config section {prefix!r} needs the keys {required}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-4' -> (['optim', 'lr'], 0.0001); values that are not Python literals stay strings."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ValueError(f"HyperAlign: override {text!r} is not of the form key.sub=value, e.g. optim.lr=1e-4.")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.split("."), value


def _schema_check(path: list[str]) -> None:
    """Check a dotted override path against the dataclasses before it is applied (unknown key -> suggestion)."""
    cls, done = TrainConfig, []
    for part in path:
        if cls is None:
            break
        if typing.get_origin(cls) is list and part.isdigit():
            cls = typing.get_args(cls)[0]
            done.append(part)
            continue
        if not is_dataclass(cls):
            break
        names = [f.name for f in fields(cls)]
        if part not in names:
            prefix = ".".join(done)
            raise _fail_key(".".join(done + [part]), [f"{prefix}.{n}" if prefix else n for n in names])
        cls = _type_hints(cls)[part]
        cls = next((a for a in typing.get_args(cls) if a is not NoneType), cls) if _is_optional(cls) else cls
        done.append(part)


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, UnionType) and NoneType in typing.get_args(tp)


def apply_override(data: dict, path: list[str], value) -> None:
    _schema_check(path)
    node = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            index = int(part)
            if index >= len(node):
                raise ValueError(f"HyperAlign: config key {'.'.join(path)!r}: list has only {len(node)} entries.")
            node = node[index]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = [] if path[i + 1].isdigit() else {}
            node[part] = nxt
        node = nxt
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML preset (or start from the defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path:
        import yaml

        full = require_path(path, "--config", "config file", "pass one of training/configs/*.yaml", kind="file")
        with open(full, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ValueError(f"HyperAlign: config file {path!r} must hold a YAML mapping of sections.")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return _build(TrainConfig, data, "")


def check_files(cfg: TrainConfig, purpose: str = "train") -> None:
    """Refuse missing files and folders, naming the config key, before any model loads.

    `purpose`: what reads them: "train", "eval" (training.evaluate) or "keysteps" (training.keysteps: the model and
    the prompts, which come from data.prompts or else the preference data's captions)."""
    check_model_source(cfg.model.path, "model.path", "model_index.json")
    if purpose == "eval":
        require_path(cfg.eval.prompts, "eval.prompts", "evaluation prompt file", "one prompt per line", kind="file")
        for i, spec in enumerate(cfg.eval.metrics):
            check_spec(spec, f"eval.metrics[{i}]")
        return
    if purpose == "keysteps" and cfg.data.prompts:
        require_path(cfg.data.prompts, "data.prompts", "prompt file", "one prompt per line", kind="file")
        return
    if purpose == "keysteps" and cfg.data.preference == "none":
        raise ValueError("HyperAlign: no prompts to sample: set data.prompts to a text file (one prompt per line).")
    d = cfg.data
    if d.preference != "none":
        kind = "file" if d.preference in ("local", "hpdv2") else "any"
        if d.preference == "pickapic" and d.path and not looks_local(d.path):
            pass  # a Hub dataset id
        else:
            require_path(d.path, "data.path", f"{d.preference} preference data", _DATA_HINT[d.preference], kind=kind)
        if d.image_root:
            require_path(
                d.image_root, "data.image_root", "HPDv2 image folder", "point it at the image folder", kind="dir"
            )
    elif cfg.objective.pref_weight > 0:
        raise ValueError(
            "HyperAlign: objective.pref_weight > 0 needs preference data, but data.preference is "
            "'none'. HINT: set data.preference and data.path, or objective.pref_weight=0."
        )
    if d.prompts:
        require_path(d.prompts, "data.prompts", "prompt file", "one prompt per line", kind="file")
    elif d.preference == "none":
        raise ValueError("HyperAlign: no reward prompts: set data.prompts to a text file (one prompt per line).")
    if d.latents_dir:
        require_path(
            d.latents_dir,
            "data.latents_dir",
            "latent cache",
            "run python -m training.cache_latents --config <same config> first",
            kind="dir",
        )
    if purpose == "keysteps":
        return
    for i, spec in enumerate(cfg.rewards):
        check_spec(spec, f"rewards[{i}]")
        if metric_only(spec):
            raise ValueError(
                f"HyperAlign: rewards[{i}] ({spec.name!r}) is an evaluation metric with no gradient "
                "(e.g. ground truth). HINT: list it under eval.metrics, not rewards."
            )
    if cfg.objective.mode == "P" and cfg.objective.keysteps is None:
        require_path(
            cfg.keysteps_path,
            "objective.keysteps_file",
            "keysteps file",
            "run python -m training.keysteps --config <same config>, or set objective.keysteps",
            kind="file",
        )
    if cfg.run.resume not in (None, "latest"):
        require_path(
            cfg.run.resume, "run.resume", "checkpoint folder", "use 'latest' or a ckpt/step_* folder", kind="dir"
        )


_DATA_HINT = {
    "local": "a pairs.jsonl with rows {'prompt', 'chosen'[, 'rejected']}, image paths relative to it",
    "pickapic": "a Pick-a-Pic v2 parquet file or folder, or its dataset id (yuvalkirstain/pickapic_v2)",
    "hpdv2": "HPDv2's train.json (images in data.image_root, default: its folder)",
}
