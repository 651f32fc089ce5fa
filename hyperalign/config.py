"""Configuration records: the hypernetwork's shape and a predictor file's header.

Both are plain dataclasses that validate themselves and round-trip through dicts; ``from_dict``
rejects unknown keys, naming them and the allowed ones, so a typo never passes silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .schedule import MODES, validate_keysteps
from .targets import FAMILIES

FORMAT_VERSION = 1


def _from_dict(cls, data: dict, what: str):
    if not isinstance(data, dict):
        raise ValueError(f"HyperAlign: {what} must be a JSON object, got {type(data).__name__}.")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"HyperAlign: unknown {what} keys {unknown}; allowed keys are {sorted(allowed)}.")
    return cls(**data)


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"HyperAlign: {name} must be an integer in [{low}, {high}], got {value!r}.")


def _check_format_version(version) -> None:
    if version != FORMAT_VERSION:
        raise ValueError(
            f"HyperAlign: predictor format_version {version!r} is not supported (this pack reads version "
            f"{FORMAT_VERSION}). HINT: update the HyperAlign node pack, or re-export the predictor with it."
        )


@dataclass
class HypernetConfig:
    """Shape of the hypernetwork (paper §4.2); see :mod:`hyperalign.hypernet` for the design."""

    feature_dim: int  # channels of the perception encoder's output tokens
    context_dim: int  # width of the prompt embedding (0: no prompt token)
    dim: int = 256  # transformer decoder width
    depth: int = 2  # decoder layers
    heads: int = 4
    rank: int = 8
    alpha: float = 8.0
    basis: int = 32  # width of each target's learned input/output LoRA basis
    feature_grid: int = 8  # perception features are pooled to at most grid x grid tokens
    encoder_blocks: int = 2  # FLUX: double blocks in the perception encoder (SD1.5 uses all input blocks)

    def __post_init__(self):
        _check_int("hypernet.feature_dim", self.feature_dim, 1, 65536)
        _check_int("hypernet.context_dim", self.context_dim, 0, 65536)
        _check_int("hypernet.dim", self.dim, 8, 8192)
        _check_int("hypernet.depth", self.depth, 1, 32)
        _check_int("hypernet.heads", self.heads, 1, 128)
        _check_int("hypernet.rank", self.rank, 1, 512)
        _check_int("hypernet.basis", self.basis, 1, 4096)
        _check_int("hypernet.feature_grid", self.feature_grid, 1, 256)
        _check_int("hypernet.encoder_blocks", self.encoder_blocks, 0, 64)
        if self.dim % self.heads:
            raise ValueError(f"HyperAlign: hypernet.dim {self.dim} must be divisible by heads {self.heads}.")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"HyperAlign: hypernet.alpha must be a positive number, got {self.alpha!r}.")
        self.alpha = float(self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HypernetConfig:
        return _from_dict(cls, data, "hypernet config")


@dataclass
class PredictorMeta:
    """The JSON header of a predictor file (format version 1)."""

    family: str
    arch: dict  # architecture numbers of the base model (targets.UNetArch / XLUNetArch / DiTArch fields)
    targets: list[str]  # ordered target ids (diffusers paths)
    targets_sha256: str
    hypernet: dict  # HypernetConfig.to_dict()
    mode: str = "S"
    keysteps: list[float] = field(default_factory=lambda: [0.0])
    provenance: dict = field(default_factory=dict)  # informational: rewards, data, base model, steps
    format_version: int = FORMAT_VERSION
    package_version: str = ""

    def __post_init__(self):
        _check_format_version(self.format_version)
        if self.family not in FAMILIES:
            raise ValueError(f"HyperAlign: unknown model family {self.family!r}; expected one of {FAMILIES}.")
        if self.mode not in MODES:
            raise ValueError(f"HyperAlign: unknown mode {self.mode!r}; expected one of {MODES}.")
        if not isinstance(self.targets, list) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError("HyperAlign: predictor header 'targets' must be a non-empty list of layer names.")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("HyperAlign: predictor header 'targets' lists a layer twice.")
        if not isinstance(self.provenance, dict) or not isinstance(self.arch, dict):
            raise ValueError("HyperAlign: predictor header 'arch' and 'provenance' must be JSON objects.")
        self.keysteps = list(validate_keysteps(self.keysteps))
        self.hypernet_config()  # validates

    def hypernet_config(self) -> HypernetConfig:
        return HypernetConfig.from_dict(self.hypernet)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorMeta:
        if isinstance(data, dict):  # before key checks: a newer file may legitimately have new keys
            _check_format_version(data.get("format_version"))
        return _from_dict(cls, data, "predictor header")
