"""Synthetic multi-sequence brain MR studies in DICOM, for tests and the demo.

No public contrast-enhanced glioma DICOM exists, so the node is exercised on
studies written here: a procedural phantom (:func:`make_phantom`) or any
volumes + NIfTI affine (e.g. a BraTS-layout synthetic cohort) go through
:func:`write_study`, which writes one series per role (T1, T1CE, T2, FLAIR)
with a chosen vendor's header style, as classic MR or Enhanced MR objects.
"""
from dicomnode.dicom.sop import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE
from dicomnode.synth.geometry import rotation_affine
from dicomnode.synth.phantom import CONTRAST, ROLES, TISSUES, make_phantom, phantom_labels
from dicomnode.synth.protocols import VENDORS
from dicomnode.synth.writer import WrittenStudy, write_study

__all__ = [
    "CONTRAST",
    "ENHANCED_MR_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "ROLES",
    "TISSUES",
    "VENDORS",
    "WrittenStudy",
    "make_phantom",
    "phantom_labels",
    "rotation_affine",
    "write_study",
]
