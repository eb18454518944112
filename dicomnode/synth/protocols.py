"""What each vendor's scanner writes for each role: equipment, protocol names, timing.

Values are modelled on real exports (Siemens Prisma VE11 / XA30, GE MR750 DV26,
Philips Ingenia R5.7) and on common clinical brain-tumour protocols.  Times
are in ms as DICOM stores them.  GE and Philips report the per-excitation TR
of their 3D T1 gradient-echo sequences (about 8 ms), not the MPRAGE-style
shot interval Siemens reports (about 2 s): that is what their headers say.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes

VENDORS = ("siemens", "ge", "philips")

#: the order in which a clinical glioma protocol acquires the series (contrast before T1CE)
ACQUISITION_ORDER = ("T1", "T2", "FLAIR", "T1CE")


@dataclass(frozen=True)
class ContrastAgent:
    name: str                    # ContrastBolusAgent as sites type it
    agent_code: object           # pydicom Code from CID 12
    concentration_mg_ml: float   # ContrastBolusIngredientConcentration
    dose_ml_per_kg: float        # standard single dose (0.1 mmol/kg)


@dataclass(frozen=True)
class Equipment:
    manufacturer: str
    model: str
    software: tuple[str, ...]
    field_strength: float        # T
    imaging_frequency: float     # MHz
    station: str
    serial: str
    receive_coil: str
    transmit_coil: str
    institution: str
    study_description: tuple[str, str]   # (with contrast, without contrast)
    series_number_base: int      # SeriesNumber of the n-th series = base * (n + 2) + offset
    series_number_offset: int
    contrast: ContrastAgent


@dataclass(frozen=True)
class Protocol:
    description: str             # SeriesDescription
    protocol_name: str
    plane: str                   # 'ax' | 'sag' | 'cor' (see geometry.PLANES)
    acquisition_type: str        # MRAcquisitionType
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    sequence_name: str | None    # (0018,0024); None where the vendor leaves it out
    pulse_sequence_name: str     # (0018,9005), enhanced objects
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    flip_angle: float
    echo_train_length: int
    pixel_bandwidth: float
    duration_s: float            # acquisition duration
    image_type: tuple[str, ...]  # classic ImageType
    image_flavor: str            # enhanced ImageType / FrameType value 3
    acquisition_contrast: str    # enhanced (0008,9209)
    echo_pulse_sequence: str     # 'GRADIENT' | 'SPIN'
    phase_direction: str = "ROW"
    averages: float = 1.0
    contrast: bool = False       # gadolinium given before this series


_GADOVIST = ContrastAgent("Gadovist", codes.cid12.Gadobutrol, 604.72, 0.1)
_CLARISCAN = ContrastAgent("Clariscan", codes.cid12.GadoterateMeglumine, 279.32, 0.2)
_DOTAREM = ContrastAgent("Dotarem", codes.cid12.GadoterateMeglumine, 279.32, 0.2)

_INSTITUTION = "Synthetic Imaging Centre"

EQUIPMENT: dict[tuple[str, bool], Equipment] = {
    ("siemens", False): Equipment(
        "SIEMENS", "Prisma", ("syngo MR E11",), 3.0, 123.2599, "AWP66024", "166024",
        "HeadNeck_20", "Body", _INSTITUTION, ("Neuro^Tumour", "Neuro^Brain"), 1, 1, _GADOVIST),
    ("siemens", True): Equipment(
        "Siemens Healthineers", "MAGNETOM Vida", ("syngo MR XA30",), 3.0, 123.2624, "MRC35062",
        "175062", "HeadNeck_64", "Body", _INSTITUTION, ("Neuro^Tumour", "Neuro^Brain"), 1, 1,
        _GADOVIST),
    ("ge", False): Equipment(
        "GE MEDICAL SYSTEMS", "DISCOVERY MR750", ("27", "LX", "MR Software release:DV26.0_R01_1725.a"),
        3.0, 127.7769, "GEMR750A", "000301496MR3T6MR", "32Ch Head", "BODY",
        _INSTITUTION, ("MR BRAIN W/WO CONTRAST", "MR BRAIN WO CONTRAST"), 1, 1, _CLARISCAN),
    ("ge", True): Equipment(
        "GE MEDICAL SYSTEMS", "SIGNA Premier", ("30", "LX", "MR30.1_R01_2230.a"),
        3.0, 127.7731, "GEPREMIER", "000301777MR3T1PR", "48Ch Head", "BODY",
        _INSTITUTION, ("MR BRAIN W/WO CONTRAST", "MR BRAIN WO CONTRAST"), 1, 1, _CLARISCAN),
    ("philips", False): Equipment(
        "Philips", "Ingenia", ("5.7.1", "5.7.1.3"), 3.0, 127.7754, "PHILIPS-ING3T", "45190",
        "MULTI COIL", "B", _INSTITUTION, ("Brain tumour +Gd", "Brain"), 100, 1, _DOTAREM),
    ("philips", True): Equipment(
        "Philips", "Ingenia", ("5.7.1", "5.7.1.3"), 3.0, 127.7754, "PHILIPS-ING3T", "45190",
        "MULTI COIL", "B", _INSTITUTION, ("Brain tumour +Gd", "Brain"), 100, 1, _DOTAREM),
}

_SIEMENS_T1 = dict(
    plane="sag", acquisition_type="3D", scanning_sequence=("GR", "IR"),
    sequence_variant=("SK", "SP", "MP"), scan_options=("IR",), sequence_name="*tfl3d1_16ns",
    pulse_sequence_name="*tfl3d1_16ns", repetition_time=2300.0, echo_time=2.98,
    inversion_time=900.0, flip_angle=9.0, echo_train_length=1, pixel_bandwidth=240.0,
    duration_s=312.0, image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), image_flavor="M",
    acquisition_contrast="UNKNOWN", echo_pulse_sequence="GRADIENT")
_GE_T1 = dict(
    plane="ax", acquisition_type="3D", scanning_sequence=("GR", "IR"),
    sequence_variant=("SK", "SS", "MP"), scan_options=("FAST_GEMS", "EDR_GEMS", "IR_GEMS", "ACC_GEMS"),
    sequence_name=None, pulse_sequence_name="efgre3d", repetition_time=8.2, echo_time=3.2,
    inversion_time=450.0, flip_angle=12.0, echo_train_length=1, pixel_bandwidth=244.1,
    duration_s=268.0, image_type=("ORIGINAL", "PRIMARY", "OTHER"), image_flavor="T1",
    acquisition_contrast="T1", echo_pulse_sequence="GRADIENT", phase_direction="COL")
_PHILIPS_T1 = dict(
    plane="sag", acquisition_type="3D", scanning_sequence=("GR",), sequence_variant=("SK", "MP"),
    scan_options=("OTHER",), sequence_name=None, pulse_sequence_name="T1TFE",
    repetition_time=8.1, echo_time=3.7, inversion_time=None, flip_angle=8.0, echo_train_length=1,
    pixel_bandwidth=191.0, duration_s=290.0, image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
    image_flavor="T1", acquisition_contrast="T1", echo_pulse_sequence="GRADIENT")

PROTOCOLS: dict[tuple[str, str], Protocol] = {
    # ---- Siemens -------------------------------------------------------------------
    ("siemens", "T1"): Protocol("t1_mprage_sag_p2_iso", "t1_mprage_sag_p2_iso", **_SIEMENS_T1),
    ("siemens", "T1CE"): Protocol("t1_mprage_sag_p2_iso_post", "t1_mprage_sag_p2_iso_post",
                                  **_SIEMENS_T1, contrast=True),
    ("siemens", "T2"): Protocol(
        "t2_tse_tra", "t2_tse_tra", plane="ax", acquisition_type="2D", scanning_sequence=("SE",),
        sequence_variant=("SK", "SP", "OSP"), scan_options=("PFP",), sequence_name="*tse2d1_15",
        pulse_sequence_name="*tse2d1_15", repetition_time=6000.0, echo_time=100.0,
        inversion_time=None, flip_angle=150.0, echo_train_length=15, pixel_bandwidth=220.0,
        duration_s=128.0, image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), image_flavor="M",
        acquisition_contrast="UNKNOWN", echo_pulse_sequence="SPIN"),
    ("siemens", "FLAIR"): Protocol(
        "t2_tirm_tra_dark-fluid", "t2_tirm_tra_dark-fluid", plane="ax", acquisition_type="2D",
        scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP", "MP"), scan_options=("IR",),
        sequence_name="*tir2d1_21", pulse_sequence_name="*tir2d1_21", repetition_time=9000.0,
        echo_time=81.0, inversion_time=2500.0, flip_angle=150.0, echo_train_length=21,
        pixel_bandwidth=260.0, duration_s=200.0,
        image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), image_flavor="M",
        acquisition_contrast="UNKNOWN", echo_pulse_sequence="SPIN"),
    # ---- GE ----------------------------------------------------------------------------
    ("ge", "T1"): Protocol("Ax T1 BRAVO", "Ax T1 BRAVO", **_GE_T1),
    ("ge", "T1CE"): Protocol("Ax T1 BRAVO +C", "Ax T1 BRAVO +C", **_GE_T1, contrast=True),
    ("ge", "T2"): Protocol(
        "Ax T2 FRFSE", "Ax T2 FRFSE", plane="ax", acquisition_type="2D", scanning_sequence=("SE",),
        sequence_variant=("SK",), scan_options=("FAST_GEMS", "EDR_GEMS", "TRF_GEMS", "FILTERED_GEMS"),
        sequence_name=None, pulse_sequence_name="frfse", repetition_time=5200.0, echo_time=102.0,
        inversion_time=None, flip_angle=111.0, echo_train_length=18, pixel_bandwidth=162.8,
        duration_s=104.0, image_type=("ORIGINAL", "PRIMARY", "OTHER"), image_flavor="T2",
        acquisition_contrast="T2", echo_pulse_sequence="SPIN", phase_direction="COL"),
    ("ge", "FLAIR"): Protocol(
        "Ax T2 FLAIR", "Ax T2 FLAIR", plane="ax", acquisition_type="2D",
        scanning_sequence=("SE", "IR"), sequence_variant=("SK", "MP"),
        scan_options=("FAST_GEMS", "EDR_GEMS", "IR_GEMS", "FILTERED_GEMS", "T2FLAIR_GEMS"),
        sequence_name=None, pulse_sequence_name="fsefast", repetition_time=9000.0,
        echo_time=120.0, inversion_time=2400.0, flip_angle=111.0, echo_train_length=24,
        pixel_bandwidth=162.8, duration_s=198.0, image_type=("ORIGINAL", "PRIMARY", "OTHER"),
        image_flavor="FLUID_ATTENUATED", acquisition_contrast="FLUID_ATTENUATED",
        echo_pulse_sequence="SPIN", phase_direction="COL"),
    # ---- Philips -----------------------------------------------------------------------
    ("philips", "T1"): Protocol("T1W_3D_TFE", "T1W_3D_TFE", **_PHILIPS_T1),
    ("philips", "T1CE"): Protocol("T1W_3D_TFE +Gd", "sT1W_3D_TFE_CE", **_PHILIPS_T1, contrast=True),
    ("philips", "T2"): Protocol(
        "T2W_TSE", "T2W_TSE", plane="ax", acquisition_type="2D", scanning_sequence=("SE",),
        sequence_variant=("SK",), scan_options=("OTHER",), sequence_name=None,
        pulse_sequence_name="TSE", repetition_time=4500.0, echo_time=100.0, inversion_time=None,
        flip_angle=90.0, echo_train_length=16, pixel_bandwidth=217.0, duration_s=126.0,
        image_type=("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), image_flavor="T2",
        acquisition_contrast="T2", echo_pulse_sequence="SPIN", phase_direction="COL"),
    ("philips", "FLAIR"): Protocol(
        "T2W_FLAIR", "T2W_FLAIR", plane="ax", acquisition_type="2D", scanning_sequence=("SE", "IR"),
        sequence_variant=("SK", "MP"), scan_options=("OTHER",), sequence_name=None,
        pulse_sequence_name="IR_TSE", repetition_time=11000.0, echo_time=120.0,
        inversion_time=2800.0, flip_angle=90.0, echo_train_length=30, pixel_bandwidth=217.0,
        duration_s=220.0, image_type=("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"),
        image_flavor="FLUID_ATTENUATED", acquisition_contrast="FLUID_ATTENUATED",
        echo_pulse_sequence="SPIN", phase_direction="COL"),
}


def protocol(vendor: str, role: str) -> Protocol:
    return PROTOCOLS[(vendor, role)]


def equipment(vendor: str, enhanced: bool) -> Equipment:
    return EQUIPMENT[(vendor, bool(enhanced))]


def series_number(vendor: str, enhanced: bool, role: str) -> int:
    """SeriesNumber: a localizer is series 1, then the roles in acquisition order."""
    eq = equipment(vendor, enhanced)
    return eq.series_number_base * (ACQUISITION_ORDER.index(role) + 2) + (
        eq.series_number_offset if eq.series_number_base > 1 else 0)
