"""hyperalign.atomic: outputs appear whole or not at all, also after an error or an interrupt."""

import json
import os
import stat

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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_text(tmp_path / "config.json", "{}\n")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_an_overwritten_file_keeps_its_mode(tmp_path):
    path = tmp_path / "results.md"
    write_text(path, "old\n")
    os.chmod(path, 0o640)
    write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
