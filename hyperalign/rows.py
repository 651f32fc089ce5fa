"""Which sample each row of a host model call belongs to, and binding per-sample factors to those rows."""

from __future__ import annotations

from .lora import Factors, LoRAState, rows_to_samples


def bind_rows(state: LoRAState, factors: Factors, rows: int, samples: int, device=None) -> None:
    """Bind per-sample `factors` to a model call of `rows` rows, in ComfyUI's chunk-major layout (which the
    trainer follows too): under CFG the cond and uncond chunks of a sample both get that sample's LoRA."""
    index = None if rows == samples else rows_to_samples(rows, samples)
    state.bind(factors, index, device=device)
