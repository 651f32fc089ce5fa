"""The model families the trainer can train on, and loading one: the only place a family is registered.

A family is the string the core uses (``hyperalign.targets``: "sd15", "sdxl", "flux"); its adapter is the
:class:`training.models.FamilyAdapter` subclass that wraps a diffusers base model of that family. To add a family:
write ``training/<family>.py`` with ``class <Name>Adapter(FamilyAdapter)`` (``name`` = the core's family string,
``load(cfg, device, dtype)`` and the methods listed in training/models.py), add it to ``ADAPTERS`` below and to
``ModelConfig.family`` in training/config.py. The adapters import training.models, never this module, so the
imports stay one-way.
"""

from __future__ import annotations

import logging

import torch

from .config import ModelConfig
from .flux import FluxAdapter
from .models import DTYPES, FamilyAdapter
from .sd15 import SD15Adapter
from .sdxl import SDXLAdapter

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[FamilyAdapter]] = {cls.name: cls for cls in (SD15Adapter, SDXLAdapter, FluxAdapter)}


def load_adapter(cfg: ModelConfig, device, dtype: torch.dtype | None = None) -> FamilyAdapter:
    """Load the base model named by `cfg` (local folder or Hub id) onto `device`, frozen, in its family's adapter."""
    if cfg.family not in ADAPTERS:
        raise ValueError(
            f"HyperAlign: no trainer adapter for model family {cfg.family!r}; known: {sorted(ADAPTERS)}. "
            "HINT: register one in training/adapters.py."
        )
    dtype = dtype or DTYPES[cfg.base_dtype]
    adapter = ADAPTERS[cfg.family].load(cfg, device, dtype)
    adapter.freeze()
    if cfg.gradient_checkpointing:
        adapter.denoiser.enable_gradient_checkpointing()
    logger.info("loaded %s base model from %s (%s)", cfg.family, cfg.path, str(dtype).replace("torch.", ""))
    return adapter
