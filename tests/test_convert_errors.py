"""Every malformed input gets an error that names what is wrong, and leaves nothing behind.

Each case builds a small source, converts it and checks the exception (or, through
``checkpoints_convert.cli.main``, the exit code and the one line on stderr) and its message,
then that nothing was written: no destination, no temporary directory beside it, an old
destination intact. Hostile sources (paths out of the checkpoint, symlinks, FIFOs) are copies of
tests/data/nld-tiny damaged in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from nld_jax.config import ConfigError, NLDConfig, RopeConfig, config_to_hf

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
from checkpoints_convert.cli import main
from checkpoints_convert.streaming import NonFiniteError
from checkpoints_convert.testing import hf_tensors, write_hf_checkpoint
from checkpoints_convert.verify import VerificationError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "nld-tiny"
CFG = NLDConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                rope=RopeConfig(theta=1e4, factor=2.0, original_max_position_embeddings=32), mask_token_id=3)
KEY = "encoder.layers.1.mlp.up_proj.weight"


def _params():
    import jax
    import jax.numpy as jnp

    from nld_jax.params import init_params

    return init_params(CFG, jax.random.PRNGKey(0), jnp.bfloat16)


@pytest.fixture(scope="module")
def good_tensors():
    return hf_tensors(CFG, _params())


def _source(tmp_path, tensors, **kw) -> str:
    return write_hf_checkpoint(str(tmp_path / "src"), CFG, None, tensors=tensors, **kw)


def _assert_empty(out_dir):
    assert os.listdir(out_dir) == [], os.listdir(out_dir)


def _leftovers(parent) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".nld-convert-" in n)


def _assert_nothing_written(dst):
    """No destination and no temporary (``.DST.nld-convert-*``) beside where it would be."""
    assert not os.path.lexists(dst), dst
    if os.path.isdir(os.path.dirname(dst)):
        assert _leftovers(os.path.dirname(dst)) == []


def _tiny(tmp_path, name="src") -> pathlib.Path:
    """A copy of the tiny NVIDIA-format checkpoint (with its draft LoRA), to damage."""
    return pathlib.Path(shutil.copytree(TINY, tmp_path / name, ignore=shutil.ignore_patterns("golden")))


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main([*map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err


def _one_error_line(err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nld-convert: error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


BAD_TENSORS = {
    "unknown": (lambda t: {**t, "encoder.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)},
                "encoder.layers.0.self_attn.q_norm.weight"),
    "missing": (lambda t: {k: v for k, v in t.items() if k != KEY}, KEY),
    "shape": (lambda t: {**t, KEY: np.zeros((31, 16), t[KEY].dtype)}, KEY),
    "dtype": (lambda t: {**t, KEY: np.zeros((32, 16), np.int32)}, KEY),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_set_is_refused_by_name(tmp_path, good_tensors, case):
    make, key = BAD_TENSORS[case]
    src = _source(tmp_path, make(good_tensors), num_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)


def test_tensor_in_two_shards_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, num_shards=2)
    shard = os.path.join(src, "model-00002-of-00002.safetensors")
    first = os.path.join(src, "model-00001-of-00002.safetensors")
    from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

    st = SafetensorsFile(shard)
    extra = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    first_st = SafetensorsFile(first)
    moved = first_st.keys()[0]
    extra[moved] = np.array(first_st.get(moved))  # now in both shards
    first_st.close()
    write_safetensors(shard, extra)
    with pytest.raises(CheckpointError, match=moved.replace(".", r"\.")):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    _assert_nothing_written(tmp_path / "dst")


def test_tensor_listed_twice_in_index_or_header_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, num_shards=2)
    index = os.path.join(src, "model.safetensors.index.json")
    text = open(index).read()
    name = json.load(open(index))["weight_map"][KEY]
    open(index, "w").write(text.replace('"weight_map": {', f'"weight_map": {{"{KEY}": "{name}", ', 1))
    with pytest.raises(CheckpointError, match="listed twice"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    _assert_nothing_written(tmp_path / "dst")

    # A safetensors header naming one tensor twice (json.load would silently keep the last).
    single = _source(tmp_path / "b", {"encoder.norm.weight": np.ones(16, np.float32)})
    path = os.path.join(single, "model.safetensors")
    header = b'{"encoder.norm.weight":{"dtype":"F32","shape":[16],"data_offsets":[0,64]},' \
             b'"encoder.norm.weight":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}'
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(CheckpointError, match="listed twice"):
        convert_hf_to_orbax(single, tmp_path / "dst", progress=False)
    _assert_nothing_written(tmp_path / "dst")


def test_unknown_config_field_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, config_json={**config_to_hf(CFG), "num_experts": 8})
    with pytest.raises(ConfigError, match="num_experts"):
        convert_hf_to_orbax(src, tmp_path / "out" / "dst", progress=False)
    _assert_nothing_written(tmp_path / "out")  # the parent we would have created is gone too


def test_pickle_sources_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="pickle"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    with pytest.raises(CheckpointError, match="never unpickles"):
        convert_hf_to_orbax(src / "pytorch_model.bin", out / "dst", progress=False)
    (src / "model.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        convert_hf_to_orbax(src / "model.pt", out / "dst", progress=False)
    assert not marker.exists()
    _assert_empty(out)


def test_bad_lora_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    lora = os.path.join(src, "linear_spec_lora")
    os.makedirs(lora)
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"]}, f)
    with pytest.raises(CheckpointError, match="target_modules"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    _assert_nothing_written(tmp_path / "dst")
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "target_modules": ["o_proj"]}, f)
    open(os.path.join(lora, "adapter_model.bin"), "wb").write(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="unpickles"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    _assert_nothing_written(tmp_path / "dst")
    # --no-lora converts the base model and never looks at the adapter
    convert_hf_to_orbax(src, tmp_path / "dst", lora=False, progress=False)
    assert not (tmp_path / "dst" / "lora").exists()


def test_existing_destination_needs_overwrite(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_hf_to_orbax(src, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    convert_hf_to_orbax(src, dst, overwrite=True, progress=False)
    assert (dst / "params").is_dir() and not (dst / "keep.txt").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
    with pytest.raises(ValueError, match="contains the source"):
        convert_hf_to_orbax(src, src, overwrite=True, progress=False)
    assert os.path.exists(os.path.join(src, "model.safetensors"))


def test_failure_midway_leaves_nothing_and_keeps_old_destination(tmp_path, good_tensors, monkeypatch):
    from checkpoints_convert.orbax_io import ItemWriter

    src = _source(tmp_path, good_tensors, num_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    real = ItemWriter.write_slot
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ItemWriter, "write_slot", failing)
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)
    (out / "dst").mkdir()
    (out / "dst" / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_orbax(src, out / "dst", overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["dst"] and os.listdir(out / "dst") == ["old.txt"]


def test_truncated_shard_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    path = os.path.join(src, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 10)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="inconsistent offsets"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)


def test_reverse_refuses_a_damaged_orbax_checkpoint(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    convert_hf_to_orbax(src, tmp_path / "orbax", progress=False)
    meta_path = tmp_path / "orbax" / "params" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    out = tmp_path / "out"
    out.mkdir()
    damaged = dict(meta, tree_metadata={k: v for k, v in meta["tree_metadata"].items() if "'norm'" not in k})
    meta_path.write_text(json.dumps(damaged))
    with pytest.raises(CheckpointError, match="missing array.*'norm'"):
        convert_orbax_to_hf(tmp_path / "orbax", out / "hf", progress=False)
    meta_path.write_text(json.dumps(meta))
    zarray = tmp_path / "orbax" / "params" / "norm" / ".zarray"
    z = json.loads(zarray.read_text())
    zarray.write_text(json.dumps(dict(z, shape=[17], chunks=[17])))
    with pytest.raises(CheckpointError, match="'norm' has shape"):
        convert_orbax_to_hf(tmp_path / "orbax", out / "hf", progress=False)
    with pytest.raises(CheckpointError, match="nld_metadata.json"):
        convert_orbax_to_hf(TINY, out / "hf", progress=False)
    _assert_empty(out)


def test_cli_reports_errors_with_exit_code(tmp_path, good_tensors, capsys):
    src = _source(tmp_path, {k: v for k, v in good_tensors.items() if k != KEY})
    assert main([src, str(tmp_path / "dst"), "--no-progress"]) == 1
    _one_error_line(capsys.readouterr().err, KEY)
    _assert_nothing_written(tmp_path / "dst")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


_SLOW_CONVERSION = """
import sys, time
from checkpoints_convert.orbax_io import ItemWriter
real = ItemWriter.write_slot
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
ItemWriter.write_slot = slow
from checkpoints_convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _slow_conversion_started(src, dst) -> subprocess.Popen:
    """A child ``nld-convert SRC DST`` (0.2 s per tensor), once its temporary directory exists."""
    parent = os.path.dirname(dst)
    before = set(_leftovers(parent))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERSION, str(src), str(dst), "--no-progress"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not set(_leftovers(parent)) - before:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # a few tensors in
    return proc


def test_sigterm_midway_leaves_nothing(tmp_path, good_tensors):
    """A killed conversion (SIGTERM) removes its temporary directory; a dead run's leftover is
    removed by the run that starts."""
    src = _source(tmp_path, good_tensors)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".dst.nld-convert-tmp.999999999.dead"  # a pid that cannot exist
    stale.mkdir()
    proc = _slow_conversion_started(src, out / "dst")
    assert not stale.exists()  # cleaned up by the run that started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    _assert_empty(out)


# ------------------------------------------------------------------------------------------
# Hostile sources: paths out of the checkpoint, symlinks, FIFOs (through the CLI)
# ------------------------------------------------------------------------------------------

def _split_off(src: pathlib.Path, key: str, name: str, path: pathlib.Path | None) -> None:
    """Move tensor ``key`` out of model.safetensors into ``path`` (when given) and write an index
    that names its shard ``name``."""
    st = SafetensorsFile(src / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    moved = {key: tensors.pop(key)}
    os.remove(src / "model.safetensors")
    write_safetensors(src / "model-rest.safetensors", tensors, {"format": "pt"})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, moved, {"format": "pt"})
    weight_map = {**{k: "model-rest.safetensors" for k in tensors}, key: name}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("case", ["dotdot", "absolute", "etc-passwd"])
def test_index_naming_a_file_outside_is_refused(tmp_path, capsys, case):
    src = _tiny(tmp_path / "deep")  # src/../../outside is still inside tmp_path
    secret = tmp_path / "outside" / "secret.safetensors"
    name = {"dotdot": "../../outside/secret.safetensors", "absolute": str(secret), "etc-passwd": "/etc/passwd"}[case]
    _split_off(src, "encoder.norm.weight", name, None if case == "etc-passwd" else secret)
    rc, err = _cli(capsys, src, tmp_path / "out" / "dst")
    assert rc == 1
    _one_error_line(err, "model.safetensors.index.json", repr(name))
    _assert_nothing_written(tmp_path / "out" / "dst")


def _outside_copy(tmp_path, rel: str) -> pathlib.Path:
    target = tmp_path / "elsewhere" / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    source = TINY / rel
    shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
    return target


LINKS_OUT = {  # file of the source -> where its symlink leads (None: a copy of it outside the source)
    "model.safetensors": None,
    "config.json": None,
    "linear_spec_lora": None,
    "linear_spec_lora/adapter_model.safetensors": None,
    "linear_spec_lora/adapter_config.json": None,
    "tokenizer.json": "/etc/passwd",
    "README.md": "secret",  # a README linked to e.g. ~/.ssh/id_ed25519
}


@pytest.mark.parametrize("rel", sorted(LINKS_OUT))
def test_symlink_out_of_the_source_is_refused_by_name(tmp_path, capsys, rel):
    src = _tiny(tmp_path)
    if LINKS_OUT[rel] == "secret":
        target = tmp_path / "home" / ".ssh" / "id_ed25519"
        target.parent.mkdir(parents=True)
        target.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    else:
        target = LINKS_OUT[rel] or _outside_copy(tmp_path, rel)
    link = src / rel
    if link.is_dir():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    link.symlink_to(target)
    rc, err = _cli(capsys, src, tmp_path / "out" / "dst")
    assert rc == 1
    _one_error_line(err, str(src / rel), "outside the checkpoint")
    _assert_nothing_written(tmp_path / "out" / "dst")


def test_symlinks_inside_the_source_and_hub_snapshots_convert(tmp_path, capsys):
    """Links that stay inside (a subfolder, or the hub cache's blobs/) are followed; side files
    are written as regular files with the linked content."""
    src = _tiny(tmp_path)
    (src / "docs").mkdir()
    (src / "docs" / "README.md").write_text("read me")
    (src / "README.md").symlink_to("docs/README.md")
    (src / "weights").mkdir()
    os.rename(src / "model.safetensors", src / "weights" / "model.safetensors")
    (src / "model.safetensors").symlink_to(src / "weights" / "model.safetensors")
    assert _cli(capsys, src, tmp_path / "a")[0] == 0
    assert not os.path.islink(tmp_path / "a" / "README.md")
    assert (tmp_path / "a" / "README.md").read_text() == "read me"

    # A hub cache snapshot: every file is a relative link into the repository's blobs/.
    repo = tmp_path / "hub" / "models--nvidia--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    for n, path in enumerate(sorted(p for p in TINY.rglob("*") if p.is_file() and "golden" not in p.parts)):
        rel = path.relative_to(TINY)
        shutil.copyfile(path, repo / "blobs" / f"blob{n}")
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(repo / "blobs" / f"blob{n}", (snapshot / rel).parent))
    assert _cli(capsys, snapshot, tmp_path / "b")[0] == 0
    assert (tmp_path / "b" / "lora").is_dir()
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()


@contextlib.contextmanager
def _deadline(seconds: int, fifo: pathlib.Path):
    """Fail (instead of hanging) when the code under test blocks, e.g. opening ``fifo``; then
    release whatever thread still waits on the FIFO."""
    def _expired(signum, frame):
        raise TimeoutError(f"nld-convert still running after {seconds} s (blocked on {fifo}?)")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        with contextlib.suppress(OSError):  # a reader blocked in open() gets an empty file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


FIFOS = {  # file made a FIFO -> whether the conversion still succeeds (the file is not needed)
    "model.safetensors": False,
    "model.safetensors.index.json": False,
    "config.json": False,
    "tokenizer.json": False,
    "linear_spec_lora/adapter_config.json": False,
    "linear_spec_lora/adapter_model.safetensors": False,
    "linear_spec_lora/notes.json": True,
}


@pytest.mark.parametrize("rel", sorted(FIFOS))
def test_fifo_in_the_source_never_blocks(tmp_path, capsys, rel):
    src = _tiny(tmp_path)
    fifo = src / rel
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    with _deadline(30, fifo):
        rc, err = _cli(capsys, src, tmp_path / "out" / "dst")
    if FIFOS[rel]:
        assert rc == 0, err
        return
    assert rc == 1
    _one_error_line(err, str(fifo), "regular file")
    _assert_nothing_written(tmp_path / "out" / "dst")


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("converted") / "tiny"
    convert_hf_to_orbax(TINY, path, progress=False)
    return path


@pytest.mark.parametrize("rel", ["nld_metadata.json", "config.json", "tokenizer.json", "params/_METADATA",
                                 "params/norm/.zarray", "params/norm/0", "lora/A/0.0.0.0"])
@pytest.mark.parametrize("kind", ["fifo", "link-out"])
def test_reverse_refuses_fifos_and_links_out(tmp_path, capsys, converted_tiny, rel, kind):
    src = pathlib.Path(shutil.copytree(converted_tiny, tmp_path / "orbax"))
    path = src / rel
    assert path.is_file(), rel
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        outside = tmp_path / "elsewhere" / path.name
        outside.parent.mkdir()
        os.rename(path, outside)
        path.symlink_to(outside)
    with _deadline(30, path):
        rc, err = _cli(capsys, src, tmp_path / "out" / "hf", "--reverse")
    assert rc == 1
    _one_error_line(err, str(path), "regular file" if kind == "fifo" else "outside the checkpoint")
    _assert_nothing_written(tmp_path / "out" / "hf")


# ------------------------------------------------------------------------------------------
# Leftovers of killed runs
# ------------------------------------------------------------------------------------------

def test_sigkilled_conversion_leftover_is_removed_by_the_next_run_beside_it(tmp_path, capsys):
    src = _tiny(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = _slow_conversion_started(src, out / "dst")
    proc.kill()
    proc.wait(timeout=60)
    left = _leftovers(out)
    assert len(left) == 1 and left[0].startswith(".dst.nld-convert-tmp."), left  # SIGKILL: no cleanup
    rc, err = _cli(capsys, src, out / "other")  # another destination in the same folder
    assert rc == 0
    assert _leftovers(out) == [] and sorted(os.listdir(out)) == ["other"]
    [line] = [line for line in err.splitlines() if "killed" in line]
    assert left[0] in line


def test_leftovers_of_gone_owners_only_are_cleaned_and_an_old_destination_is_put_back(tmp_path, capsys):
    from checkpoints_convert.atomic_output import _owner_tag

    out = tmp_path / "out"
    (out / ".prev.nld-convert-old.999999999.ab").mkdir(parents=True)  # died between the two renames
    (out / ".prev.nld-convert-old.999999999.ab" / "weights").write_text("the previous checkpoint")
    pid, start, host = _owner_tag().split("-")  # this (live) process
    kept = [f".a.nld-convert-tmp.{pid}-{start}-{host}.live",  # a live run
            f".b.nld-convert-tmp.{pid}.live",  # a live run of converter 1.0 (no start time recorded)
            f".c.nld-convert-tmp.999999999-1-{'0' * 8 if host != '0' * 8 else '1' * 8}.remote"]  # another host's
    gone = [f".d.nld-convert-tmp.{pid}-{int(start) + 1}-{host}.reused",  # the pid now belongs to another process
            ".e.nld-convert-tmp.999999999.dead", f".f.nld-convert-old.999999999-1-{host}.ab"]
    for name in kept + gone:
        (out / name).mkdir()
    (out / "f").mkdir()  # f was replaced: its old copy is obsolete
    rc, err = _cli(capsys, _tiny(tmp_path), out / "new")
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted(kept + ["f", "new", "prev"])
    assert (out / "prev" / "weights").read_text() == "the previous checkpoint"
    [line] = [line for line in err.splitlines() if "killed" in line]
    assert all(name in line for name in gone)


# ------------------------------------------------------------------------------------------
# The CLI: messages, exit codes, rollback
# ------------------------------------------------------------------------------------------

def test_existing_destination_message_speaks_each_callers_language(tmp_path, capsys, converted_tiny):
    src = _tiny(tmp_path)
    for convert, source, extra in ((convert_hf_to_orbax, src, []),
                                   (convert_orbax_to_hf, converted_tiny, ["--reverse"])):
        dst = tmp_path / "dst"
        dst.mkdir(exist_ok=True)
        with pytest.raises(FileExistsError) as info:
            convert(source, dst, progress=False)
        assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
        rc, err = _cli(capsys, source, dst, *extra)
        assert rc == 1
        assert "overwrite=True" not in _one_error_line(err, str(dst), "--overwrite")
        assert os.listdir(dst) == []


LIBRARY_ERRORS = [CheckpointError("/x/model.safetensors: tensor 'w'\nis damaged"), ConfigError("bad field"),
                  SafetensorsError("/x/model.safetensors: corrupt header"), NonFiniteError("tensor 'w' holds NaN"),
                  VerificationError("logits differ"), FileNotFoundError("checkpoint directory /x does not exist"),
                  NotADirectoryError(20, "Not a directory", "/x"), PermissionError(13, "Permission denied", "/x"),
                  IsADirectoryError(21, "Is a directory", "/x"), OSError(28, "No space left on device"),
                  ValueError("")]


@pytest.mark.parametrize("error", LIBRARY_ERRORS, ids=lambda e: type(e).__name__)
def test_cli_every_error_is_one_line_without_traceback(tmp_path, capsys, monkeypatch, error):
    import checkpoints_convert.to_orbax

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoints_convert.to_orbax, "convert_hf_to_orbax", fail)
    rc, err = _cli(capsys, tmp_path, tmp_path / "dst")
    assert rc == 1 and "Traceback" not in err
    _one_error_line(err, " ".join(str(error).split()) or type(error).__name__)


def test_cli_real_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a checkpoint")
    bad_json = _tiny(tmp_path, "bad-json")
    (bad_json / "config.json").write_text('{"vocab_size": ')
    for src, dst, part in [(tmp_path / "missing", tmp_path / "o1", "does not exist"),
                           (tmp_path / "file", tmp_path / "o2", "not a directory"),
                           (bad_json, tmp_path / "o3", "config.json"),
                           (_tiny(tmp_path), tmp_path / "file" / "dst", str(tmp_path / "file"))]:
        rc, err = _cli(capsys, src, dst)
        assert rc == 1 and "Traceback" not in err
        _one_error_line(err, part)
        _assert_nothing_written(dst)


def test_cli_help_says_src_is_the_checkpoint_directory(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "SRC DST" in text and "SRC the checkpoint directory to convert" in text


def test_cli_interrupt_exits_130_and_keeps_the_old_destination(tmp_path, capsys, monkeypatch):
    from checkpoints_convert.orbax_io import ItemWriter

    real, calls = ItemWriter.write_slot, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ItemWriter, "write_slot", interrupted)
    dst = tmp_path / "out" / "dst"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    rc, err = _cli(capsys, _tiny(tmp_path), dst, "--overwrite")
    assert rc == 130 and "interrupted" in err and len(calls) == 5
    assert os.listdir(dst) == ["old.txt"] and _leftovers(dst.parent) == []


def test_cli_failed_verify_exits_1_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    """One converted tensor perturbed: --verify must catch it, and nothing is put in place."""
    from checkpoints_convert.orbax_io import ItemWriter

    real = ItemWriter.write_slot

    def perturbed(self, leaf, layer, view, *args, **kwargs):
        if leaf == "norm":
            view = np.asarray(view, np.float32) + 0.5
        return real(self, leaf, layer, view, *args, **kwargs)

    monkeypatch.setattr(ItemWriter, "write_slot", perturbed)
    dst = tmp_path / "out" / "dst"
    rc, err = _cli(capsys, _tiny(tmp_path), dst, "--verify")
    assert rc == 1
    _one_error_line(err, "logits differ")
    _assert_nothing_written(dst)


def test_failed_final_rename_puts_the_old_destination_back(tmp_path, monkeypatch):
    dst = tmp_path / "out" / "dst"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    real = os.rename

    def rename(a, b):
        if os.path.basename(a).startswith(".dst.nld-convert-tmp.") and os.fspath(b) == str(dst):
            raise OSError(5, "rename failed (simulated)")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_orbax(_tiny(tmp_path), dst, overwrite=True, progress=False)
    assert os.listdir(dst) == ["old.txt"] and (dst / "old.txt").read_text() == "old"
    assert _leftovers(dst.parent) == []
