"""Snapshots on disk: round trips across backends, and refusals of foreign or corrupted files."""

import io
import json
import zipfile

import numpy as np
import pytest
from helpers import BACKENDS, assert_same_bits, fill_random, small_config, snapshot

from mamba_cache.snapshot import SnapshotError, load_snapshot, save_snapshot


@pytest.mark.parametrize("reader", ["numpy", "numba"])
def test_save_in_one_backend_load_in_either(backend, reader, rng, tmp_path):
    source = BACKENDS[backend](small_config())
    fill_random([source], rng)
    path = tmp_path / "prompt.npz"
    source.save_slot(path, 2)
    want = snapshot(source)
    target = BACKENDS[reader](small_config(max_batch_size=3, max_intermediate_seq_len=0))  # batch/MTP may differ
    fill_random([target], rng)
    before = snapshot(target)
    target.load_slot(path, 1)
    after = snapshot(target)
    for kind in ("recurrent", "conv"):
        assert after[kind][:, 1].tobytes() == want[kind][:, 2].tobytes()
        assert after[kind][:, [0, 2]].tobytes() == before[kind][:, [0, 2]].tobytes()


def test_file_from_another_config_is_refused(backend, rng, tmp_path):
    path = tmp_path / "other.npz"
    BACKENDS["numpy"](small_config(conv_kernel=4)).save_slot(path, 0)
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    with pytest.raises(SnapshotError, match="conv_kernel is 4 there, 3 here"):
        cache.load_slot(path, 0)
    assert_same_bits(snapshot(cache), before, "refused snapshot")


def test_dtype_mismatch_is_refused(tmp_path):
    path = tmp_path / "fp32.npz"
    BACKENDS["numpy"](small_config(conv_state_dtype="float32")).save_slot(path, 0)
    with pytest.raises(SnapshotError, match="conv_state_dtype is 'float32' there, 'float16' here"):
        load_snapshot(path, small_config())


def test_corrupted_file_is_refused(backend, rng, tmp_path):
    source = BACKENDS["numpy"](small_config())
    fill_random([source], rng)
    buffer = io.BytesIO()
    source.save_slot(buffer, 0)
    # flip one byte of one state array inside the (uncompressed) zip
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    payload = bytearray(entries["conv_1.npy"])
    payload[-1] ^= 0x01
    entries["conv_1.npy"] = bytes(payload)
    corrupted = tmp_path / "corrupted.npz"
    with zipfile.ZipFile(corrupted, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    cache = BACKENDS[backend](small_config())
    before = snapshot(cache)
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        cache.load_slot(corrupted, 0)
    assert_same_bits(snapshot(cache), before, "corrupted")


def test_garbage_and_wrong_format_are_refused(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(SnapshotError, match="not a readable mamba_cache snapshot"):
        load_snapshot(garbage, small_config())
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array(json.dumps({"format": "something-else", "version": 1, "layers": 0})))
    with pytest.raises(SnapshotError, match="not a mamba_cache.snapshot version 1 file"):
        load_snapshot(other, small_config())


def test_save_checks_the_arrays(tmp_path):
    config = small_config()
    with pytest.raises(ValueError, match="a snapshot needs 3 recurrent and 3 conv arrays"):
        save_snapshot(tmp_path / "x.npz", config, [], [])
