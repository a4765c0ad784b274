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

__all__ = ["Tokenizer", "load_tokenizer", "chat_images"]

# Content parts of a chat message that stand for an image (transformers' chat messages).
IMAGE_PARTS = ("image", "image_url")
# Where an image part was, in the rendered template text, when the tokenizer has no single token
# for the image placeholder's text (a private-use character no template writes).
_IMAGE_MARK = "\ue000nld-image\ue000"


def _image_source(part: dict, where: str):
    """The image a content part carries (a path, a PIL image or an array), or None for a bare
    ``{"type": "image"}`` whose image is given separately."""
    if part["type"] == "image":
        return part.get("image", part.get("path", part.get("url")))
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise ValueError(f"{where}: an image_url part needs image_url.url, a file path, got {url!r:.80}")
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url or url.startswith("data:"):
        raise ValueError(f"{where}: image_url {url[:60]!r} is not a local file; nld_jax neither downloads nor "
                         "decodes URLs: save the image and give its path")
    return url


def _content_parts(messages: list[dict]):
    """``(messages with list contents flattened to text, image marks in place of image parts,
    the images in order)``: text parts are joined as they are, with nothing between them (as
    Pixtral's template joins them)."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    flat, images = [], []
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            flat.append(message)
            continue
        pieces = []
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind in IMAGE_PARTS:
                images.append(_image_source(part, where))
                pieces.append(_IMAGE_MARK)
            else:
                raise ValueError(f"{where}: a content part must be {{'type': 'text', 'text': ...}}, "
                                 f"{{'type': 'image'[, 'image': path]}} or {{'type': 'image_url', ...}}, "
                                 f"got {part!r:.80}")
        flat.append({**message, "content": "".join(pieces)})
    return flat, images


def chat_images(messages: list[dict]) -> list:
    """The images of ``messages``' image content parts, in order (the order their placeholders
    have in :meth:`Tokenizer.apply_chat_template`'s prompt): a path, PIL image or array per
    part, None for a bare ``{"type": "image"}`` (its image is given separately)."""
    return _content_parts(messages)[1]


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
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            image_token_id: int | None = None) -> list[int]:
        """Render ``messages`` with the checkpoint's Jinja chat template and tokenize the result.

        A message's ``content`` may be a list of parts (transformers' chat messages): text parts
        are joined, and each image part (``{"type": "image"}``, ``{"type": "image", "image":
        path}``, ``{"type": "image_url", "image_url": {"url": path}}``) becomes one
        ``image_token_id`` in the ids, a placeholder that ``generate(images=...)`` expands to
        the image's layout (:func:`chat_images` gives the images in the same order). Where that id
        is one of the tokenizer's added tokens (``[IMG]``), the template's text holds it and is
        tokenized whole, as transformers does; otherwise the text around each image is
        tokenized piece by piece."""
        flat, images = _content_parts(messages)
        if images and image_token_id is None:
            raise ValueError("the messages hold image content parts, but this checkpoint is text-only (no image "
                             "token): load a vision-language checkpoint")
        if not images:
            return self._render(flat, add_generation_prompt)
        # An added token (like [IMG]) is split out of any text before tokenizing; an ordinary
        # vocabulary entry with that id (a tiny model's "'") is not a placeholder.
        added = self._backend.get_added_tokens_decoder() if self.kind == "tokenizers" else {}
        literal = added[image_token_id].content if image_token_id in added else None
        if literal and self.encode(literal, add_special_tokens=False) == [image_token_id]:
            flat = [{**m, "content": m["content"].replace(_IMAGE_MARK, literal)} if isinstance(m, dict)
                    and isinstance(m.get("content"), str) else m for m in flat]
            return self._render(flat, add_generation_prompt)
        pieces = self._rendered_text(flat, add_generation_prompt).split(_IMAGE_MARK)
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the chat template wrote {len(pieces) - 1} of the messages' {len(images)} image(s)")
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            ids += ([image_token_id] if n else []) + (self.encode(piece, add_special_tokens=False) if piece else [])
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        # The template writes the BOS text itself; do not add a second one.
        return self.encode(self._rendered_text(messages, add_generation_prompt), add_special_tokens=False)

    def _rendered_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
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
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)


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
