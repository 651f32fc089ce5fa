"""Atomic file writes: a reader, a crash or an interrupt never leaves a half-written file behind.

Everything is written to a temporary file in the destination's folder (same filesystem, so the final
``os.replace`` is atomic), flushed to disk, then renamed over the destination; on any error the temporary
file is removed and the destination is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path to write; when the block ends normally it replaces ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hyperalign-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, data, **dump_options) -> None:
    write_text(path, json.dumps(data, **{"indent": 2, **dump_options}) + "\n")
