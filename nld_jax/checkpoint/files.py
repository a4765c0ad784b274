"""What nld-jax reads from a checkpoint directory, and the one rule every read goes through.

A checkpoint is input from a stranger: a hub repository is a git repository and may hold
symlinks, FIFOs and index files that name any path. Every file nld-jax opens from a checkpoint
is resolved by :class:`CheckpointFiles`:

* a name is a plain file name (or a relative path of plain names for files in subfolders such
  as ``linear_spec_lora/adapter_config.json``): no absolute paths, no ``..``, no empty parts;
* the name, with every symlink followed, must land inside the checkpoint directory, or inside
  the ``blobs/`` folder of the same Hugging Face cache repository when the directory is a hub
  snapshot (``.../models--ORG--NAME/snapshots/REV/``: there every file is a symlink into
  ``../../blobs/``);
* it must be a regular file (never a FIFO, socket or device, which would block or never end);
  this is checked with ``stat`` before anything is opened, and again on the opened descriptor.

Anything else is refused with a :class:`CheckpointError` that names the file and says why.
Errors show the path inside the checkpoint (``.../snapshots/REV/model.safetensors``), never the
blob it links to, so the user can find the file.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO

from nld_jax.checkpoint.errors import CheckpointError

__all__ = ["CheckpointFiles", "checkpoint_directory", "open_regular", "plain_name", "parse_json", "JSON_LIMIT"]

# The largest JSON or text file read whole (config, index, tokenizer, metadata): real ones are a
# few MB (tokenizer.json ~17 MB); anything bigger is not one of ours and would only cost memory.
JSON_LIMIT = 256 * 2**20


def checkpoint_directory(path: str | os.PathLike) -> str:
    """``path`` as an absolute directory path, or an error that says what it is instead."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.isdir(path):
        kind = "a file" if os.path.isfile(path) else "not a directory"
        raise CheckpointError(f"{path} is {kind}; pass the checkpoint directory (the one with config.json)")
    return path


def plain_name(name: Any, where: str) -> str:
    """``name`` if it is a single plain file name (what an index may name as a shard)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name):
        raise CheckpointError(f"{where}: {name!r} is not a plain file name in the checkpoint directory "
                              "(paths, '..' and absolute names are refused)")
    return name


def open_regular(real: str, shown: str | None = None) -> BinaryIO:
    """``real`` opened for binary reading, if the opened descriptor is a regular file.

    ``O_NONBLOCK``: opening a FIFO never waits for a writer (the check then refuses it)."""
    shown = shown or real
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{shown} cannot be opened ({e.strerror or e})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{shown} is not a regular file; only regular files are read from a checkpoint")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _no_duplicate_keys(pairs: list[tuple[str, Any]], shown: str) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:  # json keeps the last silently; another reader may keep the first
            raise CheckpointError(f"{shown}: key {key!r} is listed twice")
        out[key] = value
    return out


def parse_json(raw: bytes, shown: str, what: str = "", error: type[Exception] = CheckpointError) -> Any:
    """``raw`` as strict UTF-8 JSON; every failure is ``error`` naming ``shown`` (duplicate keys
    included: readers disagree on which one wins)."""
    what = f" ({what})" if what else ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{shown}{what} is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _no_duplicate_keys(pairs, shown))
    except RecursionError:
        raise error(f"{shown}{what} is not valid JSON (nested too deeply)") from None
    except CheckpointError as e:
        raise error(str(e)) from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's digit limit
        raise error(f"{shown}{what} is not valid JSON ({e})") from None


def _hub_blobs(real_root: str) -> str | None:
    """``.../models--ORG--NAME/blobs`` when ``real_root`` is a snapshot of a hub cache repository
    (``.../snapshots/REV``) or a folder inside one."""
    path = real_root
    while True:
        snapshots = os.path.dirname(path)
        repo = os.path.dirname(snapshots)
        if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(("models--", "datasets--")):
            return os.path.join(repo, "blobs")
        if repo == snapshots:  # reached the filesystem root
            return None
        path = snapshots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class CheckpointFiles:
    """The files of one checkpoint directory (see the module docstring for the rule)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = checkpoint_directory(directory)
        self.real_root = os.path.realpath(self.directory)
        blobs = _hub_blobs(self.real_root)
        self._trusted = [self.real_root] + ([os.path.realpath(blobs)] if blobs else [])

    @classmethod
    def of(cls, source: "str | os.PathLike | CheckpointFiles") -> "CheckpointFiles":
        """``source`` itself when it already is one, else the files of directory ``source``."""
        return source if isinstance(source, CheckpointFiles) else cls(source)

    def __repr__(self) -> str:
        return f"CheckpointFiles({self.directory!r})"

    def _relative(self, name: str) -> str:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CheckpointError(f"{self.directory}: {name!r} is not a file name")
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"{self.directory}: {name!r} is not a plain file name inside the checkpoint "
                                  "(absolute paths and '..' are refused)")
        return os.path.join(*parts)

    def shown(self, name: str) -> str:
        """The path of ``name`` as errors show it (inside the checkpoint, links not followed)."""
        return os.path.join(self.directory, self._relative(name))

    def _resolve(self, name: str) -> tuple[str, str]:
        shown = self.shown(name)
        real = os.path.realpath(shown)
        if not any(_inside(real, root) for root in self._trusted):
            raise CheckpointError(f"{shown} resolves to {real}, outside the checkpoint directory "
                                  "(a symlink out of a checkpoint is refused)")
        return shown, real

    def exists(self, name: str) -> bool:
        """Whether ``name`` is there at all (a dangling or refused link counts as there: using it errors)."""
        return os.path.lexists(self.shown(name))

    def is_dir(self, name: str) -> bool:
        """Whether ``name`` is a subdirectory inside the checkpoint (symlinks followed under the rule)."""
        if not self.exists(name):
            return False
        _, real = self._resolve(name)
        return os.path.isdir(real)

    def path(self, name: str) -> str:
        """The real path of regular file ``name``, safe to open."""
        shown, real = self._resolve(name)
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            dangling = os.path.islink(shown)
            raise FileNotFoundError(f"{shown} does not exist" + (" (a dangling symlink)" if dangling else "")) from None
        except OSError as e:  # a symlink loop, a name too long...
            raise CheckpointError(f"{shown} cannot be read ({e.strerror or e})") from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device?)"
            raise CheckpointError(f"{shown} is {kind}; only regular files are read from a checkpoint")
        return real

    def size(self, name: str) -> int:
        return os.stat(self.path(name)).st_size

    def open(self, name: str) -> BinaryIO:
        """Regular file ``name`` opened for binary reading (checked before and after opening)."""
        return open_regular(self.path(name), self.shown(name))

    def read_bytes(self, name: str, limit: int = JSON_LIMIT) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"{self.shown(name)} is larger than the {limit} bytes a file of this kind may have")
        return data

    def read_text(self, name: str, limit: int = JSON_LIMIT) -> str:
        try:
            return self.read_bytes(name, limit).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.shown(name)} is not valid UTF-8 text (byte {e.start})") from None

    def read_json(self, name: str, error: type[Exception] = CheckpointError, limit: int = JSON_LIMIT) -> Any:
        """The parsed JSON of ``name``; a file that is not UTF-8 JSON raises ``error`` naming it."""
        return parse_json(self.read_bytes(name, limit), self.shown(name), error=error)

    def read_json_object(self, name: str, error: type[Exception] = CheckpointError) -> dict:
        value = self.read_json(name, error)
        if not isinstance(value, dict):
            raise error(f"{self.shown(name)} must hold a JSON object, got {type(value).__name__}")
        return value

    def subdirectory(self, name: str) -> "CheckpointFiles":
        """The files of subfolder ``name`` (e.g. ``linear_spec_lora``), under the same trust rule."""
        shown, real = self._resolve(name)
        if not os.path.isdir(real):
            raise CheckpointError(f"{shown} is not a directory")
        sub = CheckpointFiles.__new__(CheckpointFiles)
        sub.directory, sub.real_root, sub._trusted = shown, real, self._trusted
        return sub

    def listdir(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def check_tree(self, name: str) -> None:
        """Every file below subfolder ``name`` (an Orbax item, which tensorstore opens itself) obeys
        the rule of :meth:`path`; symlinked folders are refused."""
        self.subdirectory(name).check_all()

    def check_all(self) -> None:
        """Every file below this directory obeys the rule of :meth:`path` (symlinked folders refused)."""
        for dirpath, dirnames, filenames in os.walk(self.directory):  # symlinked folders are not entered
            for entry in dirnames + filenames:
                full = os.path.join(dirpath, entry)
                if os.path.isdir(full) and not os.path.islink(full):
                    continue
                if os.path.islink(full) and os.path.isdir(full):
                    raise CheckpointError(f"{full} is a symlinked folder; refused inside a checkpoint")
                self.path(os.path.relpath(full, self.directory))
