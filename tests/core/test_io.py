"""The predictor file (hyperalign.io): round trips, and every kind of bad file rejected with a clear error."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from hyperalign import FORMAT_VERSION, HypernetConfig, load_predictor, new_predictor, read_meta, save_predictor
from hyperalign import io as hio
from hyperalign.targets import SD15, UNetArch, arch_to_dict

TINY_ARCH = arch_to_dict(
    UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
)
TINY_CFG = HypernetConfig(feature_dim=16, context_dim=32, dim=16, depth=1, heads=2, rank=2, basis=4)


def tiny_predictor(seed=0, **kwargs):
    torch.manual_seed(seed)
    predictor = new_predictor(
        SD15,
        TINY_CFG,
        TINY_ARCH,
        "cross_attn",
        mode="P",
        keysteps=(0.0, 0.4),
        provenance={"reward": "toy", "steps": 3},
        **kwargs,
    )
    with torch.no_grad():  # a "trained" predictor: no tensor is left at its initial value
        for p in predictor.hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return predictor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One valid predictor file, and its pieces for the tests that corrupt copies of it."""
    path = tmp_path_factory.mktemp("predictor") / "tiny.safetensors"
    predictor = tiny_predictor()
    save_predictor(path, predictor)
    return path, predictor


def split_file(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_file(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def edited(saved, tmp_path, edit_header=None, edit_meta=None, name="edited.safetensors"):
    """A copy of the valid file with its raw header and/or its HyperAlign header edited."""
    header, body = split_file(saved[0])
    if edit_meta is not None:
        meta = json.loads(header["__metadata__"]["hyperalign"])
        edit_meta(meta)
        header["__metadata__"]["hyperalign"] = json.dumps(meta)
    if edit_header is not None:
        edit_header(header)
    return join_file(tmp_path / name, header, body)


def tensor_names(header):
    return sorted(k for k in header if k != "__metadata__")


def assert_rejected(path, match, reader=read_meta):
    with pytest.raises(ValueError, match=match) as info:
        reader(path)
    assert str(info.value).startswith("HyperAlign: ")
    return info.value


# ---------------------------------------------------------------------------------------------- round trips


def test_round_trip_fp32(saved, tmp_path):
    path, predictor = saved
    meta = read_meta(path)
    assert meta.to_dict() == predictor.meta.to_dict()
    assert meta.format_version == FORMAT_VERSION and meta.package_version
    loaded = load_predictor(path)
    assert loaded.meta.to_dict() == predictor.meta.to_dict()
    assert [t.id for t in loaded.targets] == [t.id for t in predictor.targets]
    assert loaded.path == str(path) and loaded.family == SD15
    original, restored = predictor.hypernet.state_dict(), loaded.hypernet.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert not loaded.hypernet.training and not any(p.requires_grad for p in loaded.hypernet.parameters())
    features, progress, context = torch.randn(2, 4, 16), torch.tensor([0.1, 0.9]), torch.randn(2, 5, 32)
    with torch.no_grad():
        a, b = predictor.hypernet.eval()(features, progress, context), loaded.hypernet(features, progress, context)
    for key in a:  # not bit-equal: the loaded net needs no grad, so attention takes torch's fused fast path
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_round_trip_bf16(saved, tmp_path):
    _, predictor = saved
    path = tmp_path / "bf16.safetensors"
    save_predictor(path, predictor, dtype=torch.bfloat16)
    loaded = load_predictor(path)
    assert loaded.meta.to_dict() == read_meta(path).to_dict() == predictor.meta.to_dict()
    for key, value in predictor.hypernet.state_dict().items():
        restored = loaded.hypernet.state_dict()[key]
        assert restored.dtype == torch.bfloat16
        assert torch.equal(restored, value.to(torch.bfloat16)), key
    assert path.stat().st_size < saved[0].stat().st_size * 0.6
    # the predictor being saved keeps its own dtype
    assert next(predictor.hypernet.parameters()).dtype == torch.float32


def test_save_creates_folders_and_returns_the_path(saved, tmp_path):
    path = tmp_path / "a" / "b" / "p.safetensors"
    assert save_predictor(path, saved[1]) == str(path)
    assert read_meta(path).targets == saved[1].meta.targets


def test_header_is_plain_safetensors_metadata(saved):
    header, _ = split_file(saved[0])
    assert header["__metadata__"]["format"] == "pt"
    meta = json.loads(header["__metadata__"]["hyperalign"])
    assert meta["family"] == SD15 and meta["mode"] == "P" and meta["keysteps"] == [0.0, 0.4]
    assert meta["provenance"] == {"reward": "toy", "steps": 3}


def test_load_never_unpickles(saved, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called on a user file")

    monkeypatch.setattr(torch, "load", forbidden)
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(3)}, pickle)
    assert_rejected(pickle, "not a safetensors file", load_predictor)
    assert load_predictor(saved[0]).family == SD15


# ----------------------------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="HyperAlign: predictor file .* does not exist"):
        read_meta(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="HyperAlign: "):
        load_predictor(tmp_path)  # a folder is not a file either


@pytest.mark.parametrize(
    "keep, match",
    [
        (0, "is truncated"),
        (5, "is truncated"),
        (40, "is truncated"),  # cut inside the JSON header
        (-100, "is truncated"),  # cut inside the tensor data
        (-1, "is truncated"),
    ],
)
def test_truncated_files(saved, tmp_path, keep, match):
    data = saved[0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    assert_rejected(path, match)
    assert_rejected(path, match, load_predictor)


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "random.safetensors"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    assert_rejected(path, "not a safetensors file", load_predictor)


def test_text_file(tmp_path):
    path = tmp_path / "readme.safetensors"
    path.write_text("This is not a predictor, it is a text file saved with the wrong name.\n" * 10)
    assert_rejected(path, "not a safetensors file", load_predictor)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_renamed_safetensors(tmp_path, zip_format):
    path = tmp_path / "checkpoint.safetensors"
    torch.save({"hypernet": {"w": torch.randn(4, 4)}, "step": 10}, path, _use_new_zipfile_serialization=zip_format)
    assert_rejected(path, "not a safetensors file", load_predictor)


@pytest.mark.parametrize("metadata", [None, {"ss_network_dim": "8", "ss_network_alpha": "8"}])
def test_plain_lora_is_not_a_predictor(tmp_path, metadata):
    path = tmp_path / "lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(8, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 8),
        },
        path,
        metadata=metadata,
    )
    error = assert_rejected(path, "has no 'hyperalign' metadata, so it is not a HyperAlign predictor")
    assert "models/loras" in str(error)


def test_header_lies_about_a_shape(saved, tmp_path):
    def grow(header):
        name = tensor_names(header)[0]
        header[name]["shape"] = [d + 1 for d in header[name]["shape"]]

    assert_rejected(edited(saved, tmp_path, grow), "header lies about tensor")


def test_header_swaps_a_shape_with_consistent_offsets(saved, tmp_path):
    """Offsets agree with the declared shape, but the shape is not the hypernet's."""

    def transpose(header):
        name = next(n for n in tensor_names(header) if len(set(header[n]["shape"])) == 2)
        header[name]["shape"] = header[name]["shape"][::-1]

    assert_rejected(edited(saved, tmp_path, transpose), "has tensors of the wrong shape")


def test_wrong_family_for_the_target_list(saved, tmp_path):
    def to_flux(meta):
        meta["family"], meta["arch"] = "flux", {}

    assert_rejected(edited(saved, tmp_path, edit_meta=to_flux), "do not exist in this flux model")


def test_family_and_arch_disagree(saved, tmp_path):
    def family_only(meta):
        meta["family"] = "flux"

    assert_rejected(edited(saved, tmp_path, edit_meta=family_only), "unknown flux architecture keys")


def test_unknown_family(saved, tmp_path):
    def sd3(meta):
        meta["family"] = "sd3"

    assert_rejected(edited(saved, tmp_path, edit_meta=sd3), "unknown model family 'sd3'")


def test_sd15_file_relabelled_sdxl_is_refused(saved, tmp_path):
    """SD1.5 and SDXL are both UNets, but their architecture records differ: a relabelled header cannot pass."""

    def sdxl(meta):
        meta["family"] = "sdxl"

    assert_rejected(edited(saved, tmp_path, edit_meta=sdxl), "unknown sdxl architecture keys")


def test_sdxl_round_trip(tmp_path):
    arch = {"block_channels": [32, 64], "transformer_depths": [0, 2], "mid_depth": 1, "layers_per_block": 1}
    cfg = HypernetConfig(feature_dim=64, context_dim=48, dim=16, depth=1, heads=2, rank=2, basis=4)
    predictor = new_predictor("sdxl", cfg, dict(arch, context_dim=48), "cross_kv", mode="I")
    save_predictor(tmp_path / "xl.safetensors", predictor)
    meta = read_meta(tmp_path / "xl.safetensors")
    assert (meta.family, meta.arch["transformer_depths"], len(meta.targets)) == ("sdxl", [0, 2], 2 * 3 * 2 + 2)
    loaded = load_predictor(tmp_path / "xl.safetensors")
    assert [t.id for t in loaded.targets] == meta.targets and all(".attn2.to_" in i for i in meta.targets)


def test_unknown_format_version(saved, tmp_path):
    def newer(meta):
        meta["format_version"] = 2
        meta["brand_new_key"] = "a newer writer may add keys"

    error = assert_rejected(edited(saved, tmp_path, edit_meta=newer), "format_version 2 is not supported")
    assert "update the HyperAlign node pack" in str(error)


@pytest.mark.parametrize(
    "where, match",
    [
        ("header", r"unknown predictor header keys \['rnak'\]"),
        ("hypernet", r"unknown hypernet config keys \['rnak'\]"),
    ],
)
def test_unknown_header_keys(saved, tmp_path, where, match):
    def typo(meta):
        (meta if where == "header" else meta["hypernet"])["rnak"] = 8

    assert_rejected(edited(saved, tmp_path, edit_meta=typo), match)


def test_missing_header_key(saved, tmp_path):
    def drop(meta):
        del meta["targets_sha256"]

    assert_rejected(edited(saved, tmp_path, edit_meta=drop), "targets_sha256")


def test_malformed_tensor_entry(saved, tmp_path):
    def extra_field(header):
        header[tensor_names(header)[0]]["note"] = "x"

    assert_rejected(edited(saved, tmp_path, extra_field), "has a malformed entry for tensor")


@pytest.mark.parametrize("dtype", ["I64", "F64", "F8_E4M3", ["F32"], None])
def test_unsupported_dtype(saved, tmp_path, dtype):
    def retype(header):
        header[tensor_names(header)[0]]["dtype"] = dtype

    assert_rejected(edited(saved, tmp_path, retype), "predictors use F32, F16 or BF16")


def test_missing_tensor(saved, tmp_path):
    path, predictor = saved
    header, _ = split_file(path)
    state = dict(predictor.hypernet.state_dict())
    dropped = sorted(state)[-1]
    del state[dropped]
    short = tmp_path / "short.safetensors"
    save_file(state, short, metadata=header["__metadata__"])
    assert_rejected(short, rf"missing tensors \['{dropped}'\]")


def test_extra_tensor(saved, tmp_path):
    path, predictor = saved
    header, _ = split_file(path)
    state = dict(predictor.hypernet.state_dict())
    state["spare.weight"] = torch.zeros(2, 2)
    extra = tmp_path / "extra.safetensors"
    save_file(state, extra, metadata=header["__metadata__"])
    assert_rejected(extra, r"unexpected tensors \['spare.weight'\]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_values(saved, tmp_path, bad):
    path, predictor = saved
    header, _ = split_file(path)
    state = {k: v.clone() for k, v in predictor.hypernet.state_dict().items()}
    name = sorted(state)[3]
    state[name].view(-1)[0] = bad
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(state, poisoned, metadata=header["__metadata__"])
    read_meta(poisoned)  # the header is fine: values are checked when tensors are read
    error = assert_rejected(poisoned, "contains NaN or Inf values", load_predictor)
    assert name in str(error)


def test_absurd_dimensions(saved, tmp_path):
    def huge(header):
        header[tensor_names(header)[0]]["shape"] = [2**40, 2**40]

    assert_rejected(edited(saved, tmp_path, huge), "declares an absurd shape")


@pytest.mark.parametrize("shape", [[-1, 4], [2.5, 4], "big", [True, 2]])
def test_malformed_shapes(saved, tmp_path, shape):
    def reshape(header):
        header[tensor_names(header)[0]]["shape"] = shape

    assert_rejected(edited(saved, tmp_path, reshape), "declares an absurd shape")


@pytest.mark.parametrize("offsets", [[0], [10, 5], [-8, 0], "0-8", [0, 10**15]])
def test_bad_offsets(saved, tmp_path, offsets):
    def move(header):
        header[tensor_names(header)[0]]["data_offsets"] = offsets

    assert_rejected(edited(saved, tmp_path, move), "header lies about tensor")


def test_overlapping_offsets(saved, tmp_path):
    def overlap(header):
        by_size = {}
        for name in tensor_names(header):
            start, stop = header[name]["data_offsets"]
            by_size.setdefault(stop - start, []).append(name)
        a, b = next(names for names in by_size.values() if len(names) >= 2)[:2]
        header[b]["data_offsets"] = list(header[a]["data_offsets"])

    assert_rejected(edited(saved, tmp_path, overlap), "has overlapping tensors")


def test_trailing_bytes(saved, tmp_path):
    path = tmp_path / "appended.safetensors"
    path.write_bytes(saved[0].read_bytes() + b"\0" * 8)
    assert_rejected(path, "8 data bytes that belong to no tensor", load_predictor)


def test_gap_between_tensors(saved, tmp_path):
    def drop_first(header):  # its bytes stay in the file, now owned by nobody
        first = min(tensor_names(header), key=lambda n: header[n]["data_offsets"][0])
        del header[first]

    assert_rejected(edited(saved, tmp_path, drop_first), "belong to no tensor")


def test_file_changed_after_the_header_check(saved, tmp_path, monkeypatch):
    """A failure inside safetensors itself still reaches the user as a HyperAlign error."""
    from safetensors import SafetensorError

    def failing_load_file(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: simulated")

    monkeypatch.setattr(hio, "load_file", failing_load_file)
    assert_rejected(saved[0], "could not be read", load_predictor)


def test_target_hash_mismatch(saved, tmp_path):
    def rehash(meta):
        meta["targets_sha256"] = "0" * 64

    assert_rejected(edited(saved, tmp_path, edit_meta=rehash), "has a target hash that does not match")


def test_reordered_targets_fail_the_hash(saved, tmp_path):
    def reorder(meta):
        meta["targets"] = meta["targets"][::-1]

    assert_rejected(edited(saved, tmp_path, edit_meta=reorder), "has a target hash that does not match")


@pytest.mark.parametrize(
    "value, match",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "predictor header must be a JSON object"),
        ("[" * 100_000, "HyperAlign: "),  # nested deeper than the JSON parser's recursion limit
    ],
)
def test_hyperalign_metadata_not_a_header(saved, tmp_path, value, match):
    def replace(header):
        header["__metadata__"]["hyperalign"] = value

    assert_rejected(edited(saved, tmp_path, replace), match)


@pytest.mark.parametrize("raw", [b"[1, 2, 3]", b"\xff\xfe{}", b'{"a": ' + b"[" * 100_000])
def test_raw_header_not_a_json_object(tmp_path, raw):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert_rejected(path, "not a safetensors file")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(keysteps=[0.0, 0.5, 0.5]), "strictly increasing"),
        (lambda m: m.update(mode="Z"), "unknown mode 'Z'"),
        (lambda m: m.update(targets=[]), "non-empty list of layer names"),
        (lambda m: m["hypernet"].update(rank=0), "hypernet.rank must be an integer"),
        (lambda m: m["hypernet"].update(alpha=10**400), "HyperAlign: "),
        (lambda m: m.update(keysteps=[0, 10**400]), "HyperAlign: "),
        (lambda m: m["arch"].update(layers_per_block=10**9), "layers_per_block must be an integer"),
    ],
)
def test_invalid_header_values(saved, tmp_path, edit, match):
    assert_rejected(edited(saved, tmp_path, edit_meta=edit), match)


# --------------------------------------------------------------------------------------------- atomic save


def folder_listing(path):
    return sorted(os.listdir(path))


def test_failed_save_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"

    def broken_save_file(state, filename, metadata=None):
        with open(filename, "wb") as handle:  # a partial write, then the failure
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hio, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_predictor(path, saved[1])
    assert folder_listing(tmp_path) == []


def test_failed_save_keeps_the_existing_file(saved, tmp_path, monkeypatch):
    path = tmp_path / "existing.safetensors"
    save_predictor(path, saved[1])
    before = path.read_bytes()

    def broken_save_file(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(hio, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_predictor(path, tiny_predictor(seed=1))
    assert path.read_bytes() == before
    assert folder_listing(tmp_path) == ["existing.safetensors"]


def test_saving_nan_weights_is_refused(saved, tmp_path):
    path = tmp_path / "existing.safetensors"
    save_predictor(path, saved[1])
    before = path.read_bytes()
    diverged = tiny_predictor(seed=2)
    with torch.no_grad():
        next(diverged.hypernet.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="HyperAlign: .*NaN or Inf"):
        save_predictor(path, diverged)
    assert path.read_bytes() == before
    assert folder_listing(tmp_path) == ["existing.safetensors"]


def test_save_replaces_an_existing_file(saved, tmp_path):
    path = tmp_path / "p.safetensors"
    save_predictor(path, saved[1])
    other = tiny_predictor(seed=3)
    save_predictor(path, other)
    loaded = load_predictor(path)
    for key, value in other.hypernet.state_dict().items():
        assert torch.equal(loaded.hypernet.state_dict()[key], value)
    assert folder_listing(tmp_path) == ["p.safetensors"]
