"""A 2D ResNet (He et al. 2016) written here, because no CPU build of torchvision exists.

Why its own module: MMDLM (seed 002) uses torchvision's ``resnet34`` as a slice
feature extractor with two edits, and we reproduce exactly those edits:

- the first convolution is replaced by ``Conv2d(1, 64, 7, stride 2, padding 3,
  bias=False)`` so that one MR sequence (one channel) goes in, as the public
  code does for single-sequence extractors (``in_channels`` is configurable for
  its 2- and 3-channel variants);
- the final ``fc`` is replaced by the identity, so the network returns the
  512-d globally average-pooled features of its last stage.

Layout and initialisation follow torchvision's ``ResNet``/``BasicBlock`` (3x3
convolutions, BatchNorm2d, a 1x1 projection shortcut where the shape changes,
Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0), so that weights
converted from a torchvision ResNet-34 state dict would load with a key
mapping only. We ship no pretrained weights: the public code started from
ImageNet weights (``pretrained='resnet34'``), which cannot be downloaded here;
``docs/mmdlm.md`` says what that changes.

Depth and width are parameters (``layers``, ``widths``) so the tests and the
2-core CPU can build a tiny network with the same topology.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# torchvision's resnet34: BasicBlock x (3, 4, 6, 3), widths 64-128-256-512.
RESNET34_LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)
RESNET34_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34's block)."""

    expansion: int = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            # torchvision's projection shortcut (option B): 1x1 conv + BN.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet2d(nn.Module):
    """2D ResNet returning pooled features (no classification layer).

    ``forward(x)``: ``x`` (N, in_channels, H, W) -> (N, ``feature_dim``).
    Any H, W >= 1 works (adaptive average pooling at the end); at 224x224 the
    last stage is 7x7, as in the paper.
    """

    def __init__(
        self,
        in_channels: int = 1,
        layers: Sequence[int] = RESNET34_LAYERS,
        widths: Sequence[int] = RESNET34_WIDTHS,
        stem_width: int | None = None,
        stem_pool: bool = True,
        stage_strides: Sequence[int] | None = None,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        layers = tuple(int(n) for n in layers)
        widths = tuple(int(w) for w in widths)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {layers} and widths {widths} must be non-empty and of equal length")
        if any(n < 1 for n in layers) or any(w < 1 for w in widths):
            raise ValueError(f"every stage needs >= 1 block and width >= 1: layers {layers}, widths {widths}")
        stem = widths[0] if stem_width is None else int(stem_width)
        self.in_channels = in_channels
        self.layers = layers
        self.widths = widths
        # The public code's replacement first convolution (1 channel in, no bias).
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        # ResNet's stem max pooling and stage strides (1, 2, 2, 2): a 32x reduction, 7x7 of 32 mm at
        # 224 x 1 mm. Small grids may drop the pooling / strides (no parameters change with them).
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity()
        strides = (1,) + (2,) * (len(layers) - 1) if stage_strides is None else tuple(int(t) for t in stage_strides)
        if len(strides) != len(layers) or any(t not in (1, 2) for t in strides):
            raise ValueError(f"stage_strides must give 1 or 2 per stage ({len(layers)}), got {stage_strides}")
        stages: list[nn.Module] = []
        current = stem
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = strides[index]
            stage: list[nn.Module] = [BasicBlock(current, width, stride)]
            stage += [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            current = width
        self.stages = nn.Sequential(*stages)
        # Attribute name kept (``avgpool``) for state-dict/code compatibility; max on request.
        self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.feature_dim: int = current * BasicBlock.expansion
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's ResNet initialisation (Kaiming fan_out for convs, BN 1/0)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet2d expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return torch.flatten(self.avgpool(x), 1)


def resnet34_2d(in_channels: int = 1) -> ResNet2d:
    """ResNet-34 with a ``in_channels``-channel first convolution and 512-d pooled output."""
    return ResNet2d(in_channels=in_channels, layers=RESNET34_LAYERS, widths=RESNET34_WIDTHS)
