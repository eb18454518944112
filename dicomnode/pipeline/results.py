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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VersionResult:
        d = json.loads(text)
        d["inputs"] = [InputSeries(**{**i, "instances": [SourceRef(**r) for r in i["instances"]]}) for i in d["inputs"]]
        d["decisions"] = [Decision(**x) for x in d["decisions"]]
        d["results"] = [
            ModelResult(**{**m, "tasks": [TaskResult(**t) for t in m["tasks"]],
                           "key_slices": [KeySlice(k["role"], k["attention"], SourceRef(**k["ref"]))
                                          for k in m["key_slices"]]})
            for m in d["results"]
        ]
        d["supersedes"] = Superseded(**d["supersedes"]) if d.get("supersedes") else None
        return cls(**d)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VersionResult:
        return cls.from_json(path.read_text())
