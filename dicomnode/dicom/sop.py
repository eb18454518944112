"""The SOP classes the node takes in and sends out, written once.

Every other module names these constants; none writes a SOP class UID of its
own. The values are the registry's (PS3.4 Annex B / PS3.6 Annex A), taken from
pynetdicom's registry so a typo cannot creep in.
"""
from __future__ import annotations

from pynetdicom import sop_class

# -- in: what can be graded (classic and enhanced MR) -------------------------------
MR_IMAGE_STORAGE = str(sop_class.MRImageStorage)  # 1.2.840.10008.5.1.4.1.1.4
ENHANCED_MR_IMAGE_STORAGE = str(sop_class.EnhancedMRImageStorage)  # 1.2.840.10008.5.1.4.1.1.4.1
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = str(sop_class.LegacyConvertedEnhancedMRImageStorage)  # ...1.4.4

# The listener marks an instance gradable when it is one of these and its Modality is MR;
# anything else of a storage class is stored (a PACS routes whole studies) but never graded.
GRADABLE_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE})
# Every MR image class whose headers the sequence identifier reads (legacy-converted ones included).
MR_IMAGE_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE})

# -- out: the report objects (stages/report) -----------------------------------------
COMPREHENSIVE_3D_SR = str(sop_class.Comprehensive3DSRStorage)  # 1.2.840.10008.5.1.4.1.1.88.34
SECONDARY_CAPTURE_IMAGE_STORAGE = str(sop_class.SecondaryCaptureImageStorage)  # 1.2.840.10008.5.1.4.1.1.7

# What the node itself makes and sends. A PACS that routes whole studies sends
# them back; only an instance of one of these classes can be one of ours, so
# the listener asks the index "is this ours?" for these alone.
SENT_SOP_CLASSES = frozenset({COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE_IMAGE_STORAGE})

# -- both ways: C-ECHO ------------------------------------------------------------------
VERIFICATION = str(sop_class.Verification)  # 1.2.840.10008.1.1
