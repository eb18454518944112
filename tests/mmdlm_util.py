"""The tiny MMDLM the protocol tests train: one network size for every test file, so a change of the
small profile's defaults (strides, pooling, widths) is met by all of them the same way."""
from __future__ import annotations

#: a few-thousand-parameter MMDLM on 16x16 slices of an 8 mm grid, 3 folds stratified by grade;
#: each test file adds its own epochs and batch sizes
TINY_NET_SETS: list[str] = [
    "model.resnet_layers=[1, 1, 1, 1]",
    "model.resnet_widths=[4, 4, 8, 8]",
    "model.mil_hidden_dim=8",
    "model.mil_attention_dim=8",
    "model.projection_dim=4",
    "model.fusion_dim=4",
    "model.slice_size=[16, 16]",
    "model.slice_count=8",
    "model.spacing_mm=[8.0, 8.0, 8.0]",
    "model.field_of_view_mm=[192.0, 192.0, 160.0]",
    "split.k=3",
    "split.val_fraction=0.25",
    'split.strata="grade"',
]
