"""Regression tests for issue 12 (hardening), one per row of the reliability audit
(/work/shared/audits/reliability-2026-11-30.md) that was a crash, hang, unclear error, silent
wrong result or data loss. Each docstring names the row: "§1 #2" is section 1, row 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from gemma_mlx import CheckpointError, load
from gemma_mlx.cli.app import app
from gemma_mlx.footprint import footprint
from gemma_mlx.safetensors_file import read_header, shard_files

runner = CliRunner()


@contextmanager
def within(seconds: int):
    """Fail instead of hanging forever (a FIFO opened for reading blocks until a writer comes)."""

    def timeout(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def ckpt(causal, tmp_path):
    """A writable copy of the tiny text checkpoint and its tensors."""
    out = tmp_path / "ckpt"
    shutil.copytree(causal[0], out)
    return out, load_file(str(out / "model.safetensors"))


def refused_everywhere(path: Path, match: str) -> None:
    """The loader, the memory guard / `info` (footprint) and the CLI all give the same
    CheckpointError; the CLI's `main` turns a ValueError into one red line."""
    with within(20):
        with pytest.raises(CheckpointError, match=match):
            load(path)
        with pytest.raises(CheckpointError, match=match):
            footprint(path)
        result = runner.invoke(app, ["info", "--model", str(path)])
        assert isinstance(result.exception, CheckpointError), result.output
        assert result.exception.args[0].startswith(str(path))


# ---------------------------------------------------------------------------------------------
# 1. One checked safetensors reader


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"not a safetensors file \(only 0 bytes\)"),  # §1 #3
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)), "claims .* header bytes"),  # #2
        (struct.pack("<Q", 2**40) + b"{}", "claims 1099511627776 header bytes"),  # §1 #4
        (struct.pack("<Q", 2**63 - 1) + b"{}", "claims 9223372036854775807 header bytes"),  # §1 #5
        (struct.pack("<Q", 2**64 - 1) + b"{}", "claims"),
        (struct.pack("<Q", 9) + b"{not json", "not valid JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_header_is_named_by_loader_footprint_and_cli(ckpt, content, match):
    """§1 #2 (random bytes), #3 (empty), #4 (length 2^40), #5 (2^63-1): `generate`/`info` printed
    struct.error / OverflowError / MemoryError tracebacks from footprint's unchecked read."""
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(content)
    refused_everywhere(path, "model.safetensors: .*" + match)


def test_offsets_past_end_of_file_refused_before_the_memory_guard(ckpt):
    """§1 #6: data_offsets 1 TB past EOF gave a bogus 'needs about 1000 GB' warning first."""
    path, tensors = ckpt
    f = path / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**12]
    body = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    refused_everywhere(path, "truncated: tensor")


def test_offsets_must_match_shape_and_dtype(tmp_path):
    """§1 #6 (class): offsets inside the file but not the size shape x dtype implies."""
    f = tmp_path / "x.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(
        CheckpointError, match=r"x.safetensors: .*'a'.* span 8 bytes, but F32 \(4,\) needs 16"
    ):
        read_header(f)
    header = json.dumps({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="unknown dtype 'Q4'"):
        read_header(f)


def test_fifo_named_safetensors_is_refused_without_hanging(ckpt):
    """§1 #60: a FIFO named model.safetensors hung `load` and the CLI forever."""
    path, _ = ckpt
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    refused_everywhere(path, "model.safetensors: is a FIFO")


def test_fifo_named_by_an_index_is_refused_without_hanging(ckpt):
    """§1 #60 / security note: an index entry pointing at a FIFO hung the loader too."""
    path, _ = ckpt
    os.mkfifo(path / "pipe.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "pipe.safetensors"}}))
    refused_everywhere(path, "pipe.safetensors: is a FIFO")


def test_device_and_directory_named_safetensors_are_refused(ckpt):
    """§1 #59: model.safetensors -> /dev/zero gave `error: Expecting value ...` naming no file."""
    path, _ = ckpt
    f = path / "model.safetensors"
    f.unlink()
    f.symlink_to("/dev/zero")
    refused_everywhere(path, "model.safetensors: is a device")
    f.unlink()
    f.mkdir()
    refused_everywhere(path, "model.safetensors: is a directory")


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "/etc/model.safetensors", "a/../../x"])
def test_index_entries_stay_inside_the_checkpoint(ckpt, tmp_path, entry):
    """§1 #9 and the security note: `../` and absolute index entries were followed out of the
    checkpoint folder (and a missing one was reported by its basename only)."""
    path, _ = ckpt
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(path / "model.safetensors", outside / "model.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": entry}}))
    refused_everywhere(path, "index.json: shard .* lies outside the checkpoint folder")


def test_index_entry_through_a_symlinked_folder_is_refused(ckpt, tmp_path):
    """§1 #9 (symlinks resolved): `sub/` links out of the checkpoint folder."""
    path, _ = ckpt
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(path / "model.safetensors", outside / "model.safetensors")
    (path / "sub").symlink_to(outside)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "sub/model.safetensors"}})
    )
    refused_everywhere(path, "lies outside the checkpoint folder")


def test_index_may_name_a_shard_that_is_a_symlink(ckpt, tmp_path):
    """The Hub cache links snapshot files to blobs outside the folder: still loadable."""
    path, _ = ckpt
    blob = tmp_path / "blob"
    shutil.move(path / "model.safetensors", blob)
    (path / "model.safetensors").symlink_to(blob)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    assert shard_files(path) == [path / "model.safetensors"]
    assert (
        footprint(path).weight_bytes
        == blob.stat().st_size - 8 - struct.unpack("<Q", blob.read_bytes()[:8])[0]
    )


def test_missing_shard_named_with_its_path(ckpt):
    """§1 #9: a missing shard was reported by its basename only."""
    path, _ = ckpt
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "sub/model-2.safetensors"}})
    )
    refused_everywhere(path, "names shard.* that do not exist: sub/model-2.safetensors")
