"""Atomic file writes: a reader, a crash or an interrupt never leaves a half-written file behind.

Everything is written to a temporary file in the destination's folder (same filesystem, so the final
``os.replace`` is atomic), flushed to disk, then renamed over the destination; on any error the temporary
file is removed and the destination is untouched.

Permissions: a new file gets what a plain ``open()`` would give (0666 less the umask), not the 0600 of
``tempfile.mkstemp``, so other users (a ComfyUI server under a service account) can read it; a file that is
overwritten keeps its mode.
"""

from __future__ import annotations

import json
import os
import stat
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
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _mode_for(path: str | os.PathLike) -> int:
    """The permission bits `path` has now, or those a plain open() would create it with."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return new_file_mode()


def new_file_mode() -> int:
    """The permission bits a plain open() gives a new file (0666 less the umask)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere the only way to read it is to set it and set it
    back, which another thread creating a file in that instant would see."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, data, **dump_options) -> None:
    write_text(path, json.dumps(data, **{"indent": 2, **dump_options}) + "\n")
