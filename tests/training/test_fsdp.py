"""FSDP2 on CPU (gloo): the hypernet sharded across 2 processes trains, checkpoints, resumes and exports exactly as
one process does; and a launch that accelerate leaves undistributed is refused instead of training N times."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_module, tiny_overrides
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_worker(out: Path, processes: int) -> dict:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        launcher + [str(WORKER), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def test_fsdp2_hypernet_on_two_processes_matches_one(tmp_path):
    one, two = run_worker(tmp_path / "one", 1), run_worker(tmp_path / "two", 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert two["state"] == {"data": 2, "step": 2, "world_size": 2}
    for a, b in zip(one["curve"] + [one["replay"]], two["curve"] + [two["replay"]], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert one["curve"][2]["loss"] < one["curve"][0]["loss"]  # it trains
    assert two["replay"] == pytest.approx(two["curve"][2], rel=1e-6)  # resuming the sharded state is exact
    exported_one = load_file(tmp_path / "one" / "predictor.safetensors")
    exported_two = load_file(tmp_path / "two" / "predictor.safetensors")
    assert exported_one.keys() == exported_two.keys()
    for key, value in exported_one.items():
        # attention key biases get float-noise gradients (zero in exact arithmetic) that Adam scales up a little
        assert torch.allclose(value, exported_two[key], rtol=1e-4, atol=1e-5), key


def test_an_fsdp_launch_without_gpus_is_refused(tiny_sd15, prefs, tmp_path):
    """accelerate enables FSDP only on accelerators; on CPU each process would otherwise train alone."""
    args = tiny_overrides(tiny_sd15, prefs, tmp_path) + ["run.cpu=False"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no"]
    launcher += ["--config_file", str(REPO / "training" / "configs" / "accelerate" / "fsdp_flux.yaml")]
    result = run_module("training.train", args, launcher=launcher, check=False)
    assert result.returncode != 0
    assert "HyperAlign: the launcher started 2 processes but accelerate set up 1" in result.stderr
    assert not (tmp_path / "run" / "predictor.safetensors").exists()
