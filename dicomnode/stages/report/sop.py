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
from typing import Any

import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from dicomnode.dicom.sop import COMPREHENSIVE_3D_SR
from dicomnode.handoff import SourceRef, VersionResult

from dicomnode.stages.report import codes as c
from dicomnode.stages.report import content

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "Glioma grading (research use)"
SC_SERIES_DESCRIPTION = "Glioma grading summary (research use)"

_CONTENT_SEQUENCE = 0x0040A730  # (0040,A730) Content Sequence
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
    base = _uid_base(result)
    root = {"prefix": prefix} if prefix else {}  # prefix=None would mean a random 2.25 UID in pydicom
    return {f"{kind}_{what}": str(generate_uid(**root, entropy_srcs=[*base, f"kind={kind}", what]))
            for kind in ("sr", "sc") for what in ("series", "sop")}


def summary_page_uid(result: VersionResult, page: int, *, prefix: str | None = None) -> str:
    """SOP Instance UID of page ``page`` (1-based) of the summary image, all pages in ``sc_series``.

    Page 1 is ``report_uids(result)["sc_sop"]`` (a one-page summary is what it
    always was); a continuation page hashes the same inputs plus its number,
    so a re-run writes the same pages again.
    """
    if page < 1:
        raise ValueError(f"pages are numbered from 1, got {page}")
    if page == 1:
        return report_uids(result, prefix=prefix)["sc_sop"]
    root = {"prefix": prefix} if prefix else {}
    return str(generate_uid(**root, entropy_srcs=[*_uid_base(result), "kind=sc", "sop", f"page={page}"]))


def _uid_base(result: VersionResult) -> list[str]:
    """What the report's UIDs are a function of (see :func:`report_uids`)."""
    return [
        _UID_SCHEME,
        result.study_instance_uid,
        f"version={result.version}",
        "inputs=" + ",".join(sorted({s.series_instance_uid for s in result.inputs})),
        # every checkpoint the version was judged with, graded or declined by the gate: the same
        # question asked again under another gate setting is answered in the same report object
        "checkpoints=" + ",".join(sorted({m.checkpoint_sha256 for m in result.results}
                                         | {d.checkpoint_sha256 for d in result.declined})),
    ]


def device_observer_uid(manufacturer: str, algorithm_version: str) -> str:
    """One stable UID per (manufacturer, node version): the device observer of TID 1004."""
    return str(generate_uid(entropy_srcs=[_UID_SCHEME, "device", manufacturer, algorithm_version]))


# Patient and General Study attributes of Type 2 that the report inherits from the source (PS3.3 C.7.1.1, C.7.2.1)
_TYPE2_INHERITED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber")


def read_example(result: VersionResult) -> Dataset:
    """Header of one stored source instance: the patient and study attributes the report inherits.

    Refuses an example from another study: copying another patient's
    attributes into this study would be the worst possible report error.
    """
    candidates = [s.example_file for s in result.inputs] + ([result.source_example] if result.source_example else [])
    if not candidates:
        raise ValueError("an SR must be placed in the source study, but the result lists no input series "
                         "and no source example to copy patient and study attributes from")
    for example in candidates:
        path = Path(example)
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in _TYPE2_INHERITED:
            if keyword not in ds:
                # Type 2 in the source's modules too, but senders omit them; the report's modules need them
                # present (empty), and highdicom reads them without a default
                setattr(ds, keyword, "")
        if str(ds.StudyInstanceUID) != result.study_instance_uid:
            raise ValueError(f"example file {path.name} belongs to another study")
        return ds
    raise FileNotFoundError("none of the input series' example files exists")


def _evidence_item(study_uid: str, ref: SourceRef) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    return ds


def evidence_refs(result: VersionResult) -> list[SourceRef]:
    """Every instance of every input series, then every key slice (the content's IMAGE references)."""
    refs: list[SourceRef] = [r for s in result.inputs for r in s.instances]
    refs += [k.ref for m in result.results for k in m.key_slices]
    return refs


def evidence(result: VersionResult, example: Dataset) -> list[Dataset]:
    """highdicom's ``evidence`` argument: the example first, then :func:`evidence_refs`; highdicom de-duplicates."""
    return [example] + [_evidence_item(result.study_instance_uid, r) for r in evidence_refs(result)]


def evidence_sequence(result: VersionResult, example: Dataset) -> list[Dataset]:
    """The CurrentRequestedProcedureEvidenceSequence items exactly as highdicom's ``collect_evidence`` makes them.

    Why not let highdicom do it: it builds a full Dataset per instance (four
    validated attributes) only to read them back and then searches the whole
    content tree for IMAGE references; with 620 source instances that was a
    third of the SR's build time. Here one reference item per instance, the
    same grouping (by series, in first-seen order, de-duplicated by SOP
    Instance UID, the example's series first) and the same attributes.
    ``tests/test_report.py`` checks the bytes against highdicom's own path.
    Every reference is in the SR's study (the example was checked to be).
    """
    series: dict[str, list[Dataset]] = {}
    seen: set[str] = set()
    first = [(str(example.SeriesInstanceUID), str(example.SOPClassUID), str(example.SOPInstanceUID))]
    for series_uid, class_uid, instance_uid in first + [
            (r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in evidence_refs(result)]:
        if instance_uid in seen:
            continue
        seen.add(instance_uid)
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        series.setdefault(series_uid, []).append(item)
    series_items = []
    for series_uid, items in series.items():
        series_item = Dataset()
        series_item.SeriesInstanceUID = series_uid
        series_item.ReferencedSOPSequence = items
        series_items.append(series_item)
    study_item = Dataset()
    study_item.StudyInstanceUID = result.study_instance_uid
    study_item.ReferencedSeriesSequence = series_items
    return [study_item]


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
    sr = sr_from_example(result, read_example(result), algorithm_version=algorithm_version,
                         manufacturer=manufacturer, when=when, uid_prefix=uid_prefix)
    log.info("built %s SR for study %s version %s", outcome(result), result.study_id, result.version)
    return sr


def outcome(result: VersionResult) -> str:
    """"graded" or "cannot-grade": what the SR of ``result`` says (for the log lines)."""
    graded = bool(result.results) and not result.cannot_grade and any(m.tasks for m in result.results)
    return "graded" if graded else "cannot-grade"


def sr_from_example(result: VersionResult, example: Dataset, *, algorithm_version: str,
                    manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                    uid_prefix: str | None = None, highdicom_checks: bool = False) -> Comprehensive3DSR:
    """:func:`build_sr` with the source header already read (``write_reports`` reads it once for both objects).

    ``highdicom_checks`` True hands highdicom the whole content tree and one
    evidence Dataset per source instance, as this module did before: highdicom
    then deep-copies and re-parses the tree it was just given and searches it
    for image references. The default gives it only the root container's own
    attributes and the source header (for the patient and study modules) and
    adds the content and :func:`evidence_sequence` itself: the same document,
    byte for byte (``tests/test_report.py`` compares the two), in a third of
    the time. The checks it skips hold by construction: the content is made
    of highdicom's own classes, and every IMAGE reference is a key slice,
    which :func:`evidence_refs` lists.
    """
    when = when or _dt.datetime.now()
    uids = report_uids(result, prefix=uid_prefix)

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
            groups += [content.task_group(m, t, result, first=i == 0, **common) for i, t in enumerate(m.tasks)]
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
    root = report[0]
    root.ContentSequence.append(content.version_evaluations(result))

    previous = None
    if result.supersedes is not None:
        prev = Dataset()
        prev.StudyInstanceUID = result.study_instance_uid
        prev.SeriesInstanceUID = result.supersedes.series_instance_uid
        prev.SOPClassUID = COMPREHENSIVE_3D_SR
        prev.SOPInstanceUID = result.supersedes.sop_instance_uid
        previous = [prev]

    header = dict(
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
    if highdicom_checks:
        sr = Comprehensive3DSR(evidence=evidence(result, example), content=root, **header)
    else:
        sr = _assemble(root, example, evidence_sequence(result, example), header)
    stamp_time(sr, when, date_attrs=[("InstanceCreationDate", "InstanceCreationTime")])
    log.debug("built %s SR for study %s version %s: %d group(s), %d model(s) declined by the gate",
              "graded" if graded else "cannot-grade", result.study_id, result.version, len(groups),
              len(result.declined))
    return sr


def _assemble(root: ContainerContentItem, example: Dataset, evidence_items: list[Dataset],
              header: dict[str, Any]) -> Comprehensive3DSR:
    """highdicom's Comprehensive3DSR, given only the root container's own attributes, then completed here.

    highdicom's constructor writes the SOP Common, patient, study, series and
    SR Document General modules (what it is for) and takes the content from
    its ``content`` argument by deep copy and re-parse; with a stub root (no
    children) that costs nothing, and the real children are set afterwards,
    as highdicom itself sets them (``self[tag] = value`` of the given root's elements).
    ``_content`` is the attribute behind highdicom's public ``content``
    property; ``Comprehensive3DSR.from_dataset`` sets it the same way, and a
    test reads ``content`` back, so a highdicom that renamed it fails there.
    """
    stub = Dataset()
    for elem in root:
        if elem.tag != _CONTENT_SEQUENCE:
            stub.add(elem)
    stub.ContentSequence = []  # highdicom searches it for image references: nothing to find
    sr = Comprehensive3DSR(evidence=[example], content=stub, **header)
    sr.ContentSequence = root.ContentSequence
    sr._content = ContentSequence([root], is_root=True)
    sr.CurrentRequestedProcedureEvidenceSequence = evidence_items
    return sr


__all__ = ["build_sr", "sr_from_example", "outcome", "report_uids", "summary_page_uid", "device_observer_uid",
           "read_example", "evidence", "evidence_refs", "evidence_sequence",
           "SR_SERIES_NUMBER", "SC_SERIES_NUMBER", "SR_SERIES_DESCRIPTION", "SC_SERIES_DESCRIPTION"]
