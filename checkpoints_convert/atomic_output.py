"""All-or-nothing output directories.

Everything is written into a hidden temporary directory beside the destination and renamed
into place only once complete, so an interrupted or failed run leaves neither the destination
nor a half-written checkpoint. The temporary name carries the writer's pid, so a directory
left by a process that was SIGKILLed can be recognised and removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
from typing import Iterator

__all__ = ["atomic_output_dir", "check_not_overlapping", "terminate_as_exit"]

_TMP_TAG = ".nld-convert-tmp."
_OLD_TAG = ".nld-convert-old."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: str, name: str) -> None:
    """Remove temporaries of earlier runs for the same destination whose writer is gone."""
    prefix = f".{name}"
    for entry in os.listdir(parent):
        for tag in (_TMP_TAG, _OLD_TAG):
            if entry.startswith(prefix + tag):
                pid = entry[len(prefix + tag):].split(".")[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def check_not_overlapping(src: str, dst: str) -> None:
    """Refuse a destination that is, or contains, the source: replacing it would destroy the input."""
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
        raise ValueError(f"destination {dst} is or contains the source {src}")


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory that becomes ``dst`` when the block succeeds."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    parent, name = os.path.split(dst)
    created = []  # parents we made, removed again on failure
    probe = parent
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(parent, name)
    tmp = os.path.join(parent, f".{name}{_TMP_TAG}{os.getpid()}.{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(dst):
            # Move the old destination aside first: os.rename cannot replace a non-empty directory.
            old = os.path.join(parent, f".{name}{_OLD_TAG}{os.getpid()}.{secrets.token_hex(4)}")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the duration, so cleanup handlers run on `kill`."""

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
