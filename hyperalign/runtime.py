"""Per-sampling-run state shared by ComfyUI and the trainer, so both follow the same S/I/P rules."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .lora import Factors, factor_stats
from .schedule import MODES, segment_of, validate_keysteps


@dataclass
class HypernetCall:
    step: int
    progress: float
    seconds: float
    stats: dict | None = None


@dataclass
class AlignRun:
    """Decides, step by step, whether to run the hypernet or reuse the current factors.

    `factors_at(step, progress, predict)` is called for every model evaluation; `predict()` runs the
    hypernet. Several evaluations in one step (second-order samplers) share that step's factors.
    """

    mode: str
    keysteps: tuple[float, ...] = (0.0,)
    collect_stats: bool = False
    calls: list[HypernetCall] = field(default_factory=list)
    _step: int | None = None
    _segment: int | None = None
    _factors: Factors | None = None
    _first: Factors | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"HyperAlign: unknown mode {self.mode!r}; expected one of {MODES}.")
        keysteps = self.keysteps  # a string ('0, 0.5', as the nodes pass it) is parsed, not split into characters
        self.keysteps = validate_keysteps(keysteps if isinstance(keysteps, str) else list(keysteps))

    def needs_prediction(self, step: int, progress: float) -> bool:
        if self._factors is None:
            return True
        if step == self._step:
            return False
        if self.mode == "S":
            return True
        if self.mode == "I":
            return False
        return segment_of(progress, self.keysteps) != self._segment

    def factors_at(self, step: int, progress: float, predict: Callable[[], Factors]) -> Factors:
        if self.needs_prediction(step, progress):
            start = time.perf_counter()
            factors = predict()
            stats = None
            if self.collect_stats:
                self._first = self._first or factors
                stats = factor_stats(factors, self._first)
            self.calls.append(HypernetCall(step, float(progress), time.perf_counter() - start, stats))
            self._factors = factors
            self._segment = segment_of(progress, self.keysteps)
        self._step = step
        return self._factors

    def summary(self) -> str:
        steps = ",".join(str(c.step) for c in self.calls)
        seconds = sum(c.seconds for c in self.calls)
        return f"mode {self.mode}: {len(self.calls)} hypernet call(s) at step(s) [{steps}], {seconds:.3f} s"
