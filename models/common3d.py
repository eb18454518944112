"""3D residual building blocks shared by the template network (``fs3dcnn``) and PromptNet.

Seed 000 (adaptive PromptNet, section 3.2) describes every encoder in one sentence: "a stem
cell and three 3D residual stages ... group normalization and GELU activation to adapt to the
small batch size. The classifier consists of three full connected layers." Both families are
built from the pieces here so the template and PromptNet's branches are the *same* encoder, as
the paper requires for the prompt loss (z_CF is pulled towards z_CEF, which only makes sense
when both come from the same kind of feature extractor).

Silent choices of the paper, made here (all are constructor arguments):

- **Stem**: one 3x3x3 convolution with stride 2, GroupNorm, GELU. The paper names a "stem
  cell" but not its shape; a strided 3x3x3 conv halves the 1 mm BraTS grid at once, which is
  where most of a 3D network's memory goes.
- **Residual block**: the basic (two 3x3x3 convs) post-activation ResNet-v1 block, GroupNorm after each
  conv, GELU after the first conv and after the addition; a 1x1x1 strided conv + GroupNorm on
  the shortcut when the shape changes. Bottleneck blocks pay off only at widths far above the
  ones a 12 GB GPU allows in 3D.
- **Stage**: ``blocks`` residual blocks, the first one strided (stride 2 by default;
  ``stage_strides``). Total stride 16 = a last map of 16 mm voxels at BraTS's 1 mm. On a coarse
  grid keep the *physical* size, not the voxel count: at 3 mm the same strides leave 4x4x3
  positions of ~50 mm, and per-case normalisation over so few positions erased a focal
  enhancing rim (the template memorised; training issue 5, docs/training.md). The small
  synthetic profile uses ``stage_strides=(2, 1, 1)``.
- **Normalisation** (``norm``): GroupNorm, the paper's; ``batch``, ``instance`` and ``none`` are
  switches for experiments (``norm3d``).
- **GroupNorm groups**: 8, reduced to the largest divisor of the channel count when a (test)
  width is not divisible by 8. GroupNorm has no running statistics, so train and eval mode
  normalise identically: a frozen template in eval mode behaves exactly as in training.
- **Pooling** (``pooling``): global MAX pooling by default, average as a switch. The paper says
  "latent feature vector" only. Measured on the synthetic cohort (training issue): the enhancing
  rim is ~0.1 % of the voxels, and with average pooling the FS 3D CNN memorised its training
  cases (train AUC 1.0, test AUC 0.53 +- 0.14 over 5 repeats) while a two-convolution 3D CNN with
  max pooling reached test AUC 1.00 in 2 epochs on the same split: averaging over the whole
  volume drowns a small focal finding.
- **Classifier**: Linear-GELU-Dropout, Linear-GELU-Dropout, Linear (three FC layers), hidden
  widths and dropout configurable.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from models.base import Prediction
from models.preprocess import validate_spec


def group_count(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is <= ``groups``; GroupNorm needs one.

    Tiny test widths (e.g. 6 channels) would otherwise fail with the default of 8 groups.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"channels and groups must be >= 1, got {channels}, {groups}")
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


NORMS: tuple[str, ...] = ("group", "batch", "instance", "none")


def norm3d(channels: int, groups: int, kind: str = "group") -> nn.Module:
    """The normalisation layer after each convolution.

    ``"group"`` (default, the paper's): GroupNorm, batch-size independent, the paper's reason for
    choosing it (batch size 4). ``"batch"``: BatchNorm3d (running statistics in eval mode).
    ``"instance"``: GroupNorm with one channel per group (instance norm without running stats).
    ``"none"``: identity. Per-sample normalisations (group, instance) rescale every case's feature
    maps by that case's own statistics; see ``Encoder3d`` for why that matters for a small focal
    finding on a small grid.
    """
    if kind == "group":
        return nn.GroupNorm(group_count(channels, groups), channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class Stem3d(nn.Module):
    """Strided 3x3x3 conv + GroupNorm + GELU: the paper's "stem cell"."""

    def __init__(self, in_channels: int, width: int, *, stride: int = 2, groups: int = 8, norm: str = "group") -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or stride < 1:
            raise ValueError(f"bad stem: in_channels={in_channels}, width={width}, stride={stride}")
        self.conv = nn.Conv3d(in_channels, width, kernel_size=3, stride=stride, padding=1, bias=norm == "none")
        self.norm = norm3d(width, groups, norm)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock3d(nn.Module):
    """Basic residual block: conv-GN-GELU-conv-GN, plus shortcut, then GELU."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 8, norm: str = "group"
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm3d(out_channels, groups, norm)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.norm2 = norm3d(out_channels, groups, norm)
        self.act = nn.GELU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=bias),
                norm3d(out_channels, groups, norm),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResidualStage3d(nn.Module):
    """``blocks`` residual blocks; the first changes width and (by default) halves resolution."""

    def __init__(
        self, in_channels: int, out_channels: int, *, blocks: int = 2, stride: int = 2, groups: int = 8,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a residual stage needs at least one block, got {blocks}")
        layers: list[nn.Module] = [ResidualBlock3d(in_channels, out_channels, stride=stride, groups=groups, norm=norm)]
        layers += [ResidualBlock3d(out_channels, out_channels, stride=1, groups=groups, norm=norm)
                   for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


POOLINGS: tuple[str, ...] = ("max", "avg")


class Encoder3d(nn.Module):
    """Stem + three residual stages + global pooling (max by default) -> a feature vector.

    ``forward_map`` returns the last stage's feature map (for Grad-CAM); ``forward`` the pooled
    vector of size ``feature_dim`` (= the last stage's width).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        stem_width: int = 16,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: Sequence[int] = (2, 2, 2),
        stem_stride: int = 2,
        stage_strides: Sequence[int] = (2, 2, 2),
        groups: int = 8,
        pooling: str = "max",
        norm: str = "group",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        widths = tuple(int(w) for w in widths)
        blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
        stage_strides = tuple(int(s) for s in stage_strides)
        if not (len(widths) == len(blocks_per_stage) == len(stage_strides)) or not widths:
            raise ValueError(
                "widths, blocks_per_stage and stage_strides must be non-empty and of equal length, got "
                f"{widths}, {blocks_per_stage}, {stage_strides}"
            )
        if any(w < 1 for w in widths) or any(s < 1 for s in stage_strides):
            raise ValueError(f"widths and strides must be positive, got {widths}, {stage_strides}")
        self.in_channels = int(in_channels)
        self.stem = Stem3d(in_channels, stem_width, stride=stem_stride, groups=groups, norm=norm)
        stages: list[nn.Module] = []
        prev = stem_width
        for w, b, s in zip(widths, blocks_per_stage, stage_strides):
            stages.append(ResidualStage3d(prev, w, blocks=b, stride=s, groups=groups, norm=norm))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.pooling = pooling
        self.pool: nn.Module = nn.AdaptiveMaxPool3d(1) if pooling == "max" else nn.AdaptiveAvgPool3d(1)
        self.feature_dim = prev
        self.total_stride = stem_stride
        for s in stage_strides:
            self.total_stride *= s

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> last-stage map (B, feature_dim, d, h, w)."""
        return self.stages(self.stem(x))

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global (max or average) pooling of a last-stage map -> (B, feature_dim)."""
        return self.pool(fmap).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_map(self.forward_map(x))


class Classifier3Layer(nn.Module):
    """Three fully connected layers, as in seed 000's classifier.

    GELU between layers (the paper's activation); dropout before the second and third layer
    (paper silent; 295 training volumes overfit easily).
    """

    def __init__(self, in_features: int, n_classes: int, *, hidden: Sequence[int] = (128, 64), dropout: float = 0.2) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) != 2 or any(h < 1 for h in hidden):
            raise ValueError(f"the classifier has three layers: give two positive hidden widths, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[1], n_classes),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def stack_roles(inputs: Mapping[str, torch.Tensor], roles: Sequence[str]) -> torch.Tensor:
    """Stack preprocessed volumes by role into (B, C, D, H, W), channels in ``roles`` order.

    Roles not in ``roles`` are ignored (the node may pass every role it has); a missing role,
    a non-4D tensor or mismatched shapes raise ``ValueError`` naming the problem.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping role -> tensor, got {type(inputs).__name__}")
    missing = [r for r in roles if r not in inputs]
    if missing:
        raise ValueError(f"missing input role(s) {missing}; this model needs {list(roles)}")
    vols: list[torch.Tensor] = []
    for r in roles:
        v = inputs[r]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"input {r!r} must be a torch.Tensor, got {type(v).__name__}")
        if v.ndim != 4:
            raise ValueError(f"input {r!r} must be (B, D, H, W), got shape {tuple(v.shape)}")
        if vols and v.shape != vols[0].shape:
            raise ValueError(
                f"input {r!r} has shape {tuple(v.shape)}, but {roles[0]!r} has {tuple(vols[0].shape)}"
            )
        vols.append(v)
    return torch.stack(vols, dim=1).float()


def gradcam3d(
    maps: Sequence[torch.Tensor], score: torch.Tensor, out_shape: Sequence[int]
) -> torch.Tensor:
    """Grad-CAM over one or more last-stage maps, summed, upsampled and scaled to [0, 1].

    ``score`` is a (B,) tensor (the logit of the class to explain, per sample). Each map
    contributes sum_c alpha_c A_c with alpha_c the spatial mean of d score / d A_c; the maps of
    several branches (PromptNet) are summed *before* the ReLU, because their pooled features
    enter the classifier together. Upsampled trilinearly to ``out_shape`` and min-max
    normalised per sample (all-zero when the map is constant). Returns float32 (B, *out_shape).
    """
    grads = torch.autograd.grad(score.sum(), list(maps), allow_unused=False)
    cam: torch.Tensor | None = None
    for a, g in zip(maps, grads):
        a32, g32 = a.detach().float(), g.detach().float()
        alpha = g32.mean(dim=(2, 3, 4), keepdim=True)
        c = (alpha * a32).sum(dim=1, keepdim=True)
        if cam is not None and c.shape != cam.shape:
            raise ValueError(f"branch maps differ in shape: {tuple(c.shape)} vs {tuple(cam.shape)}")
        cam = c if cam is None else cam + c
    assert cam is not None
    cam = torch.relu(cam)
    cam = nn.functional.interpolate(cam, size=tuple(int(s) for s in out_shape), mode="trilinear", align_corners=False)
    cam = cam[:, 0]
    flat = cam.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


# --------------------------------------------------------------------------------------------
# Hyper-parameters, preprocessing spec and inference shared by fs3dcnn and promptnet
# --------------------------------------------------------------------------------------------

#: Default network input, (x, y, z) after RAS reorientation at 1 mm. Seed 000 does not say how
#: its BraTS volumes (240x240x155 at 1 mm) were cut; 160x192x144 around the brain's bounding-box
#: centre holds a whole adult brain (roughly 140 x 175 x 140 mm in BraTS) with a margin, halves
#: the voxel count (the rest is background), and divides by the encoder's total stride (16).
DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (160, 192, 144)
DEFAULT_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)

#: Encoder and classifier hyper-parameters and their defaults (both families).
ENCODER_DEFAULTS: dict[str, object] = {
    "input_shape": list(DEFAULT_INPUT_SHAPE),
    "stem_width": 16,
    "widths": [32, 64, 128],
    "blocks_per_stage": [2, 2, 2],
    "stem_stride": 2,
    "stage_strides": [2, 2, 2],
    "groups": 8,
    "norm": "group",
    "pooling": "max",
    "fc_hidden": [128, 64],
    "dropout": 0.2,
}


def merge_hparams(defaults: Mapping[str, object], given: Mapping[str, object], family: str) -> dict[str, object]:
    """Defaults overridden by ``given``; an unknown key is refused (a typo must not be ignored)."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{family}: unknown hyper-parameter(s) {unknown}; known: {sorted(defaults)}")
    merged = dict(defaults)
    merged.update(given)
    return merged


def input_shape_of(hp: Mapping[str, object]) -> tuple[int, int, int] | None:
    """The validated ``input_shape`` hyper-parameter (None: accept any size)."""
    shape = hp.get("input_shape")
    if shape is None:
        return None
    shape_t = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    if len(shape_t) != 3 or any(s < 1 for s in shape_t):
        raise ValueError(f"input_shape must be three positive sizes, got {shape}")
    return shape_t  # type: ignore[return-value]


def volume_spec(
    roles: Sequence[str],
    shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> dict[str, object]:
    """The preprocessing spec (``models.preprocess`` format) of the 3D seed-000 models.

    BraTS-style: RAS, 1 mm isotropic, brain = non-zero voxels (BraTS is skull-stripped; the
    paper used the challenge's preprocessing as is), crop/pad to ``shape`` around the brain's
    bounding-box centre, per-volume z-score inside the brain (the paper states no
    normalisation; z-score over brain voxels is the BraTS convention and makes the
    scanner-dependent MR intensity scale irrelevant).

    Returned validated by ``models.preprocess.validate_spec``, i.e. with every default of the
    transforms spelled out (interpolation order, pad value, ...), the form a checkpoint stores.
    """
    return validate_spec({
        "version": 1,
        "roles": list(roles),
        "transforms": [
            {"name": "reorient", "axcodes": "RAS"},
            {"name": "resample", "spacing": [float(s) for s in spacing]},
            {"name": "brain_mask", "method": "nonzero"},
            {"name": "crop_or_pad", "shape": [int(s) for s in shape], "anchor": "brain_bbox_center"},
            {"name": "normalize", "method": "zscore", "where": "brain"},
        ],
        "slices": None,
    })


def check_volume_input(x: torch.Tensor, in_channels: int, input_shape: tuple[int, int, int] | None, who: str) -> None:
    """Refuse input the network was not built for: a wrong channel count or grid means the data
    were prepared differently from training (train/serve skew), which must fail loudly."""
    if x.ndim != 5:
        raise ValueError(f"{who}: input must be (B, C, D, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{who}: expected {in_channels} input channels, got {x.shape[1]}")
    if input_shape is not None and tuple(x.shape[2:]) != input_shape:
        raise ValueError(
            f"{who}: built for input_shape {list(input_shape)}, got {list(x.shape[2:])}; "
            "preprocess with the spec this model was trained with"
        )


def volume_features(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    roles: Sequence[str],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(B, F) float32 on the CPU: what the classifier of ``model`` reads (``model(x).features``).

    Eval mode (restored afterwards), no gradients, no autocast: the gate's statistics are fitted
    and compared in float32, so the distance does not depend on the serving precision.
    """
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.train(False)
    try:
        with torch.no_grad():
            z = model(stack_roles(inputs, roles).to(dev)).features
    finally:
        model.train(was_training)
    return z.detach().float().cpu()


class VolumeClassifier(Protocol):
    """What ``predict_volume_classifier`` needs of a network: logits and last-stage maps."""

    training: bool

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def to(self, device: torch.device) -> object: ...

    def train(self, mode: bool = True) -> object: ...


def predict_volume_classifier(
    model: VolumeClassifier,
    inputs: Mapping[str, torch.Tensor],
    *,
    roles: Sequence[str],
    family: str,
    task: str,
    labels: tuple[str, ...],
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    saliency: bool = True,
) -> Prediction:
    """Batched inference for the 3D seed-000 networks (``fs3dcnn`` and ``promptnet``).

    Eval mode (restored afterwards), inputs stacked in ``roles`` order and moved to ``device``,
    optional ``torch.autocast(device.type, dtype=autocast_dtype)``. Probabilities are the
    float32 softmax of the logits, on the CPU. With ``saliency`` (default) the explanation
    ``"saliency"`` (B, D, H, W), float32 in [0, 1], is Grad-CAM of the *predicted* class on the
    last residual stage of every encoder branch: cheap (one backward to the last stage, no
    weight gradients are accumulated) and anatomically coarse (1/16 of the grid), which is the
    honest resolution of what the classifier looked at. ``saliency=False`` runs under
    ``torch.no_grad`` only.
    """
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.train(False)
    x = stack_roles(inputs, roles).to(dev)

    def autocast() -> contextlib.AbstractContextManager[object]:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=autocast_dtype)

    explanations: dict[str, torch.Tensor] = {}
    try:
        if saliency:
            # The input requires grad so the maps do even when every weight is frozen
            # (a frozen template); only d score / d maps is computed, nothing accumulates.
            x.requires_grad_(True)
            with torch.enable_grad():
                with autocast():
                    logits, maps = model.forward_with_maps(x)
                target = logits.detach().argmax(dim=1, keepdim=True)
                score = logits.gather(1, target).squeeze(1).float()
                cam = gradcam3d(maps, score, x.shape[2:])
            explanations["saliency"] = cam.cpu()
        else:
            with torch.no_grad(), autocast():
                logits, _ = model.forward_with_maps(x)
        probs = torch.softmax(logits.detach().float(), dim=1).cpu()
    finally:
        model.train(was_training)
    return Prediction(family=family, labels={task: labels}, probabilities={task: probs}, explanations=explanations)
