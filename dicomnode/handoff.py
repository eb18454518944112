"""What one study version's grading produced: the contract between infer, report and status.

Plain dataclasses that round-trip through JSON, because the stages run as
separate Celery tasks (possibly on separate hosts) and hand over through files
in the version's work directory and rows in the index, never through memory.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SourceRef:
    """One source image (or frame of a multi-frame image) a report may point at."""

    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None  # 1-based frame number for Enhanced MR; None for single-frame images


@dataclass
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


@dataclass
class TaskResult:
    """One task's answer from one model, e.g. grade: HGG with P(HGG) = 0.83."""

    task: str  # "grade" | "idh" | "1p19q" (models.base.TASKS)
    label: str  # predicted class name (the argmax), e.g. "HGG"
    probability: float  # probability of the POSITIVE class (the second of models.base.TASKS[task])
    probabilities: dict[str, float]  # class name -> probability, summing to 1
    calibrated: bool  # temperature scaling from the checkpoint was applied


@dataclass
class KeySlice:
    """A slice a model attended to most (MMDLM attention), mapped back to a source image."""

    role: str
    attention: float
    ref: SourceRef
    grid_index: int | None = None  # the slice on the prepared case's grid (along its slice axis): the summary shows it


# Names a reader knows the families by (the report and "cannot grade" sentences); the family's
# code name is used for any family not listed.
FAMILY_TITLES: dict[str, str] = {
    "fs3dcnn": "Full-sequence 3D CNN",
    "promptnet": "Adaptive PromptNet (contrast-free)",
    "crossmodal": "Cross-modality guidance network",
    "mmdlm": "MMDLM (multi-task slice model)",
}


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family)


@dataclass
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


@dataclass
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


@dataclass
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

    def sentence(self) -> str:
        """``"Full-sequence 3D CNN: slice thickness (T2) 5.5 mm; this model was trained on 1.0–1.0 mm"``."""
        return f"{family_title(self.family)}: " + "; ".join(r.reason.rstrip(".") for r in self.reasons) + "."


@dataclass
class Decision:
    family: str
    runs: bool
    reason: str


@dataclass
class Superseded:
    """The report of an earlier study version that a new one replaces."""

    version: int
    sop_instance_uid: str
    series_instance_uid: str


@dataclass
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
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VersionResult:
        return cls.from_json(path.read_text())
