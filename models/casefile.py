"""A prepared case on disk: one ``.npz`` holding the arrays and the JSON metadata.

Why here (models) and not in the node: training caches prepared cases
(``python -m training prepare``) and the node hands them from its preprocess
step to its inference step, possibly on another host. Both must read and write
the same format, and training may not import the node.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from models.preprocess import PreprocessedCase

CASE_FORMAT = "dicomnode.case/1"
_OPTIONAL_ARRAYS = ("mask", "template_mask", "slice_mask", "slice_indices")


def plain(value: Any) -> Any:
    """JSON types only (numpy scalars and arrays, tuples -> lists), so a saved case reads back equal."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON data: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default, allow_nan=True))


def save_case(case: PreprocessedCase, path: Path) -> None:
    """Write a prepared case to one ``.npz`` (arrays + JSON meta inside), atomically.

    One file, so a reader never sees arrays from one write and meta from
    another; uncompressed, because z-scored floats barely compress and the
    next stage is waiting. The temporary name carries the process id, so two
    writers of the same case never share a temporary file.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {f"array/{role}": np.asarray(a) for role, a in case.arrays.items()}
    arrays["affine"] = np.asarray(case.affine, dtype=np.float64)
    for name in _OPTIONAL_ARRAYS:
        value = getattr(case, name, None)
        if value is not None:
            arrays[name] = np.asarray(value)
    header = {"format": CASE_FORMAT, "roles": list(case.arrays), "meta": plain(case.meta)}
    arrays["header.json"] = np.frombuffer(json.dumps(header, allow_nan=True).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_case(path: Path) -> PreprocessedCase:
    """Read a case written by :func:`save_case` (no pickles: ``allow_pickle=False``)."""
    with np.load(Path(path), allow_pickle=False) as z:
        header = json.loads(bytes(z["header.json"]).decode())
        if header.get("format") != CASE_FORMAT:
            raise ValueError(f"{Path(path).name}: not a prepared case ({header.get('format')!r})")
        arrays = {role: z[f"array/{role}"] for role in header["roles"]}
        get = {name: (z[name] if name in z.files else None) for name in _OPTIONAL_ARRAYS}
        return PreprocessedCase(arrays=arrays, affine=z["affine"], meta=header["meta"], mask=get["mask"],
                                template_mask=get["template_mask"], slice_mask=get["slice_mask"],
                                slice_indices=get["slice_indices"])


__all__ = ["CASE_FORMAT", "load_case", "plain", "save_case"]
