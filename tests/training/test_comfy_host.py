"""training.comfy_host: the one helper that boots the real ComfyUI for the tests, the benchmarks and the demo."""

import pytest

from training.comfy_host import comfyui_version, import_comfy, load_pack


def test_version_is_read_without_running_the_file(tmp_path):
    (tmp_path / "comfyui_version.py").write_text('raise RuntimeError("executed")\n__version__ = "1.2.3"\n')
    assert comfyui_version(tmp_path) == "1.2.3"
    (tmp_path / "comfyui_version.py").write_text("version = '1'\n")
    with pytest.raises(ValueError, match="HyperAlign: no __version__ in"):
        comfyui_version(tmp_path)


def test_a_folder_without_comfyui_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ComfyUI at .*HINT: run ./scripts/setup_env.sh"):
        import_comfy(tmp_path)


def test_the_pack_is_loaded_once(comfy_host, hyperalign_pack):
    assert import_comfy(comfy_host.path, cpu=True).nodes is comfy_host.nodes
    assert load_pack(comfy_host.nodes) is hyperalign_pack.module
    assert "HyperAlignApply" in hyperalign_pack.nodes and comfy_host.version.count(".") == 2
