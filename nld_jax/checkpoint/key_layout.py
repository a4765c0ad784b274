"""Tensor-name layouts of a safetensors set: NVIDIA's, and transformers' Mistral3 ones.

nld-jax's canonical names are NVIDIA's (``encoder.*`` text model, ``diffusion_head.weight``,
``encoder.vision_tower.*``, ``encoder.multi_modal_projector.*``). A VLM fine-tuned with
transformers' ``Mistral3ForConditionalGeneration`` is saved under its own names, which map one to
one onto NVIDIA's (checked against transformers' ``modeling_mistral3.py`` and the ``llava`` entry
of its ``conversion_mapping.py``)::

    transformers 4.x                         transformers 5.x                  NVIDIA (canonical)
    language_model.model.X                   model.language_model.X            encoder.X
    language_model.lm_head.weight            lm_head.weight                    diffusion_head.weight
    vision_tower.X                           model.vision_tower.X              encoder.vision_tower.X
    multi_modal_projector.X                  model.multi_modal_projector.X     encoder.multi_modal_projector.X

:func:`detect_layout` says which one a set of names uses; names that belong to no layout are
kept as they are (the strict accounting later calls them unknown tensors). Names from two
layouts in one checkpoint are refused, naming the file and a key of each: a half-renamed
checkpoint would otherwise load some tensors under the wrong name or not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from nld_jax.checkpoint.errors import CheckpointError

__all__ = ["KeyLayout", "LAYOUTS", "NVIDIA", "detect_layout"]


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """A layout: ``(its prefix, NVIDIA's prefix)`` pairs; a name matching none is not this layout's."""

    name: str
    prefixes: tuple[tuple[str, str], ...]

    def owns(self, key: str) -> bool:
        return any(key.startswith(ours) for ours, _ in self.prefixes)

    def to_canonical(self, key: str) -> str:
        for ours, nvidia in self.prefixes:
            if key.startswith(ours):
                return nvidia + key[len(ours):]
        return key


NVIDIA = KeyLayout("NVIDIA's (encoder.*, diffusion_head.*)", (("encoder.", "encoder."),
                                                              ("diffusion_head.", "diffusion_head.")))
# Longer prefixes first: "language_model.lm_head." before any shorter one of the same layout.
TRANSFORMERS_4 = KeyLayout("transformers 4.x Mistral3 (language_model.model.*, vision_tower.*)", (
    ("language_model.lm_head.", "diffusion_head."), ("language_model.model.", "encoder."),
    ("vision_tower.", "encoder.vision_tower."), ("multi_modal_projector.", "encoder.multi_modal_projector.")))
TRANSFORMERS_5 = KeyLayout("transformers 5.x Mistral3 (model.language_model.*, lm_head.*)", (
    ("lm_head.", "diffusion_head."), ("model.language_model.", "encoder."),
    ("model.vision_tower.", "encoder.vision_tower."),
    ("model.multi_modal_projector.", "encoder.multi_modal_projector.")))
LAYOUTS = (NVIDIA, TRANSFORMERS_4, TRANSFORMERS_5)


def detect_layout(keys: Iterable[str], where: str, file_of: Callable[[str], str] | None = None) -> KeyLayout:
    """The one layout ``keys`` use (NVIDIA's when they use none); names of two layouts are an
    error naming the file (``file_of(key)``, else ``where``) and one key of each."""
    first: dict[str, str] = {}  # layout name -> its first key
    for key in keys:
        for layout in LAYOUTS:
            if layout.owns(key):
                first.setdefault(layout.name, key)
                break
    if len(first) > 1:
        (a, key_a), (b, key_b) = list(first.items())[:2]
        at = file_of(key_b) if file_of else where
        raise CheckpointError(f"{at}: tensor names of two layouts in one checkpoint: {key_a!r} is {a}, "
                              f"{key_b!r} is {b}; nld_jax reads one layout at a time (re-save it in one)")
    found = next(iter(first), NVIDIA.name)
    return next(layout for layout in LAYOUTS if layout.name == found)
