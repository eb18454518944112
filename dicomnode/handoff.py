"""The typed records one stage hands to the next: converted series, the prepared plan, the version's result.

Frozen dataclasses that validate at construction and round-trip through JSON,
because the stages run as separate Celery tasks (possibly on separate hosts) and
hand over through files in the version's work directory and rows in the index,
never through memory. A later stage READS these records; it never re-runs the
stage that wrote them (a missing record is a :class:`HandoffMissing`: the earlier
step has to run again, visibly, as itself). To change a record, build a new one
(:func:`dataclasses.replace`).

Bottom floor: imports nothing of dicomnode's but the atomic writer, and only the
torch-free vocabulary of ``models``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.files import write_atomic
from models.vocab import ROLES, TASKS


class HandoffError(ValueError):
    """A record that would say something impossible (an unknown role, probabilities that do not sum to 1...)."""


class HandoffMissing(FileNotFoundError):
    """The earlier stage's record is not there: that stage must run (again) first."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise HandoffError(what)


def _load_json(path: Path, schema: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise HandoffMissing(f"{Path(path).name} is missing: its stage has not run for this version") from exc
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise HandoffMissing(f"{Path(path).name} is not a {schema} record: its stage must run again")
    return data


@dataclass(frozen=True)
class SourceRef:
    """One source image (or frame of a multi-frame image) a report may point at."""

    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None  # 1-based frame number for Enhanced MR; None for single-frame images

    def __post_init__(self) -> None:
        _require(bool(self.series_instance_uid) and bool(self.sop_class_uid) and bool(self.sop_instance_uid),
                 "a source reference needs series, SOP class and SOP instance UIDs")
        _require(self.frame is None or self.frame >= 1, f"frame numbers are 1-based, got {self.frame}")


@dataclass(frozen=True)
class InputSeries:
    """A series the version's grading used, with every instance (for the SR's evidence references)."""

    role: str
    series_instance_uid: str
    series_number: int | None
    series_description: str | None
    instances: list[SourceRef]
    example_file: str  # absolute path of one stored instance: patient/study attributes for the report
    converter: str | None = None  # "dicom2nifti" | "dcm2niix"
    nifti: str | None = None  # absolute path of the converted volume
    files: list[str] = field(default_factory=list)  # absolute path of each instance, in ``instances`` order

    def __post_init__(self) -> None:
        _require(self.role in ROLES, f"an input series has a grading role ({', '.join(ROLES)}), got {self.role!r}")
        _require(not self.files or len(self.files) == len(self.instances),
                 f"{self.role}: {len(self.files)} file(s) for {len(self.instances)} instance(s)")


THRESHOLD_SOURCES: tuple[str, ...] = ("validation", "default")


@dataclass(frozen=True)
class TaskResult:
    """One task's answer from one model, e.g. grade: HGG with P(HGG) = 0.83."""

    task: str  # "grade" | "idh" | "1p19q" (models.base.TASKS)
    label: str  # predicted class name: the positive class when probability >= threshold, e.g. "HGG"
    probability: float  # probability of the POSITIVE class (the second of models.base.TASKS[task])
    probabilities: dict[str, float]  # class name -> probability, summing to 1
    calibrated: bool  # temperature scaling from the checkpoint was applied
    # The operating threshold on ``probability`` that gave ``label``; the defaults keep result files
    # written before thresholds existed readable (they were labelled by argmax, i.e. at 0.5).
    threshold: float = 0.5
    threshold_source: str = "default"  # "validation": chosen on validation data, stored in the checkpoint

    def __post_init__(self) -> None:
        _require(isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                 and 0.0 < float(self.threshold) < 1.0,
                 f"{self.task}: threshold {self.threshold!r} is not a number strictly between 0 and 1")
        _require(self.threshold_source in THRESHOLD_SOURCES,
                 f"{self.task}: threshold_source {self.threshold_source!r} is not one of {THRESHOLD_SOURCES}")
        _require(self.task in TASKS, f"unknown task {self.task!r} (tasks: {', '.join(TASKS)})")
        _require(set(self.probabilities) <= set(TASKS[self.task]),
                 f"{self.task}: classes {sorted(self.probabilities)} are not {list(TASKS[self.task])}")
        _require(self.label in self.probabilities, f"{self.task}: label {self.label!r} has no probability")
        total = sum(self.probabilities.values())
        _require(math.isfinite(total) and abs(total - 1.0) < 1e-3,
                 f"{self.task}: probabilities sum to {total:.4f}, not 1")
        _require(0.0 <= self.probability <= 1.0, f"{self.task}: probability {self.probability} outside [0, 1]")


@dataclass(frozen=True)
class KeySlice:
    """A slice a model attended to most (MMDLM attention), mapped back to a source image."""

    role: str
    attention: float
    ref: SourceRef
    grid_index: int | None = None  # the slice on the prepared case's grid (along its slice axis): the summary shows it


# Names a reader knows the families by: everything a person reads (the summary image, the SR's text
# values, the terminal and HTML views, "cannot grade" sentences) says these, never the code name or the
# paper's seed label; the code name stays where identifiers go (algorithm identification, tracking
# identifiers, status JSON). The family's code name is used for any family not listed.
FAMILY_TITLES: dict[str, str] = {
    "fs3dcnn": "Full-sequence 3D CNN",
    "promptnet": "Adaptive PromptNet (non-contrast)",
    "crossmodal": "Cross-modality attention",
    "mmdlm": "MMDLM",
}


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family)


@dataclass(frozen=True)
class GateReason:
    """One reason the gate gave for declining a model (a ``models.gate.GateFinding``, as plain data).

    ``low``/``high`` are the range the value was compared with (the checkpoint's
    training range, widened by the node's margin; None on an open side);
    ``reason`` is the sentence the report prints.
    """

    name: str  # a measurement name (models.measures), "feature_distance", or a quality check ("skull_stripped", ...)
    value: float | None
    unit: str  # UCUM: "ml", "mm", "1"
    low: float | None
    high: float | None
    reason: str


@dataclass(frozen=True)
class ModelResult:
    family: str
    paper: str
    checkpoint_name: str
    checkpoint_sha256: str
    checkpoint_created: str
    input_roles: list[str]
    reason: str  # why this model ran (models.registry.Decision.reason)
    tasks: list[TaskResult]
    key_slices: list[KeySlice] = field(default_factory=list)
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    seconds: float = 0.0
    quality_flags: list[str] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)  # the prepared case's (models.measures names)
    prepared_case: str | None = None  # absolute path of the prepared case (.npz) the model saw: the summary shows it
    feature_distance: float | None = None  # the gate's feature-space distance, when the checkpoint records its stats
    feature_threshold: float | None = None  # the threshold it was compared with (after gate_feature_factor)

    def __post_init__(self) -> None:
        _require(set(self.input_roles) <= set(ROLES), f"{self.family}: unknown input roles {self.input_roles}")
        names = [t.task for t in self.tasks]
        _require(len(names) == len(set(names)), f"{self.family}: a task is reported twice ({names})")


@dataclass(frozen=True)
class Declined:
    """A model the gate did not let grade: the input is unlike its training data. It has NO grade, anywhere."""

    family: str
    paper: str
    checkpoint_name: str
    checkpoint_sha256: str
    input_roles: list[str]
    reasons: list[GateReason]
    stage: str = "measurements"  # "measurements" (preprocess step) | "features" (infer step, before predicting)
    measurements: dict[str, float] = field(default_factory=dict)
    prepared_case: str | None = None
    quality_flags: list[str] = field(default_factory=list)
    # the checkpoint's training-data description: a model trained on synthetic data says so on the
    # summary even when it graded nothing (results written before this field load with {})
    training_data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.reasons), f"{self.family}: a declined model needs at least one reason")

    def sentence(self) -> str:
        """``"Full-sequence 3D CNN: slice thickness (T2) 5.5 mm; this model was trained on 1.0–1.0 mm"``."""
        return f"{family_title(self.family)}: " + "; ".join(r.reason.rstrip(".") for r in self.reasons) + "."


@dataclass(frozen=True)
class Decision:
    family: str
    runs: bool
    reason: str


@dataclass(frozen=True)
class Superseded:
    """The report of an earlier study version that a new one replaces."""

    version: int
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class VersionResult:
    """Everything the report stage needs for one study version."""

    study_instance_uid: str
    study_id: int
    version: int
    inputs: list[InputSeries]
    available_roles: list[str]
    missing_roles: list[str]  # of models.base.ROLES
    decisions: list[Decision]
    results: list[ModelResult]
    cannot_grade: str | None = None  # why no model ran / grading failed; None when at least one model ran
    quality_flags: list[str] = field(default_factory=list)
    supersedes: Superseded | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    declined: list[Declined] = field(default_factory=list)  # models the gate did not let grade, with the reasons
    gate_loosened: str | None = None  # one sentence when the node's gate settings are looser than the defaults
    # a stored instance of the study to copy patient and study attributes from when no input series
    # was usable (a study the node cannot read still gets its cannot-grade SR, placed in that study)
    source_example: str | None = None

    def __post_init__(self) -> None:
        _require(set(self.available_roles) <= set(ROLES), f"unknown available roles {self.available_roles}")
        _require(sorted(self.missing_roles) == sorted(r for r in ROLES if r not in self.available_roles),
                 f"missing roles {self.missing_roles} are not the complement of {self.available_roles}")
        _require(bool(self.inputs) or self.source_example is not None or bool(self.results),
                 "a version without input series needs a source example for its report's patient and study")
        _require((self.cannot_grade is None) == bool(self.results),
                 "a version either has model results or says why it cannot be graded, never both or neither")
        graded = {r.family for r in self.results}
        _require(not graded & {d.family for d in self.declined},
                 f"a model cannot both grade and be declined ({sorted(graded)})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionResult:
        d = json.loads(text)
        d["inputs"] = [InputSeries(**{**i, "instances": [SourceRef(**r) for r in i["instances"]]}) for i in d["inputs"]]
        d["decisions"] = [Decision(**x) for x in d["decisions"]]
        d["results"] = [
            ModelResult(**{**m, "tasks": [TaskResult(**t) for t in m["tasks"]],
                           "key_slices": [KeySlice(k["role"], k["attention"], SourceRef(**k["ref"]),
                                                   k.get("grid_index"))
                                          for k in m.get("key_slices", [])]})
            for m in d["results"]
        ]
        # files written before the gate existed have no "declined" / "gate_loosened": the defaults apply
        d["declined"] = [Declined(**{**x, "reasons": [GateReason(**r) for r in x.get("reasons", [])]})
                         for x in d.get("declined", [])]
        d["supersedes"] = Superseded(**d["supersedes"]) if d.get("supersedes") else None
        return cls(**d)

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> VersionResult:
        return cls.from_json(path.read_text())


# -- convert -> preprocess, infer, report ------------------------------------------------------------------------

_ROLE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# RAS (NIfTI world) <-> LPS (DICOM patient coordinates): flip x and y.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
CONVERTED_NAME = "convert-manifest.json"
CONVERTED_SCHEMA = "dicomnode.convert/1"


@dataclass(frozen=True)
class SourceImage:
    """One source image (an instance, or a frame of a multi-frame instance) and where its plane lies."""

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None  # 1-based for multi-frame objects; None for single-frame images
    position: float  # mm along the series' slice normal (DICOM patient coordinates, LPS)
    image_position: list[float]  # ImagePositionPatient (LPS, mm): centre of the first pixel


@dataclass(frozen=True)
class ConvertedSeries:
    """The outcome of converting one series: the volume or why there is none, and its source images.

    ``normal`` is the unit slice normal (row direction x column direction) in
    DICOM patient coordinates (LPS); ``images`` are sorted by ``position``.
    ``fingerprint`` identifies the input files (paths, sizes, mtimes), so a
    manifest can tell whether a stored conversion is still the conversion of
    these files.
    """

    role: str
    series_instance_uid: str
    converter: str | None  # "dicom2nifti" | "dcm2niix"; None when nothing converted it
    nifti: str | None  # absolute path of the volume; None on error
    error: str | None  # one sentence: why the series could not be converted
    seconds: float
    normal: list[float] | None
    images: list[SourceImage] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)  # "<converter>: <why it failed>", in order
    shape: list[int] | None = None
    affine: list[list[float]] | None = None  # the NIfTI's voxel -> world (RAS, mm)
    n_files: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        _require(bool(_ROLE_NAME.match(self.role)), f"role must be a short identifier (it names a file), got {self.role!r}")
        _require((self.error is None) or self.nifti is None, f"{self.role}: a failed conversion has no volume")

    @property
    def ok(self) -> bool:
        return self.error is None and self.nifti is not None

    def refs(self) -> list[SourceRef]:
        """Every source image as the report references it (instance order by position)."""
        return [SourceRef(self.series_instance_uid, im.sop_class_uid, im.sop_instance_uid, im.frame)
                for im in self.images]

    def nearest(self, world_ras: Sequence[float]) -> tuple[SourceRef, float]:
        """The source image whose plane is nearest to a world point (NIfTI RAS, mm), and that distance (mm).

        Distance is measured along the slice normal only: the images of one
        series are parallel planes, so the nearest plane is the one to cite.
        """
        if not self.images or self.normal is None:
            raise ValueError(f"series of role {self.role} has no source images to map to")
        lps = np.asarray(world_ras, dtype=np.float64)[:3] * _RAS_TO_LPS
        d = float(lps @ np.asarray(self.normal, dtype=np.float64))
        positions = np.array([im.position for im in self.images])
        k = int(np.argmin(np.abs(positions - d)))
        im = self.images[k]
        ref = SourceRef(self.series_instance_uid, im.sop_class_uid, im.sop_instance_uid, im.frame)
        return ref, float(abs(positions[k] - d))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> ConvertedSeries:
        d = dict(json.loads(text) if isinstance(text, str) else text)
        d["images"] = [SourceImage(**im) for im in d.get("images", [])]
        return cls(**d)


def save_converted(work_dir: Path, entries: Mapping[str, ConvertedSeries]) -> Path:
    """The convert stage's hand-off: every role's outcome in ``work_dir/convert-manifest.json``."""
    body = {"schema": CONVERTED_SCHEMA,
            "series": {role: dataclasses.asdict(c) for role, c in sorted(entries.items())}}
    return write_atomic(Path(work_dir) / CONVERTED_NAME, json.dumps(body, indent=1, sort_keys=True))


def load_converted(work_dir: Path) -> dict[str, ConvertedSeries]:
    """What the convert stage handed over (raises :class:`HandoffMissing` when it has not run)."""
    data = _load_json(Path(work_dir) / CONVERTED_NAME, CONVERTED_SCHEMA)
    return {role: ConvertedSeries.from_json(entry) for role, entry in dict(data.get("series", {})).items()}


# -- preprocess -> infer ---------------------------------------------------------------------------------------

PLAN_NAME = "plan.json"
PLAN_SCHEMA = "dicomnode.plan/1"


@dataclass(frozen=True)
class PreparedRun:
    """One selected checkpoint after preprocessing: its prepared case, or why there is none, and the gate's word.

    ``gate`` non-empty means the model is declined (measurements outside its training ranges, or its held-out
    metrics under the floor): infer never runs it.
    """

    family: str
    sha256: str
    reason: str  # why the registry selected it
    case: str | None  # absolute path of the prepared case (.npz); None when preprocessing failed
    error: str | None  # "<Exception>: <message>" when preprocessing failed
    flags: list[str] = field(default_factory=list)  # quality flags of the prepared case
    measurements: dict[str, float] = field(default_factory=dict)
    gate: list[GateReason] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(len(self.sha256) == 64, f"{self.family}: a checkpoint hash has 64 hex digits")
        _require((self.case is None) != (self.error is None),
                 f"{self.family}: a prepared run has a case or an error, exactly one")


@dataclass(frozen=True)
class PreparedPlan:
    """The preprocess stage's hand-off: which roles converted, which models were considered, each prepared run."""

    available: list[str]
    decisions: list[Decision]
    runs: list[PreparedRun]
    gate_loosened: str | None = None

    def __post_init__(self) -> None:
        _require(set(self.available) <= set(ROLES), f"unknown available roles {self.available}")

    def save(self, work_dir: Path) -> Path:
        body = {"schema": PLAN_SCHEMA, **dataclasses.asdict(self)}
        return write_atomic(Path(work_dir) / PLAN_NAME, json.dumps(body, indent=1, sort_keys=True))

    @classmethod
    def load(cls, work_dir: Path) -> PreparedPlan:
        d = _load_json(Path(work_dir) / PLAN_NAME, PLAN_SCHEMA)
        return cls(available=list(d["available"]), decisions=[Decision(**x) for x in d["decisions"]],
                   runs=[PreparedRun(**{**r, "gate": [GateReason(**g) for g in r.get("gate", [])]})
                         for r in d["runs"]],
                   gate_loosened=d.get("gate_loosened"))
