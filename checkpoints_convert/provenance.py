"""``nld_metadata.json``: where a converted checkpoint came from and how it is stored.

Source files are hashed (SHA-256) on a background thread while the conversion runs: hashlib
releases the GIL on large updates and the files are in the page cache by then (or will be, for
the conversion), so the hash costs little wall time on top of the copy.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading

from nld_jax import __version__ as NLD_JAX_VERSION
from nld_jax.checkpoint.files import open_regular
from nld_jax.checkpoint.orbax import (FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, PLAIN_FORMAT_VERSION,
                                      QUANTIZED_FORMAT_VERSION, read_metadata)

from checkpoints_convert import __version__ as CONVERTER_VERSION

__all__ = ["METADATA_FILE", "FORMAT_NAME", "FORMAT_VERSION", "CONVERTER_VERSION", "FileHasher",
           "build_metadata", "write_json", "read_metadata"]



class FileHasher:
    """SHA-256 and size of each file, computed on a daemon thread; ``result()`` joins it.

    ``files`` maps the name recorded (relative to the source) to the path opened, resolved by
    :class:`~nld_jax.checkpoint.files.CheckpointFiles`; it is opened as a regular file only
    (a FIFO would block the thread, and ``result()`` with it, forever)."""

    def __init__(self, files: dict[str, str], block_bytes: int = 8 << 20):
        self._files, self._block = dict(files), block_bytes
        self._out: dict[str, dict] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nld-convert-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            buf = bytearray(self._block)
            view = memoryview(buf)
            for rel, path in self._files.items():
                digest = hashlib.sha256()
                size = 0
                with open_regular(path) as f:
                    while n := f.readinto(buf):
                        digest.update(view[:n])
                        size += n
                self._out[rel] = {"bytes": size, "sha256": digest.hexdigest()}
        except BaseException as e:  # reported by result(), on the caller's thread
            self._error = e

    def result(self) -> dict[str, dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._out)


def build_metadata(*, source: dict | None, dtypes: dict, lora: dict | None, hf_layout: dict | None,
                   side_files: list[str], chunk_bytes: int, quantization: dict | None = None) -> dict:
    """The metadata document. ``hf_layout`` (the source's key -> file map) lets ``--reverse``
    reproduce the original shard files; ``lora`` keeps the PEFT adapter config; ``quantization``
    (:func:`nld_jax.checkpoint.orbax.quantization_metadata`) names the scheme of quantized weights,
    which are written as format version 2 (older readers then ask for an upgrade)."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": PLAIN_FORMAT_VERSION if quantization is None else QUANTIZED_FORMAT_VERSION,
        "converter": "checkpoints_convert",
        "converter_version": CONVERTER_VERSION,
        "nld_jax_version": NLD_JAX_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "dtype": dtypes,
        "lora": lora,
        "hf_layout": hf_layout,
        "side_files": list(side_files),
        "storage": {"driver": "zarr", "compressor": None, "target_chunk_bytes": chunk_bytes, "ocdbt": False},
    }
    if quantization is not None:
        meta["quantization"] = quantization
    return meta


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
