"""Tokenizers: ``tokenizer.json`` (HF ``tokenizers``) or a sentencepiece ``.model``, plus the chat
template of ``tokenizer_config.json`` when present."""

from __future__ import annotations

import datetime
import glob
import json
import os
from typing import Sequence

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


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialisation
        return value.get("content")
    return value


def load_tokenizer(directory: str | os.PathLike, bos_id: int | None = None,
                   eos_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it ships none."""
    directory = os.fspath(directory)
    cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
    chat_template = cfg.get("chat_template")
    template_file = os.path.join(directory, "chat_template.jinja")
    if chat_template is None and os.path.exists(template_file):
        with open(template_file) as f:
            chat_template = f.read()
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)
    special = {name: _token_text(cfg.get(name)) or "" for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    add_bos = bool(cfg.get("add_bos_token", True))

    tok_json = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tok_json):
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(tok_json)

        def token_id(name):
            text = special.get(name)
            return backend.token_to_id(text) if text else None

        return Tokenizer(backend, "tokenizers",
                         bos_id=bos_id if bos_id is not None else token_id("bos_token"),
                         eos_id=eos_id if eos_id is not None else token_id("eos_token"),
                         add_bos=add_bos, chat_template=chat_template, special_tokens=special)

    sp_models = sorted(glob.glob(os.path.join(directory, "*.model")))
    if sp_models:
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor(model_file=sp_models[0])
        sp_bos = backend.bos_id() if backend.bos_id() >= 0 else None
        sp_eos = backend.eos_id() if backend.eos_id() >= 0 else None
        return Tokenizer(backend, "sentencepiece",
                         bos_id=bos_id if bos_id is not None else sp_bos,
                         eos_id=eos_id if eos_id is not None else sp_eos,
                         add_bos=add_bos, chat_template=chat_template, special_tokens=special)
    return None
