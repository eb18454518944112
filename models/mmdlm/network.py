"""MMDLM (seed 002): per-sequence 2D ResNet-34 slice features, gated-attention MIL, fusion, three heads.

What a study is to this network: for each sequence (T1CE, T2, FLAIR) a *bag* of
axial slices (B, S, H, W) and one boolean ``mask`` (B, S) saying which of the S
positions hold a real slice (True) and which are padding (False), so that
studies with different numbers of slices can share a batch.

Pipeline, and where each piece comes from in the public code
(``model/model.py``: ``IClassifier``, ``Attn_Net_Gated``, ``fusionmodel`` with
``top_k=512, fusion='concat', relu=True, dropout=0.25``):

1. slice extractor per sequence: ResNet-34, 1-channel first conv, fc removed
   -> h_i in R^512 per slice (``models.resnet2d``);
2. ``fc``: Linear(512, 256) + ReLU + Dropout(0.25) (``fusionmodel.fc``), then
   gated attention with L = D = 256: a = tanh(W_a h), b = sigmoid(W_b h) (each
   followed by Dropout(0.25), as ``Attn_Net_Gated(dropout=True)``),
   A = W_c (a * b), softmax over the slices of the bag, M = sum_i A_i h_i.
   The public code builds ``feat1 = feat2 = feat3 = nn.Sequential(*fc)``: the
   *same* module object for the three sequences, i.e. fc and attention are
   shared. We follow it (``share_mil=True``) and make it switchable;
3. per-sequence projection ``rho_k``: Linear(256, 128) + ReLU + Dropout(0.25)
   (never shared, as in the public code);
4. concatenation fusion: Linear(3 x 128, 128) with no nonlinearity after it
   (``fusionmodel.mm`` for ``'concat'``), then one Linear(128, 1) logit per task.

Silent choices we had to make, and made explicit:

- Padding. The public code trains with batch size 1 (one bag, no padding).
  We batch: padded positions get attention logit -inf before the softmax, so
  their weight is exactly 0; their features are zeroed before the MIL so that
  even NaN in a padded position cannot leak (0 * NaN would); and the
  extractors never run on padded slices at all (only ``slices[mask]`` goes
  through the ResNets), so padding neither costs compute nor perturbs
  BatchNorm statistics in training. A bag with no real slice is an error:
  softmax over nothing has no meaning, and predicting from nothing must fail
  loudly rather than return a prior.
- One network, three heads. The public code trains one fusion model per task
  (``net7/net8/net9``) on features from task-specific ResNets (nine ResNets:
  task x sequence). The issue asks for one multitask model; we keep one
  extractor per sequence and one shared MIL/fusion trunk with three logits.
- Softmax in float32 even under bf16/fp16 autocast, so that attention rows sum
  to 1 to float32 precision and masked weights stay exactly 0.
- Concatenation order is ``roles`` order (T1CE, T2, FLAIR, the repository's
  canonical ROLES order) where the public code used (T2, FLAIR, CET1): a
  permutation of the fusion weights, immaterial without their checkpoint.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.resnet2d import RESNET34_LAYERS, RESNET34_WIDTHS, ResNet2d

MMDLM_ROLES: tuple[str, ...] = ("T1CE", "T2", "FLAIR")
MMDLM_TASKS: tuple[str, ...] = ("grade", "idh", "1p19q")

MaskLike = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class MMDLMOutput:
    """What one forward pass gives.

    ``logits[task]``: (B,) one logit per task, positive class as coded in
    ``models.base.TASKS`` (HGG, IDH-mutant, 1p/19q-codeleted).
    ``attention[role]``: (B, S) float32 MIL weights, 0 on padding, rows sum to 1.
    ``fused``: (B, fusion_dim) the representation the heads read.
    """

    logits: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]
    fused: torch.Tensor


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL pooling (Ilse et al. 2018) with a padding mask.

    ``forward(features (B, S, F), mask (B, S) bool) -> (pooled (B, L), weights (B, S))``.
    ``fc`` (F -> L, ReLU, dropout) is the public code's ``fusionmodel.fc``;
    attention_a/b/c are its ``Attn_Net_Gated`` with D = ``attention_dim``.
    """

    def __init__(
        self,
        in_features: int = 512,
        hidden_dim: int = 256,
        attention_dim: int = 256,
        dropout: float = 0.25,
        attention_dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if min(in_features, hidden_dim, attention_dim) < 1:
            raise ValueError("in_features, hidden_dim and attention_dim must be >= 1")
        if not (0.0 <= dropout < 1.0 and 0.0 <= attention_dropout < 1.0):
            raise ValueError("dropout probabilities must be in [0, 1)")
        self.in_features = in_features
        self.hidden_dim = hidden_dim
        self.fc = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_a = nn.Sequential(
            nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(attention_dropout)
        )
        self.attention_b = nn.Sequential(
            nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(attention_dropout)
        )
        self.attention_c = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(
                f"features must be (B, S, {self.in_features}), got {tuple(features.shape)}"
            )
        mask = _check_mask(mask, features.shape[0], features.shape[1], "mask")
        # Zero padded positions first: their weight will be exactly 0, but 0 * NaN is NaN.
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = self.fc(features)  # (B, S, L)
        scores = self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)  # (B, S)
        scores = scores.float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)  # exp(-inf) == 0 exactly
        pooled = torch.bmm(weights.unsqueeze(1).to(h.dtype), h).squeeze(1)  # (B, L)
        return pooled, weights


class MMDLM(nn.Module):
    """Multi-sequence multitask MIL network of seed 002.

    ``forward(slices, mask)``: slices ``{role: (B, S, H, W)}`` -> ``MMDLMOutput``
    (end to end, the ResNets run on the real slices).
    ``forward_features(features, mask)``: features ``{role: (B, S, F)}`` ->
    ``MMDLMOutput`` (the public code's stage 3: MIL head on precomputed features).
    ``extract_features(slices, mask)``: the public code's stage 2.
    ``mask`` is one (B, S) bool tensor shared by all roles, or a mapping role -> mask.
    ``extractor_chunk`` (0 = off) bounds how many slices a ResNet sees at once in eval mode.
    """

    def __init__(
        self,
        roles: Sequence[str] = MMDLM_ROLES,
        tasks: Sequence[str] = MMDLM_TASKS,
        in_channels: int = 1,
        resnet_layers: Sequence[int] = RESNET34_LAYERS,
        resnet_widths: Sequence[int] = RESNET34_WIDTHS,
        mil_hidden_dim: int = 256,
        mil_attention_dim: int = 256,
        share_mil: bool = True,
        projection_dim: int = 128,
        fusion_dim: int = 128,
        dropout: float = 0.25,
        attention_dropout: float = 0.25,
        extractor_chunk: int = 0,
        key_slices: int = 3,
        resnet_stem_pool: bool = True,
        resnet_stage_strides: Sequence[int] | None = None,
        resnet_pooling: str = "avg",
    ) -> None:
        super().__init__()
        self.roles: tuple[str, ...] = tuple(roles)
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles must be non-empty and distinct, got {self.roles}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and distinct, got {self.tasks}")
        if min(projection_dim, fusion_dim) < 1:
            raise ValueError("projection_dim and fusion_dim must be >= 1")
        if extractor_chunk < 0:
            raise ValueError(f"extractor_chunk must be >= 0 (0 = all slices at once), got {extractor_chunk}")
        if key_slices < 1:
            raise ValueError(f"key_slices must be >= 1, got {key_slices}")
        self.in_channels = in_channels
        # How many top-attended slices ``predict`` cites per sequence (the node's report names them).
        self.key_slices = key_slices
        self.share_mil = share_mil
        self.extractor_chunk = extractor_chunk
        # One extractor per sequence, never shared: each sequence's ResNet is trained on its own slices.
        self.extractors = nn.ModuleDict(
            {role: ResNet2d(in_channels, resnet_layers, resnet_widths, stem_pool=resnet_stem_pool,
                            stage_strides=resnet_stage_strides, pooling=resnet_pooling) for role in self.roles}
        )
        self.feature_dim: int = self.extractors[self.roles[0]].feature_dim

        def make_mil() -> GatedAttentionMIL:
            return GatedAttentionMIL(
                self.feature_dim, mil_hidden_dim, mil_attention_dim, dropout, attention_dropout
            )

        if share_mil:
            self.mil: nn.Module = make_mil()
        else:
            self.mil = nn.ModuleDict({role: make_mil() for role in self.roles})
        self.projections = nn.ModuleDict(
            {
                role: nn.Sequential(nn.Linear(mil_hidden_dim, projection_dim), nn.ReLU(), nn.Dropout(dropout))
                for role in self.roles
            }
        )
        # Public code: a single Linear for 'concat' fusion, no nonlinearity before the classifier.
        self.fusion = nn.Linear(projection_dim * len(self.roles), fusion_dim)
        self.heads = nn.ModuleDict({task: nn.Linear(fusion_dim, 1) for task in self.tasks})

    # -- pieces ---------------------------------------------------------------

    def mil_for(self, role: str) -> GatedAttentionMIL:
        """The MIL module that pools ``role`` (the same object for every role when shared)."""
        if isinstance(self.mil, nn.ModuleDict):
            return self.mil[role]  # type: ignore[return-value]
        return self.mil  # type: ignore[return-value]

    def _masks(self, mask: MaskLike, batch: int, slices: int) -> dict[str, torch.Tensor]:
        if isinstance(mask, torch.Tensor):
            checked = _check_mask(mask, batch, slices, "mask")
            return {role: checked for role in self.roles}
        missing = [role for role in self.roles if role not in mask]
        if missing:
            raise ValueError(f"mask mapping lacks roles {missing}")
        return {role: _check_mask(mask[role], batch, slices, f"mask[{role!r}]") for role in self.roles}

    def _check_inputs(self, tensors: Mapping[str, torch.Tensor], trailing: int, what: str) -> tuple[int, int]:
        missing = [role for role in self.roles if role not in tensors]
        if missing:
            raise ValueError(f"{what} lacks roles {missing} (model roles: {self.roles})")
        shapes = {role: tuple(tensors[role].shape) for role in self.roles}
        first = shapes[self.roles[0]]
        for role, shape in shapes.items():
            if len(shape) != 2 + trailing or shape[:2] != first[:2]:
                raise ValueError(f"{what}: every role must share (B, S, ...); got {shapes}")
        return first[0], first[1]

    def extract_features(self, slices: Mapping[str, torch.Tensor], mask: MaskLike) -> dict[str, torch.Tensor]:
        """Per-slice features {role: (B, S, F)}; padded positions are 0 and never computed."""
        expected_dims = 2 if self.in_channels == 1 else 3
        batch, count = self._check_inputs(slices, expected_dims, "slices")
        masks = self._masks(mask, batch, count)
        features: dict[str, torch.Tensor] = {}
        for role in self.roles:
            x = slices[role]
            role_mask = masks[role]
            real = x[role_mask]  # (N, H, W) or (N, C, H, W)
            if self.in_channels == 1:
                real = real.unsqueeze(1)
            extractor = self.extractors[role]
            if not self.training and self.extractor_chunk and real.shape[0] > self.extractor_chunk:
                # Bounded memory at serving time: the ResNet sees at most `extractor_chunk` slices at once.
                # Eval only: in eval BatchNorm uses running statistics, so chunking changes nothing;
                # in training it would change the batch statistics, so training sees all slices at once.
                parts = [extractor(chunk) for chunk in torch.split(real, self.extractor_chunk)]
                feats = torch.cat(parts, dim=0)
            else:
                feats = extractor(real)
            out = feats.new_zeros(batch, count, feats.shape[-1])
            out[role_mask] = feats
            features[role] = out
        return features

    # -- forward paths ----------------------------------------------------------

    def forward_features(self, features: Mapping[str, torch.Tensor], mask: MaskLike) -> MMDLMOutput:
        """MIL + projection + fusion + heads on precomputed slice features {role: (B, S, F)}."""
        batch, count = self._check_inputs(features, 1, "features")
        masks = self._masks(mask, batch, count)
        projected: list[torch.Tensor] = []
        attention: dict[str, torch.Tensor] = {}
        for role in self.roles:
            pooled, weights = self.mil_for(role)(features[role], masks[role])
            projected.append(self.projections[role](pooled))
            attention[role] = weights
        fused = self.fusion(torch.cat(projected, dim=1))
        logits = {task: head(fused).squeeze(-1) for task, head in self.heads.items()}
        return MMDLMOutput(logits=logits, attention=attention, fused=fused)

    def forward(self, slices: Mapping[str, torch.Tensor], mask: MaskLike) -> MMDLMOutput:
        """End to end: slices {role: (B, S, H, W)} and mask (B, S) -> ``MMDLMOutput``."""
        return self.forward_features(self.extract_features(slices, mask), mask)


def _check_mask(mask: torch.Tensor, batch: int, slices: int, name: str) -> torch.Tensor:
    """Validate a (B, S) padding mask; refuse a bag that holds no real slice."""
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real slice), got {mask.dtype}")
    if tuple(mask.shape) != (batch, slices):
        raise ValueError(f"{name} must be ({batch}, {slices}), got {tuple(mask.shape)}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"{name}: bag(s) {rows} contain only padding; MIL needs at least one real slice")
    return mask
