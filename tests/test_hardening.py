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
from safetensors.numpy import load_file, save_file
from tiny import UNIFIED_CONFIG, save_checkpoint, save_tokenizer
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


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny text-only float32 checkpoint (random MLX weights, no tokenizer; no torch needed)."""
    config = {**UNIFIED_CONFIG["text_config"], "dtype": "float32"}
    return save_checkpoint(tmp_path_factory.mktemp("text") / "ckpt", config, tokenizer=False)


@pytest.fixture
def ckpt(source, tmp_path):
    """A writable copy of the tiny text checkpoint and its tensors."""
    out = tmp_path / "ckpt"
    shutil.copytree(source, out)
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


# ---------------------------------------------------------------------------------------------
# 2. Weights: dtypes always, finiteness on request


def test_integer_projection_weights_are_refused_by_name(ckpt):
    """§1 #11: int32 q_proj weights loaded and generated garbage text."""
    path, tensors = ckpt
    name = "language_model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"wrong dtype: language_model.layers.0.self_attn.q_proj.weight is"
    ):
        load(path)


def test_bool_norm_weights_are_refused_by_name(ckpt):
    """§1 #13: bool norm weights loaded and generated garbage text."""
    path, tensors = ckpt
    tensors["language_model.norm.weight"] = tensors["language_model.norm.weight"] > 0
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"language_model.norm.weight is mlx.core.bool"):
        load(path)


def test_check_finite_names_nan_weights(ckpt):
    """§1 #14: NaN q_proj generated `<pad><pad>...` silently; `check_finite=True` names it."""
    path, tensors = ckpt
    name = "language_model.layers.1.self_attn.q_proj.weight"
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(path / "model.safetensors"))
    load(path)  # off by default: reading every weight up front costs a full pass
    with pytest.raises(
        CheckpointError, match=r"non-finite .* language_model.layers.1.self_attn.q_proj.weight"
    ):
        load(path, check_finite=True)


def test_quantized_checkpoint_passes_the_dtype_check(source, tmp_path):
    """MLX's own quantized layout (uint32 weights, float scales/biases; uint8 fp scales) loads."""
    from gemma_mlx.convert import convert

    for mode in ("affine", "mxfp4"):
        out = tmp_path / mode
        convert(source, out, mode=mode, progress=False)
        load(out, check_finite=True)


# ---------------------------------------------------------------------------------------------
# 2. Configs: every field typed and ranged, each failure a ConfigError naming field and value

RELEASED_12B = json.loads((Path(__file__).parent / "data" / "gemma-4-12b-config.json").read_text())
GEMMA3 = dict(
    model_type="gemma3_text",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
)


def text(**changes):
    return lambda c: c["text_config"].update(changes)


@pytest.mark.parametrize(
    "edit, message",
    [
        (text(hidden_size=-128), "'text_config.hidden_size' is -128"),  # §1 #24 (math domain error)
        (text(hidden_size=0), "'text_config.hidden_size' is 0"),  # §1 #25 (ZeroDivisionError)
        (text(num_hidden_layers=0, layer_types=[]), "'text_config.num_hidden_layers' is 0"),  # §1 #27
        (text(num_attention_heads=0), "'text_config.num_attention_heads' is 0"),  # §1 #28
        (text(num_key_value_heads=0), "'text_config.num_key_value_heads' is 0"),  # §1 #29
        (text(head_dim=-32), "'text_config.head_dim' is -32"),  # §1 #30
        (text(head_dim=33), "'text_config.head_dim' is 33, expected an even number"),
        (text(vocab_size=10**12), "'text_config.vocab_size' is 1000000000000"),  # §1 #32
        (text(vocab_size=2**31), "'text_config.vocab_size' is 2147483648"),  # §1 #32
        (text(hidden_size="abc"), "'text_config.hidden_size' is 'abc'"),  # §1 #33 (no field named)
        (text(hidden_size=True), "'text_config.hidden_size' is True"),  # bools are not ints
        (text(num_hidden_layers=8.7), "'text_config.num_hidden_layers' is 8.7"),  # §1 #34 (truncated)
        (text(sliding_window=0), "'text_config.sliding_window' is 0"),  # §1 #35 (text '')
        (text(sliding_window=-5), "'text_config.sliding_window' is -5"),  # §1 #36
        (text(rms_norm_eps=-1), "'text_config.rms_norm_eps' is -1"),  # §1 #37 (<pad>)
        (text(rms_norm_eps=float("nan")), "'text_config.rms_norm_eps' is nan"),
        (text(max_position_embeddings=0), "'text_config.max_position_embeddings' is 0"),  # §1 #38
        (text(final_logit_softcapping="x"), "'text_config.final_logit_softcapping' is 'x'"),  # §1 #39
        (text(bos_token_id=10**6), "'text_config.bos_token_id' is 1000000"),
        (text(eos_token_id=["x"]), "'text_config.eos_token_id' is 'x'"),
        (text(global_head_dim=0), "'text_config.global_head_dim' is 0"),
        (text(layer_types="sliding"), "'text_config.layer_types' is 'sliding'"),
        (text(rope_parameters=["x"]), "'text_config.rope_parameters' is ['x']"),
        (
            lambda c: c["text_config"]["rope_parameters"]["full_attention"].update(partial_rotary_factor=2),
            "'text_config.rope_parameters.full_attention.partial_rotary_factor' is 2",
        ),
        (
            lambda c: c["text_config"]["rope_parameters"]["sliding_attention"].update(rope_theta=-1),
            "'text_config.rope_parameters.sliding_attention.rope_theta' is -1",
        ),
        (lambda c: c.update(vision_config=[]), "'vision_config' is []"),  # §1 #42 (AttributeError)
        (lambda c: c["vision_config"].update(patch_size="big"), "'vision_config.patch_size' is 'big'"),  # #43
        (lambda c: c["vision_config"].update(rms_norm_eps=0), "'vision_config.rms_norm_eps' is 0"),
        (lambda c: c["audio_config"].update(audio_embed_dim=-1), "'audio_config.audio_embed_dim' is -1"),
        (lambda c: c.update(image_token_id=-3), "'image_token_id' is -3"),
        (lambda c: c.update(quantization="yes"), "'quantization' is 'yes'"),  # §1 #54 (AttributeError)
        (lambda c: c.update(quantization={"bits": 7, "group_size": 64}), "'quantization.bits' is 7"),  # #53
        (lambda c: c.update(quantization={"bits": 4, "group_size": 0}), "'quantization.group_size' is 0"),
        (lambda c: c.update(quantization={"bits": 4, "mode": "nope"}), "'quantization.mode' is 'nope'"),
        (
            lambda c: c.update(quantization={"bits": 4, "mode": "mxfp4", "group_size": 64}),
            "group_size' is 64",
        ),
        (
            lambda c: c.update(quantization={"bits": 4, "group_size": 64, "language_model.x": {"bits": 9}}),
            "'quantization.language_model.x.bits' is 9",
        ),
        (
            lambda c: c.update(quantization={"bits": 4, "group_size": 64, "language_model.x": "float"}),
            "'quantization.language_model.x' is 'float'",
        ),
    ],
)
def test_config_values_are_checked_with_field_and_value(edit, message):
    """§1 #24-#43, #53, #54: tracebacks (ZeroDivisionError, IndexError, OverflowError,
    AttributeError, TypeError), unnamed errors and silent wrong runs from bad config values."""
    from gemma_mlx.config import ConfigError, parse_config

    cfg = json.loads(json.dumps(RELEASED_12B))
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert message in str(e.value)


def test_linear_rope_without_factor_is_a_config_error():
    """§1 #40: linear RoPE without `factor` raised KeyError: 'factor'."""
    from gemma_mlx.config import ConfigError, parse_config

    cfg = dict(GEMMA3, rope_scaling={"rope_type": "linear"})
    with pytest.raises(ConfigError, match=r"'text_config.rope_parameters.full_attention.factor' is missing"):
        parse_config(cfg)
    assert (
        parse_config(dict(GEMMA3, rope_scaling={"rope_type": "linear", "factor": 8}))
        .text.layers[5]
        .rope.scale
        == 1 / 8
    )


def test_bad_config_value_through_load_and_cli(ckpt):
    """§1 #25: `hidden_size: 0` printed a ZeroDivisionError traceback from the CLI."""
    from gemma_mlx.config import ConfigError

    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: field 'text_config.hidden_size' is 0"):
        load(path)
    result = runner.invoke(app, ["info", "--model", str(path)])
    assert isinstance(result.exception, ConfigError)


# ---------------------------------------------------------------------------------------------
# 3. Converter output safe under every fault


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """§2 #8: SIGTERM (timeout, docker stop, systemd) left the partial output behind."""
    from gemma_mlx.convert.writer import Terminated, atomic_directory

    with pytest.raises(Terminated), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_sigterm_during_a_cli_conversion_leaves_nothing(source, tmp_path):
    """§2 #8, end to end: a real `gemma-mlx convert` process terminated mid-way."""
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from gemma_mlx.convert import convert\n"
        "def slow(name, n):\n"
        "    print('tensor', flush=True); time.sleep(0.2)\n"
        "convert(sys.argv[1], sys.argv[2], progress=slow)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(source), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"tensor\n"
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    proc.terminate()
    proc.wait(timeout=60)
    time.sleep(0.1)
    assert proc.returncode != 0 and b"Terminated" in proc.stderr.read()
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_partial_of_a_sigkilled_conversion_is_removed_by_the_next_run(source, tmp_path):
    """§2 #6 end to end: a conversion killed with SIGKILL (no cleanup can run) leaves its
    partial; the next conversion into the same OUT removes it and succeeds."""
    import subprocess
    import sys

    from gemma_mlx.convert import convert

    script = (
        "import sys, time\n"
        "from gemma_mlx.convert import convert\n"
        "def slow(name, n):\n"
        "    print('tensor', flush=True); time.sleep(0.2)\n"
        "convert(sys.argv[1], sys.argv[2], progress=slow)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(source), str(tmp_path / "out")], stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"tensor\n"
    proc.kill()
    proc.wait(timeout=60)
    assert [p.name for p in tmp_path.iterdir()] == [f".out.partial-{proc.pid}"]
    convert(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == []


def test_stale_partial_of_a_killed_run_is_removed(source, tmp_path):
    """§2 #6, #7: a SIGKILLed run's `.OUT.partial-PID` stayed forever (reruns never removed it)."""
    from gemma_mlx.convert import convert

    stale = tmp_path / f".out.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
    convert(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == []


def test_partial_with_a_live_unlocked_owner_is_reported_not_removed(source, tmp_path):
    """§2 #6 (PID reuse): a partial whose PID belongs to a live process that holds no lock is
    reported and left alone (it may not be ours to delete)."""
    from gemma_mlx.convert import convert

    stale = tmp_path / f".out.partial-{os.getppid()}"
    stale.mkdir()
    with pytest.warns(UserWarning, match=r"\.out\.partial-\d+: a partial output of an earlier conversion"):
        convert(source, tmp_path / "out", progress=False)
    assert stale.is_dir()


def test_concurrent_conversion_into_the_same_out_is_refused(source, tmp_path):
    """§2 #18: two converts into one new OUT both exited 0, the second silently replacing the
    first. A live conversion holds a lock on its partial; a second one without --force fails."""
    import subprocess
    import sys

    from gemma_mlx.convert import convert
    from gemma_mlx.convert.writer import OutputExistsError

    partial = tmp_path / ".out.partial-1"
    partial.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)\n",
            str(partial),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(OutputExistsError, match=r"another conversion \(PID 1\) is writing it now"):
            convert(source, tmp_path / "out", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out").exists()


def test_out_that_appears_during_the_conversion_is_not_replaced(source, tmp_path):
    """§2 #18: the final swap re-checks OUT; the run that finishes second fails without --force."""
    from gemma_mlx.convert import convert
    from gemma_mlx.convert.writer import OutputExistsError

    out = tmp_path / "out"

    def other_run_finishes_first(name, nbytes):
        if not out.exists():
            out.mkdir()
            (out / "config.json").write_text("first")

    with pytest.raises(OutputExistsError, match="appeared while converting"):
        convert(source, out, progress=other_run_finishes_first)
    assert (out / "config.json").read_text() == "first" and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_source_is_refused(source, tmp_path, where):
    """§2 #15: `convert SRC SRC --force` replaced the float source by its quantized output; OUT
    inside SRC, or SRC inside OUT with --force, are refused as well."""
    from gemma_mlx.convert import convert

    src = tmp_path / "parent" / "src"
    shutil.copytree(source, src)
    out = {"same": src, "inside": src / "sub", "parent": src.parent}[where]
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(CheckpointError, match="source checkpoint"):
        convert(src, out, force=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def test_force_over_a_file_leaves_nothing_behind(source, tmp_path):
    """§2 #4: --force over an existing file left a hidden `.OUT.old-PID` file."""
    from gemma_mlx.convert import convert

    (tmp_path / "out").write_text("a file")
    convert(source, tmp_path / "out", force=True, progress=False)
    assert (tmp_path / "out" / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("[write] Unable to write 1200055 bytes")]
)
def test_disk_full_part_way_leaves_nothing_and_says_how_much(source, tmp_path, monkeypatch, error):
    """§2 #9, #10: a full disk gave `[write] Unable to write N bytes` (no path, no size)."""
    import errno

    import mlx.core as mx

    from gemma_mlx.convert import convert, estimate, writer

    calls = []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise error
        mx.save_safetensors(path, arrays, metadata=metadata)

    monkeypatch.setattr(writer, "mx", type("mx", (), {"save_safetensors": staticmethod(save)}))
    with pytest.raises(OSError) as e:
        convert(source, tmp_path / "out", shard_bytes=100_000, progress=False)
    needed = estimate(source).weight_bytes
    assert e.value.errno == errno.ENOSPC
    assert f"the output needs about {needed / 1e6:.3f} MB" in str(e.value) and "out" in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_too_little_free_space_is_refused_before_any_work(source, tmp_path, monkeypatch):
    """§2 #9: the space needed is known before writing; refuse at once when it is not there."""
    from gemma_mlx.convert import convert, writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    calls = []
    with pytest.raises(OSError, match=r"out: the output needs about 0\.\d+ MB, but only 0\.001 MB is free"):
        convert(source, tmp_path / "out", progress=lambda name, n: calls.append(name))
    assert calls == [] and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 7. `info --json` numbers; convert's report, info and the estimate agree


def test_info_json_prints_numbers(source):
    """Issue 12 item 10: `info --json` printed display strings ("1.07 GB") instead of numbers."""
    from gemma_mlx.footprint import footprint

    result = runner.invoke(app, ["info", "--model", str(source), "--json", "--context", "100"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    fp = footprint(source, 100)
    assert (
        data["weight_bytes"]
        == fp.weight_bytes
        == sum(a.nbytes for a in load_file(str(source / "model.safetensors")).values())
    )
    assert (data["layers"], data["sliding_layers"], data["context"]) == (8, 6, 100)
    assert data["kv_cache_bytes"] == fp.kv_bytes and data["quantization"] is None
    numbers = {k: v for k, v in data.items() if k not in ("path", "model_type", "quantization", "kv_bits")}
    assert all(isinstance(v, int | float) for v in numbers.values()), data


@pytest.mark.parametrize("args", [[], ["--dtype", "bfloat16"], ["--bits", "8", "--group-size", "32"]])
def test_convert_report_info_and_estimate_agree_on_bytes_per_token(source, tmp_path, args):
    """Issue 12 item 10: `convert` reported 150.89 MB per token, `info` 167.75 MB for the same
    output (float32 scales written where bfloat16 was assumed). One rule (`decode_bytes`) now
    serves the report, `info` and `estimate`, which defaults to the source's dtype as convert does."""
    from gemma_mlx.cli.app import human_bytes
    from gemma_mlx.convert import convert, estimate
    from gemma_mlx.footprint import footprint

    out = tmp_path / "out"
    bits = int(args[args.index("--bits") + 1]) if "--bits" in args else 4
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args else None
    report = convert(
        source, out, bits=bits, group_size=32 if bits == 8 else None, dtype=dtype, progress=False
    )
    fp = footprint(out)
    predicted = estimate(source, bits=bits, group_size=32 if bits == 8 else None, dtype=dtype)
    assert report.bytes_per_token == fp.bytes_per_token == predicted.bytes_per_token
    assert report.weight_bytes == fp.weight_bytes == predicted.weight_bytes
    assert report.bits_per_weight == pytest.approx(fp.bits_per_weight)
    info = runner.invoke(app, ["info", "--model", str(out)])
    assert human_bytes(report.bytes_per_token) in info.stdout


# ---------------------------------------------------------------------------------------------
# 6. Property-based: only the documented error types come out, quickly

from hypothesis_or_skip import HealthCheck, given, settings, st  # noqa: E402

FUZZ = settings(max_examples=500, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _valid_safetensors() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + bytes(range(32))


VALID_SAFETENSORS = _valid_safetensors()


def _read(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "fuzz.safetensors"
    f.write_bytes(content)
    try:
        header = read_header(f)
    except CheckpointError as e:
        assert str(e).startswith(str(f))
        return
    size = len(content) - 8 - struct.unpack("<Q", content[:8])[0]
    for t in header.values():  # anything accepted is consistent with the file
        assert 0 <= t.start <= t.end <= size


@settings(FUZZ, max_examples=800)
@given(content=st.binary(max_size=256))
def test_fuzz_random_bytes_at_the_safetensors_reader(tmp_path, content):
    """Issue 12 "done when": random bytes give a CheckpointError naming the file, or a header
    whose offsets lie inside the file."""
    _read(tmp_path, content)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID_SAFETENSORS) - 1), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, len(VALID_SAFETENSORS)),
)
def test_fuzz_byte_mutations_of_a_valid_safetensors_file(tmp_path, edits, cut):
    """Random byte replacements, insertions, deletions and truncation of a valid file."""
    data = bytearray(VALID_SAFETENSORS)
    for pos, byte, op in edits:
        pos = min(pos, len(data) - 1)
        if op == "r":
            data[pos] = byte
        elif op == "i":
            data.insert(pos, byte)
        elif len(data) > 1:
            del data[pos]
    _read(tmp_path, bytes(data[: max(cut, len(data) // 2)]))


@FUZZ
@given(
    tensor=st.sampled_from(["a", "b", "__metadata__", "new"]),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "other", None]),
    value=JSON_VALUES,
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzz_json_mutations_of_a_valid_safetensors_header(tmp_path, tensor, key, value, length):
    """Each field of a valid header replaced by random JSON (or the entry itself), and the
    length prefix replaced by any 64-bit number."""
    header = json.loads(VALID_SAFETENSORS[8 : 8 + struct.unpack("<Q", VALID_SAFETENSORS[:8])[0]])
    if key is None or not isinstance(header.get(tensor), dict):
        header[tensor] = value
    else:
        header[tensor][key] = value
    body = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    _read(tmp_path, prefix + body + bytes(64))


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested config dict (lists indexed too)."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


TINY_TEXT = dict(
    GEMMA3, model_type="gemma4_unified_text", layer_types=["sliding_attention"] * 5 + ["full_attention"]
)
CONFIGS = [RELEASED_12B, GEMMA3, TINY_TEXT]
CONFIG_PATHS = [(i, p) for i, c in enumerate(CONFIGS) for p in _paths(c)]


@settings(max_examples=1000, deadline=2000)
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(CONFIG_PATHS), JSON_VALUES | st.just(...)),  # ... = delete the key
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_mutations_of_a_valid_config(edits):
    """Issue 12 "done when": random mutations of valid configs (any field replaced by random
    JSON, or deleted) give a parsed config or a ConfigError naming a field, nothing else."""
    from gemma_mlx.config import ConfigError, parse_config

    which = edits[0][0][0]
    cfg = json.loads(json.dumps(CONFIGS[which]))
    for (i, path), value in edits:
        if i != which:
            continue
        parent = cfg
        try:
            for k in path[:-1]:
                parent = parent[k]
            if value is ...:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier edit changed the structure
            continue
    try:
        parse_config(cfg)
    except ConfigError as e:
        assert str(e).startswith("config.json: ")


# ---------------------------------------------------------------------------------------------
# 4. Media


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from gemma_mlx.processor import Processor

    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(path)
    return Processor.from_dir(path)


def wav_bytes(seconds: float, rate: int = 16_000) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    wave = (np.random.default_rng(0).random(int(seconds * rate)) * 0.1).astype(np.float32)
    sf.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 16, 3), (16, 0), (0,)])
def test_empty_image_array_is_a_media_error(shape):
    """§3 'ndarray shape (0,0,3)': ZeroDivisionError (API)."""
    from gemma_mlx.media import MediaError, preprocess_image

    with pytest.raises(MediaError, match=r"<ndarray>: the image array is empty"):
        preprocess_image(np.zeros(shape, np.uint8))


def test_empty_audio_array_is_a_media_error():
    """§3 audio arrays (class of the empty image array): an empty waveform is named."""
    from gemma_mlx.media import MediaError, load_audio

    with pytest.raises(MediaError, match=r"<ndarray>: the audio is empty"):
        load_audio(np.zeros((0, 2), np.float32), 16_000)


@pytest.mark.parametrize("part", [{"type": "image"}, {"type": "image", "image": None}, {"type": "audio"}])
def test_media_part_without_its_media_is_named(processor, part):
    """§3 'image None (chat part {"type":"image"} without a path)': TypeError, not MediaError."""
    from gemma_mlx.media import MediaError

    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}]
    with pytest.raises(MediaError, match=rf"message 0, part 1: an {part['type']} part without its"):
        processor.prepare(messages)


def test_fifo_as_image_or_audio_is_refused_without_hanging(tmp_path):
    """§1 #60's class for media: an image path that is a FIFO blocked in read_bytes()."""
    from gemma_mlx.media import MediaError, load_audio, load_image

    os.mkfifo(tmp_path / "pipe.png")
    with within(20):
        with pytest.raises(MediaError, match=r"pipe.png: is a FIFO"):
            load_image(tmp_path / "pipe.png")
        with pytest.raises(MediaError, match=r"pipe.png: cannot read the file"):
            load_audio(tmp_path / "pipe.png")


def test_truncated_wav_is_a_media_error(tmp_path):
    """§3 'truncated WAV (a third of the file)': decoded the part that was there, no warning."""
    from gemma_mlx.media import MediaError, load_audio

    data = wav_bytes(3.0)
    f = tmp_path / "cut.wav"
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError, match=r"cut.wav: truncated WAV file: its header announces 96,000 bytes"):
        load_audio(f)
    f.write_bytes(data)
    assert len(load_audio(f)) == 48_000  # the whole file still loads


def test_audio_longer_than_the_context_is_refused_before_the_prefill(checkpoint, tmp_path):
    """§3 '5-minute WAV': ~7,500 audio tokens went into one multi-minute prefill. Audio that
    cannot fit the room left in the context is refused while preparing, with its token count."""
    from tiny import rewrite_config

    from gemma_mlx import generate
    from gemma_mlx.media import MediaError, audio_token_count

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    rewrite_config(path, lambda c: c["text_config"].update(max_position_embeddings=256))
    model, processor = load(path)
    f = tmp_path / "long.wav"
    f.write_bytes(wav_bytes(40.0))  # 1,000 frames in two 30 s blocks
    assert audio_token_count(40 * 16_000) == 1000 + 4
    with pytest.raises(
        MediaError, match=r"long.wav: 40.0 s of audio needs 1,004 tokens .* room for 256"
    ) as e:
        generate(model, processor, "<|audio|>Transcribe.", audio=[f], max_tokens=2)
    assert any(entry.name == "prepare" for entry in e.traceback)  # refused before any model call


# ---------------------------------------------------------------------------------------------
# 5. GGUF import: tokenizer metadata and sizes


def small_gguf(
    path: Path, *, sizes: dict | None = None, tokens="default", scores="default", types="default", ids=None
):
    """A metadata-only gemma3 GGUF (no tensors) with the tokenizer fields as given (None: left out)."""
    gguf = pytest.importorskip("gguf")

    w = gguf.GGUFWriter(str(path), "gemma3")
    base = {
        "context_length": 128,
        "embedding_length": 64,
        "block_count": 6,
        "feed_forward_length": 128,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.key_length": 32,
        "attention.value_length": 32,
    }
    for key, value in {**base, **(sizes or {})}.items():
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    w.add_tokenizer_model("llama")
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"]
    if tokens is not None:
        w.add_token_list(vocab if tokens == "default" else tokens)
    if scores is not None:
        w.add_token_scores([0.0] * len(vocab) if scores == "default" else scores)
    if types is not None:
        w.add_token_types([3, 3, 3, 2, 1, 1] if types == "default" else types)
    for key, value in (ids or {"bos": 2, "eos": 1}).items():
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=None), "'tokenizer.ggml.tokens' is missing"),  # §6 KeyError
        (dict(types=None), "'tokenizer.ggml.token_type' is missing"),  # §6 TypeError
        (dict(scores=[0.0, 0.0]), "'tokenizer.ggml.scores' has 2 entries for 6 tokens"),  # §6 bare zip()
        (dict(types=[1, 1, 1]), "'tokenizer.ggml.token_type' has 3 entries for 6 tokens"),
        (dict(types=[3, 3, 3, 2, 1, 9]), "'tokenizer.ggml.token_type' has unknown types \\[9\\]"),
        (
            dict(ids={"bos": 999, "eos": 1}),
            "'tokenizer.ggml.bos_token_id' is 999, outside the vocabulary of 6",
        ),  # §6 IndexError
        (dict(ids={"bos": 2, "eos": 1, "unknown": 6}), "'tokenizer.ggml.unknown_token_id' is 6"),
        (
            dict(sizes={"embedding_length": 0}),
            "'gemma3.embedding_length' is 0, expected a positive integer",
        ),  # §6
        (dict(sizes={"block_count": 0}), "'gemma3.block_count' is 0"),
        (dict(sizes={"attention.head_count": 0}), "'gemma3.attention.head_count' is 0"),
        (dict(sizes={"context_length": 0}), "'gemma3.context_length' is 0"),
    ],
)
def test_gguf_metadata_errors_name_the_key(tmp_path, kwargs, match):
    """§6: missing tokens (KeyError), missing token types (TypeError), bos_token_id 999
    (IndexError), too few scores (a bare zip() error naming no file) and embedding_length 0
    (imported, then ZeroDivisionError at load) are now GGUFErrors naming the file and key."""
    from gemma_mlx.convert.gguf import GGUFError, import_gguf

    f = small_gguf(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(GGUFError, match=match) as e:
        import_gguf(f, tmp_path / "out")
    assert str(e.value).startswith(str(f)) and not (tmp_path / "out").exists()
