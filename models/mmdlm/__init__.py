"""MMDLM (seed 002): multi-sequence multitask MIL model for grade, IDH and 1p/19q.

Rooms as every family: ``network`` (``MMDLM``, ``GatedAttentionMIL``), ``loss``
(``MMDLMLoss``), ``family`` (``FAMILY``). See ``docs/mmdlm.md``.
"""
from __future__ import annotations

from models.mmdlm.family import FAMILY, build, default_hparams, default_spec, predict, spec_for
from models.mmdlm.loss import MISSING, MMDLMLoss, l2_penalty
from models.mmdlm.network import MMDLM, MMDLM_ROLES, MMDLM_TASKS, GatedAttentionMIL, MMDLMOutput

__all__ = [
    "FAMILY",
    "MISSING",
    "MMDLM",
    "MMDLM_ROLES",
    "MMDLM_TASKS",
    "GatedAttentionMIL",
    "MMDLMLoss",
    "MMDLMOutput",
    "build",
    "default_hparams",
    "default_spec",
    "l2_penalty",
    "predict",
    "spec_for",
]
