"""The main job end to end on the shipped toy world, shortened: keysteps, training, evaluation, grid, ComfyUI."""

import json

import numpy as np
from PIL import Image


def test_demo_writes_every_output_and_comfyui_uses_the_predictor(tmp_path, capsys):
    from toyworld import demo

    assert demo.main(["--out", str(tmp_path), "--steps", "3", "--prompts", "1"]) == 0
    printed = capsys.readouterr().out
    predictor = tmp_path / "toy" / "predictor.safetensors"
    for path in (predictor, tmp_path / "eval" / "results.md", tmp_path / "comparison_grid.png"):
        assert path.is_file() and str(path) in printed
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert list(results) == ["base", "S", "I", "P"]
    assert results["S"]["hypernet_calls_per_image"] == 10 and results["I"]["hypernet_calls_per_image"] == 1
    # ground truth is reported beside the learned rewards, as differences from base, and summed up per mode
    assert {"toy_truth", "toy_taste", "toy_clip", "toy_aesthetic"} <= set(results["S"]["vs_base"])
    assert "Against base, paired by prompt" in printed and "HyperAlign S: toy_truth" in printed
    # ComfyUI's KSampler image: plain on the left, HyperAlign S on the right; a trained predictor changes it
    image = np.asarray(Image.open(tmp_path / "comfyui_plain_vs_hyperalign.png")).astype(int)
    plain, aligned = np.split(image, 2, axis=1)
    assert plain.shape == aligned.shape and np.abs(plain - aligned).max() > 0
