"""hyperalign.atomic: outputs appear whole or not at all, also after an error or an interrupt."""

import json
import os

import pytest

from hyperalign.atomic import atomic_path, write_json, write_text


def test_write_json_creates_folders_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    write_json(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert os.listdir(path.parent) == ["results.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "keysteps.json"
    write_text(path, "old\n")
    with pytest.raises(type(error)), atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write("half of the new")
        raise error
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["keysteps.json"]


def test_the_temporary_file_is_beside_the_destination(tmp_path):
    with atomic_path(tmp_path / "out.safetensors", suffix=".safetensors.tmp") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same filesystem: the rename is atomic
        open(tmp, "wb").close()
    assert os.listdir(tmp_path) == ["out.safetensors"]
