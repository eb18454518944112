"""Adaptive PromptNet of seed 000: a contrast-free (T1, T2, FLAIR) grader with a multi-branch encoder.

The paper (section 2.2, Fig. 1): "a multi-branch encoder to extract non-enhanced features and
extra complementary features z_CF"; the prompt loss pulls z_CF (only) towards the frozen
template's z_CEF; "non-enhanced features and complementary features are fused and inputted to
a classifier". Each branch is the template's encoder (``models.common3d.Encoder3d``).

Silent choices (all constructor arguments / family hparams, see ``docs/promptnet.md``):

- ``branch_inputs``: what each branch reads.
  ``"shared"`` (default): one non-enhanced (NE) branch and the complementary (CF) branch, both
  reading all three NE sequences as channels. Cheapest; the branches differ only in what the
  loss asks of them, which is the paper's point ("the enhanced features influence only the
  complementary feature extraction").
  ``"per_sequence"``: one NE branch per sequence (1 channel each) plus the CF branch on all
  three; closer to a literal "multi-branch" reading, 2x the parameters.
- ``fusion``: ``"concat"`` (default; the classifier sees every branch), ``"sum"`` (all
  features summed; needs equal dims) or ``"gated"`` (per-feature sigmoid gate g from
  [mean NE; z_CF]: g * mean(NE) + (1 - g) * z_CF).
- ``template_feature_dim``: the size of z_CEF. z_CF must match it for the L1 prompt loss;
  when the CF branch's width differs, a documented linear projection maps it (default: same
  width as the template, no projection).

The template is *not* a sub-module: PromptNet's state dict (and checkpoint) holds only the
student. The frozen template lives in ``models.promptnet.loss.PromptNetCriterion``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.common3d import Classifier3Layer, Encoder3d, check_volume_input

BRANCH_INPUTS: tuple[str, ...] = ("shared", "per_sequence")
FUSIONS: tuple[str, ...] = ("concat", "sum", "gated")


@dataclass
class PromptNetOutput:
    """``logits`` (B, k); ``features`` the fused vector; ``z_cf`` (B, template_feature_dim);
    ``z_ne`` one (B, feature_dim) tensor per non-enhanced branch."""

    logits: torch.Tensor
    features: torch.Tensor
    z_cf: torch.Tensor
    z_ne: tuple[torch.Tensor, ...]

    @property
    def probabilities(self) -> torch.Tensor:
        """Softmax over classes (float32): the f(x) of the paper's eq. (4)."""
        return torch.softmax(self.logits.float(), dim=1)


class PromptNet(nn.Module):
    """(B, 3, D, H, W) non-enhanced volumes (T1, T2, FLAIR) -> logits, z_CF, fused features."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
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
        branch_inputs: str = "shared",
        fusion: str = "concat",
        template_feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if branch_inputs not in BRANCH_INPUTS:
            raise ValueError(f"branch_inputs must be one of {BRANCH_INPUTS}, got {branch_inputs!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.branch_inputs = branch_inputs
        self.fusion = fusion
        self.input_shape: tuple[int, int, int] | None = (
            None if input_shape is None else tuple(int(s) for s in input_shape)  # type: ignore[assignment]
        )
        if self.input_shape is not None and len(self.input_shape) != 3:
            raise ValueError(f"input_shape must have three sizes, got {input_shape}")

        def encoder(channels: int) -> Encoder3d:
            return Encoder3d(
                channels,
                stem_width=stem_width,
                widths=widths,
                blocks_per_stage=blocks_per_stage,
                stem_stride=stem_stride,
                stage_strides=stage_strides,
                groups=groups,
                norm=norm,
                pooling=pooling,
            )

        n_ne = 1 if branch_inputs == "shared" else self.in_channels
        ne_channels = self.in_channels if branch_inputs == "shared" else 1
        self.ne_branches = nn.ModuleList([encoder(ne_channels) for _ in range(n_ne)])
        self.cf_branch = encoder(self.in_channels)
        d = self.cf_branch.feature_dim
        self.template_feature_dim = d if template_feature_dim is None else int(template_feature_dim)
        if self.template_feature_dim < 1:
            raise ValueError(f"template_feature_dim must be positive, got {template_feature_dim}")
        # z_CF must live in z_CEF's space for the L1 prompt loss.
        self.cf_projection: nn.Module = (
            nn.Identity() if self.template_feature_dim == d else nn.Linear(d, self.template_feature_dim)
        )
        self.gate: nn.Module | None = None
        if fusion in ("sum", "gated") and self.template_feature_dim != d:
            raise ValueError(
                f"fusion={fusion!r} adds NE features ({d}) to z_CF ({self.template_feature_dim}); "
                "they must have equal size: use fusion='concat' or widths matching the template"
            )
        if fusion == "concat":
            fused_dim = n_ne * d + self.template_feature_dim
        else:
            fused_dim = d
            if fusion == "gated":
                self.gate = nn.Linear(2 * d, d)
        self.fused_dim = fused_dim
        self.classifier = Classifier3Layer(fused_dim, n_classes, hidden=fc_hidden, dropout=dropout)

    def _branch_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.branch_inputs == "shared":
            return [x]
        return [x[:, i : i + 1] for i in range(self.in_channels)]

    def _fuse(self, z_ne: Sequence[torch.Tensor], z_cf: torch.Tensor) -> torch.Tensor:
        if self.fusion == "concat":
            return torch.cat([*z_ne, z_cf], dim=1)
        if self.fusion == "sum":
            return torch.stack([*z_ne, z_cf], dim=0).sum(dim=0)
        assert self.gate is not None
        ne = torch.stack(list(z_ne), dim=0).mean(dim=0)
        g = torch.sigmoid(self.gate(torch.cat([ne, z_cf], dim=1)))
        return g * ne + (1.0 - g) * z_cf

    def _run(self, x: torch.Tensor) -> tuple[PromptNetOutput, list[torch.Tensor]]:
        check_volume_input(x, self.in_channels, self.input_shape, type(self).__name__)
        maps: list[torch.Tensor] = []
        z_ne: list[torch.Tensor] = []
        for enc, xi in zip(self.ne_branches, self._branch_inputs(x)):
            m = enc.forward_map(xi)
            maps.append(m)
            z_ne.append(enc.pool_map(m))
        m_cf = self.cf_branch.forward_map(x)
        maps.append(m_cf)
        z_cf = self.cf_projection(self.cf_branch.pool_map(m_cf))
        fused = self._fuse(z_ne, z_cf)
        out = PromptNetOutput(logits=self.classifier(fused), features=fused, z_cf=z_cf, z_ne=tuple(z_ne))
        return out, maps

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the last-stage map of every branch (for Grad-CAM)."""
        out, maps = self._run(x)
        return out.logits, maps

    def forward(self, x: torch.Tensor) -> PromptNetOutput:
        return self._run(x)[0]
