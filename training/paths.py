"""Telling local files from Hub ids, and refusing missing files early with the config key that names them."""

from __future__ import annotations

import os

# A value with one of these endings is a file, never a Hub repository id.
FILE_SUFFIXES = (
    ".pt",
    ".pth",
    ".bin",
    ".ckpt",
    ".safetensors",
    ".json",
    ".jsonl",
    ".txt",
    ".parquet",
    ".yaml",
    ".yml",
)


def offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    )


def looks_local(value: str) -> bool:
    """Whether `value` means a path on this machine (rather than a Hub id such as 'org/name')."""
    if os.path.exists(value):
        return True
    return (
        os.path.isabs(value)
        or value.startswith(("./", "../", "~", ".\\", "..\\"))
        or value.lower().endswith(FILE_SUFFIXES)
    )


def missing(what: str, path: str, key: str, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"HyperAlign: {what} {path!r} does not exist (config key {key}). HINT: {hint}")


def require_path(path: str | None, key: str, what: str, hint: str, kind: str = "any") -> str:
    """Return `path` expanded if it exists (as a file, a folder or either), else raise naming `key`."""
    if not path:
        raise ValueError(f"HyperAlign: config key {key} is not set; it must name the {what}. HINT: {hint}")
    full = os.path.expanduser(path)
    ok = {"file": os.path.isfile, "dir": os.path.isdir}.get(kind, os.path.exists)(full)
    if not ok:
        raise missing(what, path, key, hint)
    return full


def check_model_source(path: str, key: str, marker: str) -> None:
    """A base model or reward source: a local folder that must exist, or a Hub id (cached, when offline)."""
    if looks_local(path):
        require_path(path, key, "model folder", "point it at a diffusers/transformers folder or use a Hub id")
        return
    if offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, marker), str):
            raise FileNotFoundError(
                f"HyperAlign: {path!r} (config key {key}) is neither a local folder nor in the Hugging Face cache, "
                "and HF_HUB_OFFLINE is set. HINT: download it once online, or set the key to a local folder."
            )
