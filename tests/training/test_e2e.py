"""End to end through the command-line entry points: a run, its export, a torchrun (gloo, 2 processes) run and a
killed-then-resumed run that must reproduce it, keystep discovery and evaluation, and a FLUX run."""

import json
import os
import sys

import pytest
import torch
from conftest import reset_accelerate, run_module, tiny_overrides
from safetensors.torch import load_file

from hyperalign.io import load_predictor, save_predictor

# Adam turns gradients that are zero in exact arithmetic (an attention key bias) but float noise in practice into
# full lr-sized steps; an eps above that noise keeps runs that differ only in summation order comparable.
STEPS = ["optim.max_steps=4", "run.save_every=2", "optim.batch_size=2", "optim.eps=1e-6", "sampling.num_steps=3"]
COMPARED = ("loss", "loss_reward", "loss_pref", "reward", "grad_norm")

KILL_AT_STEP_3 = """
import os, signal, sys
import training.loop as loop
original = loop.reward_loss
def reward_loss(tr, batch, step):
    if step == 2:  # inside step 3, after the step-2 checkpoint: die as a preempted job does
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tr, batch, step)
loop.reward_loss = reward_loss
from training.train import main
sys.exit(main(sys.argv[1:]))
"""


def train_in_process(args):
    from training.train import main

    reset_accelerate()
    try:
        assert main(args) == 0
    finally:
        reset_accelerate()


def metrics(run_dir):
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            row = json.loads(line)
            by_step[row["step"]] = row  # a resumed run may log a step again: the last one counts
    return by_step


def assert_same_curve(a, b):
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in COMPARED:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-5), (step, key)


def assert_same_predictor(path_a, path_b):
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


@pytest.fixture(scope="module")
def reference(tiny_sd15, prefs, tmp_path_factory):
    """One process, global batch 2, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs")
    train_in_process(tiny_overrides(tiny_sd15, prefs, out) + STEPS + ["run.name='reference'"])
    return out / "reference"


def test_run_writes_checkpoints_and_a_predictor_the_core_loads(reference, tmp_path):
    assert sorted(os.listdir(reference / "ckpt")) == ["step_00000002", "step_00000004"]
    assert {"config.json", "metrics.jsonl", "train.log", "predictor.safetensors"} <= set(os.listdir(reference))
    predictor = load_predictor(str(reference / "predictor.safetensors"))
    assert predictor.meta.family == "sd15" and predictor.meta.mode == "S" and len(predictor.targets) == 32
    assert predictor.meta.provenance["steps"] == 4 and predictor.meta.provenance["global_batch"] == 2
    trained = load_file(reference / "ckpt" / "step_00000004" / "hypernet.safetensors")
    assert all(torch.equal(predictor.hypernet.state_dict()[k], v) for k, v in trained.items())
    save_predictor(tmp_path / "again.safetensors", predictor)  # round trip
    again = load_predictor(str(tmp_path / "again.safetensors"))
    assert again.meta == predictor.meta
    assert_same_predictor(reference / "predictor.safetensors", tmp_path / "again.safetensors")
    from training.export import main as export

    assert export([str(reference), "--out", str(tmp_path / "bf16.safetensors"), "--dtype", "bf16"]) == 0
    exported = load_predictor(str(tmp_path / "bf16.safetensors"))
    assert next(exported.hypernet.parameters()).dtype == torch.bfloat16
    assert exported.meta.provenance["steps"] == 4


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # the shipped DDP config, as the README runs it (it names GPUs; run.cpu=true makes it gloo on CPU)
    "accelerate": ["-m", "accelerate.commands.launch", "--config_file", "training/configs/accelerate/ddp.yaml"]
    + ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29517"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one_process(reference, tiny_sd15, prefs, tmp_path, launcher):
    """2 ranks x batch 1 (gloo) == 1 rank x batch 2; under torchrun the frozen base is also sharded with FSDP2."""
    shard = ["model.shard_base=True"] if launcher == "torchrun" else []
    args = tiny_overrides(tiny_sd15, prefs, tmp_path) + STEPS + ["optim.batch_size=1", "run.name='two'"] + shard
    run_module("training.train", args, launcher=[sys.executable] + LAUNCHERS[launcher], timeout=600)
    assert_same_curve(metrics(reference), metrics(tmp_path / "two"))
    assert_same_predictor(reference / "predictor.safetensors", tmp_path / "two" / "predictor.safetensors")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["optim"]["batch_size"] == 1


def test_killed_run_resumes_to_the_same_curve(reference, tiny_sd15, prefs, tmp_path):
    import subprocess

    from conftest import REPO

    args = tiny_overrides(tiny_sd15, prefs, tmp_path) + STEPS + ["run.name='killed'"]
    result = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP_3, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == -9, result.stderr[-3000:]
    run_dir = tmp_path / "killed"
    assert sorted(metrics(run_dir)) == [1, 2] and os.listdir(run_dir / "ckpt") == ["step_00000002"]
    train_in_process(args + ["--resume", "latest"])
    assert_same_curve(metrics(reference), metrics(run_dir))
    assert_same_predictor(reference / "predictor.safetensors", run_dir / "predictor.safetensors")


def test_keysteps_then_evaluate_base_and_modes(reference, tiny_sd15, prefs, tmp_path):
    from training.evaluate import main as evaluate
    from training.keysteps import main as keysteps

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a lighthouse\n")
    args = tiny_overrides(tiny_sd15, prefs, tmp_path) + ["sampling.num_steps=3"]
    args += [f"objective.keysteps_file={str(tmp_path / 'k.json')!r}"]
    reset_accelerate()
    assert keysteps([*args, "--num", "2", "--samples", "2", "--batch", "2"]) == 0
    found = json.loads((tmp_path / "k.json").read_text())
    assert found["keysteps"][0] == 0.0 and len(found["keysteps"]) == 2 and len(found["distance"]) == 2
    reset_accelerate()
    eval_args = args + [
        f"eval.prompts={str(prompts)!r}",
        "eval.seeds=[0, 1]",
        f"eval.out={str(tmp_path / 'e')!r}",
        "eval.metrics=[{'name': 'brightness'}, {'name': 'color'}]",
    ]
    assert evaluate([*eval_args, "--predictor", str(reference / "predictor.safetensors"), "--save-images"]) == 0
    reset_accelerate()
    report = json.loads((tmp_path / "e" / "results.json").read_text())
    results = report["results"]
    assert list(results) == ["base", "S", "I", "P"]
    calls = {variant: results[variant]["hypernet_calls_per_image"] for variant in results}
    assert calls == {"base": 0, "S": 3, "I": 1, "P": 2}  # 3 steps; P predicts at its 2 keysteps
    for variant in results:
        assert set(results[variant]["metrics"]) == {"brightness", "color"}
        assert results[variant]["diversity"] > 0  # the seeds' images differ
    assert report["protocol"]["keysteps"] == found["keysteps"] and report["protocol"]["prompts"] == 1
    table = (tmp_path / "e" / "results.md").read_text()
    assert table.startswith("| variant | brightness | color | diversity | s/image |")
    assert os.listdir(tmp_path / "e" / "images") == ["prompt_00000.png"]


def test_flux_trains_and_exports(tiny_flux, prefs, tmp_path):
    args = tiny_overrides(tiny_flux, prefs, tmp_path, family="flux") + [
        "optim.max_steps=2",
        "optim.batch_size=1",
        "run.name='flux'",
        "run.sample_every=2",
        "run.report_to='tensorboard'",
    ]
    train_in_process(args)
    predictor = load_predictor(str(tmp_path / "flux" / "predictor.safetensors"))
    assert predictor.meta.family == "flux" and predictor.meta.arch["hidden_size"] == 32
    assert predictor.meta.hypernet["context_dim"] == 32 and predictor.meta.hypernet["encoder_blocks"] == 1
    assert (tmp_path / "flux" / "samples" / "step_00000002.png").is_file()
    events = [name for _, _, names in os.walk(tmp_path / "flux") for name in names if "tfevents" in name]
    assert events, "no tensorboard event file"
    rows = list(metrics(tmp_path / "flux").values())
    for row in rows:  # the logged terms add up: loss = -reward + pref_weight * loss_pref (pref_weight 1 in flux.yaml)
        assert row["loss_reward"] == pytest.approx(-row["reward"], abs=1e-6)
        assert row["loss"] == pytest.approx(row["loss_reward"] + row["loss_pref"], abs=1e-6)
