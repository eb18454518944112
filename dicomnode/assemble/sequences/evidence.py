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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NamedTuple

from pydicom.dataset import Dataset

from dicomnode.assemble.sequences.keywords import NO_AGENT, normalize
from dicomnode.dicom.sop import MR_IMAGE_SOP_CLASSES


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


# --- the extractors: one question each ----------------------------------------------
#
# Each returns the SeriesEvidence fields it answers.  Those that read every
# instance and frame go through instances in the given order, each one's top
# level before its frames, because "most common" ties, "first seen"
# de-duplication and the order of contrast facts depend on it.  Only _geometry
# can raise on a malformed header (PixelSpacing, ImageOrientationPatient); it
# reads them in that same order, so the same header raises the same error.


class _Instance(NamedTuple):
    """One MR image instance with its frames' functional groups ([] for a classic instance).

    Why: almost every question is asked of the top level and then of each frame;
    listing the frames once spares each extractor re-walking the sequences.
    """

    ds: Dataset
    frames: list[list[Dataset]]


def _mode(values: Iterable[Any]) -> Any:
    """The most frequent non-None value (the first seen wins a tie); None when there is none."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def _rounded(value: Any, ndigits: int, *, allow_zero: bool = False) -> float | None:
    """The first number of ``value`` rounded to ``ndigits``; None when absent, negative or (unless ``allow_zero``) zero.

    Why: TR, TI, b-values and thickness count only above 0, while a TE of 0 is
    kept; rounding makes values that differ by float noise count as one.
    """
    x = _num(value)
    if x is None or x < 0 or (x == 0 and not allow_zero):
        return None
    return round(x, ndigits)


def _angle(value: Any) -> float | None:
    """The first number of ``value`` rounded to 0.1 degree, whatever its sign; None when absent."""
    x = _num(value)
    return None if x is None else round(x, 1)


def _position(value: Any) -> tuple[float, ...] | None:
    """ImagePositionPatient rounded to 0.1 mm; None when it is not numbers."""
    try:
        return tuple(round(float(x), 1) for x in value[:3])
    except (TypeError, ValueError, IndexError):
        return None


def _slice_normal(value: Any) -> tuple[float, float, float] | None:
    """The unit slice normal of an ImageOrientationPatient; None when absent or degenerate.

    A value too short to hold a column vector raises (IndexError): the series is then
    OTHER, "headers could not be interpreted".
    """
    return _normal(value) if value is not None else None


def _spacing(value: Any, *, tolerant: bool) -> tuple[float, float] | None:
    """PixelSpacing (row, column) rounded to 0.1 um; None when absent or single-valued.

    Why ``tolerant``: the classic top level has always skipped a non-numeric pair,
    while a broken one in the functional groups raises (the series is then OTHER,
    "headers could not be interpreted").
    """
    if value is None or len(value) < 2:
        return None
    try:
        return (round(float(value[0]), 4), round(float(value[1]), 4))
    except (TypeError, ValueError):
        if tolerant:
            return None
        raise


def _group_items(groups: Sequence[Dataset], keyword: str) -> Iterator[Dataset]:
    """Every item of sequence ``keyword`` in each of one frame's groups (per-frame first, then shared)."""
    for group in groups:
        yield from group.get(keyword, None) or []


def _mr_images(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The MR image instances of the series, each SOPInstanceUID once.

    Why: the caller is meant to filter, but a stray Raw Data or SR object must never
    reach the classifier; and the same image stored twice (e.g. in two transfer
    syntaxes) is one image, not a repeated volume.  A dataset without SOPClassUID
    or SOPInstanceUID is kept.
    """
    images: list[Dataset] = []
    seen: set[str] = set()
    for ds in datasets:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class and sop_class not in MR_IMAGE_SOP_CLASSES:
            continue
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if sop_uid in seen:
            continue
        if sop_uid:
            seen.add(sop_uid)
        images.append(ds)
    return images


def _is_enhanced(images: Sequence[Dataset]) -> bool:
    """Whether any instance carries functional groups (Enhanced or Legacy Enhanced MR).

    Why: it is evidence in its own right, and vendor-private b-values are read only
    from classic series.
    """
    return any("PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds for ds in images)


def _counts(instances: Sequence[_Instance]) -> dict[str, Any]:
    """How many instances, and how many images (frames; 1 per classic instance).

    Why: images per slice position reveal dynamic and repeated series.
    """
    n_images = sum(max(int(_num(inst.ds.get("NumberOfFrames")) or 1), 1) for inst in instances)
    return {"n_instances": len(instances), "n_images": n_images}


def _names(first: Dataset) -> dict[str, Any]:
    """SeriesDescription, ProtocolName and SequenceName (PulseSequenceName for Enhanced).

    Why: vendor naming is the first source for the weighting and for most OTHER
    gates; a series has one name, so the first instance's is read.
    """
    return {
        "series_description": _text(first, "SeriesDescription"),
        "protocol_name": _text(first, "ProtocolName"),
        "sequence_name": _text(first, "SequenceName") or _text(first, "PulseSequenceName"),
    }


def _scanner(first: Dataset) -> dict[str, Any]:
    """Manufacturer, field strength and SeriesNumber, from the first instance.

    Why: SeriesNumber names a series in reasons and breaks ties in selection; the
    scanner facts are kept in the summary for whoever reads it.
    """
    series_number = _num(first.get("SeriesNumber"))
    return {
        "manufacturer": _text(first, "Manufacturer"),
        "field_strength": _num(first.get("MagneticFieldStrength")),
        "series_number": int(series_number) if series_number is not None else None,
    }


def _image_type(instances: Sequence[_Instance], first: Dataset) -> dict[str, Any]:
    """ImageType / FrameType values, AcquisitionContrast and ComplexImageComponent.

    Why: they say derived, phase, ADC, MPR, ... outright and (Enhanced) name the
    weighting.  Every value over all instances and frames is kept, since one
    derived or phase frame is enough to make a series unfit; the first instance's
    ImageType is kept in order too, because its positions (ORIGINAL\\PRIMARY) rank
    candidates.
    """
    values: set[str] = set()
    contrasts: set[str] = set()
    components: set[str] = set()
    for inst in instances:
        values.update(_strs(inst.ds.get("ImageType")))
        contrasts.update(_strs(inst.ds.get("AcquisitionContrast")))
        components.update(_strs(inst.ds.get("ComplexImageComponent")))
        for groups in inst.frames:
            values.update(_strs(_fg(groups, "MRImageFrameTypeSequence", "FrameType")))
            contrasts.update(_strs(_fg(groups, "MRImageFrameTypeSequence", "AcquisitionContrast")))
            components.update(_strs(_fg(groups, "MRImageFrameTypeSequence", "ComplexImageComponent")))
    return {
        "image_type": tuple(_strs(first.get("ImageType"))),
        "image_type_values": frozenset(values),
        "acquisition_contrast": frozenset(contrasts),
        "complex_components": frozenset(components),
    }


def _sequence_family(instances: Sequence[_Instance]) -> dict[str, Any]:
    """ScanningSequence, SequenceVariant, ScanOptions, EchoPulseSequence and 2D/3D.

    Why: SE / GR / IR / EP is half of the physics behind the weighting, and 3D
    ranks candidates.  The lists keep the scanner's order (evidence reads
    ``ScanningSequence=SE\\IR``); echo type and 2D/3D are the most common value.
    """
    scanning: dict[str, None] = {}  # dicts as ordered sets
    variant: dict[str, None] = {}
    options: dict[str, None] = {}
    echo_pulse: list[str] = []
    acq_types: list[str] = []
    for inst in instances:
        scanning.update(dict.fromkeys(_strs(inst.ds.get("ScanningSequence"))))
        variant.update(dict.fromkeys(_strs(inst.ds.get("SequenceVariant"))))
        options.update(dict.fromkeys(_strs(inst.ds.get("ScanOptions"))))
        echo_pulse += _strs(inst.ds.get("EchoPulseSequence"))
        acq_types += _strs(inst.ds.get("MRAcquisitionType"))
    return {
        "scanning_sequence": tuple(scanning),
        "sequence_variant": tuple(variant),
        "scan_options": tuple(options),
        "echo_pulse_sequence": _mode(echo_pulse) or "",
        "mr_acquisition_type": _mode(acq_types) or "",
    }


def _epi_and_ir_flags(instances: Sequence[_Instance]) -> dict[str, Any]:
    """EchoPlanarPulseSequence (top level) and InversionRecovery (MR modifier groups).

    Each is True when any value says YES, False when values exist and none does,
    None when absent.  Why: EPI feeds the echo-planar gate, and the classifier
    treats "IR not recorded" (None) differently from "no IR" (False).
    """
    echo_planar: bool | None = None
    inversion: bool | None = None
    for inst in instances:
        epi = _strs(inst.ds.get("EchoPlanarPulseSequence"))
        if epi:
            echo_planar = bool(echo_planar) or epi[0] == "YES"
        for groups in inst.frames:
            ir = _strs(_fg(groups, "MRModifierSequence", "InversionRecovery"))
            if ir:
                inversion = bool(inversion) or ir[0] == "YES"
    return {"echo_planar": echo_planar, "inversion_recovery": inversion}


def _timing(instances: Sequence[_Instance]) -> dict[str, Any]:
    """TR, TE, echo numbers, TI and flip angle (top level, then MR timing / echo / modifier groups).

    Why: they decide T1 / T2 / FLAIR when the names do not.  TR, TI and flip angle
    are the series' most common value; every distinct TE and echo number is kept,
    because more than one means a multi-echo series.
    """
    trs: list[Any] = []
    tes: list[Any] = []
    tis: list[Any] = []
    flips: list[Any] = []
    echo_numbers: set[int] = set()
    for inst in instances:
        ds = inst.ds
        trs.append(ds.get("RepetitionTime"))
        tes.append(ds.get("EchoTime"))
        echo_numbers.update(int(en) for en in _nums(ds.get("EchoNumbers")))
        tis.append(ds.get("InversionTime"))
        flips.append(ds.get("FlipAngle"))
        for groups in inst.frames:
            trs.append(_fg(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
            flips.append(_fg(groups, "MRTimingAndRelatedParametersSequence", "FlipAngle"))
            tes.append(_fg(groups, "MREchoSequence", "EffectiveEchoTime"))
            tis += _nums(_fg(groups, "MRModifierSequence", "InversionTimes"))
    distinct_tes = {_rounded(te, 1, allow_zero=True) for te in tes} - {None}
    return {
        "repetition_time": _mode(_rounded(tr, 1) for tr in trs),
        "echo_times": tuple(sorted(distinct_tes)),
        "echo_numbers": tuple(sorted(echo_numbers)),
        "inversion_time": _mode(_rounded(ti, 1) for ti in tis),
        "flip_angle": _mode(_angle(fa) for fa in flips),
    }


def _diffusion(instances: Sequence[_Instance], enhanced: bool) -> dict[str, Any]:
    """Diffusion b-values above 0 and DiffusionDirectionality other than NONE.

    Why: any of them makes the series DWI, never a grading input.  Classic DWI
    from GE and Siemens may carry its b-value only in a private tag, so that is
    read too (classic series only).
    """
    b_values: list[Any] = []
    directionality: set[str] = set()
    for inst in instances:
        b_values.append(inst.ds.get("DiffusionBValue"))
        b_values.append(_private_b_value(inst.ds) if not enhanced else None)
        directionality.update(_strs(inst.ds.get("DiffusionDirectionality")))
        for groups in inst.frames:
            b_values.append(_fg(groups, "MRDiffusionSequence", "DiffusionBValue"))
            directionality.update(_strs(_fg(groups, "MRDiffusionSequence", "DiffusionDirectionality")))
    directionality.discard("NONE")
    distinct_bs = {_rounded(b, 0) for b in b_values} - {None}
    return {"b_values": tuple(sorted(distinct_bs)), "diffusion_directionality": frozenset(directionality)}


def _temporal_positions(instances: Sequence[_Instance]) -> int:
    """Time points: the larger of NumberOfTemporalPositions and the distinct temporal position indices.

    Why: a dynamic series (perfusion, DCE, repeated volumes) is never a grading input.
    """
    declared = 0
    indices: list[Any] = []
    for inst in instances:
        ntp = _num(inst.ds.get("NumberOfTemporalPositions"))
        if ntp is not None:
            declared = max(declared, int(ntp))
        indices.append(inst.ds.get("TemporalPositionIdentifier"))
        indices += [_fg(groups, "FrameContentSequence", "TemporalPositionIndex") for groups in inst.frames]
    distinct = {int(x) for x in map(_num, indices) if x is not None}
    return max(declared, len(distinct))


def _geometry(instances: Sequence[_Instance]) -> dict[str, Any]:
    """Slice positions and normals, slice thickness and pixel spacing (top level, then plane / pixel measures groups).

    Why: few positions or several orientations mean a localizer or a multi-stack
    series; thickness and voxel size rank candidates for a role.
    """
    positions: set[tuple[float, ...] | None] = set()
    normals: list[tuple[float, float, float] | None] = []
    thicknesses: list[Any] = []
    spacings: list[tuple[float, float] | None] = []
    for inst in instances:
        ds = inst.ds
        thicknesses.append(ds.get("SliceThickness"))
        spacings.append(_spacing(ds.get("PixelSpacing"), tolerant=True))
        if "ImagePositionPatient" in ds:
            positions.add(_position(ds.ImagePositionPatient))
        normals.append(_slice_normal(ds.get("ImageOrientationPatient")))
        for groups in inst.frames:
            positions.add(_position(_fg(groups, "PlanePositionSequence", "ImagePositionPatient")))
            normals.append(_slice_normal(_fg(groups, "PlaneOrientationSequence", "ImageOrientationPatient")))
            thicknesses.append(_fg(groups, "PixelMeasuresSequence", "SliceThickness"))
            spacings.append(_spacing(_fg(groups, "PixelMeasuresSequence", "PixelSpacing"), tolerant=False))
    positions.discard(None)
    return {
        "n_positions": len(positions),
        "n_orientations": _count_orientations(n for n in normals if n is not None),
        "slice_thickness": _mode(_rounded(t, 2) for t in thicknesses),
        "pixel_spacing": _mode(spacings),
    }


def _acquisition_time(instances: Sequence[_Instance]) -> str:
    """The earliest acquisition time of the series, sortable; "" when unknown.

    Why: selection prefers the later of two otherwise equal series (a repeat is
    usually acquired because the first was degraded).  An Enhanced frame's
    FrameAcquisitionDateTime is used only while no time has been found.
    """
    times: list[str] = []
    for inst in instances:
        acq = _acquisition_datetime(inst.ds)
        if acq:
            times.append(acq)
        for groups in inst.frames:
            fad = str(_fg(groups, "FrameContentSequence", "FrameAcquisitionDateTime") or "")
            if fad and not times:
                times.append(_dicom_datetime(fad[:8], fad[8:]))
    return min(times) if times else ""


def _anatomy(instances: Sequence[_Instance], first: Dataset) -> dict[str, Any]:
    """BodyPartExamined (first instance) and the FrameAnatomy region meanings, upper case.

    Why: a declared non-head body part makes the series OTHER whatever it is
    called, and a declared head part keeps a non-head word from doing so.
    """
    regions: set[str] = set()
    for inst in instances:
        for groups in inst.frames:
            for region in _group_items(groups, "FrameAnatomySequence"):
                for code in region.get("AnatomicRegionSequence", None) or []:
                    regions.add(str(code.get("CodeMeaning", "")).strip().upper())
    regions.discard("")
    return {"body_part": _text(first, "BodyPartExamined").upper(), "anatomic_regions": frozenset(regions)}


def _bolus_module_facts(ds: Dataset) -> Iterator[tuple[bool, str]]:
    """(agent given?, fact) from the Contrast/Bolus module at the top level (classic and Enhanced).

    Why: an agent name, an amount, a start time or a coded agent says contrast was
    given; an explicit "none" agent says it was not (and silences the start time,
    which some consoles pre-fill).
    """
    agent = _text(ds, "ContrastBolusAgent")
    if agent and _agent_is_negative(agent):
        yield False, f"ContrastBolusAgent='{agent}' (explicitly no agent)"
    elif agent:
        yield True, f"ContrastBolusAgent='{agent}'"
    for keyword in _CONTRAST_AMOUNT_KEYWORDS:
        amount = _num(ds.get(keyword))
        if amount is not None and amount > 0:
            yield True, f"{keyword}={amount:g}"
    start = _text(ds, "ContrastBolusStartTime")
    if start and (agent == "" or not _agent_is_negative(agent)):
        yield True, f"ContrastBolusStartTime={start}"
    for item in ds.get("ContrastBolusAgentSequence", None) or []:
        meaning = str(item.get("CodeMeaning", "") or item.get("CodeValue", "")).strip()
        if meaning:
            yield True, f"ContrastBolusAgentSequence '{meaning}'"


def _usage_facts(frames: Sequence[list[Dataset]]) -> Iterator[tuple[bool, str]]:
    """(agent given?, fact) from each frame's ContrastBolusUsageSequence (Enhanced MR).

    Why: Enhanced MR records per frame whether an agent was administered or detected.
    """
    for groups in frames:
        for usage in _group_items(groups, "ContrastBolusUsageSequence"):
            given = _strs(usage.get("ContrastBolusAgentAdministered"))
            detected = _strs(usage.get("ContrastBolusAgentDetected"))
            if "YES" in given or "YES" in detected:
                yield True, "ContrastBolusUsageSequence: agent administered/detected"
            elif "NO" in given:
                yield False, "ContrastBolusUsageSequence: agent not administered"


def _nested_agent_facts(ds: Dataset) -> Iterator[tuple[bool, str]]:
    """(agent given?, fact) for a ContrastBolusAgent nested anywhere in the functional groups.

    Why: vendors vary (e.g. inside MRModifierSequence).  Only the shared item and
    the first per-frame item are walked: contrast does not change from frame to
    frame, and walking every frame of a 10 000-frame fMRI would be slow.
    """
    for group in _first_groups(ds):
        for _keyword, value in _walk_keywords(group, {"ContrastBolusAgent"}):
            text = str(value).strip()
            if text and _agent_is_negative(text):
                yield False, f"ContrastBolusAgent='{text}' in functional groups (explicitly no agent)"
            elif text:
                yield True, f"ContrastBolusAgent='{text}' in functional groups"


def _contrast(instances: Sequence[_Instance]) -> dict[str, Any]:
    """Facts that an agent was given, and facts that explicitly none was; each once, in the order found.

    Why: they decide T1 vs T1CE; "explicitly none" is kept apart from "not
    recorded" so that the classifier can weigh them against the description.
    """
    facts = [fact for inst in instances
             for fact in chain(_bolus_module_facts(inst.ds), _usage_facts(inst.frames), _nested_agent_facts(inst.ds))]
    return {
        "contrast_positive": tuple(dict.fromkeys(text for given, text in facts if given)),
        "contrast_negative": tuple(dict.fromkeys(text for given, text in facts if not given)),
    }


def extract_evidence(series_uid: str, datasets: Sequence[Dataset]) -> SeriesEvidence:
    """Summarize the MR image headers of one series (header-only datasets are enough).

    Datasets whose SOPClassUID is present and is not an MR image class are ignored
    (the caller is meant to filter; ignoring here keeps a stray Raw Data or SR
    object from ever reaching the classifier).  Duplicate SOPInstanceUIDs (the
    same image stored twice, e.g. in two transfer syntaxes) count once.
    """
    images = _mr_images(datasets)
    enhanced = _is_enhanced(images)
    instances = [_Instance(ds, list(_frame_groups(ds))) for ds in images]
    first = images[0] if images else Dataset()
    return SeriesEvidence(
        series_uid=series_uid,
        enhanced=enhanced,
        temporal_positions=_temporal_positions(instances),
        acquisition_datetime=_acquisition_time(instances),
        **_counts(instances),
        **_names(first),
        **_scanner(first),
        **_image_type(instances, first),
        **_sequence_family(instances),
        **_epi_and_ir_flags(instances),
        **_timing(instances),
        **_diffusion(instances, enhanced),
        **_geometry(instances),
        **_anatomy(instances, first),
        **_contrast(instances),
    )
