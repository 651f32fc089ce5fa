"""Every trainer tool's flags do what their help says: `--check` validates that tool's inputs, prints them and stops
before any model loads or any file is written; a flag a tool has no use for (`--resume` outside train) is refused."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from hyperalign.config import HypernetConfig
from hyperalign.io import new_predictor, save_predictor

PRESET = "training/configs/sd15.yaml"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model or starting accelerate fails the test: --check must stop before both."""
    import training.adapters
    import training.engine
    import training.models

    def forbidden(*args, **kwargs):
        raise AssertionError("--check loaded a model or started accelerate")

    for module, name in (
        (training.adapters, "load_adapter"),
        (training.models, "load_vae"),
        (training.engine, "make_accelerator"),
    ):
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def setup(tmp_path, prefs):
    """A local 'model' folder (--check only checks that it exists), prefs, a predictor file and an output folder."""
    model = tmp_path / "model"
    model.mkdir()
    predictor = save_predictor(
        str(tmp_path / "p.safetensors"),
        new_predictor("sd15", HypernetConfig(feature_dim=32, context_dim=32, dim=8, heads=1, rank=1, basis=2)),
    )
    common = [
        "--config",
        PRESET,
        f"model.path={str(model)!r}",
        "data.preference='local'",
        f"data.path={str(prefs / 'pairs.jsonl')!r}",
        f"data.prompts={str(prefs / 'prompts.txt')!r}",
        "rewards=[{'name': 'brightness'}]",
        f"run.output_dir={str(tmp_path / 'runs')!r}",
        f"eval.prompts={str(prefs / 'prompts.txt')!r}",
        "eval.metrics=[{'name': 'brightness'}]",
    ]
    return tmp_path, common, predictor


TOOL_ARGS = {
    "train": [],
    "evaluate": ["--predictor", "{predictor}", "--save-images"],
    "keysteps": ["--num", "3", "--samples", "5"],
    "cache_latents": ["data.latents_dir='{tmp}/latents'", "--shard-size", "7"],
}
TOOL_OPTIONS = {
    "train": {},
    "evaluate": {"predictor": "{predictor}", "save_images": True},
    "keysteps": {"num": 3, "samples": 5, "batch": 4, "out": None},
    "cache_latents": {"shard_size": 7, "batch": 16},
}


def _fill(value, tmp, predictor):
    return value.format(tmp=tmp, predictor=predictor) if isinstance(value, str) else value


@pytest.mark.parametrize("tool", sorted(TOOL_ARGS))
def test_check_validates_prints_and_stops(tool, setup, nothing_loads, capsys):
    tmp, common, predictor = setup
    module = __import__(f"training.{tool}", fromlist=["main"])
    extra = [_fill(a, tmp, predictor) for a in TOOL_ARGS[tool]]
    assert module.main([*common, *extra, "optim.lr=0.25", "--check"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["optim"]["lr"] == 0.25
    assert printed["options"] == {k: _fill(v, tmp, predictor) for k, v in TOOL_OPTIONS[tool].items()}
    assert sorted(os.listdir(tmp)) == ["model", "p.safetensors"]  # nothing written: no run dir, no cache, no eval


@pytest.mark.parametrize(
    "tool, extra, message",
    [
        (
            "train",
            ["data.prompts='{tmp}/none.txt'"],
            "prompt file '{tmp}/none.txt' does not exist (config key data.prompts)",
        ),
        (
            "evaluate",
            ["--predictor", "{tmp}/none.safetensors"],
            "'{tmp}/none.safetensors' does not exist (config key --predictor)",
        ),
        ("evaluate", ["--predictor", "{predictor}", "eval.prompts='{tmp}/none.txt'"], "config key eval.prompts"),
        (
            "keysteps",
            ["data.prompts='{tmp}/none.txt'"],
            "prompt file '{tmp}/none.txt' does not exist (config key data.prompts)",
        ),
        ("keysteps", ["data.prompts=None", "data.preference='none'"], "no prompts to sample: set data.prompts"),
        ("cache_latents", [], "set data.latents_dir"),
        ("cache_latents", ["data.latents_dir='{tmp}/l'", "data.path='{tmp}/none.jsonl'"], "config key data.path"),
    ],
)
def test_check_refuses_what_the_tool_would_miss(tool, extra, message, setup, nothing_loads, capsys):
    tmp, common, predictor = setup
    module = __import__(f"training.{tool}", fromlist=["main"])
    assert module.main([*common, *[_fill(a, tmp, predictor) for a in extra], "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("HyperAlign:") and _fill(message, tmp, predictor) in err, err


@pytest.mark.parametrize("tool", ["evaluate", "keysteps", "cache_latents"])
def test_resume_is_only_a_train_flag(tool, setup, capsys):
    _, common, predictor = setup
    module = __import__(f"training.{tool}", fromlist=["main"])
    own = ["--predictor", predictor] if tool == "evaluate" else []
    with pytest.raises(SystemExit) as info:
        module.main([*common, *own, "--resume", "latest", "--check"])
    assert info.value.code == 2 and "unrecognised arguments: --resume latest" in capsys.readouterr().err


def _checkpoint(folder, step=3):
    predictor = new_predictor("sd15", HypernetConfig(feature_dim=32, context_dim=32, dim=8, heads=1, rank=1, basis=2))
    folder.mkdir(parents=True)
    (folder / "predictor_meta.json").write_text(json.dumps(predictor.meta.to_dict()))
    (folder / "state.json").write_text(json.dumps({"step": step}))
    save_file({k: v.contiguous() for k, v in predictor.hypernet.state_dict().items()}, folder / "hypernet.safetensors")
    return folder


def test_export_check_writes_nothing_and_export_writes_what_it_said(tmp_path, capsys):
    from hyperalign.io import read_meta
    from training.export import main

    run = tmp_path / "run"
    _checkpoint(run / "ckpt" / "step_00000003")
    assert main([str(run), "--dtype", "bf16", "--check"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said == {
        "checkpoint": str(run / "ckpt" / "step_00000003"),
        "out": str(run / "predictor.safetensors"),
        "dtype": "bf16",
        "family": "sd15",
        "mode": "S",
        "steps": 3,
    }
    assert not os.path.exists(said["out"])
    assert main([str(run), "--dtype", "bf16"]) == 0
    assert read_meta(said["out"]).provenance["steps"] == 3


def test_export_check_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    from training.export import main

    folder = _checkpoint(tmp_path / "step_00000001")
    os.remove(folder / "hypernet.safetensors")
    assert main([str(folder), "--check"]) == 2
    assert "has no hypernet.safetensors" in capsys.readouterr().err


def test_bf16_is_what_export_writes(tmp_path):
    from safetensors import safe_open

    from training.export import main

    folder = _checkpoint(tmp_path / "run" / "ckpt" / "step_00000002", step=2)
    assert main([str(folder), "--out", str(tmp_path / "x.safetensors"), "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
