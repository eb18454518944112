"""What one training case IS, independent of where it came from.

Every reader in :mod:`training.datasets` (BraTS2020, BraTS2018/2019, a site
manifest, UCSF-PDGM) and the synthetic cohort end in the same ``list[Case]``,
so the protocols never branch on the data source. A case carries:

- ``images``: role -> NIfTI path, roles from :data:`ROLES` (a role can be
  absent: a site case without T1CE is still a PromptNet test case);
- ``seg``: the tumour segmentation if there is one (MMDLM's tumour-range
  slices need it; grading itself does not);
- ``labels``: task -> 0, 1 or None, coded exactly as ``models.base.TASKS``
  (grade 0=LGG 1=HGG; idh 0=wildtype 1=mutant; 1p19q 0=intact 1=codeleted),
  so a label never needs translating between training and the node;
- ``patient_id``: splits are made per patient, never per case, so that two
  studies of one patient can never sit on both sides of a split.

The label parsers live here (not in the readers) because the coding is part
of what a case is; the readers only add file/row context to their errors.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

#: sequence roles, in the canonical channel order (same as ``models.base.ROLES``)
from models.vocab import ROLES
#: tasks and their class names, index = label value (same as ``models.base.TASKS``)
TASKS: dict[str, tuple[str, str]] = {
    "grade": ("LGG", "HGG"),
    "idh": ("IDH-wildtype", "IDH-mutant"),
    "1p19q": ("1p/19q-intact", "1p/19q-codeleted"),
}
#: BraTS file suffix of each role (``BraTS20_Training_001_t1ce.nii.gz``)
BRATS_SUFFIX: dict[str, str] = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}

# Spellings that mean "no label": sites write all of these.
MISSING_TOKENS: frozenset[str] = frozenset(
    {"", "na", "n/a", "nan", "none", "null", "unknown", "unk", "-", "?", "not available",
     "not assessed", "indeterminate", "missing"}
)

# Accepted spellings per task (lower-cased, whitespace collapsed). Numbers are the
# 0/1 coding itself; WHO grades are deliberately NOT accepted here because "1"
# would be ambiguous (WHO grade I is low grade, label 1 is HGG): the UCSF-PDGM
# reader maps WHO grades explicitly.
_TOKENS: dict[str, dict[str, int]] = {
    "grade": {
        "hgg": 1, "high": 1, "high grade": 1, "high-grade": 1, "gbm": 1, "glioblastoma": 1, "1": 1,
        "lgg": 0, "low": 0, "low grade": 0, "low-grade": 0, "0": 0,
    },
    "idh": {
        "mutant": 1, "mutated": 1, "mut": 1, "idh-mutant": 1, "idh mutant": 1, "idhmut": 1,
        "positive": 1, "1": 1,
        "wildtype": 0, "wild-type": 0, "wild type": 0, "wt": 0, "idh-wildtype": 0,
        "idh wildtype": 0, "idhwt": 0, "negative": 0, "0": 0,
    },
    "1p19q": {
        "codeleted": 1, "co-deleted": 1, "codeletion": 1, "co-deletion": 1, "deleted": 1,
        "1p/19q-codeleted": 1, "yes": 1, "1": 1,
        "intact": 0, "non-codeleted": 0, "not codeleted": 0, "no codeletion": 0,
        "1p/19q-intact": 0, "no": 0, "0": 0,
    },
}


class LabelError(ValueError):
    """A label value that does not parse; the readers wrap it with file/row context."""


def _norm(value: object) -> str:
    return " ".join(str(value).strip().lower().split())


def is_missing(value: object) -> bool:
    """True for None, NaN and the usual spellings of "no value" (empty, NA, unknown...)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return _norm(value) in MISSING_TOKENS


def parse_label(task: str, value: object) -> int | None:
    """Parse one label of ``task`` into 0/1/None; raise :class:`LabelError` if it does not parse.

    Why strict: a typo like "HHG" silently read as missing would shrink the
    training set without anyone noticing; a wrong label is worse than none.
    Floats written by spreadsheets ("1.0") are accepted as their integer.
    """
    if task not in TASKS:
        raise LabelError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    token = _norm(value)
    if token in ("0.0", "1.0"):
        token = token[0]
    coded = _TOKENS[task].get(token)
    if coded is None:
        accepted = sorted(k for k in _TOKENS[task] if not k.isdigit())
        raise LabelError(
            f"{task} value {str(value)!r} does not parse (accepted: 0, 1, {', '.join(accepted)}; "
            f"missing: empty, NA, unknown)")
    return coded


def label_name(task: str, value: int | None) -> str:
    """Class name of a coded label (``""`` for missing), e.g. for CSV files people read."""
    return "" if value is None else TASKS[task][value]


def _freeze_images(images: Mapping[str, Any]) -> Mapping[str, Path]:
    out: dict[str, Path] = {}
    for role, path in images.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        out[role] = Path(path)
    # canonical role order, so equal cases compare and print alike
    return MappingProxyType({r: out[r] for r in ROLES if r in out})


def _freeze_labels(labels: Mapping[str, Any]) -> Mapping[str, int | None]:
    unknown = set(labels) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} (tasks: {', '.join(TASKS)})")
    out: dict[str, int | None] = {}
    for task in TASKS:
        v = labels.get(task)
        if v is not None and v not in (0, 1):
            raise ValueError(f"label {task}={v!r} must be 0, 1 or None")
        out[task] = None if v is None else int(v)
    return MappingProxyType(out)


@dataclass(frozen=True)
class Case:
    """One case (one study of one patient): image paths per role, labels, provenance.

    Frozen with read-only mappings so a case can be shared between data
    loaders, caches and splits without one of them changing it for the rest.
    ``labels`` always holds every task of :data:`TASKS` (None when unknown).
    """

    case_id: str
    patient_id: str
    images: Mapping[str, Path]
    seg: Path | None
    labels: Mapping[str, int | None]
    source: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not str(self.case_id).strip():
            raise ValueError("case_id must not be empty")
        object.__setattr__(self, "case_id", str(self.case_id).strip())
        pid = str(self.patient_id).strip() if self.patient_id is not None else ""
        object.__setattr__(self, "patient_id", pid or self.case_id)
        object.__setattr__(self, "images", _freeze_images(self.images))
        object.__setattr__(self, "seg", None if self.seg is None else Path(self.seg))
        object.__setattr__(self, "labels", _freeze_labels(self.labels))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __hash__(self) -> int:  # mappings are not hashable; identity is (source, case_id)
        return hash((self.source, self.case_id))

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this case has, in canonical order."""
        return tuple(self.images)

    def has_roles(self, roles: Iterable[str]) -> bool:
        return all(r in self.images for r in roles)

    def label(self, task: str) -> int | None:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
        return self.labels[task]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (paths as strings): for caches, logs and manifests."""
        return {
            "case_id": self.case_id,
            "patient_id": self.patient_id,
            "images": {r: str(p) for r, p in self.images.items()},
            "seg": None if self.seg is None else str(self.seg),
            "labels": dict(self.labels),
            "source": self.source,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Case:
        return cls(case_id=d["case_id"], patient_id=d.get("patient_id") or d["case_id"],
                   images=d.get("images", {}), seg=d.get("seg"), labels=d.get("labels", {}),
                   source=d.get("source", ""), meta=d.get("meta", {}))


# --------------------------------------------------------------------------- helpers
def labels_array(cases: Sequence[Case], task: str, *, missing: int = -1) -> np.ndarray:
    """Labels of ``task`` as an int64 array, ``missing`` where unknown (for sklearn splitters)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    return np.array([missing if c.labels[task] is None else c.labels[task] for c in cases],
                    dtype=np.int64)


def has_label(cases: Sequence[Case], task: str) -> np.ndarray:
    """Boolean mask of the cases whose ``task`` label is known."""
    return labels_array(cases, task) >= 0


def labelled(cases: Sequence[Case], task: str) -> list[Case]:
    """The cases with a known ``task`` label (a task's training set never sees None)."""
    return [c for c in cases if c.labels[task] is not None]


def with_roles(cases: Sequence[Case], roles: Iterable[str]) -> list[Case]:
    """The cases that have every one of ``roles`` (e.g. T1CE for a template model)."""
    need = tuple(roles)
    unknown = set(need) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}")
    return [c for c in cases if c.has_roles(need)]


def patient_groups(cases: Sequence[Case]) -> np.ndarray:
    """Integer group per case, equal for cases of one patient (for GroupKFold-style splits).

    Groups are numbered in order of first appearance, so they are stable for a
    given case order.
    """
    index: dict[str, int] = {}
    return np.array([index.setdefault(c.patient_id, len(index)) for c in cases], dtype=np.int64)


def class_counts(cases: Sequence[Case], task: str) -> dict[str, int]:
    """Counts per class name plus ``"missing"``: the numbers a results table states."""
    names = TASKS[task]
    out = {names[0]: 0, names[1]: 0, "missing": 0}
    for c in cases:
        v = c.labels[task]
        out["missing" if v is None else names[v]] += 1
    return out


def check_unique(cases: Sequence[Case]) -> None:
    """Raise ValueError when two cases share a case_id: a duplicate would leak across splits."""
    seen: dict[str, int] = {}
    for i, c in enumerate(cases):
        if c.case_id in seen:
            raise ValueError(f"case_id {c.case_id!r} appears twice (positions {seen[c.case_id]} and {i})")
        seen[c.case_id] = i


def describe(cases: Sequence[Case]) -> dict[str, Any]:
    """A JSON-able description of a case list: what a checkpoint records as its training data.

    Counts per task and class, per source, the roles present, and the number of
    patients, so a site can see at a glance what a model was made from.
    """
    roles: dict[str, int] = {r: 0 for r in ROLES}
    sources: dict[str, int] = {}
    for c in cases:
        for r in c.images:
            roles[r] += 1
        sources[c.source] = sources.get(c.source, 0) + 1
    return {
        "n_cases": len(cases),
        "n_patients": len({c.patient_id for c in cases}),
        "sources": sources,
        "roles": roles,
        "with_seg": sum(c.seg is not None for c in cases),
        "labels": {task: class_counts(cases, task) for task in TASKS},
    }
