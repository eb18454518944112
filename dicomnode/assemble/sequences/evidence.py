"""A normalized, vendor-neutral summary of one series, read from its headers.

Classic MR Image Storage puts TR/TE/TI, ImageType and contrast at the top level
of every instance; Enhanced MR Image Storage puts most of them in functional
groups (shared and per frame: MRTimingAndRelatedParametersSequence, MREchoSequence,
MRModifierSequence, MRImageFrameTypeSequence, ...).  The classifier should not
care which, so everything it needs is gathered here once, over all instances and
frames, into :class:`SeriesEvidence`.  Values that vary inside a series (echo
times, orientations, positions) are kept as sets, because that variation is
itself evidence (multi-echo, localizer, dynamic series).

Nothing here decides a role; nothing here reads patient identity.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from pydicom.dataset import Dataset

from dicomnode.assemble.sequences.keywords import NO_AGENT, normalize

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MR_IMAGE_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE, LEGACY_ENHANCED_MR_IMAGE_STORAGE})

# Attribute keywords of the Contrast/Bolus module whose presence with a real value
# means an agent was given (ContrastBolusRoute alone is not enough: some consoles
# pre-fill it).
_CONTRAST_AMOUNT_KEYWORDS = ("ContrastBolusVolume", "ContrastBolusTotalDose", "ContrastBolusIngredientConcentration")


@dataclass(frozen=True)
class SeriesEvidence:
    """Everything the classifier and the selector look at, for one series.

    Numbers are in DICOM units (ms, mm, T).  ``None`` means "not in the headers".
    """

    series_uid: str
    n_instances: int  # distinct MR image instances
    n_images: int  # frames over all instances (1 per classic instance)
    n_positions: int  # distinct slice positions; 0 when no geometry
    n_orientations: int  # distinct slice normals (> 10 degrees apart)
    enhanced: bool
    manufacturer: str
    series_description: str
    protocol_name: str
    sequence_name: str  # SequenceName, else PulseSequenceName (Enhanced)
    image_type: tuple[str, ...]  # ImageType of the first instance, upper case
    image_type_values: frozenset[str]  # every ImageType / FrameType value seen
    acquisition_contrast: frozenset[str]  # AcquisitionContrast (Enhanced)
    complex_components: frozenset[str]  # ComplexImageComponent (Enhanced)
    scanning_sequence: tuple[str, ...]  # SE, GR, IR, EP, RM (as written, unique)
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    echo_pulse_sequence: str  # SPIN / GRADIENT / BOTH (Enhanced), "" if unknown
    echo_planar: bool | None  # EchoPlanarPulseSequence, None when absent
    inversion_recovery: bool | None  # MRModifier InversionRecovery, None when absent
    mr_acquisition_type: str  # 2D / 3D / ""
    repetition_time: float | None
    echo_times: tuple[float, ...]  # distinct, sorted
    echo_numbers: tuple[int, ...]  # distinct, sorted
    inversion_time: float | None  # most common positive TI, None when none > 0
    flip_angle: float | None
    field_strength: float | None
    slice_thickness: float | None
    pixel_spacing: tuple[float, float] | None
    b_values: tuple[float, ...]  # distinct diffusion b-values > 0
    diffusion_directionality: frozenset[str]
    temporal_positions: int  # max(NumberOfTemporalPositions, distinct TemporalPositionIndex)
    body_part: str  # BodyPartExamined, upper case
    anatomic_regions: frozenset[str]  # FrameAnatomy code meanings, upper case
    contrast_positive: tuple[str, ...]  # facts saying an agent was given
    contrast_negative: tuple[str, ...]  # facts saying explicitly that none was
    acquisition_datetime: str  # sortable YYYYMMDDHHMMSS.ffffff, "" when unknown
    series_number: int | None

    @property
    def images_per_position(self) -> float:
        """How many images share one slice position (1 for an ordinary volume)."""
        if self.n_positions <= 0:
            return 1.0
        return self.n_images / self.n_positions

    @property
    def voxel_volume(self) -> float | None:
        if self.pixel_spacing is None or self.slice_thickness is None:
            return None
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_thickness


# --- small readers ------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """First numeric value of a DS/IS/FD/str element, None when absent or unparsable."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        value = next(iter(value), None)
        if value is None:
            return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _nums(value: Any) -> list[float]:
    """Every numeric value of a single- or multi-valued element."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    out = []
    for v in value:
        x = _num(v)
        if x is not None:
            out.append(x)
    return out


def _strs(value: Any) -> list[str]:
    """A CS/LO value (single or multi) as a list of stripped upper-case strings."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    out = []
    for v in value:
        s = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        s = s.strip().upper()
        if s:
            out.append(s)
    return out


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _frame_groups(ds: Dataset) -> Iterator[list[Dataset]]:
    """For each frame of an Enhanced instance: [per-frame item, shared item] (per-frame wins).

    Classic instances yield nothing here.
    """
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        for item in per_frame:
            yield [g for g in (item, shared_item) if g is not None]
    elif shared_item is not None:
        yield [shared_item]


def _first_groups(ds: Dataset) -> list[Dataset]:
    """The shared functional group item and the first per-frame item (when present)."""
    out = []
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(keyword)
        if seq:
            out.append(seq[0])
    return out


def _fg(groups: Sequence[Dataset], sequence: str, keyword: str) -> Any:
    """``groups[i].<sequence>[0].<keyword>`` from the first group that has it."""
    for group in groups:
        seq = group.get(sequence)
        if seq:
            value = seq[0].get(keyword)
            if value is not None and value != "":
                return value
    return None


def _walk_keywords(ds: Dataset, keywords: set[str], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every (keyword, value) for the given keywords anywhere in ``ds`` (bounded depth)."""
    if depth > 4:
        return
    for elem in ds:
        if elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            if elem.keyword in ("PerFrameFunctionalGroupsSequence", "ReferencedImageEvidenceSequence",
                                "SourceImageEvidenceSequence", "ReferencedImageSequence"):
                continue
            for item in elem.value:
                yield from _walk_keywords(item, keywords, depth + 1)
        elif elem.keyword in keywords:
            yield elem.keyword, elem.value


def _dicom_datetime(date: str, time: str) -> str:
    """DA + TM as a sortable ``YYYYMMDDHHMMSS.ffffff``; "" when time is unknown."""
    time = (time or "").strip()
    if not time:
        return ""
    hhmmss, _, frac = time.partition(".")
    hhmmss = re.sub(r"\D", "", hhmmss).ljust(6, "0")[:6]
    frac = re.sub(r"\D", "", frac).ljust(6, "0")[:6]
    date = re.sub(r"\D", "", date or "").ljust(8, "0")[:8]
    return f"{date}{hhmmss}.{frac}"


def _acquisition_datetime(ds: Dataset) -> str:
    """When this instance was acquired: AcquisitionDateTime, AcquisitionTime, else SeriesTime."""
    adt = _text(ds, "AcquisitionDateTime")
    if adt:
        digits = re.sub(r"[^\d.]", "", adt.split("+")[0].split("-")[0])
        if len(digits) >= 8:
            return _dicom_datetime(digits[:8], digits[8:])
    date = _text(ds, "AcquisitionDate") or _text(ds, "SeriesDate") or _text(ds, "StudyDate")
    at = _dicom_datetime(date, _text(ds, "AcquisitionTime"))
    if at:
        return at
    return _dicom_datetime(_text(ds, "SeriesDate") or _text(ds, "StudyDate"), _text(ds, "SeriesTime"))


def _normal(orientation: Sequence[Any]) -> tuple[float, float, float] | None:
    try:
        r = [float(x) for x in orientation[:3]]
        c = [float(x) for x in orientation[3:6]]
    except (TypeError, ValueError, IndexError):
        return None
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n))
    if norm < 1e-6:
        return None
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def _count_orientations(normals: Iterable[tuple[float, float, float]]) -> int:
    """Distinct slice normals, treating anything within 10 degrees (either sign) as one."""
    reps: list[tuple[float, float, float]] = []
    cos_limit = math.cos(math.radians(10))
    for n in normals:
        if not any(abs(sum(a * b for a, b in zip(n, r))) >= cos_limit for r in reps):
            reps.append(n)
    return len(reps)


def _private_b_value(ds: Dataset) -> float | None:
    """Vendor-private b-values for classic DWI that lacks DiffusionBValue (GE, Siemens)."""
    candidates = ((0x0043, "GEMS_PARM_01", 0x39), (0x0019, "SIEMENS MR HEADER", 0x0C))
    for group, creator, offset in candidates:
        try:
            value = ds.private_block(group, creator)[offset].value
        except (KeyError, ValueError, TypeError):
            continue
        b = _num(value)
        if b is None:
            continue
        if b >= 1e9:  # GE stores b + 1e9 on some software versions
            b -= 1e9
        return b
    return None


def _agent_is_negative(agent: str) -> bool:
    """True for an explicit "no agent" value ("NONE", "no", "keine", "-", "n/a"...)."""
    norm = normalize(agent)
    return not norm or bool(NO_AGENT.fullmatch(norm))


# --- the extractor ------------------------------------------------------------------


def extract_evidence(series_uid: str, datasets: Sequence[Dataset]) -> SeriesEvidence:
    """Summarize the MR image headers of one series (header-only datasets are enough).

    Datasets whose SOPClassUID is present and is not an MR image class are ignored
    (the caller is meant to filter; ignoring here keeps a stray Raw Data or SR
    object from ever reaching the classifier).  Duplicate SOPInstanceUIDs (the
    same image stored twice, e.g. in two transfer syntaxes) count once.
    """
    images: list[Dataset] = []
    seen: set[str] = set()
    for ds in datasets:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class and sop_class not in MR_IMAGE_SOP_CLASSES:
            continue
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if sop_uid:
            if sop_uid in seen:
                continue
            seen.add(sop_uid)
        images.append(ds)

    first = images[0] if images else Dataset()
    enhanced = any("PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
                   for ds in images)

    image_type_values: set[str] = set()
    acquisition_contrast: set[str] = set()
    complex_components: set[str] = set()
    # dicts as ordered sets: evidence shows ScanningSequence=SE\\IR as the scanner wrote it
    scanning: dict[str, None] = {}
    variant: dict[str, None] = {}
    options: dict[str, None] = {}
    echo_pulse: Counter[str] = Counter()
    echo_planar: bool | None = None
    inversion_flag: bool | None = None
    acq_types: Counter[str] = Counter()
    trs: Counter[float] = Counter()
    tes: set[float] = set()
    echo_numbers: set[int] = set()
    tis: Counter[float] = Counter()
    flips: Counter[float] = Counter()
    thicknesses: Counter[float] = Counter()
    spacings: Counter[tuple[float, float]] = Counter()
    b_values: set[float] = set()
    directionality: set[str] = set()
    temporal_indices: set[int] = set()
    temporal_positions = 0
    positions: set[tuple[float, float, float]] = set()
    normals: list[tuple[float, float, float]] = []
    anatomic: set[str] = set()
    positive: list[str] = []
    negative: list[str] = []
    acq_times: list[str] = []
    n_images = 0

    def add_tr(v: Any) -> None:
        x = _num(v)
        if x is not None and x > 0:
            trs[round(x, 1)] += 1

    def add_te(v: Any) -> None:
        x = _num(v)
        if x is not None and x >= 0:
            tes.add(round(x, 1))

    def add_ti(v: Any) -> None:
        x = _num(v)
        if x is not None and x > 0:
            tis[round(x, 1)] += 1

    def add_position(v: Any) -> None:
        try:
            positions.add(tuple(round(float(x), 1) for x in v[:3]))  # type: ignore[arg-type]
        except (TypeError, ValueError, IndexError):
            pass

    def add_orientation(v: Any) -> None:
        if v is not None:
            n = _normal(v)
            if n is not None:
                normals.append(n)

    def add_b(v: Any) -> None:
        x = _num(v)
        if x is not None and x > 0:
            b_values.add(round(x, 0))

    def note(facts: list[str], fact: str) -> None:
        if fact not in facts:
            facts.append(fact)

    for ds in images:
        frames = max(int(_num(ds.get("NumberOfFrames")) or 1), 1)
        n_images += frames
        image_type_values.update(_strs(ds.get("ImageType")))
        acquisition_contrast.update(_strs(ds.get("AcquisitionContrast")))
        complex_components.update(_strs(ds.get("ComplexImageComponent")))
        scanning.update(dict.fromkeys(_strs(ds.get("ScanningSequence"))))
        variant.update(dict.fromkeys(_strs(ds.get("SequenceVariant"))))
        options.update(dict.fromkeys(_strs(ds.get("ScanOptions"))))
        for eps in _strs(ds.get("EchoPulseSequence")):
            echo_pulse[eps] += 1
        epi = _strs(ds.get("EchoPlanarPulseSequence"))
        if epi:
            echo_planar = bool(echo_planar) or epi[0] == "YES"
        for t in _strs(ds.get("MRAcquisitionType")):
            acq_types[t] += 1
        add_tr(ds.get("RepetitionTime"))
        add_te(ds.get("EchoTime"))
        for en in _nums(ds.get("EchoNumbers")):
            echo_numbers.add(int(en))
        add_ti(ds.get("InversionTime"))
        x = _num(ds.get("FlipAngle"))
        if x is not None:
            flips[round(x, 1)] += 1
        x = _num(ds.get("SliceThickness"))
        if x is not None and x > 0:
            thicknesses[round(x, 2)] += 1
        ps = ds.get("PixelSpacing")
        if ps is not None and len(ps) >= 2:
            try:
                spacings[(round(float(ps[0]), 4), round(float(ps[1]), 4))] += 1
            except (TypeError, ValueError):
                pass
        add_b(ds.get("DiffusionBValue"))
        add_b(_private_b_value(ds) if not enhanced else None)
        directionality.update(d for d in _strs(ds.get("DiffusionDirectionality")) if d != "NONE")
        ntp = _num(ds.get("NumberOfTemporalPositions"))
        if ntp is not None:
            temporal_positions = max(temporal_positions, int(ntp))
        tpi = _num(ds.get("TemporalPositionIdentifier"))
        if tpi is not None:
            temporal_indices.add(int(tpi))
        if "ImagePositionPatient" in ds:
            add_position(ds.ImagePositionPatient)
        add_orientation(ds.get("ImageOrientationPatient"))
        acq = _acquisition_datetime(ds)
        if acq:
            acq_times.append(acq)

        # Contrast/Bolus module (classic and Enhanced top level).
        agent = _text(ds, "ContrastBolusAgent")
        if agent:
            if _agent_is_negative(agent):
                note(negative, f"ContrastBolusAgent='{agent}' (explicitly no agent)")
            else:
                note(positive, f"ContrastBolusAgent='{agent}'")
        for kw in _CONTRAST_AMOUNT_KEYWORDS:
            amount = _num(ds.get(kw))
            if amount is not None and amount > 0:
                note(positive, f"{kw}={amount:g}")
        start = _text(ds, "ContrastBolusStartTime")
        if start and (agent == "" or not _agent_is_negative(agent)):
            note(positive, f"ContrastBolusStartTime={start}")
        for item in ds.get("ContrastBolusAgentSequence", None) or []:
            meaning = str(item.get("CodeMeaning", "") or item.get("CodeValue", "")).strip()
            if meaning:
                note(positive, f"ContrastBolusAgentSequence '{meaning}'")

        # Enhanced MR: the same facts, per frame, from the functional groups.
        for groups in _frame_groups(ds):
            for t in _strs(_fg(groups, "MRImageFrameTypeSequence", "FrameType")):
                image_type_values.add(t)
            acquisition_contrast.update(_strs(_fg(groups, "MRImageFrameTypeSequence", "AcquisitionContrast")))
            complex_components.update(_strs(_fg(groups, "MRImageFrameTypeSequence", "ComplexImageComponent")))
            add_tr(_fg(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
            fa = _num(_fg(groups, "MRTimingAndRelatedParametersSequence", "FlipAngle"))
            if fa is not None:
                flips[round(fa, 1)] += 1
            add_te(_fg(groups, "MREchoSequence", "EffectiveEchoTime"))
            ir = _strs(_fg(groups, "MRModifierSequence", "InversionRecovery"))
            if ir:
                inversion_flag = bool(inversion_flag) or ir[0] == "YES"
            for ti in _nums(_fg(groups, "MRModifierSequence", "InversionTimes")):
                add_ti(ti)
            add_b(_fg(groups, "MRDiffusionSequence", "DiffusionBValue"))
            directionality.update(d for d in _strs(_fg(groups, "MRDiffusionSequence", "DiffusionDirectionality"))
                                  if d != "NONE")
            tpi = _num(_fg(groups, "FrameContentSequence", "TemporalPositionIndex"))
            if tpi is not None:
                temporal_indices.add(int(tpi))
            pos = _fg(groups, "PlanePositionSequence", "ImagePositionPatient")
            if pos is not None:
                add_position(pos)
            add_orientation(_fg(groups, "PlaneOrientationSequence", "ImageOrientationPatient"))
            th = _num(_fg(groups, "PixelMeasuresSequence", "SliceThickness"))
            if th is not None and th > 0:
                thicknesses[round(th, 2)] += 1
            ps = _fg(groups, "PixelMeasuresSequence", "PixelSpacing")
            if ps is not None and len(ps) >= 2:
                spacings[(round(float(ps[0]), 4), round(float(ps[1]), 4))] += 1
            fad = str(_fg(groups, "FrameContentSequence", "FrameAcquisitionDateTime") or "")
            if fad and not acq_times:
                acq_times.append(_dicom_datetime(fad[:8], fad[8:]))
            for group in groups:
                for region in group.get("FrameAnatomySequence", None) or []:
                    for code in region.get("AnatomicRegionSequence", None) or []:
                        meaning = str(code.get("CodeMeaning", "")).strip().upper()
                        if meaning:
                            anatomic.add(meaning)
                for usage in group.get("ContrastBolusUsageSequence", None) or []:
                    given = _strs(usage.get("ContrastBolusAgentAdministered"))
                    detected = _strs(usage.get("ContrastBolusAgentDetected"))
                    if "YES" in given or "YES" in detected:
                        note(positive, "ContrastBolusUsageSequence: agent administered/detected")
                    elif "NO" in given:
                        note(negative, "ContrastBolusUsageSequence: agent not administered")

        # Any ContrastBolusAgent nested elsewhere in the functional groups (vendors
        # vary, e.g. inside MRModifierSequence).  Walk the shared item and the
        # first per-frame item only: contrast does not change from frame to frame,
        # and walking every frame of a 10 000-frame fMRI would be slow.
        for group in _first_groups(ds):
            for _kw, value in _walk_keywords(group, {"ContrastBolusAgent"}):
                text = str(value).strip()
                if text and _agent_is_negative(text):
                    note(negative, f"ContrastBolusAgent='{text}' in functional groups (explicitly no agent)")
                elif text:
                    note(positive, f"ContrastBolusAgent='{text}' in functional groups")

    if temporal_indices:
        temporal_positions = max(temporal_positions, len(temporal_indices))
    ti = tis.most_common(1)[0][0] if tis else None
    echo_pulse_sequence = echo_pulse.most_common(1)[0][0] if echo_pulse else ""
    sequence_name = _text(first, "SequenceName") or _text(first, "PulseSequenceName")
    series_number = _num(first.get("SeriesNumber"))
    body_part = _text(first, "BodyPartExamined").upper()
    field = _num(first.get("MagneticFieldStrength"))

    return SeriesEvidence(
        series_uid=series_uid,
        n_instances=len(images),
        n_images=n_images,
        n_positions=len(positions),
        n_orientations=_count_orientations(normals),
        enhanced=enhanced,
        manufacturer=_text(first, "Manufacturer"),
        series_description=_text(first, "SeriesDescription"),
        protocol_name=_text(first, "ProtocolName"),
        sequence_name=sequence_name,
        image_type=tuple(_strs(first.get("ImageType"))),
        image_type_values=frozenset(image_type_values),
        acquisition_contrast=frozenset(acquisition_contrast),
        complex_components=frozenset(complex_components),
        scanning_sequence=tuple(scanning),
        sequence_variant=tuple(variant),
        scan_options=tuple(options),
        echo_pulse_sequence=echo_pulse_sequence,
        echo_planar=echo_planar,
        inversion_recovery=inversion_flag,
        mr_acquisition_type=acq_types.most_common(1)[0][0] if acq_types else "",
        repetition_time=trs.most_common(1)[0][0] if trs else None,
        echo_times=tuple(sorted(tes)),
        echo_numbers=tuple(sorted(echo_numbers)),
        inversion_time=ti,
        flip_angle=flips.most_common(1)[0][0] if flips else None,
        field_strength=field,
        slice_thickness=thicknesses.most_common(1)[0][0] if thicknesses else None,
        pixel_spacing=spacings.most_common(1)[0][0] if spacings else None,
        b_values=tuple(sorted(b_values)),
        diffusion_directionality=frozenset(directionality),
        temporal_positions=temporal_positions,
        body_part=body_part,
        anatomic_regions=frozenset(anatomic),
        contrast_positive=tuple(positive),
        contrast_negative=tuple(negative),
        acquisition_datetime=min(acq_times) if acq_times else "",
        series_number=int(series_number) if series_number is not None else None,
    )
