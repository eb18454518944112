"""The report objects: a TID 1500 Comprehensive 3D SR in the source study, and its deterministic UIDs.

The SR goes back into the study it grades (same StudyInstanceUID, patient and
study attributes copied from a stored source instance), in a series of its
own, with every source instance it used listed as evidence. Its UIDs are a
hash of what the report is about, so a retried or re-queued report task
writes the same object again instead of a second, different report.
"""
from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable
from pathlib import Path

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from dicomnode.handoff import SourceRef, VersionResult

from dicomnode.stages.report import codes as c
from dicomnode.stages.report import content

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "Glioma grading (research use)"
SC_SERIES_DESCRIPTION = "Glioma grading summary (research use)"

_UID_SCHEME = "dicomnode.stages.report/1"  # bump only if the meaning of the UIDs' inputs changes


def report_uids(result: VersionResult, *, prefix: str | None = None) -> dict[str, str]:
    """The report's UIDs, a pure function of (study, version, input series, checkpoint hashes, kind).

    Keys: ``sr_series``, ``sr_sop``, ``sc_series``, ``sc_sop``. Anything not
    in that list (time, host, algorithm version, wording) must not change
    them, or a re-run would send the PACS a second report for the same
    question. A different checkpoint or input series is a different question
    and gets different UIDs. ``prefix`` lets a site use its own UID root
    (default: pydicom's, as ``dicomnode.synth`` does).
    """
    base = [
        _UID_SCHEME,
        result.study_instance_uid,
        f"version={result.version}",
        "inputs=" + ",".join(sorted({s.series_instance_uid for s in result.inputs})),
        # every checkpoint the version was judged with, graded or declined by the gate: the same
        # question asked again under another gate setting is answered in the same report object
        "checkpoints=" + ",".join(sorted({m.checkpoint_sha256 for m in result.results}
                                         | {d.checkpoint_sha256 for d in result.declined})),
    ]
    root = {"prefix": prefix} if prefix else {}  # prefix=None would mean a random 2.25 UID in pydicom
    return {f"{kind}_{what}": str(generate_uid(**root, entropy_srcs=[*base, f"kind={kind}", what]))
            for kind in ("sr", "sc") for what in ("series", "sop")}


def device_observer_uid(manufacturer: str, algorithm_version: str) -> str:
    """One stable UID per (manufacturer, node version): the device observer of TID 1004."""
    return str(generate_uid(entropy_srcs=[_UID_SCHEME, "device", manufacturer, algorithm_version]))


def read_example(result: VersionResult) -> Dataset:
    """Header of one stored source instance: the patient and study attributes the report inherits.

    Refuses an example from another study: copying another patient's
    attributes into this study would be the worst possible report error.
    """
    if not result.inputs:
        raise ValueError("an SR must be placed in the source study, but the result lists no input series "
                         "to copy patient and study attributes from")
    for series in result.inputs:
        path = Path(series.example_file)
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.StudyInstanceUID) != result.study_instance_uid:
            raise ValueError(f"example file of the {series.role} series belongs to another study")
        return ds
    raise FileNotFoundError("none of the input series' example files exists")


def _evidence_item(study_uid: str, ref: SourceRef) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    return ds


def evidence(result: VersionResult, example: Dataset) -> list[Dataset]:
    """Every instance of every input series (and every key slice), example first; highdicom de-duplicates."""
    refs: list[SourceRef] = [r for s in result.inputs for r in s.instances]
    refs += [k.ref for m in result.results for k in m.key_slices]
    return [example] + [_evidence_item(result.study_instance_uid, r) for r in refs]


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Declares 99DCMNODE, so a reader of a private code can tell where it comes from."""
    return CodingSchemeIdentificationItem(designator=c.PRIVATE_SCHEME, name=c.PRIVATE_SCHEME_NAME,
                                          responsible_organization=c.PRIVATE_SCHEME_ORGANIZATION)


def stamp_time(ds: Dataset, when: _dt.datetime, *, date_attrs: Iterable[tuple[str, str]]) -> None:
    """Overwrite highdicom's "now" stamps, so the same ``when`` gives the same bytes."""
    for date_kw, time_kw in date_attrs:
        setattr(ds, date_kw, DA(when.date()))
        setattr(ds, time_kw, TM(when.time()))
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)


def build_sr(result: VersionResult, *, algorithm_version: str, manufacturer: str = "dicomnode",
             when: _dt.datetime | None = None, uid_prefix: str | None = None) -> Comprehensive3DSR:
    """The TID 1500 report for one study version (a finding per model task, or why there is none).

    ``when`` stamps content, series and instance-creation date/time (default:
    now); pass the same value to get the same bytes.
    """
    when = when or _dt.datetime.now()
    uids = report_uids(result, prefix=uid_prefix)
    example = read_example(result)

    observer = ObserverContext(
        observer_type=pcodes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(manufacturer, algorithm_version),
            name=content.NODE_ALGORITHM_NAME,
            manufacturer_name=manufacturer,
            model_name=algorithm_version,
        ),
    )
    graded = bool(result.results) and not result.cannot_grade
    common = dict(report_uid=uids["sr_sop"], algorithm_version=algorithm_version, manufacturer=manufacturer)
    groups: list = []
    if graded and any(m.tasks for m in result.results):
        for m in result.results:  # per model: its finding groups, then the measurements of the case it graded
            groups += [content.task_group(m, t, result, **common) for t in m.tasks]
            extra = content.measurements_group(m, result, **common)
            if extra is not None:
                groups.append(extra)
    else:
        groups = [content.cannot_grade_group(result, **common)]
        graded = False
    # a declined model is listed with its reasons and values, never with a Finding or a Probability
    groups += [content.declined_group(d, result, **common) for d in result.declined]

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=c.MRI_PROCEDURE.concept,
        imaging_measurements=groups,
        title=c.IMAGING_MEASUREMENT_REPORT.concept,
    )
    report[0].ContentSequence.append(content.version_evaluations(result))

    previous = None
    if result.supersedes is not None:
        prev = Dataset()
        prev.StudyInstanceUID = result.study_instance_uid
        prev.SeriesInstanceUID = result.supersedes.series_instance_uid
        prev.SOPClassUID = COMPREHENSIVE_3D_SR
        prev.SOPInstanceUID = result.supersedes.sop_instance_uid
        previous = [prev]

    sr = Comprehensive3DSR(
        evidence=evidence(result, example),
        content=report[0],
        series_instance_uid=uids["sr_series"],
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids["sr_sop"],
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=True,
        previous_versions=previous,
        series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=[private_coding_scheme()],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        software_versions=algorithm_version,
        manufacturer_model_name=content.NODE_ALGORITHM_NAME,
    )
    stamp_time(sr, when, date_attrs=[("InstanceCreationDate", "InstanceCreationTime")])
    log.info("built %s SR for study %s version %s: %d group(s), %d model(s) declined by the gate",
             "graded" if graded else "cannot-grade", result.study_id, result.version, len(groups),
             len(result.declined))
    return sr


__all__ = ["build_sr", "report_uids", "device_observer_uid", "read_example", "evidence",
           "SR_SERIES_NUMBER", "SC_SERIES_NUMBER", "SR_SERIES_DESCRIPTION", "SC_SERIES_DESCRIPTION"]
