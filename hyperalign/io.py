"""The predictor file: ``.safetensors`` holding the hypernet's weights, with a JSON header.

The safetensors ``__metadata__`` carries ``"hyperalign"``: the JSON of :class:`PredictorMeta`. The
reader validates the raw header (length, JSON, dtypes, shapes, offsets against the file size) and
the HyperAlign header (version, family, targets and their hash, hypernet config, the exact tensor
names and shapes the hypernet needs) before it reads a single tensor, and then rejects NaN/Inf.
Nothing here unpickles anything. Writes are atomic: a temp file in the same folder, then rename.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_path
from .config import HypernetConfig, PredictorMeta
from .hypernet import HyperNet
from .targets import Target, TargetTable, arch_to_dict, build_table, targets_sha256

META_KEY = "hyperalign"
MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
_MAX_NUMEL = 1 << 34  # no single hypernet tensor is anywhere near this: a header saying so lies


@dataclass
class Predictor:
    meta: PredictorMeta
    table: TargetTable
    targets: list[Target]
    hypernet: HyperNet
    path: str | None = None

    @property
    def family(self) -> str:
        return self.meta.family


def _fail(path, problem: str, hint: str) -> ValueError:
    name = os.path.basename(str(path))
    return ValueError(f"HyperAlign: {name!r} {problem}. HINT: {hint}")


_NOT_PREDICTOR = "choose a predictor file exported by HyperAlign (LoRA and checkpoint files go elsewhere)"


def _read_raw_header(path) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _fail(path, "is truncated (shorter than a safetensors header)", "re-download or re-export it")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            if length <= MAX_HEADER_BYTES and handle.read(1) == b"{":  # a real header, cut short
                raise _fail(
                    path,
                    f"is truncated (its header needs {length} bytes, {size - 8} are left)",
                    "re-download or re-export it",
                )
            raise _fail(
                path, f"is not a safetensors file (header length {length} for a {size}-byte file)", _NOT_PREDICTOR
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8, bad JSON, absurd numbers or nesting
        raise _fail(path, "is not a safetensors file (its header is not JSON)", _NOT_PREDICTOR) from None
    if not isinstance(header, dict):
        raise _fail(path, "is not a safetensors file (its header is not a JSON object)", _NOT_PREDICTOR)
    return header, size - 8 - length


def _check_tensor_entries(path, header: dict, data_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    entries, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"has a malformed entry for tensor {name!r}", "re-export the predictor")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _fail(
                path, f"stores tensor {name!r} as {dtype!r}; predictors use F32, F16 or BF16", "re-export the predictor"
            )
        ok_shape = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        numel = math.prod(shape) if ok_shape else -1
        if not ok_shape or numel > _MAX_NUMEL:
            raise _fail(path, f"declares an absurd shape {shape!r} for tensor {name!r}", "re-export the predictor")
        ok_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        )
        if not ok_offsets or offsets[1] - offsets[0] != numel * _DTYPES[dtype][1]:
            raise _fail(
                path,
                f"header lies about tensor {name!r} (shape {shape}, offsets {offsets}, "
                f"{data_size} data bytes): the file is truncated or corrupt",
                "re-download or re-export it",
            )
        spans.append(tuple(offsets))
        entries[name] = (_DTYPES[dtype][0], tuple(shape))
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise _fail(path, "has overlapping tensors", "re-export the predictor")
    covered = sum(stop - start for start, stop in spans)
    if covered != data_size:  # safetensors itself refuses gaps and trailing bytes: say so before it does
        raise _fail(
            path,
            f"has {data_size - covered} data bytes that belong to no tensor (corrupt or appended to)",
            "re-download or re-export it",
        )
    return entries


def read_meta(path) -> PredictorMeta:
    """Validate the header of `path` and return its HyperAlign metadata; reads no tensor data."""
    meta, _ = _read_and_check(path)
    return meta


def _read_and_check(path) -> tuple[PredictorMeta, TargetTable]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HyperAlign: predictor file {str(path)!r} does not exist.")
    header, data_size = _read_raw_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or META_KEY not in metadata:
        raise _fail(
            path,
            "has no 'hyperalign' metadata, so it is not a HyperAlign predictor",
            "LoRA files belong in models/loras; predictors come from HyperAlign's trainer",
        )
    try:
        data = json.loads(metadata[META_KEY])
    except (TypeError, ValueError, RecursionError):
        raise _fail(path, "has a 'hyperalign' header that is not valid JSON", "re-export the predictor") from None
    try:
        meta = PredictorMeta.from_dict(data)
        table = build_table(meta.family, meta.arch)
        targets = table.select(meta.targets)
    except (TypeError, ValueError, OverflowError) as err:  # a missing key, a wrong type, an int beyond float
        message = str(err) if str(err).startswith("HyperAlign:") else f"HyperAlign: invalid predictor header: {err}"
        raise ValueError(f"{message} (in {os.path.basename(str(path))!r})") from None
    if targets_sha256(targets) != meta.targets_sha256:
        raise _fail(
            path,
            "has a target hash that does not match its target list (edited or corrupt header)",
            "re-export the predictor",
        )
    entries = _check_tensor_entries(path, header, data_size)
    _check_expected_tensors(path, entries, meta, targets)
    return meta, table


def _expected_shapes(cfg: HypernetConfig, targets: list[Target]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = HyperNet(cfg, targets)
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def _check_expected_tensors(path, entries: dict, meta: PredictorMeta, targets: list[Target]) -> None:
    expected = _expected_shapes(meta.hypernet_config(), targets)
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise _fail(
            path,
            f"does not match its header: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}",
            "re-export the predictor with the same HyperAlign version that reads it",
        )
    wrong = [f"{n} {entries[n][1]} != {expected[n]}" for n in expected if entries[n][1] != expected[n]]
    if wrong:
        raise _fail(path, f"has tensors of the wrong shape: {wrong[:3]}", "re-export the predictor")


def load_predictor(path, device: str | torch.device = "cpu") -> Predictor:
    meta, table = _read_and_check(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:  # the header passed our checks; the file changed or is unreadable
        raise _fail(path, f"could not be read ({err})", "re-download or re-export it") from None
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise _fail(
            path, f"contains NaN or Inf values in {bad[:3]}", "the training run diverged; export an earlier checkpoint"
        )
    targets = table.select(meta.targets)
    net = HyperNet(meta.hypernet_config(), targets).to(device)
    net.load_state_dict(state, strict=True)
    net.to(next(iter(state.values())).dtype)
    return Predictor(meta, table, targets, net.eval().requires_grad_(False), str(path))


def new_predictor(
    family: str,
    hypernet: HypernetConfig,
    arch=None,
    targets: list[str] | str = "attn",
    mode: str = "S",
    keysteps=(0.0,),
    provenance: dict | None = None,
) -> Predictor:
    """An untrained (identity) predictor: what training starts from."""
    table = build_table(family, arch)
    rows = table.preset(targets) if isinstance(targets, str) else table.select(targets)
    meta = PredictorMeta(
        family=family,
        arch=arch_to_dict(table.arch),
        targets=[t.id for t in rows],
        targets_sha256=targets_sha256(rows),
        hypernet=hypernet.to_dict(),
        mode=mode,
        keysteps=list(keysteps),
        provenance=dict(provenance or {}),
        package_version=__version__,
    )
    return Predictor(meta, table, rows, HyperNet(hypernet, rows))


def save_predictor(path, predictor: Predictor, dtype: torch.dtype | None = None) -> str:
    """Write atomically; the header is re-validated by reading the file back before it replaces `path`."""
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in predictor.hypernet.state_dict().items()}
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:  # the reader would reject the file: refuse before touching the disk
        raise ValueError(
            f"HyperAlign: refusing to save a predictor with NaN or Inf values in {bad[:3]}. HINT: the "
            "training run diverged; export an earlier checkpoint."
        )
    predictor.meta.package_version = predictor.meta.package_version or __version__
    metadata = {"format": "pt", META_KEY: json.dumps(predictor.meta.to_dict(), sort_keys=True)}
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file(state, tmp, metadata=metadata)
        _read_and_check(tmp)
    return str(path)
