"""The processing stages of one study version as plain functions: convert, prepare, infer.

Why plain functions: the Celery tasks (``dicomnode.pipeline``) call them, and
tests and scripts call them directly; nothing here knows about queues. Stages
hand over through files (NIfTI volumes, a conversion manifest, a prepared case
as ``.npz`` + JSON), never through memory, because each may run in another
process or on another host.

Names are resolved lazily so that a CPU worker that only converts does not
import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ConvertedSeries": "convert", "SourceImage": "convert", "convert_series": "convert",
    "convert_version": "convert",
    "QualityThresholds": "prepare", "PrepareError": "prepare", "prepare": "prepare", "save_case": "prepare",
    "load_case": "prepare", "quality_flags": "prepare", "gate_case": "prepare", "quality_findings": "prepare",
    "ModelCache": "infer", "resolve_device": "infer", "run_model": "infer", "calibrate": "infer",
    "temperatures_of": "infer", "check_case_features": "infer", "FeatureCheck": "infer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
