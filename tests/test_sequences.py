"""Sequence identification (dicomnode.assemble.sequences): real vendor headers and constructed ones.

The real-data test is the honest one: every folder of ../shared/data/real must
come out as its MANIFEST says.  The constructed datasets (header-only pydicom
Datasets, no pixels) cover what no public data holds: post-contrast series,
vendor naming styles, languages, false friends, selection and site rules.
"""
from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnode.assemble.sequences import ROLES, SeriesAssignment, SiteRules, identify_study, load_site_rules

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"

# --- real data ---------------------------------------------------------------------------
# folder -> {SeriesDescription: role}; from ../shared/data/real/MANIFEST.md.
REAL_EXPECTED: dict[str, dict[str, str]] = {
    "siemens_prisma_brain_T1_FLAIR_HUMAN": {
        "MPRAGE_EnchancedContrast": "T1",  # "Enchanced Contrast" is a CNR option, no agent given
        "t2_tirm_tra_dark-fluid_FLAIR": "FLAIR",
    },
    "siemens_prisma_PD_T2_TSE_PHANTOM": {"pd+t2_tse_sag_ISO_1.8mm": "OTHER"},  # two echoes in one series
    "philips_elition_2D_T1w_enhanced_and_classic_PHANTOM": {
        "T1W_TSE_Sno_CSno_CSAIno": "T1",
        "T1W_TSE_Sno_CSno_CSAI2": "T1",
        "T1W_FFE_Sno_CS2": "T1",
        "T1W_FFE_Sno_CS4": "T1",
    },
    "siemens_xa30_enhanced_T1w_HUMAN": {"anat-T1w_acq-tfl": "T1"},
    "siemens_xa30_enhanced_ADC_map_HUMAN": {"DWI_dir80_PA_ADC": "OTHER"},
    "siemens_trio_EPI_9_transfer_syntaxes_HUMAN": {"ax_asc_35sl": "OTHER"},
    "ge_mr750_EPI_fMRI_HUMAN": {"Axial EPI-FMRI (Interleaved I to S)": "OTHER"},
    "ge_pioneer_DWI_PHANTOM": {"Ax DWI TENSOR R2": "OTHER"},
    "uih_umr770_DTI_HUMAN": {"dti_tra_dir16_AP_SaveBySlc": "OTHER"},
    "philips_achieva_enhanced_B0map_PHANTOM": {"B0 NS": "OTHER"},
    "siemens_xa10_enhanced_fMRI_PHANTOM": {"REST1 w SMS PF7-8": "OTHER"},
    "hitachi_echelon_SE_SHOULDER": {"": "OTHER"},  # anonymised: no description, 4 slices
}


@functools.lru_cache(maxsize=None)
def _real_studies(folder: Path) -> dict[str, dict[str, list[Dataset]]]:
    """StudyInstanceUID -> SeriesInstanceUID -> MR image headers, for one folder.

    Filters by SOP class as the node's caller does: Raw Data Storage, and the
    NIfTI/JSON references lying next to the DICOM, never reach identify_study.
    """
    studies: dict[str, dict[str, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if str(ds.get("SOPClassUID", "")) not in (MR_IMAGE, ENHANCED_MR_IMAGE):
            continue
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].append(ds)
    return {study: dict(series) for study, series in studies.items()}


def test_real_data_folders_all_have_expectations(real_data_dir: Path) -> None:
    folders = {p.name for p in real_data_dir.iterdir() if p.is_dir()}
    assert folders == set(REAL_EXPECTED), "a real-data folder was added or removed: update REAL_EXPECTED"


@pytest.mark.parametrize("folder", sorted(REAL_EXPECTED))
def test_real_data_roles(real_data_dir: Path, folder: str) -> None:
    studies = _real_studies(real_data_dir / folder)
    assert studies, f"no MR image headers found in {folder}"
    expected = REAL_EXPECTED[folder]
    seen: set[str] = set()
    for series in studies.values():
        result = identify_study(series)
        assert set(result) == set(series)
        for uid, assignment in result.items():
            description = str(series[uid][0].get("SeriesDescription", ""))
            assert description in expected, f"unexpected series {description!r} in {folder}"
            assert assignment.role == expected[description], (description, assignment.reason)
            assert assignment.reason and assignment.evidence
            seen.add(description)
        _assert_selection_consistent(result)
    assert seen == set(expected)


def test_real_philips_t1_candidates_one_selected_per_study(real_data_dir: Path) -> None:
    """Several T1 series in one study: one selected, the others alternatives it lists."""
    studies = _real_studies(real_data_dir / "philips_elition_2D_T1w_enhanced_and_classic_PHANTOM")
    n_series = sum(len(s) for s in studies.values())
    assert n_series == 4
    selected = alternatives = 0
    for series in studies.values():
        result = identify_study(series)
        statuses = sorted(a.status for a in result.values())
        assert statuses.count("selected") == 1
        selected += 1
        alternatives += statuses.count("alternative")
        if len(series) > 1:
            (chosen,) = [a for a in result.values() if a.status == "selected"]
            assert len(chosen.chosen_over) == len(series) - 1
    assert (selected, alternatives) == (len(studies), n_series - len(studies))


def test_real_enchanced_contrast_false_friend_is_explained(real_data_dir: Path) -> None:
    (series,) = _real_studies(real_data_dir / "siemens_prisma_brain_T1_FLAIR_HUMAN").values()
    result = identify_study(series)
    (mprage,) = [a for uid, a in result.items() if series[uid][0].SeriesDescription == "MPRAGE_EnchancedContrast"]
    assert mprage.role == "T1" and mprage.status == "selected"
    assert any("false friend" in e for e in mprage.evidence)
    assert "TI=1100ms" in mprage.evidence


def _assert_selection_consistent(result: dict[str, SeriesAssignment]) -> None:
    by_role: dict[str, list[tuple[str, SeriesAssignment]]] = defaultdict(list)
    for uid, a in result.items():
        assert a.role in ROLES
        assert (a.role == "OTHER") == (a.status == "other")
        by_role[a.role].append((uid, a))
    for role, items in by_role.items():
        if role == "OTHER":
            continue
        selected = [(u, a) for u, a in items if a.status == "selected"]
        assert len(selected) == 1, role
        alternatives = {u for u, a in items if a.status == "alternative"}
        assert set(selected[0][1].chosen_over) == alternatives


# --- constructed headers -------------------------------------------------------------------
STUDY = generate_uid()


def mr_series(
    description: str = "",
    *,
    protocol: str | None = None,
    sequence_name: str | None = None,
    scanning: str | list[str] | None = "SE",
    tr: float | None = None,
    te: float | list[float] | None = None,
    ti: float | None = None,
    flip: float | None = None,
    acquisition: str = "2D",
    image_type: Iterable[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    slices: int = 24,
    thickness: float = 5.0,
    pixel: float = 1.0,
    agent: str | None = None,
    body_part: str = "BRAIN",
    series_number: int = 1,
    acquisition_time: str = "100000",
    orientations: list[list[float]] | None = None,
    manufacturer: str = "SIEMENS",
    extra: dict[str, Any] | None = None,
) -> list[Dataset]:
    """A classic MR Image Storage series, header only: one Dataset per slice.

    ``te`` as a list makes every slice carry every echo (a multi-echo series);
    ``orientations`` cycles the slice orientation (a 3-plane localizer).
    """
    series_uid = generate_uid()
    echoes = te if isinstance(te, list) else [te]
    out = []
    for i in range(slices):
        for e, echo in enumerate(echoes):
            ds = Dataset()
            ds.SOPClassUID = MR_IMAGE
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = STUDY
            ds.SeriesInstanceUID = series_uid
            ds.Modality = "MR"
            ds.PatientName = "Doe^Jane"
            ds.PatientID = "PID-12345"
            ds.PatientBirthDate = "19700101"
            ds.Manufacturer = manufacturer
            ds.SeriesDescription = description
            ds.ProtocolName = description if protocol is None else protocol
            if sequence_name is not None:
                ds.SequenceName = sequence_name
            if scanning is not None:
                ds.ScanningSequence = scanning
            ds.MRAcquisitionType = acquisition
            ds.ImageType = list(image_type)
            if tr is not None:
                ds.RepetitionTime = tr
            if echo is not None:
                ds.EchoTime = echo
                ds.EchoNumbers = e + 1
            if ti is not None:
                ds.InversionTime = ti
            if flip is not None:
                ds.FlipAngle = flip
            ds.SliceThickness = thickness
            ds.PixelSpacing = [pixel, pixel]
            ds.BodyPartExamined = body_part
            ds.MagneticFieldStrength = 3
            ds.SeriesNumber = series_number
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20240102"
            ds.AcquisitionTime = acquisition_time
            orientation = orientations[i % len(orientations)] if orientations else [1, 0, 0, 0, 1, 0]
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [0.0, 0.0, i * thickness]
            if agent is not None:
                ds.ContrastBolusAgent = agent
            for key, value in (extra or {}).items():
                setattr(ds, key, value)
            out.append(ds)
    return out


def enhanced_series(
    description: str = "",
    *,
    tr: float,
    te: float,
    ti: float | None = None,
    echo_pulse: str = "SPIN",
    acquisition_contrast: str = "UNKNOWN",
    frames: int = 40,
    thickness: float = 1.0,
    acquisition: str = "3D",
    contrast_administered: str | None = None,
    frame_type: Iterable[str] = ("ORIGINAL", "PRIMARY", "M", "NONE"),
) -> list[Dataset]:
    """An Enhanced MR Image Storage series: one multi-frame Dataset, parameters in functional groups."""
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_MR_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.ImageType = list(frame_type)
    ds.MRAcquisitionType = acquisition
    ds.EchoPulseSequence = echo_pulse
    ds.EchoPlanarPulseSequence = "NO"
    ds.NumberOfFrames = frames
    ds.BodyPartExamined = "BRAIN"
    ds.SeriesNumber = 7
    ds.AcquisitionDateTime = "20240102100000"
    shared = Dataset()
    timing = Dataset()
    timing.RepetitionTime = tr
    timing.FlipAngle = 90
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    modifier = Dataset()
    modifier.InversionRecovery = "YES" if ti else "NO"
    if ti:
        modifier.InversionTimes = [ti]
    shared.MRModifierSequence = DicomSequence([modifier])
    measures = Dataset()
    measures.SliceThickness = thickness
    measures.PixelSpacing = [1.0, 1.0]
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    if contrast_administered is not None:
        usage = Dataset()
        usage.ContrastBolusAgentNumber = 1
        usage.ContrastBolusAgentAdministered = contrast_administered
        shared.ContrastBolusUsageSequence = DicomSequence([usage])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for i in range(frames):
        item = Dataset()
        echo = Dataset()
        echo.EffectiveEchoTime = te
        item.MREchoSequence = DicomSequence([echo])
        frame_type_item = Dataset()
        frame_type_item.FrameType = list(frame_type)
        frame_type_item.AcquisitionContrast = acquisition_contrast
        frame_type_item.ComplexImageComponent = "MAGNITUDE"
        item.MRImageFrameTypeSequence = DicomSequence([frame_type_item])
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, i * thickness]
        item.PlanePositionSequence = DicomSequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return [ds]


def one(series: list[Dataset], rules: SiteRules | None = None) -> SeriesAssignment:
    """identify_study on a single series."""
    result = identify_study({series[0].SeriesInstanceUID: series}, rules)
    return result[series[0].SeriesInstanceUID]


# Typical 3 T parameters per vendor style, as the consoles write them.
T1_MPRAGE = dict(scanning=["GR", "IR"], tr=2300, te=2.3, ti=900, flip=8, acquisition="3D", thickness=1.0, slices=30)
T1_SE = dict(scanning="SE", tr=550, te=12)
T1_BRAVO = dict(scanning=["GR", "IR"], tr=8.2, te=3.2, ti=450, flip=12, acquisition="3D", thickness=1.0, slices=30)
T1_TFE = dict(scanning="GR", tr=8.1, te=3.7, flip=8, acquisition="3D", thickness=1.0, slices=30)
T2_TSE = dict(scanning="SE", tr=5000, te=98)
FLAIR_2D = dict(scanning=["SE", "IR"], tr=9000, te=120, ti=2500)
FLAIR_3D = dict(scanning=["SE", "IR"], tr=5000, te=390, ti=1800, acquisition="3D", thickness=1.0, slices=30)


@pytest.mark.parametrize(
    "description, params, role",
    [
        # Siemens
        ("t1_mprage_sag_p2_iso", T1_MPRAGE, "T1"),
        ("t1_se_tra", T1_SE, "T1"),
        ("t1_mprage_sag_p2_iso_post", T1_MPRAGE, "T1CE"),
        ("t2_tse_tra_512", T2_TSE, "T2"),
        ("t2_tirm_tra_dark-fluid", FLAIR_2D, "FLAIR"),
        ("t2_space_dark-fluid_sag_p2_iso", FLAIR_3D, "FLAIR"),
        # GE
        ("Sag 3D T1 BRAVO", T1_BRAVO, "T1"),
        ("Ax T1 FLAIR", dict(scanning=["SE", "IR"], tr=2200, te=20, ti=860), "T1"),  # T1-FLAIR is a T1
        ("Sag 3D T1 BRAVO +C", T1_BRAVO, "T1CE"),
        ("Ax T1 SE C+", T1_SE, "T1CE"),
        ("Ax T2 FRFSE", dict(scanning="SE", tr=4000, te=102), "T2"),
        ("Ax T2 FLAIR", dict(scanning=["SE", "IR"], tr=9500, te=130, ti=2400), "FLAIR"),
        ("Sag CUBE FLAIR", FLAIR_3D, "FLAIR"),
        # Philips
        ("sT1W_3D_TFE", T1_TFE, "T1"),
        ("T1W_SE", T1_SE, "T1"),
        ("T1W_3D_TFE CE", T1_TFE, "T1CE"),
        ("T2W_TSE", dict(scanning="SE", tr=3000, te=80), "T2"),
        ("T2W_FLAIR", dict(scanning=["SE", "IR"], tr=11000, te=125, ti=2800), "FLAIR"),
        ("VISTA_FLAIR", FLAIR_3D, "FLAIR"),
    ],
)
def test_vendor_naming_styles(description: str, params: dict[str, Any], role: str) -> None:
    a = one(mr_series(description, **params))
    assert a.role == role, a.reason
    assert a.status == "selected"
    assert a.reason.startswith(f"{role}:")


@pytest.mark.parametrize(
    "params, role",
    [
        (T1_MPRAGE, "T1"), (T1_SE, "T1"), (T1_TFE, "T1"), (T2_TSE, "T2"), (FLAIR_2D, "FLAIR"), (FLAIR_3D, "FLAIR"),
        (dict(scanning="SE", tr=4000, te=12), "OTHER"),  # proton density
        (dict(scanning="GR", tr=600, te=20, flip=20), "OTHER"),  # T2* gradient echo
        (dict(scanning=["SE", "IR"], tr=5000, te=60, ti=160), "OTHER"),  # STIR
    ],
)
def test_physics_alone_decides_when_no_words(params: dict[str, Any], role: str) -> None:
    a = one(mr_series("", protocol="", **params))
    assert a.role == role, a.reason


def test_flair_evidence_lists_the_deciding_facts() -> None:
    a = one(mr_series("Ax FLAIR", **FLAIR_2D))
    assert a.role == "FLAIR"
    assert "description keyword 'flair'" in a.evidence
    assert "TI=2500ms" in a.evidence
    assert "ScanningSequence=SE\\IR" in a.evidence


def test_t1ce_by_contrast_agent_with_plain_t1_description() -> None:
    a = one(mr_series("T1", **T1_SE, agent="Gadovist 1.0"))
    assert a.role == "T1CE"
    assert "ContrastBolusAgent='Gadovist 1.0'" in a.evidence


def test_t1ce_by_contrast_volume_and_start_time() -> None:
    a = one(mr_series("T1", **T1_SE, extra={"ContrastBolusVolume": 7.5, "ContrastBolusStartTime": "101500"}))
    assert a.role == "T1CE"


@pytest.mark.parametrize("agent", ["NONE", "no", "None ", "n/a", "keine", "-"])
def test_explicit_no_agent_is_not_contrast(agent: str) -> None:
    a = one(mr_series("T1", **T1_SE, agent=agent))
    assert a.role == "T1", a.reason


@pytest.mark.parametrize(
    "description",
    [
        "t1_mprage_sag_KM",  # German: Kontrastmittel
        "T1 mit KM",
        "T1_nach_Kontrast",
        "T1 gado",  # French
        "T1 3D apres injection",
        "T1 SE con contraste",  # Spanish
        "T1 post mdc",  # Italian
        "T1_contraste",
        "AX T1 +C",
        "T1 POST GD",
        "T1c",
        "T1_CE",
    ],
)
def test_t1ce_by_keywords_in_several_languages(description: str) -> None:
    a = one(mr_series(description, **T1_MPRAGE))
    assert a.role == "T1CE", a.reason


@pytest.mark.parametrize(
    "description",
    ["T1 sin contraste", "T1 nativ", "T1_pre", "T1 ohne KM", "T1 sans gado", "T1 senza mdc", "T1 pre contrast"],
)
def test_negations_keep_t1(description: str) -> None:
    a = one(mr_series(description, **T1_MPRAGE))
    assert a.role == "T1", a.reason


def test_description_negation_overrules_a_header_agent() -> None:
    a = one(mr_series("T1 pre", **T1_SE, agent="Dotarem"))
    assert a.role == "T1"
    assert any("overruled" in e for e in a.evidence)


@pytest.mark.parametrize(
    "description",
    ["MPRAGE_EnchancedContrast", "MPRAGE_EnhancedContrast", "t1_mprage_enhanced", "T1 ENHANCEDCONTRAST"],
)
def test_enhanced_contrast_false_friend_stays_t1(description: str) -> None:
    a = one(mr_series(description, **T1_MPRAGE))
    assert a.role == "T1", a.reason


@pytest.mark.parametrize(
    "description, role",
    [
        ("t1_space_sag", "T1"),  # "space" contains "ce" but is not the token "ce"
        ("T1 sequence", "T1"),
        ("T1_CE", "T1CE"),
        ("ce_T1", "T1CE"),
        ("T1 post-op", "T1"),  # post-operative, not post-contrast
        ("T1 post fossa", "T1"),  # posterior fossa
        ("T1 posterior", "T1"),
    ],
)
def test_contrast_words_match_whole_tokens_only(description: str, role: str) -> None:
    a = one(mr_series(description, **T1_SE))
    assert a.role == role, a.reason


@pytest.mark.parametrize(
    "series",
    [
        pytest.param(lambda: mr_series("AAHead_Scout_64ch-head-coil", scanning="GR", tr=8, te=4, flip=20,
                                       acquisition="3D", slices=128, thickness=1.6), id="siemens-aahead"),
        pytest.param(lambda: mr_series("3-Plane Loc", scanning="GR", tr=6, te=1.6, slices=9,
                                       orientations=[[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]]),
                     id="ge-3plane"),
        pytest.param(lambda: mr_series("", protocol="", scanning="GR", tr=6, te=1.6, slices=15,
                                       orientations=[[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]]),
                     id="unnamed-3-orientations"),
        pytest.param(lambda: mr_series("Survey", **T1_SE), id="philips-survey"),
    ],
)
def test_localizers_are_other(series: Any) -> None:
    a = one(series())
    assert a.role == "OTHER" and a.status == "other"
    assert "localizer" in a.reason


@pytest.mark.parametrize(
    "series",
    [
        pytest.param(lambda: mr_series("ep2d_diff_3scan_trace_p2", scanning="EP", tr=5000, te=89,
                                       image_type=["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW", "ND"],
                                       extra={"DiffusionBValue": 1000}), id="siemens-trace"),
        pytest.param(lambda: mr_series("Ax DWI", scanning=["EP", "SE"], tr=6000, te=80,
                                       extra={"DiffusionBValue": 1000}), id="ge-dwi"),
        pytest.param(lambda: mr_series("", protocol="", scanning="SE", tr=6000, te=80,
                                       extra={"DiffusionBValue": 1000}), id="unnamed-b1000"),
        pytest.param(lambda: mr_series("DTI_30dir", scanning="EP", tr=8000, te=90), id="dti"),
    ],
)
def test_dwi_is_other(series: Any) -> None:
    a = one(series())
    assert a.role == "OTHER"
    assert a.reason.startswith("OTHER: diffusion")


@pytest.mark.parametrize(
    "description, image_type",
    [
        ("ep2d_diff_3scan_trace_p2_ADC", ["DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"]),
        ("t2_tse_tra", ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]),  # a T2-sounding name does not save an ADC map
        ("Apparent Diffusion Coefficient", ["DERIVED", "PRIMARY", "ADC"]),
    ],
)
def test_adc_is_other(description: str, image_type: list[str]) -> None:
    a = one(mr_series(description, scanning="EP", tr=5000, te=89, image_type=image_type))
    assert a.role == "OTHER"
    assert "ImageType ADC" in a.evidence


@pytest.mark.parametrize(
    "description", ["ep2d_perf_p2", "Ax DSC Perfusion", "pCASL ASL", "DCE T1 dynamic", "PWI"],
)
def test_perfusion_is_other(description: str) -> None:
    a = one(mr_series(description, **T1_SE))
    assert a.role == "OTHER"
    assert a.reason.startswith("OTHER: perfusion"), a.reason


def test_fmri_bold_is_other() -> None:
    a = one(mr_series("ep2d_bold_moco_rest", scanning="EP", tr=2000, te=30, slices=36))
    assert a.role == "OTHER"


def test_repeated_volumes_are_other() -> None:
    # The same 20 positions 5 times over, no telltale name: a dynamic series.
    series = mr_series("t1_fl2d", **{**T1_SE, "slices": 20})
    for repeat in range(4):
        for ds in mr_series("t1_fl2d", **{**T1_SE, "slices": 20}):
            ds.SeriesInstanceUID = series[0].SeriesInstanceUID
            series.append(ds)
    a = one(series)
    assert a.role == "OTHER" and "repeated volumes" in a.reason


@pytest.mark.parametrize(
    "description, image_type",
    [
        ("t1_mprage_sag_p2_iso_MPR_tra", ["DERIVED", "PRIMARY", "MPR", "ND", "NORM"]),
        ("Ax T1 reformat", ["DERIVED", "SECONDARY", "REFORMATTED"]),
        ("t1_mprage", ["DERIVED", "PRIMARY", "PROJECTION IMAGE"]),
        ("T1 MIP", ["ORIGINAL", "PRIMARY", "M", "ND"]),
        ("T1 subtraction", ["ORIGINAL", "PRIMARY", "M"]),
    ],
)
def test_mpr_and_derived_are_other(description: str, image_type: list[str]) -> None:
    a = one(mr_series(description, **T1_MPRAGE, image_type=image_type))
    assert a.role == "OTHER"
    assert a.reason.startswith("OTHER: derived"), a.reason


def test_multi_echo_is_other() -> None:
    a = one(mr_series("pd+t2_tse_tra", scanning="SE", tr=4300, te=[11.0, 92.0]))
    assert a.role == "OTHER"
    assert "multi-echo" in a.reason
    assert any("TE 11, 92" in e for e in a.evidence)


def test_separated_long_echo_of_dual_echo_is_t2() -> None:
    # The same protocol name, one echo per series: physics decides between "pd" and "t2".
    assert one(mr_series("pd+t2_tse_tra", scanning="SE", tr=4300, te=92)).role == "T2"
    assert one(mr_series("pd+t2_tse_tra", scanning="SE", tr=4300, te=11)).role == "OTHER"


@pytest.mark.parametrize("kwargs", [dict(body_part="SHOULDER"), dict(body_part="KNEE")])
def test_non_head_body_part_is_other(kwargs: dict[str, str]) -> None:
    a = one(mr_series("t1_tse_cor", **T1_SE, **kwargs))
    assert a.role == "OTHER"
    assert f"BodyPartExamined={kwargs['body_part']}" in a.evidence


def test_non_head_description_is_other() -> None:
    a = one(mr_series("T1 SHOULDER COR", **T1_SE, body_part=""))
    assert a.role == "OTHER"


def test_multi_stack_series_is_other() -> None:
    a = one(mr_series("t2_tse_tra", **{**T2_TSE, "slices": 80},
                      orientations=[[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0.8, -0.6]]))
    assert a.role == "OTHER" and "orientations" in a.reason


def test_too_few_slices_is_other() -> None:
    a = one(mr_series("t1_se_tra", **{**T1_SE, "slices": 4}))
    assert a.role == "OTHER" and "too few slices" in a.reason


def test_words_and_physics_that_disagree_give_other() -> None:
    a = one(mr_series("T2 tra", **T1_SE))
    assert a.role == "OTHER"
    assert "conflicting" in a.reason


# --- Enhanced MR ---------------------------------------------------------------------------


def test_enhanced_flair_from_functional_groups_without_words() -> None:
    a = one(enhanced_series("", tr=4800, te=320, ti=1650, echo_pulse="SPIN"))
    assert a.role == "FLAIR", a.reason
    assert "TI=1650ms" in a.evidence and "TE=320ms" in a.evidence


def test_enhanced_t1ce_from_contrast_usage_sequence() -> None:
    a = one(enhanced_series("T1 3D", tr=2000, te=2.5, ti=900, echo_pulse="GRADIENT", contrast_administered="YES"))
    assert a.role == "T1CE", a.reason
    assert any("ContrastBolusUsageSequence" in e for e in a.evidence)
    b = one(enhanced_series("T1 3D", tr=2000, te=2.5, ti=900, echo_pulse="GRADIENT", contrast_administered="NO"))
    assert b.role == "T1", b.reason


def test_enhanced_acquisition_contrast_names_the_weighting() -> None:
    # No words, physics in the grey zone (TR 1500 / TE 50): AcquisitionContrast decides.
    a = one(enhanced_series("", tr=1500, te=50, acquisition_contrast="T2"))
    assert a.role == "T2", a.reason


def test_enhanced_derived_frame_type_is_other() -> None:
    a = one(enhanced_series("T2 3D", tr=3200, te=400, frame_type=("DERIVED", "PRIMARY", "MPR", "NONE")))
    assert a.role == "OTHER"


# --- selection -----------------------------------------------------------------------------


def _study(*series: list[Dataset]) -> tuple[dict[str, SeriesAssignment], list[str]]:
    uids = [s[0].SeriesInstanceUID for s in series]
    return identify_study({s[0].SeriesInstanceUID: s for s in series}), uids


def test_selection_3d_beats_2d() -> None:
    result, (two_d, three_d) = _study(
        mr_series("t1_se_tra", **T1_SE, thickness=1.0, series_number=9, acquisition_time="120000"),
        mr_series("t1_mprage_sag", **{**T1_MPRAGE, "thickness": 1.0}, series_number=2, acquisition_time="100000"),
    )
    assert result[three_d].status == "selected"
    assert result[three_d].chosen_over == (two_d,)
    assert result[two_d].status == "alternative" and result[two_d].chosen_over == ()
    assert any("3D over 2D" in e for e in result[two_d].evidence)


def test_selection_thinner_beats_thicker() -> None:
    result, (thick, thin) = _study(
        mr_series("t2_tse_tra", **T2_TSE, thickness=5.0, acquisition_time="120000"),
        mr_series("t2_tse_tra_3mm", **T2_TSE, thickness=3.0, acquisition_time="100000"),
    )
    assert (result[thin].status, result[thick].status) == ("selected", "alternative")
    assert result[thin].chosen_over == (thick,)
    assert "thinner slices" in result[thick].reason


def test_selection_tie_goes_to_later_acquisition() -> None:
    result, (early, late, middle) = _study(
        mr_series("t2_tirm_tra_dark-fluid", **FLAIR_2D, acquisition_time="101500", series_number=5),
        mr_series("t2_tirm_tra_dark-fluid", **FLAIR_2D, acquisition_time="104500", series_number=3),
        mr_series("t2_tirm_tra_dark-fluid", **FLAIR_2D, acquisition_time="103000", series_number=4),
    )
    assert result[late].status == "selected"
    assert result[late].chosen_over == (middle, early)  # best first
    assert {result[early].status, result[middle].status} == {"alternative"}
    assert "later acquisition" in result[early].reason


def test_selection_is_per_role_and_deterministic() -> None:
    t1 = mr_series("t1_mprage", **T1_MPRAGE)
    t1ce = mr_series("t1_mprage_post", **T1_MPRAGE)
    t2 = mr_series("t2_tse", **T2_TSE)
    loc = mr_series("localizer", **T1_SE)
    series = {s[0].SeriesInstanceUID: s for s in (t1, t1ce, t2, loc)}
    first = identify_study(series)
    again = identify_study(dict(reversed(list(series.items()))))
    assert first == again
    assert [first[s[0].SeriesInstanceUID].role for s in (t1, t1ce, t2, loc)] == ["T1", "T1CE", "T2", "OTHER"]
    assert all(a.status in ("selected", "other") for a in first.values())
    assert list(first) == list(series)  # one assignment per key, in key order


# --- site rules ----------------------------------------------------------------------------


def test_site_rules_override_heuristics(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[[rule]]\nmatch = "series_description"\npattern = "(?i)^AX T1 POST"\nrole = "T1CE"\n'
        '[[rule]]\nmatch = "protocol_name"\npattern = "(?i)ignore_me"\nrole = "OTHER"\n'
        '[[rule]]\nmatch = "series_description"\npattern = "."\nrole = "T2"\n',
        encoding="utf-8",
    )
    rules = load_site_rules(path)
    assert len(rules) == 3
    # A derived series the heuristics would drop, forced to T1CE by rule 1.
    post = mr_series("AX T1 POST GD SUB", **T1_SE, image_type=["DERIVED", "PRIMARY", "SUBTRACTION"])
    a = one(post, rules)
    assert (a.role, a.status) == ("T1CE", "selected")
    assert a.evidence[0].startswith("site rule 1: series_description 'AX T1 POST GD SUB'")
    # An obvious T2 sent to OTHER by rule 2 (first match wins over rule 3).
    b = one(mr_series("t2_tse_tra", protocol="research_ignore_me", **T2_TSE), rules)
    assert (b.role, b.status) == ("OTHER", "other")
    assert "site rule 2" in b.reason
    # Without rules, the heuristics decide.
    assert one(post).role == "OTHER"


def test_site_rule_candidate_loses_to_primary_in_selection() -> None:
    rules = SiteRules.from_list([{"match": "series_description", "pattern": "T1", "role": "T1"}])
    derived = mr_series("T1 derived", **T1_MPRAGE, image_type=["DERIVED", "PRIMARY", "MPR"])
    primary = mr_series("T1 original", **T1_SE)
    result = identify_study({s[0].SeriesInstanceUID: s for s in (derived, primary)}, rules)
    assert result[primary[0].SeriesInstanceUID].status == "selected"
    assert "original/primary over derived" in result[derived[0].SeriesInstanceUID].reason


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[rule]\nmatch = 1", "not valid TOML"),
        ('[[rule]]\nmatch = "series_description"\npattern = "x"\nrole = "T3"\n', "role 'T3'"),
        ('[[rule]]\nmatch = "series_description"\npattern = "(unclosed"\nrole = "T1"\n', "not a valid regex"),
        ('[[rule]]\nmatch = "patient_name"\npattern = "x"\nrole = "T1"\n', "match 'patient_name'"),
        ('[[rule]]\nmatch = "series_description"\nrole = "T1"\n', "missing required key 'pattern'"),
        ('[[rule]]\nmatch = "series_description"\npattern = "x"\nrole = "T1"\npriority = 1\n', "unknown key"),
        ('[[rules]]\nmatch = "series_description"\npattern = "x"\nrole = "T1"\n', "unknown top-level key"),
        ('rule = "T1"\n', "array of tables"),
    ],
)
def test_bad_site_rules_file_gives_clear_value_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as excinfo:
        load_site_rules(path)
    assert message in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_missing_site_rules_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_site_rules(tmp_path / "absent.toml")


# --- the answer object ---------------------------------------------------------------------


def test_to_json_is_plain_json() -> None:
    result, (t1, t1b) = _study(mr_series("t1_mprage", **T1_MPRAGE, acquisition_time="090000"),
                               mr_series("t1_mprage", **T1_MPRAGE, acquisition_time="100000"))
    payload = json.loads(json.dumps({uid: a.to_json() for uid, a in result.items()}))
    assert payload[t1b] == {
        "role": "T1",
        "status": "selected",
        "reason": result[t1b].reason,
        "evidence": list(result[t1b].evidence),
        "chosen_over": [t1],
    }


def test_assignment_validates_at_construction() -> None:
    with pytest.raises(ValueError):
        SeriesAssignment(role="T3", status="selected", reason="", evidence=())
    with pytest.raises(ValueError):
        SeriesAssignment(role="OTHER", status="selected", reason="", evidence=())
    with pytest.raises(ValueError):
        SeriesAssignment(role="T1", status="alternative", reason="", evidence=(), chosen_over=("1.2",))


def test_empty_and_non_image_series_are_other() -> None:
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = generate_uid()
    result = identify_study({"1.2.3": [], "1.2.4": [sr]})
    assert {a.role for a in result.values()} == {"OTHER"}


def test_one_unreadable_series_does_not_sink_the_study(monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomnode.assemble.sequences.identify as identify_module

    good = mr_series("t2_tse_tra", **T2_TSE)
    bad = mr_series("t1_mprage", **T1_MPRAGE)
    real_extract = identify_module.extract_evidence

    def flaky(uid: str, datasets: Any) -> Any:
        if uid == bad[0].SeriesInstanceUID:
            raise ValueError("malformed value 'Doe^Jane'")
        return real_extract(uid, datasets)

    monkeypatch.setattr(identify_module, "extract_evidence", flaky)
    result, (good_uid, bad_uid) = _study(good, bad)
    assert result[good_uid].role == "T2"
    assert result[bad_uid].role == "OTHER" and "ValueError" in result[bad_uid].reason
    assert not any("Doe" in e for e in result[bad_uid].evidence)


def test_no_phi_in_info_logs(caplog: pytest.LogCaptureFixture) -> None:
    series = mr_series("t1_mprage", **T1_MPRAGE)
    with caplog.at_level(logging.DEBUG, logger="dicomnode.assemble.sequences"):
        identify_study({series[0].SeriesInstanceUID: series})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records
    for phi in ("Doe", "Jane", "PID-12345", "19700101"):
        assert phi not in text
