"""Export trained models into the checkpoint contract of ``models/`` and hand them to the node.

```python
from training.export import export_model, copy_checkpoints, read_index

sha = export_model(run / "checkpoints" / "fs3dcnn-r0.pt", model, "fs3dcnn", hparams, spec,
                   train_cases=train, val_cases=val, split=split.to_dict(), config=cfg,
                   metrics={"val": {...}, "test": {...}}, calibration=fit, row="fs", repeat=0,
                   index=run / "checkpoints.json", val_score=0.93,
                   gate=gate_stats(model, "fs3dcnn", train, val, cache, device="cuda"))
copy_checkpoints(run, "/var/lib/node/checkpoints")          # per row, the repeat with the best VALIDATION score
```

Why this module: every protocol must write the same things into a checkpoint (what it was
trained on, how it was split, the config, its validation and test metrics, the temperature
fitted on validation data) so a site can audit any model the node runs. ``save_checkpoint``
validates before it writes (a file the node would refuse is never written), and every export
is listed in the run's ``checkpoints.json`` index, which :func:`copy_checkpoints` reads.
The node's registry takes the newest checkpoint per family, so copying one per row is the
site's decision (``rows=``), not something to leave to file times.

The gate (``models.gate``): :func:`gate_stats` measures what the node's gate compares a study
with, on the same preprocessed arrays training used (the protocol's ``VolumeCache``): the range of
every measurement over the TRAINING cases, and the statistics of the network's penultimate
features (fitted on the training cases, threshold from the VALIDATION cases the protocol already
selects on; never the test part). ``export_model(..., gate=...)`` stores them as ``extra["gate"]``.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.base import ModelFamily
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.families import get_family
from models.gate import FeatureStats, case_measurements, ranges_from
from training.calibration import TemperatureFit
from training.cases import Case, describe
from training.data import VolumeCache

__all__ = ["ExportError", "copy_checkpoints", "export_model", "gate_record", "gate_stats", "read_index"]

#: feature statistics of the gate: threshold percentile (of validation distances) and PCA components
GATE_PERCENTILE = 99.0
GATE_COMPONENTS = 16

INDEX_NAME = "checkpoints.json"


class ExportError(RuntimeError):
    """Nothing (or not what was asked for) can be exported from a run folder."""


def read_index(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The entries of a run's ``checkpoints.json`` (empty when none exists yet)."""
    p = Path(path)
    if not p.exists():
        return []
    return list(json.loads(p.read_text())["checkpoints"])


def _write_index(path: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"checkpoints": list(entries)}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def gate_record(
    train_measurements: Sequence[Mapping[str, float]],
    train_features: np.ndarray | None = None,
    val_features: np.ndarray | None = None,
    *,
    percentile: float = GATE_PERCENTILE,
    components: int = GATE_COMPONENTS,
) -> dict[str, Any]:
    """``extra["gate"]`` from the training cases' measurements and the training/validation features.

    ``features`` is left out (with a ``features_note`` saying why) when there are fewer than two
    training cases or no validation case: a threshold chosen on the fitting cases themselves would
    decline most new cases, and one chosen on test cases would leak the test part.
    """
    out: dict[str, Any] = {"ranges": ranges_from(train_measurements), "n_cases": len(train_measurements)}
    if train_features is None or val_features is None:
        out["features_note"] = "no feature statistics: no features were given"
    elif len(train_features) < 2 or len(val_features) < 1:
        out["features_note"] = (f"no feature statistics: {len(train_features)} training and "
                                f"{len(val_features)} validation cases (at least 2 and 1 needed)")
    else:
        out["features"] = FeatureStats.fit(np.asarray(train_features), np.asarray(val_features),
                                           percentile=percentile, components=components).to_dict()
    return out


def _features_and_measurements(model: nn.Module, family: ModelFamily, cases: Sequence[Case], cache: VolumeCache,
                               device: str | torch.device, batch_size: int
                               ) -> tuple[np.ndarray, list[dict[str, float]]]:
    """(N, F) features (``family.features``) and the measurements of ``cases``, read once from ``cache``."""
    assert family.features is not None
    roles = list(family.input_roles)
    feats: list[np.ndarray] = []
    measured: list[dict[str, float]] = []
    for start in range(0, len(cases), batch_size):
        items = [cache.get(c) for c in cases[start:start + batch_size]]
        inputs = {r: torch.from_numpy(np.stack([it.arrays[r] for it in items]).astype(np.float32, copy=False))
                  for r in roles}
        if items[0].slice_mask is not None:
            inputs["slice_mask"] = torch.from_numpy(np.stack([np.asarray(it.slice_mask, dtype=bool) for it in items]))
        feats.append(family.features(model, inputs, device).numpy())
        measured.extend(case_measurements(it.meta) for it in items)
    dim = feats[0].shape[1] if feats else 0
    return (np.concatenate(feats) if feats else np.zeros((0, dim))), measured


def gate_stats(
    model: nn.Module,
    family: ModelFamily | str,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    cache: VolumeCache,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    percentile: float = GATE_PERCENTILE,
    components: int = GATE_COMPONENTS,
) -> dict[str, Any]:
    """What the node's gate needs of a trained model (``extra["gate"]``, see :func:`gate_record`).

    ``cache`` must be the one the model was trained and evaluated with (its spec is the
    checkpoint's): the measurements and arrays come from it, so no case is preprocessed again.
    One forward pass (eval mode, float32) over the training and validation cases.
    """
    fam = get_family(family) if isinstance(family, str) else family
    if fam.features is None:
        return gate_record([case_measurements(cache.meta(c)) for c in train_cases])
    f_train, m_train = _features_and_measurements(model, fam, train_cases, cache, device, batch_size)
    f_val, _ = _features_and_measurements(model, fam, val_cases, cache, device, batch_size)
    return gate_record(m_train, f_train, f_val, percentile=percentile, components=components)


def export_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    family_name: str,
    hparams: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case] = (),
    split: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any],
    calibration: TemperatureFit | None = None,
    protocol: str = "",
    row: str = "",
    repeat: int | None = None,
    index: str | os.PathLike[str] | None = None,
    val_score: float | None = None,
    extra: Mapping[str, Any] | None = None,
    description: str | None = None,
    gate: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> str:
    """Write one checkpoint (``models.checkpoint.save_checkpoint``), load it back to prove the node
    can, and list it in ``index``. Returns the SHA-256 content hash.

    ``training_data`` records ``describe(train_cases)`` (+ the validation cases and the case ids,
    so the exact training set can be rebuilt); the temperature is the validation fit's (None when
    no calibration was fitted). ``description`` (e.g. "synthetic demo cohort ..., NOT for clinical
    use") is stored as ``training_data["description"]``, the first thing a site reads about the data.
    ``gate`` (:func:`gate_stats`) is stored as ``extra["gate"]``; without it the node's gate
    declines the checkpoint unless the site allows unchecked models.
    ``thresholds`` (task -> operating threshold on the calibrated P(positive), chosen on validation
    data: ``training.operating.heldout_metrics``) is stored as the checkpoint's ``thresholds``; the
    node labels with it. None stores none, and the node then labels at 0.5.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    training_data = {
        "train": describe(train_cases),
        "val": describe(val_cases) if val_cases else None,
        "train_case_ids": [c.case_id for c in train_cases],
        "val_case_ids": [c.case_id for c in val_cases],
        "split": dict(split) if split is not None else None,
        "protocol": protocol,
        "row": row,
        "repeat": repeat,
    }
    if description:
        training_data["description"] = str(description)
    all_metrics = dict(metrics)
    if calibration is not None:
        all_metrics["calibration"] = calibration.to_dict()
    ext = {"config": dict(config or {}), **dict(extra or {})}
    if gate is not None:
        ext["gate"] = dict(gate)
    temperature = None if calibration is None else float(calibration.temperature)
    sha = save_checkpoint(target, model, family_name, hparams, spec, training_data=training_data,
                          metrics=all_metrics, temperature=temperature, thresholds=thresholds, extra=ext)
    try:
        load_checkpoint(target)
    except CheckpointError as exc:  # would be a bug in models/ or here: never leave such a file
        target.unlink(missing_ok=True)
        raise ExportError(f"{target}: written but refused on load: {exc}") from exc
    if index is not None:
        ip = Path(index)
        entries = [e for e in read_index(ip) if e.get("path") != target.name]
        entries.append({"path": target.name, "family": family_name, "protocol": protocol, "row": row,
                        "repeat": repeat, "sha256": sha, "val_score": val_score,
                        "temperature": temperature, "thresholds": dict(thresholds or {})})
        _write_index(ip, entries)
    return sha


def copy_checkpoints(
    run_dir: str | os.PathLike[str],
    to_dir: str | os.PathLike[str],
    *,
    rows: Sequence[str] | None = None,
    repeat: int | None = None,
) -> list[Path]:
    """Copy, per row, one checkpoint of a run into ``to_dir`` (the node's checkpoint folder).

    Chooses the repeat with the best *validation* score (never test) unless ``repeat`` is given;
    ``rows`` None = every row of the run. Each file is validated with ``load_checkpoint`` before
    it is copied, and copied atomically under ``<protocol>-<row>-r<repeat>.pt``.
    """
    run = Path(run_dir)
    entries = read_index(run / INDEX_NAME)
    if not entries:
        raise ExportError(f"{run}: no {INDEX_NAME}: this folder holds no exported checkpoints (train first)")
    have = sorted({e["row"] for e in entries})
    wanted = list(rows) if rows else have
    unknown = [r for r in wanted if r not in have]
    if unknown:
        raise ExportError(f"{run}: no checkpoints for row(s) {unknown}; this run has {have}")
    dest = Path(to_dir)
    dest.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    for row in wanted:
        cands = [e for e in entries if e["row"] == row]
        if repeat is not None:
            cands = [e for e in cands if e["repeat"] == repeat]
            if not cands:
                raise ExportError(f"{run}: row {row!r} has no checkpoint for repeat {repeat}")
        best = max(cands, key=lambda e: (e.get("val_score") if e.get("val_score") is not None else float("-inf"),
                                         -(e.get("repeat") or 0)))
        src = run / "checkpoints" / best["path"]
        try:
            load_checkpoint(src)
        except CheckpointError as exc:
            raise ExportError(f"{src}: refused, not copied: {exc}") from exc
        name = f"{best.get('protocol') or best['family']}-{row}-r{best['repeat']}.pt"
        tmp = dest / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest / name)
        copied.append(dest / name)
    return copied
