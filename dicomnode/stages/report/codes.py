"""The coded concepts the glioma report uses, each with where it was verified.

A code in an SR is a claim another system will act on, so every standard code
here was checked against a named source, and nothing was guessed:

- ``PS3.16 (pydicom)``: the code is in pydicom 3's ``pydicom.sr._concepts_dict``,
  which is generated from DICOM PS3.16 (DCM, SCT, LN and UCUM codes used in
  DICOM templates and context groups).
- ``NOTES.md``: listed as verified in ``/work/shared/NOTES.md``.
- ``Ontoserver docs``: the SNOMED CT concept and its fully specified name appear
  in a public terminology-server example ("772292003 |High grade glioma
  (morphologic abnormality)|"), found with the project's code search.

No SNOMED CT concept for low-grade glioma, IDH mutation status or 1p/19q
co-deletion status could be verified with the sources available here, so those
concepts live in the private coding scheme :data:`PRIVATE_SCHEME`, which every
SR declares in its CodingSchemeIdentificationSequence. Replace them with
standard codes once a site's terminology service confirms suitable concepts;
never substitute a SNOMED code from memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_SCHEME_NAME = "dicomnode glioma grading private concepts"
PRIVATE_SCHEME_ORGANIZATION = "dicomnode project (research use only)"


@dataclass(frozen=True)
class VerifiedCode:
    """A code together with the source that vouches for it (kept next to the code on purpose)."""

    code: Code
    source: str

    @property
    def concept(self) -> CodedConcept:
        return CodedConcept(self.code.value, self.code.scheme_designator, self.code.meaning)


def _dcm(value: str, meaning: str, source: str = "PS3.16 (pydicom)") -> VerifiedCode:
    return VerifiedCode(Code(value, "DCM", meaning), source)


def _sct(value: str, meaning: str, source: str) -> VerifiedCode:
    return VerifiedCode(Code(value, "SCT", meaning), source)


def _private(value: str, meaning: str) -> VerifiedCode:
    return VerifiedCode(Code(value, PRIVATE_SCHEME, meaning), f"private scheme {PRIVATE_SCHEME} (declared in the SR)")


# --------------------------------------------------------------------------- standard (DCM / SCT / LN / UCUM)
ALGORITHM_NAME = _dcm("111001", "Algorithm Name", "NOTES.md; PS3.16 (pydicom)")
ALGORITHM_VERSION = _dcm("111003", "Algorithm Version", "NOTES.md; PS3.16 (pydicom)")
ALGORITHM_PARAMETERS = _dcm("111002", "Algorithm Parameters", "NOTES.md; PS3.16 (pydicom)")
TRACKING_IDENTIFIER = _dcm("112039", "Tracking Identifier", "NOTES.md; PS3.16 (pydicom)")
TRACKING_UID = _dcm("112040", "Tracking Unique Identifier", "NOTES.md; PS3.16 (pydicom)")
PROBABILITY = _dcm("122157", "Probability", "NOTES.md; PS3.16 (pydicom)")
FINDING = _dcm("121071", "Finding", "NOTES.md; PS3.16 (pydicom, CID 3419/6053/7002/9000)")
IMAGING_MEASUREMENT_REPORT = _dcm("126000", "Imaging Measurement Report", "PS3.16 (pydicom, CID 7021)")
COMMENT = _dcm("121106", "Comment", "PS3.16 (pydicom, CID 12101)")
# TID 1500's "Qualitative Evaluations" container (CODE and TEXT children); highdicom 0.28
# has no builder for it. Code from the DICOM SR -> FHIR mapping IG and dcmjs' TID 1500 code.
QUALITATIVE_EVALUATIONS = VerifiedCode(Code("C0034375", "UMLS", "Qualitative Evaluations"),
                                       "DICOM SR-FHIR IG (TID 1500 mapping); dcmjs MeasurementReport")

HIGH_GRADE_GLIOMA = _sct("772292003", "High grade glioma",
                         "NOTES.md; Ontoserver docs: '772292003 |High grade glioma (morphologic abnormality)|'")
GLIOBLASTOMA = _sct("1163375002", "Glioblastoma", "NOTES.md; PS3.16 (pydicom, CID 638/639)")  # not emitted: grade != GBM
HISTOLOGIC_GRADE = _sct("371469007", "Histologic grade", "NOTES.md; PS3.16 (pydicom)")
BRAIN = _sct("12738006", "Brain", "PS3.16 (pydicom, CID 4)")

# TID 1500 row 3 "Procedure reported" draws from CID 100; LN 25056-3 is in CID 100.
MRI_PROCEDURE = VerifiedCode(Code("25056-3", "LN", "MRI unspecified body region"), "PS3.16 (pydicom, CID 100)")
# UCUM "1" = dimensionless (CID 7181). "{probability}" is valid UCUM annotation syntax but is
# not in any DICOM context group we could check, so the report uses "1".
UNIT_ONE = VerifiedCode(Code("1", "UCUM", "no units"), "PS3.16 (pydicom, CID 7181)")
UNIT_MM = VerifiedCode(Code("mm", "UCUM", "mm"), "PS3.16 (pydicom, CID 7181)")
# UCUM case-sensitive "ml" (milli + liter "l"). PS3.16's context groups list only compound ml units
# (ml/s, ml/g, ...) and "cm3" (CID 7181, which is extensible); the gate's vocabulary is millilitres.
UNIT_ML = VerifiedCode(Code("ml", "UCUM", "milliliter"), "UCUM c/s symbol 'ml' (CID 7181 is extensible)")
UNITS: dict[str, VerifiedCode] = {"1": UNIT_ONE, "mm": UNIT_MM, "ml": UNIT_ML}

# --------------------------------------------------------------------------- private (99DCMNODE)
LOW_GRADE_GLIOMA = _private("LGG", "Low grade glioma")
IDH_STATUS = _private("IDHSTATUS", "IDH mutation status")
IDH_WILDTYPE = _private("IDHWT", "IDH-wildtype")
IDH_MUTANT = _private("IDHMUT", "IDH-mutant")
CODELETION_STATUS = _private("1P19QSTATUS", "1p/19q co-deletion status")
CODELETION_INTACT = _private("1P19QINTACT", "1p/19q intact")
CODELETION_CODELETED = _private("1P19QCODEL", "1p/19q co-deleted")

DISCLAIMER = _private("DISCLAIMER", "Research use disclaimer")
MODEL_PATH = _private("MODELPATH", "Model path and reason")
INPUTS_USED = _private("INPUTSUSED", "Inputs used")
MISSING_INPUTS = _private("MISSINGINPUTS", "Missing inputs")
CLASS_PROBABILITIES = _private("CLASSPROBS", "Class probabilities")
OPERATING_THRESHOLD = _private("OPTHRESHOLD", "Operating threshold")
KEY_SLICE = _private("KEYSLICE", "Key slice")
TRAINING_DATA = _private("TRAININGDATA", "Training data")
VALIDATION_METRICS = _private("VALMETRICS", "Validation metrics")
QUALITY_FLAG = _private("QUALITYFLAG", "Quality flag")
CANNOT_GRADE = _private("CANNOTGRADE", "Cannot grade")
SUPERSEDES = _private("SUPERSEDES", "Supersedes report")
CHECKPOINT = _private("CHECKPOINT", "Checkpoint")
DECLINED = _private("DECLINED", "Model declined by the input gate")
GATE_FINDING = _private("GATEFINDING", "Input gate finding")
GATE_LOOSENED = _private("GATELOOSENED", "Input gate loosened")

# --------------------------------------------------------------------------- measurements (99DCMNODE)
# The measurements a prepared case carries (models.measures: the gate's vocabulary), as NUM concept
# names: prefix -> (code value, meaning, UCUM unit). Role-specific measurements ("slice_thickness_mm/T2")
# get one code per role, "<code>-<ROLE>" (at most 16 characters, the SH limit of CodeValue), meaning
# "<meaning> (<ROLE>)". tests/test_report.py checks that this table and models.measures agree
# (models is not imported here: it would pull torch into the CPU report worker).
MEASUREMENT_CONCEPTS: dict[str, tuple[str, str, str]] = {
    "brain_volume_ml": ("BRAINVOL", "Brain volume", "ml"),
    "atlas_mi": ("ATLASMI", "Registration to template (mutual information)", "1"),
    "atlas_dice": ("ATLASDICE", "Brain overlap with template brain (Dice)", "1"),
    "atlas_scale": ("ATLASSCALE", "Head size relative to template", "1"),
    "coregister_mi": ("COREGMI", "Co-registration to reference (mutual information)", "1"),
    "template_coverage": ("TPLCOVER", "Coverage of the template brain", "1"),
    "slice_thickness_mm": ("SLICETHICK", "Slice thickness", "mm"),
    "inplane_spacing_mm": ("INPLANESP", "In-plane pixel spacing", "mm"),
    "slices": ("NSLICES", "Number of slices", "1"),
    "intensity_cv": ("INTENSCV", "Intensity spread in the brain (std/mean)", "1"),
    # the gate's own numbers (not case measurements)
    "feature_distance": ("FEATDIST", "Image-feature distance from training data", "1"),
    "nonzero_share": ("NONZEROSHARE", "Nonzero share of the field of view", "1"),
}
GATE_ONLY_MEASUREMENTS: frozenset[str] = frozenset({"feature_distance", "nonzero_share"})


def measurement_code(name: str) -> VerifiedCode | None:
    """The NUM concept name of a measurement (``"slice_thickness_mm/T2"``), or None for an unknown one."""
    prefix, _, role = name.partition("/")
    entry = MEASUREMENT_CONCEPTS.get(prefix)
    if entry is None:
        return None
    value, meaning, _ = entry
    if role:
        if not role.isalnum() or len(value) + 1 + len(role) > 16:
            return None
        value, meaning = f"{value}-{role}", f"{meaning} ({role})"
    return _private(value, meaning)


def measurement_unit(name: str) -> VerifiedCode:
    """The UCUM unit of a measurement (``1`` for an unknown one)."""
    entry = MEASUREMENT_CONCEPTS.get(name.partition("/")[0])
    return UNITS[entry[2]] if entry else UNIT_ONE

# --------------------------------------------------------------------------- task -> concept name, class -> value
TASK_CONCEPT: dict[str, VerifiedCode] = {
    "grade": HISTOLOGIC_GRADE,
    "idh": IDH_STATUS,
    "1p19q": CODELETION_STATUS,
}

CLASS_CODE: dict[str, VerifiedCode] = {
    "LGG": LOW_GRADE_GLIOMA,
    "HGG": HIGH_GRADE_GLIOMA,
    "IDH-wildtype": IDH_WILDTYPE,
    "IDH-mutant": IDH_MUTANT,
    "1p/19q-intact": CODELETION_INTACT,
    "1p/19q-codeleted": CODELETION_CODELETED,
}

# models.base.TASKS is not imported here (it would pull torch into the CPU report worker);
# tests/test_report.py checks that every label it can emit has a code above.


def all_codes() -> dict[str, VerifiedCode]:
    """Every code constant in this module by name (for docs and tests)."""
    return {name: value for name, value in globals().items() if isinstance(value, VerifiedCode)}
