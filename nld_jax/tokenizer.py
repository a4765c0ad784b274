"""Tokenizers: ``tokenizer.json`` (HF ``tokenizers``) or a sentencepiece ``.model``, plus the chat
template of ``tokenizer_config.json`` (or ``chat_template.jinja``) when present. The files are
read under the checkpoint's trust rule (:mod:`nld_jax.checkpoint.files`)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Sequence

from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import CheckpointFiles

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """A thin, backend-neutral wrapper: ``encode`` / ``decode`` / ``apply_chat_template``."""

    def __init__(self, backend, kind: str, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool = True, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self._backend = backend
        self.kind = kind  # "tokenizers" | "sentencepiece"
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    def token_id(self, text: str) -> int | None:
        """The id of the one token spelled ``text`` (``"[IMG]"``), or None when there is none."""
        if self.kind == "tokenizers":
            return self._backend.token_to_id(text)
        found = self._backend.piece_to_id(text)
        return found if self._backend.id_to_piece(found) == text else None

    # ---- encoding ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.kind == "tokenizers":
            ids = list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        else:
            ids = list(self._backend.encode(text))
        # Add BOS when the config asks for it and the backend's post-processor did not.
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            special = {i for i in (self.bos_id, self.eos_id) if i is not None}
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids)

    @property
    def vocab_size(self) -> int:
        if self.kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    # ---- chat ----------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render ``messages`` with the checkpoint's Jinja chat template and tokenize the result."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json lacks one)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        # The template writes the BOS text itself; do not add a second one.
        return self.encode(text, add_special_tokens=False)


def _token_text(value, name: str, where: str) -> str:
    if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {name} must be a string or an AddedToken object, got {value!r:.80}")
    return value


def _chat_template(value, where: str) -> str | None:
    """The default template of ``chat_template`` (a string, or a list of ``{name, template}``)."""
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
            raise CheckpointError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")
        named = {t.get("name"): t["template"] for t in value}
        value = named.get("default") or next(iter(named.values()), None)
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{where}: chat_template must be a string, got {type(value).__name__}")
    return value


def load_tokenizer(directory: str | os.PathLike | CheckpointFiles, bos_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it ships none. Every file is read
    through :class:`CheckpointFiles`; the backends get its bytes, never a path to open."""
    files = CheckpointFiles.of(directory)
    config_name = "tokenizer_config.json"
    where = files.shown(config_name)
    cfg = files.read_json_object(config_name) if files.exists(config_name) else {}
    chat_template = _chat_template(cfg.get("chat_template"), where)
    if chat_template is None and files.exists("chat_template.jinja"):
        chat_template = files.read_text("chat_template.jinja")
    special = {name: _token_text(cfg.get(name), name, where) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    add_bos = cfg.get("add_bos_token", True)
    if not isinstance(add_bos, bool):
        raise CheckpointError(f"{where}: add_bos_token must be true or false, got {add_bos!r:.80}")

    if files.exists("tokenizer.json"):
        from tokenizers import Tokenizer as HFTokenizer

        text = files.read_text("tokenizer.json")
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust library raises a bare Exception for a malformed file
            raise CheckpointError(f"{files.shown('tokenizer.json')} is not a valid tokenizer ({str(e)[:200]})") from None

        def token_id(name):
            text = special.get(name)
            return backend.token_to_id(text) if text else None

        return Tokenizer(backend, "tokenizers",
                         bos_id=bos_id if bos_id is not None else token_id("bos_token"),
                         eos_id=eos_id if eos_id is not None else token_id("eos_token"),
                         add_bos=add_bos, chat_template=chat_template, special_tokens=special)

    sp_models = [name for name in files.listdir() if name.endswith(".model")]
    if sp_models:
        import sentencepiece as spm

        backend, proto = spm.SentencePieceProcessor(), files.read_bytes(sp_models[0])
        try:
            backend.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise CheckpointError(f"{files.shown(sp_models[0])} is not a valid sentencepiece model ({e})") from None
        sp_bos = backend.bos_id() if backend.bos_id() >= 0 else None
        sp_eos = backend.eos_id() if backend.eos_id() >= 0 else None
        return Tokenizer(backend, "sentencepiece",
                         bos_id=bos_id if bos_id is not None else sp_bos,
                         eos_id=eos_id if eos_id is not None else sp_eos,
                         add_bos=add_bos, chat_template=chat_template, special_tokens=special)
    return None
