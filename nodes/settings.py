"""What a HyperAlign Apply node asks for: the S/I/P mode, keysteps, strength and the active window."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..hyperalign.io import Predictor
from ..hyperalign.schedule import MODES, validate_keysteps

FROM_FILE = "from_file"  # the mode and keysteps the predictor was trained with
_EPS = 1e-6


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
