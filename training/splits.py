"""Patient-level, stratified, seeded train/validation/test splits.

Why this module exists: every number in a results table is only as honest as
the split behind it. Three rules are enforced here rather than trusted to each
protocol:

- **Patient level.** Several cases (visits, re-scans) of one patient are nearly
  the same image; if one lands in training and another in test, the test
  measures memory, not generalisation. All cases of a patient always fall in
  the same part of a split, and stratification uses the *patient's* label.
- **Fixed seeds, recorded splits.** The same inputs and seed give the same
  splits (independent of the order the cases were listed in), and a
  :class:`SplitPlan` serialises to JSON so a run records exactly which cases it
  tested on.
- **Model selection never looks at test.** An optional validation part is
  carved out of the *training* part (stratified, patient level) for early
  stopping, checkpoint selection and temperature scaling. MMDLM's public code
  selected checkpoints on its test folds (see the field notes); we do not.

Two schemes:

- :func:`repeated_holdout`: stratified 4:1 train/test, repeated 5 times with
  fresh draws (seed 000's protocol; ``test_fraction=0.2``, ``repeats=5``).
- :func:`stratified_kfold`: stratified k-fold cross-validation (seed 002 used
  5 folds); every patient is tested exactly once.

Randomness comes from ``numpy.random.RandomState``: its stream is frozen by
NumPy's compatibility policy (NEP 19), whereas ``Generator`` streams may change
between NumPy versions, which would silently change "seeded" splits.
"""
from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT = "training.splits/1"

# A stratification label: what a patient is stratified on. Missing labels
# (None, NaN) form their own stratum so that cases without a label are spread
# evenly too. Tuples come from :func:`joint_strata`.
Label = None | bool | int | float | str | tuple[Any, ...]
Conflict = Literal["error", "max", "first"]
Part = Literal["train", "val", "test"]
PARTS: tuple[Part, ...] = ("train", "val", "test")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class Split:
    """One train/val/test partition of the cases (one repeat or one fold).

    ``train``, ``val`` and ``test`` are sorted ``int64`` index arrays into the
    plan's case list (read-only, so that ``X[split.test]`` works and nobody
    edits a recorded split in place); ``*_ids`` are the same cases by id, for
    humans and for JSON. ``val`` is empty when no validation part was asked
    for.
    """

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    test_ids: tuple[str, ...]

    def part(self, name: Part) -> np.ndarray:
        """The index array of one part, by name."""
        if name not in PARTS:
            raise ValueError(f"unknown split part {name!r}; expected one of {PARTS}")
        return getattr(self, name)

    def ids(self, name: Part) -> tuple[str, ...]:
        """The case ids of one part, by name."""
        if name not in PARTS:
            raise ValueError(f"unknown split part {name!r}; expected one of {PARTS}")
        return getattr(self, f"{name}_ids")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: indices and ids of every part."""
        out: dict[str, Any] = {"index": self.index}
        for name in PARTS:
            out[name] = [int(i) for i in self.part(name)]
            out[f"{name}_ids"] = list(self.ids(name))
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """All splits of one experiment, with what they were made from.

    ``scheme`` is ``"repeated-holdout"`` or ``"kfold"``; ``params`` holds the
    scheme's parameters (fractions, repeats or k); ``labels`` are the
    per-case stratification labels as given (normalised to JSON-able values);
    ``notes`` records anything a reader of the results should know (e.g. a
    stratum too small to reach every fold). A plan validates itself on
    construction: a hand-edited JSON with a patient in two parts is refused.
    """

    scheme: str
    seed: int
    params: Mapping[str, Any]
    case_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: tuple[Label, ...]
    splits: tuple[Split, ...]
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_plan(self)

    def __len__(self) -> int:
        return len(self.splits)

    def __iter__(self) -> Iterator[Split]:
        return iter(self.splits)

    def __getitem__(self, i: int) -> Split:
        return self.splits[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SplitPlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data (tuples become lists)."""
        return {
            "format": FORMAT,
            "scheme": self.scheme,
            "seed": self.seed,
            "params": dict(self.params),
            "case_ids": list(self.case_ids),
            "patient_ids": list(self.patient_ids),
            "labels": [_label_to_json(v) for v in self.labels],
            "notes": list(self.notes),
            "splits": [s.to_dict() for s in self.splits],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON text (stable key order, so equal plans give equal text)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON; returns the path. A run does this before training."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n", encoding="utf-8")
        return p

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitPlan:
        """Rebuild (and re-validate) a plan from :meth:`to_dict` output."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a split plan: format is {data.get('format')!r}, expected {FORMAT!r}")
        try:
            splits = tuple(
                Split(
                    index=int(s["index"]),
                    train=_index_array(s["train"]),
                    val=_index_array(s["val"]),
                    test=_index_array(s["test"]),
                    train_ids=tuple(str(x) for x in s["train_ids"]),
                    val_ids=tuple(str(x) for x in s["val_ids"]),
                    test_ids=tuple(str(x) for x in s["test_ids"]),
                )
                for s in data["splits"]
            )
            return cls(
                scheme=str(data["scheme"]),
                seed=int(data["seed"]),
                params=dict(data["params"]),
                case_ids=tuple(str(x) for x in data["case_ids"]),
                patient_ids=tuple(str(x) for x in data["patient_ids"]),
                labels=tuple(_normalise_label(_label_from_json(v)) for v in data["labels"]),
                splits=splits,
                notes=tuple(str(x) for x in data.get("notes", ())),
            )
        except KeyError as exc:
            raise ValueError(f"split plan is missing the field {exc.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> SplitPlan:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"split plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("split plan JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> SplitPlan:
        """Read a plan saved with :meth:`save` (to re-evaluate a finished run on the same splits)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read split plan {p}: {exc}") from None
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None


# --------------------------------------------------------------------------- public builders


def repeated_holdout(
    case_ids: Sequence[str],
    labels: Sequence[Any],
    patient_ids: Sequence[str] | None = None,
    *,
    test_fraction: float = 0.2,
    repeats: int = 5,
    val_fraction: float = 0.0,
    seed: int = 0,
    on_conflict: Conflict = "error",
) -> SplitPlan:
    """Stratified train/test splits drawn ``repeats`` times (seed 000: 4:1, five repeats).

    ``test_fraction`` is the share of *patients* in test (0.2 is 4:1); each
    stratum contributes its proportional share (largest-remainder rounding so
    the total is exact). ``val_fraction`` is the share of each repeat's
    *training* patients moved to validation (0 = no validation part).
    Repeats are independent draws, so a case may be tested in several repeats
    or none, as in the paper. ``patient_ids=None`` means one case per patient
    (BraTS). See :func:`stratified_kfold` for the other arguments.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _check_val_fraction(val_fraction)
    cases, patients, case_labels, groups, strata = _prepare(case_ids, labels, patient_ids, on_conflict)
    n_pat = len(groups)
    if n_pat < 2:
        raise ValueError(f"need at least 2 patients for a train/test split, got {n_pat}")
    rng = np.random.RandomState(seed)
    splits: list[Split] = []
    all_pat = np.arange(n_pat)
    for r in range(repeats):
        test_p, train_p = _stratified_take(all_pat, strata, test_fraction, rng)
        val_p, train_p = _carve_val(train_p, strata, val_fraction, rng)
        splits.append(_make_split(r, cases, groups, train_p, val_p, test_p))
    notes = _stratum_notes(strata, minimum=2, what="a stratum with fewer than 2 patients cannot be in both train and test")
    return SplitPlan(
        scheme="repeated-holdout",
        seed=int(seed),
        params={"test_fraction": test_fraction, "repeats": repeats, "val_fraction": val_fraction, "on_conflict": on_conflict},
        case_ids=cases,
        patient_ids=patients,
        labels=case_labels,
        splits=tuple(splits),
        notes=notes,
    )


def stratified_kfold(
    case_ids: Sequence[str],
    labels: Sequence[Any],
    patient_ids: Sequence[str] | None = None,
    *,
    k: int = 5,
    val_fraction: float = 0.0,
    seed: int = 0,
    on_conflict: Conflict = "error",
) -> SplitPlan:
    """Stratified k-fold cross-validation at patient level; every patient is tested once.

    Patients are shuffled within each stratum, then dealt round-robin into the
    k folds, continuing the count across strata, so that every fold gets its
    share of each class and fold sizes differ by at most one patient.

    - ``case_ids``: unique id per case (scan), in the order of your data arrays;
      the returned indices refer to this order.
    - ``labels``: per-case stratification label (``0``/``1``, ``"HGG"``, a tuple
      from :func:`joint_strata`; ``None``/NaN = missing, its own stratum).
    - ``patient_ids``: per-case patient; ``None`` = every case its own patient.
    - ``val_fraction``: share of each fold's training patients carved out,
      stratified, as validation (for model selection and temperature scaling).
    - ``on_conflict``: what to do when one patient's cases carry different
      labels: ``"error"`` (default: usually a data error), ``"max"`` (e.g. a
      glioma that progressed from LGG to HGG counts as HGG), ``"first"``
      (the label of the patient's first case in sorted case-id order).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    _check_val_fraction(val_fraction)
    cases, patients, case_labels, groups, strata = _prepare(case_ids, labels, patient_ids, on_conflict)
    n_pat = len(groups)
    if n_pat < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} patients, got {n_pat}")
    rng = np.random.RandomState(seed)
    fold_of = np.empty(n_pat, dtype=np.int64)
    pos = 0
    for key in _sorted_keys(strata):
        members = np.array([i for i in range(n_pat) if strata[i] == key], dtype=np.int64)
        for p in members[rng.permutation(len(members))]:
            fold_of[p] = pos % k
            pos += 1
    splits: list[Split] = []
    all_pat = np.arange(n_pat)
    for f in range(k):
        test_p = all_pat[fold_of == f]
        train_p = all_pat[fold_of != f]
        val_p, train_p = _carve_val(train_p, strata, val_fraction, rng)
        splits.append(_make_split(f, cases, groups, train_p, val_p, test_p))
    notes = _stratum_notes(strata, minimum=k, what=f"a stratum with fewer than {k} patients is missing from some test folds")
    return SplitPlan(
        scheme="kfold",
        seed=int(seed),
        params={"k": k, "val_fraction": val_fraction, "on_conflict": on_conflict},
        case_ids=cases,
        patient_ids=patients,
        labels=case_labels,
        splits=tuple(splits),
        notes=notes,
    )


def joint_strata(*label_lists: Sequence[Any]) -> list[tuple[Label, ...]]:
    """Combine several per-case label lists into one stratification label per case.

    Why: MMDLM is evaluated on grade, IDH and 1p/19q at once; stratifying on
    the tuple keeps every fold's mix of all three (IDH-mutant codeleted LGG
    are rare, and a fold without any makes its 1p/19q AUC undefined). Missing
    values stay ``None`` inside the tuple.
    """
    if not label_lists:
        raise ValueError("joint_strata needs at least one label list")
    n = len(label_lists[0])
    for i, lst in enumerate(label_lists):
        if len(lst) != n:
            raise ValueError(f"label list {i} has {len(lst)} entries, the first has {n}")
    return [tuple(_normalise_label(lst[j]) for lst in label_lists) for j in range(n)]


# --------------------------------------------------------------------------- internals


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _normalise_label(value: Any) -> Label:
    """Make a label hashable, comparable across runs and JSON-able; NaN -> None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_normalise_label(v) for v in value)
    raise ValueError(f"stratification label {value!r} ({type(value).__name__}) is not a number, string, None or tuple")


def _label_to_json(value: Label) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_label_to_json(v) for v in value]}
    return value


def _label_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_label_from_json(v) for v in value["tuple"])
    return value


def _sort_key(value: Hashable) -> tuple[str, str]:
    """A total order over labels of mixed types (None, ints, strings, tuples)."""
    return (type(value).__name__, repr(value))


def _sorted_keys(strata: Sequence[Label]) -> list[Label]:
    return sorted(set(strata), key=_sort_key)


def _prepare(
    case_ids: Sequence[str],
    labels: Sequence[Any],
    patient_ids: Sequence[str] | None,
    on_conflict: Conflict,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[Label, ...], list[np.ndarray], list[Label]]:
    """Validate inputs and group cases by patient.

    Returns the case ids, per-case patient ids and labels (as given, in input
    order), the case indices of each patient (patients in sorted id order, so
    the result does not depend on input order) and each patient's stratum.
    """
    cases = tuple(str(c) for c in case_ids)
    if not cases:
        raise ValueError("no cases to split")
    if len(labels) != len(cases):
        raise ValueError(f"{len(cases)} case ids but {len(labels)} labels")
    if any(not c for c in cases):
        raise ValueError("case ids must be non-empty strings")
    if len(set(cases)) != len(cases):
        dup = sorted({c for c in cases if cases.count(c) > 1})
        raise ValueError(f"case ids must be unique; repeated: {dup[:5]}")
    if patient_ids is None:
        patients = cases
    else:
        patients = tuple(str(p) for p in patient_ids)
        if len(patients) != len(cases):
            raise ValueError(f"{len(cases)} case ids but {len(patient_ids)} patient ids")
        if any(not p for p in patients):
            raise ValueError("patient ids must be non-empty strings")
    if on_conflict not in ("error", "max", "first"):
        raise ValueError(f"on_conflict must be 'error', 'max' or 'first', got {on_conflict!r}")
    case_labels = tuple(_normalise_label(v) for v in labels)

    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    groups: list[np.ndarray] = []
    strata: list[Label] = []
    for p in sorted(by_patient):
        idx = sorted(by_patient[p], key=lambda i: cases[i])
        groups.append(np.array(idx, dtype=np.int64))
        strata.append(_patient_label(p, [case_labels[i] for i in idx], on_conflict))
    return cases, patients, case_labels, groups, strata


def _patient_label(patient: str, values: list[Label], on_conflict: Conflict) -> Label:
    """One stratification label per patient; missing values yield to known ones."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    distinct = sorted(set(known), key=_sort_key)
    if len(distinct) == 1:
        return distinct[0]
    if on_conflict == "error":
        raise ValueError(
            f"patient {patient!r} has cases with different labels {distinct}: "
            "fix the labels, or pass on_conflict='max' or 'first'"
        )
    if on_conflict == "first":
        return known[0]
    try:
        return max(known)  # type: ignore[type-var]
    except TypeError:
        raise ValueError(f"patient {patient!r}: labels {distinct} cannot be ordered for on_conflict='max'") from None


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _stratified_take(
    pool: np.ndarray,
    strata: Sequence[Label],
    fraction: float,
    rng: np.random.RandomState,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``fraction`` of the patients in ``pool``, stratified; returns (taken, kept), sorted.

    The total is ``round(fraction * n)``, clipped so both parts keep at least
    one patient; it is shared among strata by largest remainder, so a
    369-case BraTS2020 split gives 74 test patients with 59 HGG and 15 LGG.
    """
    n = len(pool)
    total = min(max(_round_half_up(fraction * n), 1), n - 1)
    keys = _sorted_keys([strata[p] for p in pool])
    members = {key: pool[[strata[p] == key for p in pool]] for key in keys}
    exact = {key: total * len(members[key]) / n for key in keys}
    quota = {key: math.floor(exact[key]) for key in keys}
    short = total - sum(quota.values())
    # Largest remainder first; ties go to the larger stratum, then the key order.
    order = sorted(keys, key=lambda key: (-(exact[key] - quota[key]), -len(members[key]), _sort_key(key)))
    for key in order[:short]:
        quota[key] += 1
    taken: list[np.ndarray] = []
    for key in keys:
        shuffled = members[key][rng.permutation(len(members[key]))]
        taken.append(shuffled[: quota[key]])
    take = np.sort(np.concatenate(taken)) if taken else np.empty(0, dtype=np.int64)
    keep = np.setdiff1d(pool, take)
    return take.astype(np.int64), keep.astype(np.int64)


def _carve_val(
    train_p: np.ndarray, strata: Sequence[Label], val_fraction: float, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Move a stratified share of the training patients into validation."""
    if val_fraction == 0.0:
        return np.empty(0, dtype=np.int64), train_p
    if len(train_p) < 2:
        raise ValueError(f"cannot carve a validation part out of {len(train_p)} training patient(s)")
    return _stratified_take(train_p, strata, val_fraction, rng)


def _make_split(
    index: int,
    cases: tuple[str, ...],
    groups: list[np.ndarray],
    train_p: np.ndarray,
    val_p: np.ndarray,
    test_p: np.ndarray,
) -> Split:
    """Expand patient positions to sorted, read-only case-index arrays."""

    def expand(pats: np.ndarray) -> np.ndarray:
        if len(pats) == 0:
            arr = np.empty(0, dtype=np.int64)
        else:
            arr = np.sort(np.concatenate([groups[p] for p in pats])).astype(np.int64)
        arr.setflags(write=False)
        return arr

    tr, va, te = expand(train_p), expand(val_p), expand(test_p)
    return Split(
        index=index,
        train=tr,
        val=va,
        test=te,
        train_ids=tuple(cases[i] for i in tr),
        val_ids=tuple(cases[i] for i in va),
        test_ids=tuple(cases[i] for i in te),
    )


def _index_array(values: Sequence[int]) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.int64)
    arr.setflags(write=False)
    return arr


def _stratum_notes(strata: Sequence[Label], *, minimum: int, what: str) -> tuple[str, ...]:
    counts = {key: sum(1 for s in strata if s == key) for key in _sorted_keys(strata)}
    small = {key: c for key, c in counts.items() if c < minimum}
    if not small:
        return ()
    listed = ", ".join(f"{key!r}: {c}" for key, c in small.items())
    return (f"small strata ({listed} patients): {what}",)


def _check_plan(plan: SplitPlan) -> None:
    """Refuse a plan whose parts overlap, leak a patient, or disagree with its ids."""
    n = len(plan.case_ids)
    if len(plan.patient_ids) != n or len(plan.labels) != n:
        raise ValueError(f"split plan: {n} case ids, {len(plan.patient_ids)} patient ids, {len(plan.labels)} labels")
    if len(set(plan.case_ids)) != n:
        raise ValueError("split plan: case ids are not unique")
    if not plan.splits:
        raise ValueError("split plan has no splits")
    for s in plan.splits:
        seen: dict[int, str] = {}
        patient_part: dict[str, str] = {}
        for name in PARTS:
            idx = s.part(name)
            ids = s.ids(name)
            if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
                raise ValueError(f"split {s.index}: {name} indices out of range 0..{n - 1}")
            if tuple(plan.case_ids[i] for i in idx) != ids:
                raise ValueError(f"split {s.index}: {name} case ids do not match its indices")
            for i in idx:
                i = int(i)
                if i in seen:
                    raise ValueError(f"split {s.index}: case {plan.case_ids[i]!r} is in both {seen[i]} and {name}")
                seen[i] = name
                p = plan.patient_ids[i]
                if patient_part.setdefault(p, name) != name:
                    raise ValueError(
                        f"split {s.index}: patient {p!r} has cases in both {patient_part[p]} and {name}"
                    )
        if not len(s.train) or not len(s.test):
            raise ValueError(f"split {s.index}: train and test must both be non-empty")
