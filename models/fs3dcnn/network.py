"""The template network of seed 000 (Fig. 1), also Table 1's "3D CNN FS-MRI" baseline.

One 3D encoder (stem + three residual stages, GroupNorm, GELU, global max pooling by default) over
the four co-registered sequences stacked as channels in ``ROLES`` order (T1, T1CE, T2, FLAIR),
and a three-layer FC classifier. Its pooled feature vector is the contrast-enhanced feature
vector z_CEF that PromptNet's complementary branch is pulled towards; the paper says the
Table 1 baseline "has the same network structure as the template model", so one class
serves both (a trained template *is* an FS-MRI grader).

Silent choice: the paper feeds the template "CE-MRI data" without listing channels; we give it
all four sequences (the FS-MRI baseline's input), so one checkpoint is both template and grader.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.common3d import Classifier3Layer, Encoder3d, check_volume_input


@dataclass
class FS3DOutput:
    """``logits`` (B, n_classes) and ``features`` = z_CEF (B, feature_dim)."""

    logits: torch.Tensor
    features: torch.Tensor

    @property
    def probabilities(self) -> torch.Tensor:
        """Softmax over classes (float32), the f_T(x_CE) of the paper's eq. (4)."""
        return torch.softmax(self.logits.float(), dim=1)


class FullSequence3DCNN(nn.Module):
    """Template / full-sequence 3D CNN: (B, 4, D, H, W) -> logits and z_CEF."""

    def __init__(
        self,
        *,
        in_channels: int = 4,
        n_classes: int = 2,
        input_shape: Sequence[int] | None = (160, 192, 144),
        stem_width: int = 16,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: Sequence[int] = (2, 2, 2),
        stem_stride: int = 2,
        stage_strides: Sequence[int] = (2, 2, 2),
        groups: int = 8,
        norm: str = "group",
        pooling: str = "max",
        fc_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.input_shape: tuple[int, int, int] | None = (
            None if input_shape is None else tuple(int(s) for s in input_shape)  # type: ignore[assignment]
        )
        if self.input_shape is not None and len(self.input_shape) != 3:
            raise ValueError(f"input_shape must have three sizes, got {input_shape}")
        self.encoder = Encoder3d(
            in_channels,
            stem_width=stem_width,
            widths=widths,
            blocks_per_stage=blocks_per_stage,
            stem_stride=stem_stride,
            stage_strides=stage_strides,
            groups=groups,
            norm=norm,
            pooling=pooling,
        )
        self.feature_dim = self.encoder.feature_dim
        self.classifier = Classifier3Layer(self.feature_dim, n_classes, hidden=fc_hidden, dropout=dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """z_CEF: the pooled encoder output (B, feature_dim)."""
        check_volume_input(x, self.in_channels, self.input_shape, type(self).__name__)
        return self.encoder(x)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the last-stage map (for Grad-CAM)."""
        check_volume_input(x, self.in_channels, self.input_shape, type(self).__name__)
        fmap = self.encoder.forward_map(x)
        return self.classifier(self.encoder.pool_map(fmap)), [fmap]

    def forward(self, x: torch.Tensor) -> FS3DOutput:
        z = self.forward_features(x)
        return FS3DOutput(logits=self.classifier(z), features=z)
