"""benchmarks/gpu_check.py on tiny shapes on the CPU: every section runs end to end and writes its Markdown, and a
section that fails leaves the others running and is reported (the GPU run has one shot at 8 minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.comfy
def test_gpu_check_runs_every_section_on_tiny_shapes(comfy_host, tmp_path):
    out = tmp_path / "check.md"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out),
        "--steps", "2", "--max-rounds", "1", "--batches", "1", "--sections", "sd15", "train_sd15", "train_flux",
        "--fail", "train_flux",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    report = out.read_text()
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]  # one section failed on request
    assert "Finished in" in report and "1 section(s) failed" in report
    sampling = report.split("## Sampling overhead: sd15")[1].split("## ")[0]
    for mode in ("S", "P", "I"):
        assert f"\n| {mode} | " in sampling
    assert "Cost model, batch 1" in sampling and "auto picks: S" in sampling
    assert "## Training step peak memory: sd15" in report and "the step ran end to end" in report
    assert "## train_flux: failed" in report and "failed on request" in report
