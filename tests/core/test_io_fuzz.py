"""Property-based fuzzing of the predictor header reader: whatever the bytes, read_meta either accepts
them or raises a HyperAlign ValueError (or FileNotFoundError); never a crash, a hang or another type."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperalign import HypernetConfig, new_predictor, read_meta, save_predictor
from hyperalign.targets import SD15, UNetArch, arch_to_dict

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid tiny predictor file split into (raw header dict, HyperAlign header dict, data bytes)."""
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    arch = arch_to_dict(
        UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
    )
    cfg = HypernetConfig(feature_dim=8, context_dim=8, dim=8, depth=1, heads=1, rank=1, basis=2)
    path = folder / "valid.safetensors"
    save_predictor(path, new_predictor(SD15, cfg, arch, "cross_attn"))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return {
        "folder": folder,
        "bytes": data,
        "header": header,
        "length": length,
        "meta": json.loads(header["__metadata__"]["hyperalign"]),
        "body": data[8 + length :],
    }


def check(path):
    """The property: read_meta returns, or raises one of the two documented, HyperAlign-worded errors."""
    try:
        read_meta(path)
    except (ValueError, FileNotFoundError) as err:
        assert str(err).startswith("HyperAlign:"), repr(err)


def write(valid, raw: bytes):
    path = valid["folder"] / "fuzzed.safetensors"
    path.write_bytes(raw)
    return path


def pack(header_bytes: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_bytes)) + header_bytes + body


def test_the_valid_file_passes(valid):
    assert read_meta(write(valid, valid["bytes"])).family == SD15


@FUZZ
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes(valid, raw):
    check(write(valid, raw))


@FUZZ
@given(raw=st.binary(max_size=256), body=st.binary(max_size=64))
def test_arbitrary_header_bytes_with_a_plausible_length(valid, raw, body):
    check(write(valid, pack(raw, body)))


@FUZZ
@given(header=json_values, body=st.binary(max_size=64))
def test_arbitrary_json_headers(valid, header, body):
    check(write(valid, pack(json.dumps(header).encode(), body)))


@FUZZ
@given(meta=json_values, entries=st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_arbitrary_hyperalign_metadata(valid, meta, entries):
    header = dict(entries, __metadata__={"hyperalign": json.dumps(meta)})
    check(write(valid, pack(json.dumps(header).encode(), valid["body"])))


def paths_into(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, the value itself included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_into(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:4]):
            yield from paths_into(child, (*prefix, index))


def replaced(value, path, new, delete=False):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    if len(path) == 1 and delete:
        del copy[path[0]]
    else:
        copy[path[0]] = replaced(copy[path[0]], path[1:], new, delete)
    return copy


@FUZZ
@given(data=st.data())
def test_mutated_valid_headers(valid, data):
    """Replace or delete one node anywhere in the raw header or the HyperAlign header."""
    header = json.loads(json.dumps(valid["header"]))
    meta = valid["meta"]
    in_meta = data.draw(st.booleans(), label="mutate the hyperalign header")
    target = meta if in_meta else header
    paths = [p for p in paths_into(target) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    delete = data.draw(st.booleans(), label="delete")
    new = data.draw(json_values | st.integers(min_value=-(2**70), max_value=2**70), label="new value")
    mutated = replaced(target, path, new, delete)
    if in_meta:
        header["__metadata__"]["hyperalign"] = json.dumps(mutated)
    else:
        header = mutated
    check(write(valid, pack(json.dumps(header).encode(), valid["body"])))


@FUZZ
@given(data=st.data())
def test_byte_flips_in_a_valid_file(valid, data):
    raw = bytearray(valid["bytes"])
    limit = 8 + valid["length"] + 16  # the length field, the header, the start of the data
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        position = data.draw(st.integers(0, min(limit, len(raw)) - 1), label="position")
        raw[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.none() | st.integers(0, len(raw)), label="truncate at")
    check(write(valid, bytes(raw[:cut] if cut is not None else raw)))
