"""Cross-modality guidance-aided multi-modal network with dual attention (seed 001).

Xu, Wang, Cai, Heng, "Cross-modality Guidance-aided Multi-modal Learning with
Dual Attention for MRI Brain Tumor Grading" (arXiv 2401.09029). What the paper
fixes, and what we had to choose because it does not say (see also
``docs/crossmodal.md``):

Backbone
    One ResNet Mixed-Convolution encoder per modality (torchvision's ``mc3_18``
    layout, written here because no CPU torchvision exists in this project):
    a 3D stem (3x7x7, stride 1x2x2), residual stages whose first
    ``n_3d_stages`` use full 3x3x3 convolutions and whose later stages use
    1x3x3 in-plane convolutions, treating the slice axis as depth. As in MC3
    the slice axis is never down-sampled, so the high-level feature map has one
    row per input slice and the slice attention maps 1:1 onto input slices.
    *Silent choice*: GroupNorm instead of MC3's BatchNorm by default
    (``norm="group"``): 3D batches are 1-4 volumes, where batch statistics are
    noise, and no Kinetics pre-training can be loaded here anyway.
    ``norm="batch"`` restores MC3's BatchNorm.

Cross-modality guidance
    T1CE is the primary modality. Its high-level (post dual attention)
    features are projected by a 1x1x1 convolution to ``guide_channels``
    (*silent choice*: the projection keeps the concatenation cheap; the paper
    concatenates without saying at which width), up-sampled trilinearly to the
    resolution of each secondary's low-level features (end of the stem plus the
    first ``low_level_stages`` residual stages), concatenated with them, and the
    secondary continues through its own high-level extractor whose first block
    takes the wider input. *Silent choice*: gradients flow from the secondaries
    into the primary through the guidance (``detach_guidance=False``); set it to
    True to make the guidance a fixed signal from the primary.

Dual attention
    On each modality's high-level features (B, C, D, h, w): spatial (position)
    attention over the h*w positions of each slice (DANet's position attention
    module, one N x N map per slice) and slice attention over the D slices (a
    D x D affinity between whole slices). Output
    ``x + gamma_spatial * spatial(x) + gamma_slice * slice(x)``: the two
    branches are summed as in DANet, each scaled by a learnable gamma
    initialised at 0, so the module starts as the identity and learns how
    much attention to mix in. *Silent choices*: both affinities use 1x1x1
    query/key projections with C/``attention_reduction`` channels and are
    scaled by 1/sqrt(dim) (DANet's position module is unscaled; unscaled
    dot products over a whole slice's features saturate the softmax); the
    softmax is computed in float32 even under autocast, so maps stay
    row-stochastic in bf16.

Fusion and classifier
    Global average pooling of each modality's attended features, then
    concatenation into fixed slots in ``ROLES`` order (T1, T1CE, T2, FLAIR);
    a modality that is not active contributes zeros to its slot, which is
    exactly a classifier restricted to the active slots (its first-layer
    weights get no gradient and add nothing). Then a two-layer MLP to the two
    grade logits (LGG, HGG). *Silent choice*: the paper does not describe the
    head; ours is Linear-ReLU-Dropout-Linear.

Two-stage (cumulative) training
    :func:`set_stage` switches between ``"primary"`` (T1CE branch and the
    classifier only) and ``"all"`` with an ordered list of active secondaries
    (the paper adds them in descending order of their single-modality
    performance). Inactive branches are not computed, contribute zeros to the
    fusion and are frozen (``requires_grad=False``, kept in eval mode). The
    stage is stored in a buffer, so a checkpoint remembers which modalities its
    classifier was trained with.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import ROLES, TASKS

NormKind = Literal["group", "batch"]
Stage = Literal["primary", "all"]


def _norm_factory(kind: NormKind, groups: int) -> Callable[[int], nn.Module]:
    """A constructor of the normalisation layer, so every block uses the same one."""
    if kind == "group":
        # gcd keeps the group count a divisor of the width, so tiny test widths work too.
        return lambda channels: nn.GroupNorm(math.gcd(groups, channels), channels)
    if kind == "batch":
        return lambda channels: nn.BatchNorm3d(channels)
    raise ValueError(f"crossmodal: norm must be 'group' or 'batch', got {kind!r}")


class MixedConvBlock(nn.Module):
    """A ResNet basic block whose convolutions are 3x3x3 (``full_3d``) or 1x3x3 (in-plane).

    Why in-plane kernels later: MC3's finding (Tran et al. 2018) that motion
    (here: inter-slice) modelling matters most in early layers; in-plane
    kernels in late stages save most of the 3D cost. Strides are in-plane only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        full_3d: bool,
        norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        kernel = (3, 3, 3) if full_3d else (1, 3, 3)
        padding = (1, 1, 1) if full_3d else (0, 1, 1)
        step = (1, stride, stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, step, padding, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, 1, padding, bias=False)
        self.norm2 = norm(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, step, bias=False), norm(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


def _stage(
    in_channels: int,
    out_channels: int,
    blocks: int,
    stride: int,
    full_3d: bool,
    norm: Callable[[int], nn.Module],
) -> nn.Sequential:
    layers = [MixedConvBlock(in_channels, out_channels, stride, full_3d, norm)]
    layers += [MixedConvBlock(out_channels, out_channels, 1, full_3d, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SpatialAttention(nn.Module):
    """DANet position attention applied per slice: an (h*w) x (h*w) map for every slice.

    Why per slice: the slice axis gets its own module (:class:`SliceAttention`);
    a joint (D*h*w)^2 map would cost D^2 times more for no stated benefit.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.key_channels = max(1, channels // reduction)
        self.query = nn.Conv3d(channels, self.key_channels, 1)
        self.key = nn.Conv3d(channels, self.key_channels, 1)
        self.value = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (attended features (B, C, D, h, w), attention (B, D, h*w, h*w), rows sum to 1)."""
        b, c, d, h, w = x.shape
        n = h * w
        q = self.query(x).permute(0, 2, 3, 4, 1).reshape(b * d, n, self.key_channels)
        k = self.key(x).permute(0, 2, 1, 3, 4).reshape(b * d, self.key_channels, n)
        energy = torch.bmm(q, k).float() / math.sqrt(self.key_channels)
        attention = torch.softmax(energy, dim=-1)
        v = self.value(x).permute(0, 2, 1, 3, 4).reshape(b * d, c, n)
        out = torch.bmm(v, attention.to(v.dtype).transpose(1, 2))  # out[:, :, i] = sum_j v[:, :, j] A[i, j]
        out = out.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)
        return out, attention.reshape(b, d, n, n)


class SliceAttention(nn.Module):
    """Slice x slice attention: each slice is re-expressed as a mixture of all slices.

    Why: a tumour occupies a few slices; the paper's point is that slices are
    not equally informative. The affinity of two slices is the scaled dot
    product of their projected whole-slice features.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.key_channels = max(1, channels // reduction)
        self.query = nn.Conv3d(channels, self.key_channels, 1)
        self.key = nn.Conv3d(channels, self.key_channels, 1)
        self.value = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (attended features (B, C, D, h, w), attention (B, D, D), rows sum to 1)."""
        b, c, d, h, w = x.shape
        q = self.query(x).transpose(1, 2).reshape(b, d, -1)
        k = self.key(x).transpose(1, 2).reshape(b, d, -1)
        energy = torch.bmm(q, k.transpose(1, 2)).float() / math.sqrt(q.shape[-1])
        attention = torch.softmax(energy, dim=-1)
        v = self.value(x).transpose(1, 2).reshape(b, d, -1)
        out = torch.bmm(attention.to(v.dtype), v).reshape(b, d, c, h, w).transpose(1, 2)
        return out, attention


class DualAttention(nn.Module):
    """Spatial and slice attention, summed onto the input with gammas initialised at 0.

    Why gamma = 0 at start: as in DANet, the module begins as the identity, so
    the backbone's features are not scrambled by untrained attention; the
    gammas still receive a non-zero gradient at step 0 and grow as useful.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.spatial = SpatialAttention(channels, reduction)
        self.slice = SliceAttention(channels, reduction)
        self.gamma_spatial = nn.Parameter(torch.zeros(1))
        self.gamma_slice = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (features, spatial attention (B, D, N, N), slice attention (B, D, D))."""
        spatial_out, spatial_attention = self.spatial(x)
        slice_out, slice_attention = self.slice(x)
        y = x + self.gamma_spatial.to(x.dtype) * spatial_out + self.gamma_slice.to(x.dtype) * slice_out
        return y, spatial_attention, slice_attention


class ModalityBranch(nn.Module):
    """One modality's semantic feature extractor: low-level part, high-level part, dual attention.

    A secondary branch also owns its guidance projection (the primary's
    features re-expressed for this secondary), so adding or dropping a
    secondary adds or drops all of its parameters together.
    """

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        n_3d_stages: int,
        low_level_stages: int,
        guide_channels: int,
        attention_reduction: int,
        norm: Callable[[int], nn.Module],
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        strides = [1] + [2] * (len(widths) - 1) if strides is None else [int(t) for t in strides]
        stem = nn.Sequential(
            nn.Conv3d(1, widths[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            norm(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks)):
            if i == low_level_stages:
                in_channels += guide_channels  # the guidance is concatenated here
            stages.append(_stage(in_channels, width, n_blocks, strides[i], i < n_3d_stages, norm))
            in_channels = width
        self.low = nn.Sequential(stem, *stages[:low_level_stages])
        self.high = nn.Sequential(*stages[low_level_stages:])
        self.attention = DualAttention(widths[-1], attention_reduction)
        self.guide: nn.Module | None = None
        if guide_channels > 0:
            self.guide = nn.Sequential(
                nn.Conv3d(widths[-1], guide_channels, 1, bias=False),
                norm(guide_channels),
                nn.ReLU(inplace=True),
            )

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, 1, D, H, W); guidance: the primary's high-level features, for a secondary."""
        low = self.low(x)
        if self.guide is not None:
            if guidance is None:
                raise ValueError("crossmodal: a secondary branch needs the primary's guidance features")
            g = self.guide(guidance)
            g = F.interpolate(g, size=low.shape[2:], mode="trilinear", align_corners=False)
            low = torch.cat([low, g.to(low.dtype)], dim=1)
        return self.attention(self.high(low))


@dataclass
class CrossModalOutput:
    """What the network returns: logits plus everything an explanation needs.

    ``features[role]``: attended high-level map (B, C, D, h, w); ``pooled[role]``:
    (B, C); ``spatial_attention[role]``: (B, D, h*w, h*w); ``slice_attention[role]``:
    (B, D, D). Only active roles appear.
    """

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    pooled: dict[str, Tensor] = field(default_factory=dict)
    spatial_attention: dict[str, Tensor] = field(default_factory=dict)
    slice_attention: dict[str, Tensor] = field(default_factory=dict)


class CrossModalityNet(nn.Module):
    """Primary-guided multi-modal grading network (seed 001). See the module docstring.

    ``forward(inputs)`` takes a mapping role -> (B, D, H, W) (or (B, 1, D, H, W))
    holding at least the active roles, D being the slice axis, and returns a
    :class:`CrossModalOutput`. Inputs must have ``input_size`` = (D, H, W): the
    preprocessing spec fixes it, and a different size means the data were not
    prepared as in training.
    """

    def __init__(
        self,
        *,
        input_size: Sequence[int] = (64, 128, 128),
        primary: str = "T1CE",
        secondary_order: Sequence[str] = ("FLAIR", "T2", "T1"),
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        n_3d_stages: int = 1,
        low_level_stages: int = 1,
        guide_channels: int = 64,
        detach_guidance: bool = False,
        attention_reduction: int = 8,
        norm: NormKind = "group",
        norm_groups: int = 8,
        hidden: int = 256,
        dropout: float = 0.0,
        stage_strides: Sequence[int] | None = None,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"crossmodal: pooling must be 'avg' or 'max', got {pooling!r}")
        strides = [1] + [2] * (len(widths) - 1) if stage_strides is None else [int(t) for t in stage_strides]
        if len(strides) != len(widths) or any(t not in (1, 2) for t in strides):
            raise ValueError(f"crossmodal: stage_strides must give 1 or 2 per stage ({len(widths)}), got {stage_strides!r}")
        self.pooling = pooling
        if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
            raise ValueError(f"crossmodal: input_size must be (D, H, W) positive, got {input_size!r}")
        if primary not in ROLES:
            raise ValueError(f"crossmodal: primary must be one of {ROLES}, got {primary!r}")
        if sorted(secondary_order) != sorted(r for r in ROLES if r != primary):
            raise ValueError(
                f"crossmodal: secondary_order must list each of {[r for r in ROLES if r != primary]} once, "
                f"got {list(secondary_order)!r}"
            )
        if len(widths) != len(blocks) or len(widths) < 2:
            raise ValueError("crossmodal: widths and blocks must have the same length, at least 2")
        if any(int(w) < 1 for w in widths) or any(int(n) < 1 for n in blocks):
            raise ValueError("crossmodal: widths and blocks must be positive")
        if not 1 <= low_level_stages < len(widths):
            raise ValueError(f"crossmodal: low_level_stages must be in [1, {len(widths) - 1}], got {low_level_stages}")
        if not 0 <= n_3d_stages <= len(widths):
            raise ValueError(f"crossmodal: n_3d_stages must be in [0, {len(widths)}], got {n_3d_stages}")
        if guide_channels < 1 or attention_reduction < 1 or hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError("crossmodal: guide_channels, attention_reduction, hidden >= 1 and 0 <= dropout < 1")
        self.input_size: tuple[int, int, int] = tuple(int(s) for s in input_size)  # type: ignore[assignment]
        self.roles: tuple[str, ...] = ROLES
        self.primary = primary
        self.secondary_order: tuple[str, ...] = tuple(secondary_order)
        self.detach_guidance = bool(detach_guidance)
        self.feature_channels = int(widths[-1])
        norm_layer = _norm_factory(norm, norm_groups)
        self.branches = nn.ModuleDict(
            {
                role: ModalityBranch(
                    [int(w) for w in widths],
                    [int(n) for n in blocks],
                    n_3d_stages,
                    low_level_stages,
                    0 if role == primary else guide_channels,
                    attention_reduction,
                    norm_layer,
                    strides,
                )
                for role in self.roles
            }
        )
        n_classes = len(TASKS["grade"])
        self.classifier = nn.Sequential(
            nn.Linear(len(self.roles) * self.feature_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )
        # activation_rank[i] for role i of ROLES: 0 inactive, 1 the primary, k >= 2 the
        # (k-1)-th secondary added. A buffer, so checkpoints keep the stage they were trained in.
        rank = torch.zeros(len(self.roles), dtype=torch.long)
        rank[self.roles.index(primary)] = 1
        for k, role in enumerate(self.secondary_order):
            rank[self.roles.index(role)] = k + 2
        self.register_buffer("activation_rank", rank)
        self._frozen: set[str] = set()
        # The resolved hyper-parameters as JSON-able data: what a checkpoint records to rebuild this.
        self.hparams: dict[str, Any] = {
            "input_size": list(self.input_size),
            "primary": primary,
            "secondary_order": list(self.secondary_order),
            "widths": [int(w) for w in widths],
            "blocks": [int(n) for n in blocks],
            "n_3d_stages": int(n_3d_stages),
            "low_level_stages": int(low_level_stages),
            "guide_channels": int(guide_channels),
            "detach_guidance": self.detach_guidance,
            "attention_reduction": int(attention_reduction),
            "norm": norm,
            "norm_groups": int(norm_groups),
            "hidden": int(hidden),
            "dropout": float(dropout),
            "stage_strides": strides,
            "pooling": pooling,
        }

    # ---- stage bookkeeping -------------------------------------------------
    @property
    def active_secondaries(self) -> tuple[str, ...]:
        """Active secondaries in the order they were added."""
        ranked = [(int(r), role) for role, r in zip(self.roles, self.activation_rank.tolist()) if r >= 2]
        return tuple(role for _, role in sorted(ranked))

    @property
    def active_roles(self) -> tuple[str, ...]:
        """The primary followed by the active secondaries, in the order they were added."""
        return (self.primary, *self.active_secondaries)

    @property
    def stage(self) -> Stage:
        return "all" if self.active_secondaries else "primary"

    def train(self, mode: bool = True) -> CrossModalityNet:
        """Like ``nn.Module.train``, but frozen branches stay in eval mode.

        Why: a frozen branch with BatchNorm would otherwise still update its
        running statistics while "frozen"; with GroupNorm this is a no-op.
        """
        super().train(mode)
        for role in self._frozen:
            self.branches[role].eval()
        return self

    # ---- forward -----------------------------------------------------------
    def _volume(self, inputs: Mapping[str, Tensor], role: str) -> Tensor:
        if role not in inputs:
            raise KeyError(
                f"crossmodal: input role {role!r} is missing; active roles are {list(self.active_roles)}, "
                f"given {sorted(k for k in inputs)}"
            )
        x = inputs[role]
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"crossmodal: input {role} must be (B, D, H, W) or (B, 1, D, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"crossmodal: input {role} has (D, H, W) = {tuple(x.shape[2:])} but the network was built for "
                f"{self.input_size} (hparams 'input_size'); prepare the data with this model's preprocessing spec"
            )
        return x

    def fuse(self, pooled: Mapping[str, Tensor]) -> Tensor:
        """Concatenate pooled features into fixed ROLES-ordered slots; absent roles are zeros."""
        reference = next(iter(pooled.values()))
        zeros = reference.new_zeros(reference.shape[0], self.feature_channels)
        return torch.cat([pooled.get(role, zeros) for role in self.roles], dim=1)

    def forward(self, inputs: Mapping[str, Tensor]) -> CrossModalOutput:
        active = self.active_roles
        volumes = {role: self._volume(inputs, role) for role in active}
        batch = {v.shape[0] for v in volumes.values()}
        if len(batch) != 1:
            sizes = {r: v.shape[0] for r, v in volumes.items()}
            raise ValueError(f"crossmodal: inputs differ in batch size: {sizes}")
        out = CrossModalOutput(logits=torch.empty(0))
        guidance: Tensor | None = None
        for role in active:  # the primary comes first: its features guide the others
            features, spatial, slices = self.branches[role](volumes[role], guidance)
            out.features[role] = features
            out.spatial_attention[role] = spatial
            out.slice_attention[role] = slices
            if role == self.primary:
                guidance = features.detach() if self.detach_guidance else features
        if self.pooling == "max":
            out.pooled = {role: f.amax(dim=(2, 3, 4)) for role, f in out.features.items()}
        else:
            out.pooled = {role: f.mean(dim=(2, 3, 4)) for role, f in out.features.items()}
        out.logits = self.classifier(self.fuse(out.pooled))
        return out


def set_stage(
    model: CrossModalityNet,
    stage: Stage,
    active_secondaries: Sequence[str] | None = None,
    *,
    freeze_primary: bool = False,
) -> tuple[str, ...]:
    """Switch the cumulative two-stage training of the paper; returns the active roles.

    - ``"primary"``: only the primary (T1CE) branch and the classifier run and
      train; every secondary is frozen and not computed.
    - ``"all"``: the primary plus ``active_secondaries`` (default: all of them
      in ``model.secondary_order``), in the order given, which is the order
      they are recorded as added. Call it repeatedly with a growing list to add
      secondaries one at a time (see :func:`cumulative_schedule`).

    Nothing here touches weights: the primary's weights carry over between
    stages unchanged. ``freeze_primary=True`` keeps the primary fixed in stage
    "all" (*our switch*: the paper does not say whether the primary is
    fine-tuned; by default it is, end to end). Inactive branches are frozen
    (``requires_grad=False``), kept in eval mode and contribute zeros to the
    fused features.
    """
    if stage == "primary":
        if active_secondaries:
            raise ValueError("crossmodal: stage 'primary' takes no active_secondaries")
        chosen: tuple[str, ...] = ()
        if freeze_primary:
            raise ValueError("crossmodal: freeze_primary makes no sense in stage 'primary'")
    elif stage == "all":
        chosen = model.secondary_order if active_secondaries is None else tuple(active_secondaries)
        unknown = [r for r in chosen if r not in model.secondary_order]
        if unknown:
            raise ValueError(
                f"crossmodal: {unknown} are not secondary roles (secondaries: {list(model.secondary_order)})"
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"crossmodal: active_secondaries has duplicates: {list(chosen)}")
        if not chosen:
            raise ValueError("crossmodal: stage 'all' needs at least one secondary; use stage 'primary'")
    else:
        raise ValueError(f"crossmodal: stage must be 'primary' or 'all', got {stage!r}")

    rank = torch.zeros_like(model.activation_rank)
    rank[model.roles.index(model.primary)] = 1
    for k, role in enumerate(chosen):
        rank[model.roles.index(role)] = k + 2
    model.activation_rank.copy_(rank)

    frozen = {r for r in model.roles if r != model.primary and r not in chosen}
    if freeze_primary:
        frozen.add(model.primary)
    for role, branch in model.branches.items():
        branch.requires_grad_(role not in frozen)
    model.classifier.requires_grad_(True)
    model._frozen = frozen
    model.train(model.training)
    return model.active_roles


def cumulative_schedule(model: CrossModalityNet) -> list[tuple[Stage, tuple[str, ...]]]:
    """The paper's stage sequence: primary alone, then secondaries added one by one.

    Returns e.g. ``[("primary", ()), ("all", ("FLAIR",)), ("all", ("FLAIR", "T2")),
    ("all", ("FLAIR", "T2", "T1"))]`` for ``secondary_order = (FLAIR, T2, T1)``;
    feed each to :func:`set_stage` and train until the validation metric stops
    improving before the next.
    """
    order = model.secondary_order
    schedule: list[tuple[Stage, tuple[str, ...]]] = [("primary", ())]
    schedule += [("all", order[: k + 1]) for k in range(len(order))]
    return schedule
