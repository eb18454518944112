"""The checkpoint contract: one file that binds weights to everything needed to use them safely.

Why: serving must never run a network on data prepared differently from its
training, nor read its outputs with the wrong label coding. So one file holds
the weights together with the architecture name and hyper-parameters, input
roles, preprocessing spec, tasks and label coding, the training-data
description, validation metrics, software versions, creation time and a
SHA-256 content hash; :func:`load_checkpoint` validates all of it and refuses
(``CheckpointError``, naming what is wrong) a file that does not match.

File layout (``torch.save`` of a dict holding only plain types and tensors, so
it loads with ``weights_only=True`` and never unpickles code)::

    {"format": "glioma-models-checkpoint", "format_version": 2,
     "family": str, "paper": str, "hparams": {...}, "input_roles": [...],
     "tasks": {task: [class names, index = coding]}, "spec": {...},
     "training_data": {...}, "metrics": {...}, "temperature": float | None,
     "thresholds": {task: float},
     "extra": {...}, "versions": {...}, "created": ISO-8601 UTC,
     "state_dict": {key: tensor}, "sha256": hex}

``thresholds`` (format 2) holds the operating threshold per binary task: the
node calls a case positive (the second class of the task's coding) when the
calibrated P(positive) >= the task's threshold. Training chooses it on
validation data (``training.operating``: Youden's J), never on the test part.
Why stored here and not in ``metrics``: it changes what the node reports, so it
is validated (each a number in (0, 1), for a task of the family) and covered
by the content hash like the weights. Optional: a format-1 file (written
before thresholds existed) and a task without an entry load as "no threshold",
and the node then uses 0.5 (argmax for a binary task), as it did before.
Format 2 is written so that code which predates thresholds refuses the file
("newer than this code reads") instead of silently labelling at 0.5.

The content hash covers everything but itself: the weights in sorted key order
(each framed by its key, dtype, shape and byte length) followed by the
canonical JSON (sorted keys, no whitespace) of every other field. Metadata are
converted to plain JSON types at save time, so what is stored is exactly what
was hashed and a load reproduces the hash bit for bit.

The spec is stored validated, with every default explicit
(:func:`models.preprocess.validate_spec`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.base import ModelFamily
from models.families import resolve_family
from models.preprocess import SpecError, output_shape, validate_spec

FORMAT_NAME = "glioma-models-checkpoint"
FORMAT_VERSION = 2
_META_FIELDS: tuple[str, ...] = (
    "format", "format_version", "family", "paper", "hparams", "input_roles", "tasks", "spec",
    "training_data", "metrics", "temperature", "extra", "versions", "created",
)
_REQUIRED: tuple[str, ...] = (*_META_FIELDS, "state_dict", "sha256")
# Fields a file may lack (older formats); when present they are hashed and validated like the others.
_OPTIONAL_META: tuple[str, ...] = ("thresholds",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or must not be used; the message says what is wrong."""


@dataclass
class LoadedCheckpoint:
    """A validated checkpoint: the network (eval mode, on ``map_location``) and its contract."""

    model: nn.Module
    family: ModelFamily
    hparams: dict[str, Any]
    spec: dict[str, Any]
    labels: dict[str, tuple[str, ...]]
    input_roles: tuple[str, ...]
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    sha256: str
    temperature: float | None
    created: str = ""
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # task -> operating threshold on the calibrated P(positive); {} for a file without thresholds (node: 0.5)
    thresholds: dict[str, float] = field(default_factory=dict)


def software_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint (what produced it; not enforced on load)."""
    try:
        package = importlib.metadata.version("dicomnode")
    except importlib.metadata.PackageNotFoundError:
        package = "unknown"
    out = {"torch": str(torch.__version__), "numpy": str(np.__version__), "python": platform.python_version(),
           "package": package}
    for name in ("scipy", "nibabel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON types (tuples become lists); CheckpointError if it is not JSON data."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} must be plain JSON-able data (str, numbers, lists, dicts): {exc}") from exc


def _canonical_json(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def content_hash(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """SHA-256 over the weights (sorted keys, framed) and the canonical JSON of ``meta``."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        data = _tensor_bytes(t)
        header = json.dumps([key, str(t.dtype), list(t.shape), len(data)], separators=(",", ":")).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(data)
    h.update(b"\0meta\0")
    h.update(_canonical_json(meta))
    return h.hexdigest()


def _tasks_of(family: ModelFamily) -> dict[str, list[str]]:
    return {task: list(labels) for task, labels in family.tasks.items()}


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    family_name: str,
    hparams: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    training_data: Mapping[str, Any],
    metrics: Mapping[str, Any],
    temperature: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    families: Mapping[str, ModelFamily] | None = None,
) -> str:
    """Write one checkpoint file and return its SHA-256 content hash.

    Validates before writing (a checkpoint that would be refused on load is
    never written): the family exists, the spec validates and names the
    family's input roles, metadata are JSON data, and the state dict matches a
    network built from ``hparams``. Written atomically (temporary file, fsync,
    rename), so a crash never leaves half a checkpoint under the final name.
    ``thresholds``: task -> operating threshold in (0, 1) (see the module
    docstring); None or {} stores none, and the node then uses 0.5.
    """
    try:
        family = resolve_family(family_name, families)
    except (ValueError, ImportError) as exc:
        raise CheckpointError(str(exc)) from exc
    try:
        clean_spec = validate_spec(spec)
    except SpecError as exc:
        raise CheckpointError(f"spec does not validate: {exc}") from exc
    _check_spec_roles(clean_spec, family)
    if temperature is not None:
        temperature = _check_temperature(temperature)
    clean_thresholds = _check_thresholds(thresholds or {}, family)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    resolved = _resolved_hparams(family, hparams)
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "paper": family.paper,
        "hparams": _plain(resolved, "hparams"),
        "input_roles": list(family.input_roles),
        "tasks": _tasks_of(family),
        "spec": _plain(clean_spec, "spec"),
        "training_data": _plain(dict(training_data), "training_data"),
        "metrics": _plain(dict(metrics), "metrics"),
        "temperature": temperature,
        "thresholds": clean_thresholds,
        "extra": _plain(dict(extra or {}), "extra"),
        "versions": _plain(software_versions(), "versions"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
    }
    _check_weights(state, _build(family, meta["hparams"]), family.name)
    _check_spec_fits(clean_spec, family, meta["hparams"])
    digest = content_hash(state, meta)
    payload = {**meta, "state_dict": state, "sha256": digest}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def _resolved_hparams(family: ModelFamily, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hparams with the family's defaults filled in, when ``hparams`` is a partial override of them.

    Why: every family builds from partial hparams merged over its defaults; a
    checkpoint that stored only the overrides would build a different network
    (or silently different switches) once a default changes. Stored complete,
    it builds what was trained. Hparams with keys outside the defaults are
    stored as given (the family's ``build`` decides whether they are valid).
    """
    given = dict(hparams)
    try:
        defaults = dict(family.default_hparams())
    except Exception as exc:  # a broken family must not write a checkpoint
        raise CheckpointError(f"{family.name}: default_hparams() failed: {exc}") from exc
    if set(given) <= set(defaults):
        return {**defaults, **given}
    return given


def _check_temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"temperature must be a positive finite number or None, got {value!r}")
    return float(value)


def _check_thresholds(value: Any, family: ModelFamily) -> dict[str, float]:
    """A task -> threshold mapping, each strictly inside (0, 1), for binary tasks of the family.

    Why strict: 0 or 1 would call every case one class whatever the network
    says, and a threshold for a task the family lacks means the file was built
    for another model; both must be refused, not served.
    """
    if not isinstance(value, Mapping):
        raise CheckpointError(f"thresholds must be a mapping task -> number, got {type(value).__name__}")
    out: dict[str, float] = {}
    for task, t in value.items():
        if task not in family.tasks:
            raise CheckpointError(f"thresholds: {task!r} is not a task of the {family.name} family "
                                  f"({sorted(family.tasks)})")
        if len(family.tasks[task]) != 2:
            raise CheckpointError(f"thresholds: task {task!r} is not binary; a threshold applies to binary tasks")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 < t < 1.0:
            raise CheckpointError(f"thresholds: {task} must be a number strictly between 0 and 1, got {t!r}")
        out[str(task)] = float(t)
    return out


def _check_spec_roles(spec: Mapping[str, Any], family: ModelFamily) -> None:
    if set(spec["roles"]) != set(family.input_roles):
        raise CheckpointError(
            f"spec roles {spec['roles']} differ from the {family.name} family's input roles {list(family.input_roles)}")


def _check_spec_fits(spec: Mapping[str, Any], family: ModelFamily, hparams: Mapping[str, Any]) -> None:
    """The spec's arrays must have the shape the network built from ``hparams`` takes.

    Why: a spec and hparams that disagree build and load fine, and only fail
    (or worse, silently resize) when the first study is served. Refused here,
    at save and at load, instead.
    """
    if family.spec_for is None:
        return
    try:
        want = output_shape(family.spec_for(hparams))
    except Exception as exc:  # the family's own spec builder refusing these hparams
        raise CheckpointError(f"hparams do not give a {family.name} spec: {type(exc).__name__}: {exc}") from exc
    have = output_shape(spec)
    if want is not None and have != want:
        raise CheckpointError(f"spec produces arrays of shape {have}, but the {family.name} network built from "
                              f"these hparams takes {want}: use the family's spec_for(hparams)")


def _build(family: ModelFamily, hparams: Mapping[str, Any]) -> nn.Module:
    try:
        return family.build(dict(hparams))
    except Exception as exc:  # the family's own validation: any error means "these hparams do not build"
        raise CheckpointError(f"hparams do not build a {family.name} network: {type(exc).__name__}: {exc}") from exc


def _check_weights(state: Mapping[str, torch.Tensor], model: nn.Module, family_name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise CheckpointError(f"weights do not match the {family_name} network built from the hparams: "
                              f"{'; '.join(parts)}")
    for key, ref in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"weights: {key} is not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"weights: {key} has shape {tuple(t.shape)}, the {family_name} network "
                                  f"built from the hparams expects {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise CheckpointError(f"weights: {key} has dtype {t.dtype}, the network expects {ref.dtype}")


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    families: Mapping[str, ModelFamily] | None = None,
) -> LoadedCheckpoint:
    """Read, validate and build a checkpoint; ``CheckpointError`` names whatever does not match.

    Checked, in order: the file reads as a weights-only checkpoint; format name
    and version (newer than this code: refused); required fields; the content
    hash (any change after writing: refused); the family is known; input roles
    and tasks/label coding equal the family's contract; the spec validates and
    names those roles; the temperature; the thresholds (optional: a file
    without them loads with ``thresholds == {}``); the hparams build the network; every
    weight key, shape and dtype matches it. Software versions are recorded,
    not enforced.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code, truncated file ...
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    where = f"{p.name}"
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where}: not a checkpoint (top level is {type(payload).__name__}, not a dict)")
    if payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: not a {FORMAT_NAME} file (format {payload.get('format')!r})")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: written in checkpoint format {version}, newer than this code reads "
                              f"({FORMAT_VERSION}); upgrade the models package")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(payload) - set(_REQUIRED) - set(_OPTIONAL_META))
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {unknown}")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{where}: state_dict is not a dict of tensors")
    meta = {k: payload[k] for k in _META_FIELDS}
    meta.update({k: payload[k] for k in _OPTIONAL_META if k in payload})  # hashed only when the file has them
    computed = content_hash(state, meta)
    if computed != payload["sha256"]:
        raise CheckpointError(f"{where}: content hash mismatch: the file was changed after it was written "
                              f"(stored {str(payload['sha256'])[:16]}..., computed {computed[:16]}...)")
    try:
        family = resolve_family(str(meta["family"]), families)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    except ImportError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if list(meta["input_roles"]) != list(family.input_roles):
        raise CheckpointError(f"{where}: input roles {meta['input_roles']} differ from the {family.name} "
                              f"family's {list(family.input_roles)}")
    want_tasks = _tasks_of(family)
    if meta["tasks"] != want_tasks:
        raise CheckpointError(f"{where}: tasks/label coding {meta['tasks']} differ from the {family.name} "
                              f"family's {want_tasks}")
    try:
        spec = validate_spec(meta["spec"])
    except SpecError as exc:
        raise CheckpointError(f"{where}: preprocessing spec does not validate: {exc}") from exc
    try:
        _check_spec_roles(spec, family)
        temperature = None if meta["temperature"] is None else _check_temperature(meta["temperature"])
        thresholds = _check_thresholds(meta.get("thresholds", {}), family)
        if not isinstance(meta["hparams"], dict):
            raise CheckpointError("hparams is not a dict")
        model = _build(family, meta["hparams"])
        _check_weights(state, model, family.name)
        _check_spec_fits(spec, family, meta["hparams"])
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return LoadedCheckpoint(
        model=model,
        family=family,
        hparams=dict(meta["hparams"]),
        spec=spec,
        labels={task: tuple(names) for task, names in meta["tasks"].items()},
        input_roles=tuple(meta["input_roles"]),
        training_data=dict(meta["training_data"]),
        metrics=dict(meta["metrics"]),
        versions=dict(meta["versions"]),
        sha256=str(payload["sha256"]),
        temperature=temperature,
        created=str(meta["created"]),
        path=p,
        extra=dict(meta["extra"]),
        thresholds=thresholds,
    )


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata fields of a checkpoint file, UNVALIDATED (for listings and error reports only)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint")
    return {k: payload.get(k) for k in (*_META_FIELDS, *_OPTIONAL_META, "sha256")}
