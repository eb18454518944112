"""Seed 001: cross-modality guidance-aided multi-modal learning with dual attention.

T1CE guides T1, T2 and FLAIR through per-modality ResNet mixed-convolution
encoders with spatial and slice attention; grade (LGG/HGG) by weighted
cross-entropy; two-stage (cumulative) training via :func:`set_stage`.
See ``docs/crossmodal.md``.
"""
from models.crossmodal.family import FAMILY, default_spec, make_spec, predict
from models.crossmodal.loss import (
    WeightedCrossEntropyLoss,
    class_weights_from_counts,
    class_weights_from_labels,
)
from models.crossmodal.network import (
    CrossModalityNet,
    CrossModalOutput,
    DualAttention,
    MixedConvBlock,
    ModalityBranch,
    SliceAttention,
    SpatialAttention,
    cumulative_schedule,
    set_stage,
)

__all__ = [
    "FAMILY",
    "CrossModalOutput",
    "CrossModalityNet",
    "DualAttention",
    "MixedConvBlock",
    "ModalityBranch",
    "SliceAttention",
    "SpatialAttention",
    "WeightedCrossEntropyLoss",
    "class_weights_from_counts",
    "class_weights_from_labels",
    "cumulative_schedule",
    "default_spec",
    "make_spec",
    "predict",
    "set_stage",
]
