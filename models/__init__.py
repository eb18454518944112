"""What a model IS: the networks of the seed papers, the preprocessing they expect, their labels,
and the checkpoint format that binds them.

``models`` imports nothing from ``dicomnode`` or ``training`` (``dicomnode ->
models <- training``). Importing it does not import any family's network code:
:func:`get_family` does that lazily, by name.
"""
from __future__ import annotations

import importlib
from typing import Any

# Names resolved lazily, on first use: importing ``models`` (or ``models.vocab``) must not import torch,
# because the node's listener process reads the vocabulary and never runs a network.
_EXPORTS: dict[str, str] = {
    "ROLES": "models.vocab", "NON_ENHANCED_ROLES": "models.vocab", "TASKS": "models.vocab",
    "ModelFamily": "models.base", "Prediction": "models.base",
    "CheckpointError": "models.checkpoint", "LoadedCheckpoint": "models.checkpoint",
    "load_checkpoint": "models.checkpoint", "save_checkpoint": "models.checkpoint",
    "FAMILY_NAMES": "models.families", "all_families": "models.families", "get_family": "models.families",
    "PreprocessedCase": "models.preprocess", "PreprocessError": "models.preprocess", "SpecError": "models.preprocess",
    "apply_spec": "models.preprocess", "to_batch": "models.preprocess", "validate_spec": "models.preprocess",
    "CheckpointRegistry": "models.registry", "Decision": "models.registry", "Selection": "models.registry",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ROLES",
    "NON_ENHANCED_ROLES",
    "TASKS",
    "Prediction",
    "ModelFamily",
    "FAMILY_NAMES",
    "get_family",
    "all_families",
    "apply_spec",
    "to_batch",
    "validate_spec",
    "PreprocessedCase",
    "PreprocessError",
    "SpecError",
    "save_checkpoint",
    "load_checkpoint",
    "LoadedCheckpoint",
    "CheckpointError",
    "CheckpointRegistry",
    "Selection",
    "Decision",
]
