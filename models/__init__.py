"""What a model IS: the networks of the seed papers, the preprocessing they expect, their labels,
and the checkpoint format that binds them.

``models`` imports nothing from ``dicomnode`` or ``training`` (``dicomnode ->
models <- training``). Importing it does not import any family's network code:
:func:`get_family` does that lazily, by name.
"""
from __future__ import annotations

from models.base import NON_ENHANCED_ROLES, ROLES, TASKS, ModelFamily, Prediction
from models.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from models.families import FAMILY_NAMES, all_families, get_family
from models.preprocess import (
    PreprocessedCase,
    PreprocessError,
    SpecError,
    apply_spec,
    to_batch,
    validate_spec,
)
from models.registry import CheckpointRegistry, Decision, Selection

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
