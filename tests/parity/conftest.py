"""Fixtures for the parity tests (trainer vs real ComfyUI). The ComfyUI host fixtures live in tests/conftest.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models are dominated by per-op overhead, which a second thread only adds to (see tests/core)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def predictor_folder(comfy_host, tmp_path_factory):
    """A models/hyperalign folder registered with ComfyUI, for the predictor files the trainer exports here."""
    folder = tmp_path_factory.mktemp("parity_predictors")
    comfy_host.folder_paths.add_model_folder_path("hyperalign", str(folder), is_default=True)
    return folder
