"""Resumable checkpoints and predictor export.

A checkpoint is a folder ``<run>/ckpt/step_XXXXXXXX/``: ``hypernet.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``rng_rank<r>.pt`` (python, numpy, torch and CUDA generators of each rank),
``state.json`` (global step, data position, world size) and ``predictor_meta.json`` (the predictor
header, so ``training.export`` needs no base model). It is written into ``.tmp-step_…`` and renamed
when complete, so a run killed while saving never leaves a half checkpoint that ``latest`` would
pick. Model and optimizer states are full, FQN-keyed state dicts (torch.distributed.checkpoint
helpers), the same for one process, DDP and FSDP, so a run may resume on a different world size.
All ``.pt`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hyperalign.config import PredictorMeta
from hyperalign.hypernet import HyperNet
from hyperalign.io import Predictor, save_predictor
from hyperalign.targets import build_table

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "ckpt", f"step_{step:08d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    folder = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _STEP.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: str, resume: str | None) -> str | None:
    """'latest' -> the newest complete checkpoint of the run (None on a fresh run); a folder -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(
            f"HyperAlign: {resume!r} is not a complete checkpoint folder (no state.json). "
            "HINT: use run.resume=latest or a <run>/ckpt/step_* folder."
        )
    return resume


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator,
    run_dir: str,
    step: int,
    hypernet,
    optimizer,
    scheduler,
    state: dict,
    meta: PredictorMeta,
    keep_last: int,
) -> str:
    """Write a checkpoint atomically (every rank calls this: FSDP gathers are collective)."""
    model_state = get_model_state_dict(hypernet, options=_FULL)
    optim_state = get_optimizer_state_dict(hypernet, _inner(optimizer), options=_FULL)
    final = checkpoint_dir(run_dir, step)
    tmp = os.path.join(run_dir, "ckpt", f".tmp-step_{step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "hypernet.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        _write_json(os.path.join(tmp, "predictor_meta.json"), meta.to_dict())
        _write_json(os.path.join(tmp, "state.json"), dict(state, step=step, world_size=accelerator.num_processes))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, hypernet, optimizer, scheduler) -> dict:
    """Restore model, optimizer, LR schedule and this rank's RNG; returns the saved state.json."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    set_model_state_dict(
        hypernet, load_file(os.path.join(path, "hypernet.safetensors")), options=StateDictOptions(full_state_dict=True)
    )
    optim_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    set_optimizer_state_dict(hypernet, _inner(optimizer), optim_state, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng_file = os.path.join(path, f"rng_rank{accelerator.process_index}.pt")
    if not os.path.isfile(rng_file):
        logger.warning(
            "checkpoint %s was saved by %s processes; rank %d reuses rank 0's RNG state",
            path,
            state.get("world_size"),
            accelerator.process_index,
        )
        rng_file = os.path.join(path, "rng_rank0.pt")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def _prune(run_dir: str, keep_last: int) -> None:
    for step, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        exported = os.path.join(run_dir, f"predictor_step_{step:08d}.safetensors")
        if os.path.isfile(exported):
            os.remove(exported)


def export_predictor(path: str, meta: PredictorMeta, model_state: dict, dtype: torch.dtype | None = None) -> str:
    """Write the predictor file the ComfyUI nodes load: the header `meta` and the hypernet weights."""
    table = build_table(meta.family, meta.arch)
    targets = table.select(meta.targets)
    hypernet = HyperNet(meta.hypernet_config(), targets)
    hypernet.load_state_dict(model_state, strict=True)
    return save_predictor(path, Predictor(meta, table, targets, hypernet), dtype=dtype)


def checkpoint_meta(checkpoint: str) -> PredictorMeta:
    """The predictor header a checkpoint would export (validated), with its step count; reads no weights."""
    for name in ("predictor_meta.json", "state.json", "hypernet.safetensors"):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise FileNotFoundError(
                f"HyperAlign: checkpoint {checkpoint!r} has no {name}. HINT: pick a complete ckpt/step_* folder "
                "(an interrupted save leaves only a .tmp-step_* folder)."
            )
    with open(os.path.join(checkpoint, "predictor_meta.json"), encoding="utf-8") as handle:
        meta = PredictorMeta.from_dict(json.load(handle))
    with open(os.path.join(checkpoint, "state.json"), encoding="utf-8") as handle:
        meta.provenance = dict(meta.provenance, steps=json.load(handle)["step"])
    return meta


def export_checkpoint(checkpoint: str, out: str, dtype: torch.dtype | None = None) -> str:
    meta = checkpoint_meta(checkpoint)
    return export_predictor(out, meta, load_file(os.path.join(checkpoint, "hypernet.safetensors")), dtype)
