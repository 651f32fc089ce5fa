"""Config: YAML presets, typed dotted overrides, unknown keys and missing files refused before any model loads."""

import dataclasses
import subprocess
import sys

import pytest

from hyperalign.config import HypernetConfig
from training import config as config_mod
from training.config import HypernetSection, load_config, parse_override

PRESETS = ["training/configs/sd15.yaml", "training/configs/flux.yaml", "training/configs/sdxl.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_with_typed_sections(preset):
    cfg = load_config(preset)
    assert cfg.model.family in preset
    assert cfg.rewards[0].name == "hps" and cfg.rewards[0].weight == 1.0
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    hcfg = cfg.hypernet.resolve(64, 32)
    assert isinstance(hcfg, HypernetConfig) and (hcfg.feature_dim, hcfg.context_dim) == (64, 32)


def test_hypernet_section_has_exactly_the_core_fields():
    assert [f.name for f in dataclasses.fields(HypernetSection)] == [f.name for f in dataclasses.fields(HypernetConfig)]
    assert HypernetSection(rank=4).resolve(1280, 768).scale == 8.0 / 4


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        PRESETS[0],
        [
            "optim.lr=3e-5",
            "optim.max_steps=7",
            "objective.mode=P",
            "objective.keysteps=[0, 0.5]",
            "model.path=/models/sd15",
            "run.name=2026",
            "model.gradient_checkpointing=false",
            "rewards.0.weight=2",
            "rewards.0.options={'arch': 'ViT-H-14'}",
            "hypernet.rank=4",
        ],
    )
    assert cfg.optim.lr == 3e-5 and cfg.optim.max_steps == 7
    assert cfg.objective.mode == "P" and cfg.objective.keysteps == [0.0, 0.5]
    assert cfg.model.path == "/models/sd15" and cfg.run.name == "2026"
    assert cfg.model.gradient_checkpointing is False
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[0].options == {"arch": "ViT-H-14"}
    assert cfg.hypernet.rank == 4
    assert parse_override("a.b=[1, 'x']") == (["a", "b"], [1, "x"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optimm.lr=1", "did you mean 'optim'?"),
        ("rewards.0.wieght=1", "did you mean 'rewards.0.weight'?"),
        ("optim.lr=fast", "config key 'optim.lr' must be float"),
        ("optim.max_steps=2.5", "config key 'optim.max_steps' must be int"),
        ("objective.mode=X", "must be one of ['S', 'I', 'P']"),
        ("hypernet.rank=0", "hypernet.rank must be an integer"),
        ("rewards=[{'name': 'hsp'}]", "did you mean 'hps'?"),
        ("objective.keysteps=[0.5, 0.2]", "keysteps"),
        ("model.resolution=500", "multiple of 8"),
        ("optim.lr", "key.sub=value"),
    ],
)
def test_bad_overrides_are_refused_with_a_hint(override, message):
    with pytest.raises(ValueError, match=None) as info:
        load_config(PRESETS[0], [override])
    assert message in str(info.value)
    assert str(info.value).startswith("HyperAlign:")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: checks must come first."""
    import training.adapters

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(training.adapters, "load_adapter", forbidden)


def test_cli_refuses_unknown_key_before_loading(no_model_load, capsys):
    from training.train import main

    assert main(["--config", PRESETS[0], "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_cli_refuses_missing_files_naming_the_key(no_model_load, capsys, tmp_path, tiny_sd15, prefs):
    from training.train import main

    base = [f"model.path={str(tiny_sd15)!r}", "data.preference='local'", f"data.prompts={str(prefs / 'prompts.txt')!r}"]
    cases = [
        ([f"data.path={str(tmp_path / 'nope.jsonl')!r}"], "data.path"),
        (
            [f"data.path={str(prefs / 'pairs.jsonl')!r}", f"rewards.0.path={str(tmp_path / 'hps.pt')!r}"],
            "rewards[0].path",
        ),
        (
            [
                f"data.path={str(prefs / 'pairs.jsonl')!r}",
                "rewards=[{'name': 'brightness'}]",
                "objective.mode='P'",
                f"objective.keysteps_file={str(tmp_path / 'k.json')!r}",
            ],
            "objective.keysteps_file",
        ),
        (
            [
                f"data.path={str(prefs / 'pairs.jsonl')!r}",
                "rewards=[{'name': 'brightness'}]",
                f"data.latents_dir={str(tmp_path / 'latents')!r}",
            ],
            "training.cache_latents",
        ),
        (["model.path='./no/such/model'"], "model.path"),
    ]
    for extra, key in cases:
        assert main(["--config", PRESETS[0], *base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("HyperAlign:") and key in err, err


def test_cli_dashdash_overrides_and_check(tiny_sd15, prefs, tmp_path, capsys, no_model_load):
    from training.train import main

    args = [
        "--config",
        PRESETS[0],
        f"--model.path={str(tiny_sd15)!r}",
        "--data.preference='local'",
        f"--data.path={str(prefs / 'pairs.jsonl')!r}",
        "--rewards=[{'name': 'brightness'}]",
        "--optim.lr=0.5",
        "--check",
    ]
    assert main(args) == 0
    assert '"lr": 0.5' in capsys.readouterr().out


def test_help_runs_without_models():
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "torchrun --nnodes 2" in result.stdout and "accelerate launch" in result.stdout


def test_offline_hub_id_not_in_cache_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        config_mod.check_model_source("someone/not-cached-model", "model.path", "model_index.json")


def test_options_and_overrides_may_interleave():
    from training.cli import parse
    from training.evaluate import _extra

    argv = ["--config", PRESETS[0], "optim.lr=0.5", "--predictor", "p.safetensors", "optim.max_steps=7", "--check"]
    cfg, args = parse(argv, "", "python -m training.evaluate", _extra)
    assert (cfg.optim.lr, cfg.optim.max_steps, args.predictor, args.check) == (0.5, 7, "p.safetensors", True)


@pytest.mark.parametrize("tool", ["evaluate", "keysteps", "cache_latents"])
def test_each_tool_names_itself_in_its_usage(tool, capsys):
    module = __import__(f"training.{tool}", fromlist=["main"])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m training.{tool} ")
