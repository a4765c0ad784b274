"""All-or-nothing output directories, and the leftovers of runs that were killed.

Everything is written into a hidden temporary directory beside the destination and renamed
into place only once complete, so an interrupted or failed run leaves neither the destination
nor a half-written checkpoint. An existing destination is first moved aside (``os.rename``
cannot replace a non-empty directory) and put back if the final rename fails.

A run killed with SIGKILL (or by the OOM killer) cannot clean up: its temporary directory,
``.DST.nld-convert-tmp.OWNER.RANDOM``, stays beside the destination, or, if it died between the
two renames, the old destination stays as ``.DST.nld-convert-old.OWNER.RANDOM``. OWNER is
``PID-STARTTIME-HOST``: the writer's pid, its start time (``/proc/PID/stat``, clock ticks since
boot) and a hash of the host name. Every run first removes the leftovers beside its destination
whose owner is gone: the pid is not alive, or it is alive but started at another time (a pid
reused by a later process). Leftovers of other hosts (a shared filesystem) are left alone: their
pids mean nothing here. A left-over old destination whose destination is missing is put back,
not deleted: it is the user's previous checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from typing import Iterator

__all__ = ["DestinationExistsError", "atomic_output_dir", "check_destination", "check_not_overlapping",
           "remove_leftovers", "terminate_as_exit"]

_TMP_TAG = ".nld-convert-tmp."
_OLD_TAG = ".nld-convert-old."
# .NAME.nld-convert-(tmp|old).PID[-STARTTIME-HOST].RANDOM (the short form is the 1.0 converter's)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.nld-convert-(?P<kind>tmp|old)\.(?P<pid>\d+)(?:-(?P<start>\d+)-"
                       r"(?P<host>[0-9a-f]+))?\.[0-9a-zA-Z]+$")


class DestinationExistsError(FileExistsError):
    """The destination exists and replacing it was not asked for. The message speaks the API's
    language (``overwrite=True``); the CLI says ``--overwrite`` instead (see :attr:`path`)."""

    def __init__(self, path: str):
        super().__init__(f"{path} already exists; pass overwrite=True to replace it")
        self.path = path


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuse an existing ``dst`` unless ``overwrite``."""
    if os.path.lexists(dst) and not overwrite:
        raise DestinationExistsError(dst)


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may itself hold spaces or parentheses.
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner_tag() -> str:
    return f"{os.getpid()}-{_start_time(os.getpid()) or 0}-{_host_tag()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:  # larger than any pid
        return False
    return True


def _owner_gone(match: re.Match) -> bool:
    if match["host"] is not None and match["host"] != _host_tag():
        return False  # written from another machine (a shared filesystem): its pid means nothing here
    pid = int(match["pid"])
    if not _pid_alive(pid):
        return True
    if match["start"] not in (None, "0"):
        now = _start_time(pid)
        return now is not None and now != match["start"]  # the pid now belongs to a later process
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_leftovers(dst: str) -> list[str]:
    """Remove the temporaries that killed runs left in ``dst``'s parent directory (any
    destination name there), put back old destinations that were moved aside and never
    replaced, and say so in one line on stderr. Returns what was done, one entry each."""
    parent = os.path.dirname(os.path.abspath(os.fspath(dst)))
    try:
        entries = sorted(os.listdir(parent))
    except OSError:  # no parent yet (or not a directory): nothing can be left there
        return []
    done = []
    for entry in entries:
        match = _LEFTOVER.match(entry)
        if match is None or not _owner_gone(match):
            continue
        path, target = os.path.join(parent, entry), os.path.join(parent, match["name"])
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(path, target)  # killed between the two renames: the previous destination comes back
            done.append(f"put back {target} from {entry}")
        else:
            _remove(path)
            if not os.path.lexists(path):
                done.append(f"removed {entry}")
    if done:
        print(f"nld-convert: cleaned up after a killed conversion in {parent}: {'; '.join(done)}", file=sys.stderr)
    return done


def check_not_overlapping(src: str, dst: str) -> None:
    """Refuse a destination that is, or contains, the source: replacing it would destroy the input."""
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    if src == dst or src.startswith(dst.rstrip(os.sep) + os.sep):
        raise ValueError(f"destination {dst} is or contains the source {src}")


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory that becomes ``dst`` when the block succeeds."""
    dst = os.path.abspath(dst)
    remove_leftovers(dst)
    check_destination(dst, overwrite)
    parent, name = os.path.split(dst)
    created = []  # parents we made, removed again on failure
    probe = parent
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}{_TMP_TAG}{_owner_tag()}.{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(dst):
            old = os.path.join(parent, f".{name}{_OLD_TAG}{_owner_tag()}.{secrets.token_hex(4)}")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            _remove(old)
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
