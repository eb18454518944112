"""Write volumes as a multi-series brain MR study: classic MR or Enhanced MR objects."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat
from pydicom.sr.codedict import codes

from dicomnode.dicom.sop import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE
from dicomnode.synth import protocols as _p
from dicomnode.synth.geometry import PLANES, SliceStack, check_affine, slice_stack
from dicomnode.synth.phantom import ROLES

_FILE_NAME = re.compile(r"^\d{4}\.dcm$")


@dataclass
class WrittenStudy:
    study_instance_uid: str
    series: dict[str, str] = field(default_factory=dict)          # role -> SeriesInstanceUID
    files: dict[str, list[Path]] = field(default_factory=dict)    # role -> files written

    def all_files(self) -> list[Path]:
        return [f for role in self.files for f in self.files[role]]


# --------------------------------------------------------------------------- helpers
def _uid(*parts: object) -> str:
    """Deterministic UID under pydicom's prefix, from the given parts."""
    return generate_uid(entropy_srcs=["dicomnode.synth", *(str(p) for p in parts)])


def _ds(value: float) -> DSfloat:
    """A DS value that fits in 16 characters, written as short as it reads exactly."""
    v = float(value)
    if abs(v) < 1e-10:  # rounding noise from rotations, e.g. 6e-17
        v = 0.0
    text = repr(v)
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) <= 16 and "e" not in text:
        return DSfloat(text)
    short = f"{v:.15g}"  # drops floating-point noise such as 0.6000000000000001 (a rotated affine's spacing)
    if len(short) <= 16 and "e" not in short:
        return DSfloat(short)
    return DSfloat(v, auto_format=True)


def _tm(seconds: float) -> str:
    seconds = seconds % 86400
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def _item(**attrs) -> Dataset:
    item = Dataset()
    for k, v in attrs.items():
        setattr(item, k, v)
    return item


def _seq(**attrs) -> Sequence:
    """A sequence of one item with the given attributes (most functional groups)."""
    return Sequence([_item(**attrs)])


def _code(code) -> Dataset:
    """A code sequence item from a pydicom ``Code`` (codes come from pydicom's CID tables)."""
    return _item(CodeValue=code.value, CodingSchemeDesignator=code.scheme_designator,
                 CodeMeaning=code.meaning)


@dataclass(frozen=True)
class _Scaling:
    stored: np.ndarray     # uint16, same shape as the input
    slope: float
    intercept: float

    @property
    def identity(self) -> bool:
        return self.slope == 1.0 and self.intercept == 0.0


def _scale(volume: np.ndarray, bits: int) -> _Scaling:
    """Map real values onto unsigned ``bits``-bit integers (value = stored * slope + intercept)."""
    v = np.asarray(volume, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("volume has NaN or infinite values")
    top = 2 ** bits - 1
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0 and hi <= top and np.array_equal(v, np.round(v)):
        return _Scaling(v.astype(np.uint16), 1.0, 0.0)
    intercept = 0.0 if lo >= 0 else lo
    span = hi - intercept
    # one count of head-room absorbs the rounding of the DS strings
    slope = float(_ds(span / (top - 1))) if span > 0 else 1.0
    intercept = float(_ds(intercept))
    stored = np.clip(np.round((v - intercept) / slope), 0, top).astype(np.uint16)
    return _Scaling(stored, slope, intercept)


def _window(volume: np.ndarray) -> tuple[float, float]:
    """Window centre/width as a scanner sets them: from zero (or the minimum) to near the top."""
    v = np.asarray(volume, dtype=np.float64)
    lo = min(0.0, float(np.percentile(v, 0.5)))
    hi = float(np.percentile(v, 99.8))
    width = max(hi - lo, 1.0)
    return float(round(lo + width / 2, 2)), float(round(width, 2))


def _slice_offsets(pr: _p.Protocol, n: int) -> np.ndarray:
    """Seconds from the series start at which each slice is acquired.

    A 3D volume is excited as a whole (all 0).  A 2D multi-slice series is
    interleaved within each TR, ascending, starting with the odd-numbered
    slices when the count is even (as Siemens does).
    """
    if pr.acquisition_type == "3D":
        return np.zeros(n)
    first = list(range(1, n, 2)) if n % 2 == 0 else list(range(0, n, 2))
    order = first + [k for k in range(n) if k not in set(first)]
    offsets = np.zeros(n)
    for position, k in enumerate(order):
        offsets[k] = position * pr.repetition_time / n / 1000.0
    return offsets


@dataclass(frozen=True)
class _Patient:
    sex: str
    age: int
    birth_date: str
    weight: float
    size: float


def _patient(seed: int, study_date: str) -> _Patient:
    rng = np.random.default_rng([seed, 4242])
    sex = "F" if rng.random() < 0.45 else "M"
    age = int(rng.integers(30, 79))
    year = int(study_date[:4]) - age
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    weight = round(float(rng.uniform(55, 68) if sex == "F" else rng.uniform(68, 95)), 1)
    size = round(float(rng.uniform(1.55, 1.75) if sex == "F" else rng.uniform(1.68, 1.92)), 2)
    return _Patient(sex, age, f"{year:04d}{month:02d}{day:02d}", weight, size)


def _schedule(seed: int, roles: list[str]) -> tuple[float, dict[str, float], float]:
    """(study start, {role: series start}, contrast injection time), seconds after midnight."""
    start = 8 * 3600 + (seed * 1237) % (8 * 3600)
    t = start + 95.0  # localizer first
    starts: dict[str, float] = {}
    injection = t
    for role in _p.ACQUISITION_ORDER:
        if role == "T1CE":
            injection = t + 30.0
            t = injection + 90.0
        starts[role] = t
        # every vendor's durations are close; use Siemens' as the clock
        t += _p.protocol("siemens", role).duration_s + 25.0
    return float(start), {r: starts[r] for r in roles}, injection


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class _Context:
    vendor: str
    enhanced: bool
    seed: int
    study_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    study_start: float
    injection: float
    patient: _Patient
    with_contrast: bool
    bits: int
    character_set: str
    protocols: dict[str, _p.Protocol]          # role -> protocol with the caller's plane/acquisition overrides
    thickness: dict[str, float]                # role -> SliceThickness where it differs from the slice spacing


def _base_dataset(ctx: _Context, role: str, series_uid: str, series_start: float) -> Dataset:
    eq = _p.equipment(ctx.vendor, ctx.enhanced)
    pr = ctx.protocols[role]
    ds = Dataset()
    ds.SpecificCharacterSet = ctx.character_set
    ds.InstanceCreationDate = ctx.study_date
    ds.InstanceCreationTime = _tm(series_start + pr.duration_s + 5)
    ds.StudyDate = ctx.study_date
    ds.SeriesDate = ctx.study_date
    ds.AcquisitionDate = ctx.study_date
    ds.ContentDate = ctx.study_date
    ds.StudyTime = _tm(ctx.study_start)
    ds.SeriesTime = _tm(series_start)
    ds.ContentTime = _tm(series_start + pr.duration_s + 5)
    ds.AccessionNumber = f"SYN{ctx.seed % 10**9:09d}"[:16]
    ds.Modality = "MR"
    ds.Manufacturer = eq.manufacturer
    ds.InstitutionName = eq.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = eq.station
    ds.StudyDescription = eq.study_description[0 if ctx.with_contrast else 1]
    ds.SeriesDescription = pr.description
    ds.ManufacturerModelName = eq.model
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.patient.birth_date
    ds.PatientSex = ctx.patient.sex
    ds.PatientAge = f"{ctx.patient.age:03d}Y"
    ds.PatientSize = _ds(ctx.patient.size)
    ds.PatientWeight = _ds(ctx.patient.weight)
    ds.BodyPartExamined = "BRAIN"
    ds.DeviceSerialNumber = eq.serial
    ds.SoftwareVersions = list(eq.software) if len(eq.software) > 1 else eq.software[0]
    ds.ProtocolName = pr.protocol_name
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = _p.series_number(ctx.vendor, ctx.enhanced, role)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.MRAcquisitionType = pr.acquisition_type
    ds.MagneticFieldStrength = _ds(eq.field_strength)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = ctx.bits
    ds.HighBit = ctx.bits - 1
    ds.PixelRepresentation = 0
    return ds


def _contrast_volume(ctx: _Context) -> float:
    eq = _p.equipment(ctx.vendor, ctx.enhanced)
    return round(eq.contrast.dose_ml_per_kg * ctx.patient.weight, 1)


def _add_classic_contrast(ds: Dataset, ctx: _Context) -> None:
    agent = _p.equipment(ctx.vendor, ctx.enhanced).contrast
    ds.ContrastBolusAgent = agent.name
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = _ds(_contrast_volume(ctx))
    ds.ContrastBolusStartTime = _tm(ctx.injection)
    ds.ContrastBolusTotalDose = _ds(_contrast_volume(ctx))
    ds.ContrastBolusIngredient = "GADOLINIUM"
    ds.ContrastBolusIngredientConcentration = _ds(agent.concentration_mg_ml)


def _acquisition_matrix(pr: _p.Protocol, stack: SliceStack) -> list[int]:
    # [frequency rows, frequency columns, phase rows, phase columns]
    if pr.phase_direction == "ROW":
        return [0, stack.rows, stack.columns, 0]
    return [stack.columns, 0, 0, stack.rows]


def _classic_series(ctx: _Context, role: str, volume: np.ndarray, affine: np.ndarray,
                    series_uid: str, series_start: float) -> list[Dataset]:
    pr = ctx.protocols[role]
    eq = _p.equipment(ctx.vendor, ctx.enhanced)
    stack = slice_stack(volume, affine, pr.plane)
    scaling = _scale(stack.pixels, ctx.bits)
    centre, width = _window(stack.pixels)
    locations = stack.slice_locations
    offsets = _slice_offsets(pr, stack.pixels.shape[0])
    out = []
    for k in range(stack.pixels.shape[0]):
        ds = _base_dataset(ctx, role, series_uid, series_start)
        ds.ImageType = list(pr.image_type)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = _uid(series_uid, "instance", k + 1)
        ds.AcquisitionTime = _tm(series_start + offsets[k])
        ds.ScanningSequence = list(pr.scanning_sequence)
        ds.SequenceVariant = list(pr.sequence_variant)
        ds.ScanOptions = list(pr.scan_options)
        if pr.sequence_name is not None:
            ds.SequenceName = pr.sequence_name
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds(ctx.thickness.get(role, stack.slice_spacing))
        ds.RepetitionTime = _ds(pr.repetition_time)
        ds.EchoTime = _ds(pr.echo_time)
        if pr.inversion_time is not None:
            ds.InversionTime = _ds(pr.inversion_time)
        ds.NumberOfAverages = _ds(pr.averages)
        ds.ImagingFrequency = _ds(eq.imaging_frequency)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.SpacingBetweenSlices = _ds(stack.slice_spacing)
        ds.NumberOfPhaseEncodingSteps = stack.columns if pr.phase_direction == "ROW" else stack.rows
        ds.EchoTrainLength = pr.echo_train_length
        ds.PercentSampling = _ds(100)
        ds.PercentPhaseFieldOfView = _ds(100)
        ds.PixelBandwidth = _ds(pr.pixel_bandwidth)
        ds.ReceiveCoilName = eq.receive_coil
        ds.TransmitCoilName = eq.transmit_coil
        ds.AcquisitionMatrix = _acquisition_matrix(pr, stack)
        ds.InPlanePhaseEncodingDirection = pr.phase_direction
        ds.FlipAngle = _ds(pr.flip_angle)
        ds.VariableFlipAngleFlag = "N"
        if pr.contrast:
            _add_classic_contrast(ds, ctx)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in stack.positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in stack.orientation]
        ds.SliceLocation = _ds(locations[k])
        ds.Rows = stack.rows
        ds.Columns = stack.columns
        ds.PixelSpacing = [_ds(v) for v in stack.pixel_spacing]
        if not scaling.identity or ctx.vendor == "philips":
            ds.RescaleIntercept = _ds(scaling.intercept)
            ds.RescaleSlope = _ds(scaling.slope)
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(width)
        ds.PixelData = scaling.stored[k].astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out


def _enhanced_series(ctx: _Context, role: str, volume: np.ndarray, affine: np.ndarray,
                     series_uid: str, series_start: float) -> Dataset:
    pr = ctx.protocols[role]
    eq = _p.equipment(ctx.vendor, ctx.enhanced)
    stack = slice_stack(volume, affine, pr.plane)
    scaling = _scale(stack.pixels, ctx.bits)
    centre, width = _window(stack.pixels)
    n = stack.pixels.shape[0]
    acq_dt = ctx.study_date + _tm(series_start)
    image_type = ["ORIGINAL", "PRIMARY", pr.image_flavor, "NONE"]

    ds = _base_dataset(ctx, role, series_uid, series_start)
    del ds.AcquisitionDate
    ds.ImageType = image_type
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = _uid(series_uid, "instance", 1)
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = acq_dt
    ds.AcquisitionDuration = float(pr.duration_s)
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # Common CT/MR and MR image description macros
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = pr.acquisition_contrast
    # MR pulse sequence module
    ds.PulseSequenceName = pr.pulse_sequence_name
    ds.EchoPulseSequence = pr.echo_pulse_sequence
    if pr.echo_pulse_sequence in ("SPIN", "BOTH"):
        ds.MultipleSpinEcho = "YES" if pr.echo_train_length > 1 else "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL" if pr.echo_train_length > 1 else "SINGLE"
    if pr.acquisition_type == "3D":
        ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # Acquisition context (type 2, empty)
    ds.AcquisitionContextSequence = Sequence([])
    if pr.contrast:
        _add_enhanced_contrast(ds, ctx)
    # Multi-frame dimension module: frames indexed by (stack, position in stack)
    dim_uid = _uid(series_uid, "dimension-organization")
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dim_uid)
    ds.DimensionOrganizationType = "3D"
    dims = []
    for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number")):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        item.DimensionDescriptionLabel = label
        dims.append(item)
    ds.DimensionIndexSequence = Sequence(dims)
    ds.NumberOfFrames = n
    ds.Rows = stack.rows
    ds.Columns = stack.columns

    # ---- shared functional groups
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(
        PixelSpacing=[_ds(v) for v in stack.pixel_spacing],
        SliceThickness=_ds(ctx.thickness.get(role, stack.slice_spacing)),
        SpacingBetweenSlices=_ds(stack.slice_spacing),
    )
    shared.PlaneOrientationSequence = _seq(
        ImageOrientationPatient=[_ds(v) for v in stack.orientation])
    shared.FrameAnatomySequence = _seq(
        AnatomicRegionSequence=Sequence([_code(codes.cid4030.Brain)]), FrameLaterality="U")
    shared.FrameVOILUTSequence = _seq(WindowCenter=_ds(centre), WindowWidth=_ds(width))
    shared.MRImageFrameTypeSequence = _seq(
        FrameType=image_type, PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast=pr.acquisition_contrast)
    timing = Dataset()
    timing.RepetitionTime = _ds(pr.repetition_time)
    timing.EchoTrainLength = pr.echo_train_length
    timing.FlipAngle = _ds(pr.flip_angle)
    timing.RFEchoTrainLength = pr.echo_train_length if pr.echo_pulse_sequence == "SPIN" else 0
    timing.GradientEchoTrainLength = 1 if pr.echo_pulse_sequence == "GRADIENT" else 0
    timing.OperatingModeSequence = Sequence([
        _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
        _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
    ])
    timing.SpecificAbsorptionRateSequence = Sequence([
        _item(SpecificAbsorptionRateDefinition="IEC_HEAD",
              SpecificAbsorptionRateValue=0.3 if pr.echo_pulse_sequence == "GRADIENT" else 1.2)])
    timing.GradientOutputType = "PER_NERVE_STIM"
    timing.GradientOutput = 0.6
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = _seq(EffectiveEchoTime=float(pr.echo_time))
    modifier = Dataset()
    modifier.InversionRecovery = "YES" if pr.inversion_time is not None else "NO"
    if pr.inversion_time is not None:
        modifier.InversionTimes = [float(pr.inversion_time)]
    modifier.FlowCompensation = "NONE"
    modifier.T2Preparation = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    if pr.echo_pulse_sequence == "GRADIENT":
        modifier.Spoiling = "RF"
    shared.MRModifierSequence = Sequence([modifier])
    shared.MRImagingModifierSequence = _seq(
        PixelBandwidth=_ds(pr.pixel_bandwidth), MagnetizationTransfer="NONE",
        BloodSignalNulling="NO", Tagging="NONE", TransmitterFrequency=float(eq.imaging_frequency))
    shared.MRReceiveCoilSequence = _seq(
        ReceiveCoilName=eq.receive_coil, ReceiveCoilManufacturerName=eq.manufacturer,
        ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
        MultiCoilDefinitionSequence=Sequence([
            _item(MultiCoilElementName="HEAD", MultiCoilElementUsed="YES")]))
    shared.MRTransmitCoilSequence = _seq(
        TransmitCoilName=eq.transmit_coil, TransmitCoilManufacturerName=eq.manufacturer,
        TransmitCoilType="BODY")
    shared.MRAveragesSequence = _seq(NumberOfAverages=_ds(pr.averages))
    shared.MRFOVGeometrySequence = _seq(
        # the enhanced objects spell it out: ROW | COLUMN
        InPlanePhaseEncodingDirection="ROW" if pr.phase_direction == "ROW" else "COLUMN", MRAcquisitionFrequencyEncodingSteps=(
            stack.rows if pr.phase_direction == "ROW" else stack.columns),
        MRAcquisitionPhaseEncodingStepsInPlane=(
            stack.columns if pr.phase_direction == "ROW" else stack.rows),
        **({"MRAcquisitionPhaseEncodingStepsOutOfPlane": n} if pr.acquisition_type == "3D" else {}),
        PercentSampling=_ds(100), PercentPhaseFieldOfView=_ds(100))
    shared.MRSpatialSaturationSequence = Sequence([])
    if pr.contrast:
        shared.ContrastBolusUsageSequence = _seq(
            ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES",
            ContrastBolusAgentDetected="YES", ContrastBolusAgentPhase="POST_CONTRAST")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    # ---- per-frame functional groups
    frames = []
    duration_ms = pr.duration_s * 1000.0
    offsets = _slice_offsets(pr, n)
    for k in range(n):
        fg = Dataset()
        frame_dt = ctx.study_date + _tm(series_start + offsets[k])
        fg.FrameContentSequence = _seq(
            FrameAcquisitionNumber=1,
            FrameReferenceDateTime=frame_dt,
            FrameAcquisitionDateTime=frame_dt,
            FrameAcquisitionDuration=duration_ms,
            StackID="1",
            InStackPositionNumber=k + 1,
            DimensionIndexValues=[1, k + 1],
        )
        fg.PlanePositionSequence = _seq(ImagePositionPatient=[_ds(v) for v in stack.positions[k]])
        # per frame, as Siemens and Philips write it (and as dicom2nifti reads it)
        fg.PixelValueTransformationSequence = _seq(
            RescaleIntercept=_ds(scaling.intercept), RescaleSlope=_ds(scaling.slope),
            RescaleType="US")
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = scaling.stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _add_enhanced_contrast(ds: Dataset, ctx: _Context) -> None:
    """Enhanced Contrast/Bolus module (the agent is given before this series)."""
    agent = _p.equipment(ctx.vendor, ctx.enhanced).contrast
    volume = _contrast_volume(ctx)
    item = _code(agent.agent_code)
    item.ContrastBolusAgentNumber = 1
    item.ContrastBolusAdministrationRouteSequence = Sequence([_code(codes.cid11.IntravenousRoute)])
    item.ContrastBolusIngredientCodeSequence = Sequence([_code(codes.cid13.Gadolinium)])
    item.ContrastBolusVolume = _ds(volume)
    item.ContrastBolusIngredientConcentration = _ds(agent.concentration_mg_ml)
    item.ContrastAdministrationProfileSequence = _seq(
        ContrastBolusVolume=_ds(volume),
        ContrastBolusStartTime=_tm(ctx.injection),
        ContrastBolusStopTime=_tm(ctx.injection + 15),
        ContrastFlowRate=[_ds(round(volume / 15, 2))],
        ContrastFlowDuration=[_ds(15)],
    )
    ds.ContrastBolusAgentSequence = Sequence([item])
    # the classic attributes too: many readers (and the node's sequence rules) look for them
    ds.ContrastBolusAgent = agent.name


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- public
def _per_role(name: str, value: Mapping[str, object] | None, wanted: list[str]) -> dict[str, object]:
    """Upper-case the keys of a per-role option; every key must be a role being written."""
    if value is None:
        return {}
    out = {str(k).upper(): v for k, v in value.items()}
    extra = sorted(set(out) - set(wanted))
    if extra:
        raise ValueError(f"{name} names roles that are not written: {', '.join(extra)}")
    return out


def write_study(volumes: Mapping[str, np.ndarray], affine: np.ndarray | Mapping[str, np.ndarray],
                out_dir: str | Path, *,
                vendor: str = "siemens", enhanced: bool = False, seed: int = 0,
                study_instance_uid: str | None = None, patient_name: str = "SYNTHETIC^GLIOMA",
                patient_id: str = "SYN0001", study_date: str = "20260101",
                roles: Iterable[str] | None = None, bits: int = 16,
                planes: Mapping[str, str] | None = None,
                slice_thickness: Mapping[str, float] | None = None,
                acquisition_types: Mapping[str, str] | None = None) -> WrittenStudy:
    """Write one brain MR study, one series per role, under ``out_dir``.

    ``volumes`` maps role (see :data:`ROLES`) to a 3-D array in NIfTI voxel order
    with the NIfTI RAS ``affine``: one 4x4 for every role, or a mapping role ->
    4x4 when each series has its own grid (native scanner geometry, e.g.
    :func:`training.heads.native_study`).  Classic MR Image Storage writes one file per
    slice (``<role>/<nnnn>.dcm``); ``enhanced=True`` writes one Enhanced MR Image
    Storage file per series (``<role>/0001.dcm``).  UIDs are derived from
    ``seed`` (and the study UID), so the same call writes the same UIDs.

    Per-role overrides of the vendor protocol: ``planes`` ("ax" | "sag" |
    "cor": the plane the volume's axes are laid out in, instead of the
    protocol's), ``slice_thickness`` (SliceThickness in mm when it differs
    from the slice spacing, i.e. 2D stacks with a gap) and
    ``acquisition_types`` ("2D" | "3D": MRAcquisitionType and what follows
    from it, such as interleaved slice times).
    """
    vendor = vendor.lower()
    if vendor not in _p.VENDORS:
        raise ValueError(f"vendor must be one of {_p.VENDORS}, got {vendor!r}")
    if not 8 <= int(bits) <= 16:
        raise ValueError(f"bits must be between 8 and 16, got {bits}")
    bits = int(bits)
    if not re.fullmatch(r"\d{8}", study_date):
        raise ValueError(f"study_date must be YYYYMMDD, got {study_date!r}")
    _dt.datetime.strptime(study_date, "%Y%m%d")
    # role names are matched case-insensitively, so BraTS keys (t1, t1ce, t2, flair) work too
    by_role: dict[str, np.ndarray] = {}
    for key, volume in volumes.items():
        by_role[str(key).upper()] = volume
    wanted = list(by_role) if roles is None else [str(r).upper() for r in roles]
    for role in wanted:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES} (pass roles= to pick some)")
        if role not in by_role:
            raise ValueError(f"no volume for role {role!r}")
        if np.asarray(by_role[role]).ndim != 3:
            raise ValueError(f"volume for {role} must be 3-D, got shape {np.shape(by_role[role])}")
    if isinstance(affine, Mapping):
        by_role_affine = {str(k).upper(): v for k, v in affine.items()}
        missing = [r for r in wanted if r not in by_role_affine]
        if missing:
            raise ValueError(f"no affine for role(s) {', '.join(missing)}")
        affines = {r: check_affine(by_role_affine[r]) for r in wanted}
    else:
        one = check_affine(affine)
        affines = {r: one for r in wanted}
    plane_of = _per_role("planes", planes, wanted)
    thick_of = _per_role("slice_thickness", slice_thickness, wanted)
    acq_of = _per_role("acquisition_types", acquisition_types, wanted)
    protocols: dict[str, _p.Protocol] = {}
    for role in wanted:
        pr = _p.protocol(vendor, role)
        if role in plane_of:
            if plane_of[role] not in PLANES:
                raise ValueError(f"plane for {role} must be one of {', '.join(PLANES)}, got {plane_of[role]!r}")
            pr = dataclasses.replace(pr, plane=str(plane_of[role]))
        if role in acq_of:
            if acq_of[role] not in ("2D", "3D"):
                raise ValueError(f"acquisition type for {role} must be 2D or 3D, got {acq_of[role]!r}")
            pr = dataclasses.replace(pr, acquisition_type=str(acq_of[role]))
        protocols[role] = pr
    thickness: dict[str, float] = {}
    for role, value in thick_of.items():
        t = float(value)  # type: ignore[arg-type]
        if not (np.isfinite(t) and t > 0):
            raise ValueError(f"slice thickness for {role} must be a positive number of mm, got {value!r}")
        thickness[role] = t
    ordered = [r for r in _p.ACQUISITION_ORDER if r in wanted]

    study_uid = study_instance_uid or _uid("study", seed, vendor, enhanced, patient_id, study_date)
    study_start, starts, injection = _schedule(seed, ordered)
    ctx = _Context(
        vendor=vendor, enhanced=bool(enhanced), seed=int(seed), study_uid=study_uid,
        frame_of_reference_uid=_uid(study_uid, seed, "frame-of-reference"),
        patient_name=patient_name, patient_id=patient_id, study_date=study_date,
        study_start=study_start, injection=injection, patient=_patient(int(seed), study_date),
        with_contrast="T1CE" in ordered, bits=bits,
        character_set="ISO_IR 100" if _latin1(patient_name + patient_id) else "ISO_IR 192",
        protocols=protocols, thickness=thickness,
    )
    out = Path(out_dir)
    written = WrittenStudy(study_instance_uid=study_uid)
    for role in ordered:
        series_uid = _uid(study_uid, seed, "series", vendor, enhanced, role)
        volume = np.asarray(by_role[role])
        if enhanced:
            datasets = [_enhanced_series(ctx, role, volume, affines[role], series_uid, starts[role])]
        else:
            datasets = _classic_series(ctx, role, volume, affines[role], series_uid, starts[role])
        role_dir = out / role
        role_dir.mkdir(parents=True, exist_ok=True)
        for old in role_dir.iterdir():  # only names this writer makes: a rerun replaces them
            if old.is_file() and _FILE_NAME.match(old.name):
                old.unlink()
        paths = []
        for n, ds in enumerate(datasets, start=1):
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = role_dir / f"{n:04d}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        written.series[role] = series_uid
        written.files[role] = paths
    return written
