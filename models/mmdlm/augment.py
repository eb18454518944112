"""Stage-1 slice augmentation of MMDLM's public code, in torch, reproducible per (seed, epoch, item).

The public ``train_resnet.py`` trains its slice ResNets with torchvision's
``RandomResizedCrop(224)`` (area scale (0.08, 1), aspect ratio (3/4, 4/3),
bilinear), ``RandomHorizontalFlip()``, ``RandomVerticalFlip()`` (p = 0.5 each)
and ``RandomRotation(30)`` (angle uniform in [-30, 30] degrees, fill 0), in
that order. Without them its slice networks would memorise a few hundred
training slices (ours did: training slice AUC 1.0 by epoch 6).

Why our own code and not torchvision: torchvision is not a dependency of the
node, and one affine map that composes crop, flips and rotation needs a single
interpolation (``grid_sample``) instead of three. Why parameters are drawn by
a NumPy generator seeded from ``(seed, epoch, item)`` and not from the global
RNG: the draw for an item is then the same whatever the loader's worker count,
batch composition or a resume in the middle of training, so a run is
reproducible (docs/mmdlm.md, "Reproducibility").

Training-time only: the network and ``FAMILY.predict`` never import this.
Background is 0 after the per-slice z-score inside the brain, so the fill
value 0 adds nothing that is not already background.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SliceAugment", "apply_affine", "item_rng"]


@dataclass(frozen=True)
class SliceAugment:
    """Random resized crop + horizontal/vertical flips + rotation, as one affine map per slice.

    ``crop_scale``: range of the crop's area as a fraction of the slice (torchvision
    default and the public code: (0.08, 1.0)); ``crop_ratio``: range of its aspect
    ratio (w/h, log-uniform); ``flip_p``: probability of each flip; ``rotate_deg``:
    maximum absolute rotation. ``crop_scale = (1, 1)`` and ``crop_ratio = (1, 1)``
    switch the crop off, ``flip_p = 0`` the flips, ``rotate_deg = 0`` the rotation.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    rotate_deg: float = 30.0

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        rlo, rhi = self.crop_ratio
        if not (0.0 < rlo <= rhi):
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise ValueError(f"rotate_deg must be in [0, 180], got {self.rotate_deg}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SliceAugment | None:
        """From a config table (``stage1.augment``); None when ``enabled`` is false."""
        if not bool(cfg.get("enabled", True)):
            return None
        scale = [float(v) for v in cfg.get("crop_scale", (0.08, 1.0))]
        ratio = [float(v) for v in cfg.get("crop_ratio", (3.0 / 4.0, 4.0 / 3.0))]
        if len(scale) != 2 or len(ratio) != 2:
            raise ValueError(f"crop_scale and crop_ratio need two numbers each, got {scale}, {ratio}")
        return cls(crop_scale=(scale[0], scale[1]), crop_ratio=(ratio[0], ratio[1]),
                   flip_p=float(cfg.get("flip_p", 0.5)), rotate_deg=float(cfg.get("rotate_deg", 30.0)))

    def as_dict(self) -> dict[str, Any]:
        return {"crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio), "flip_p": self.flip_p,
                "rotate_deg": self.rotate_deg}

    def _crop(self, rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float, float]:
        """(crop width, crop height, centre x, centre y) in pixels, centre relative to the slice centre.

        torchvision's rule: up to 10 draws of (area, log-ratio) whose box fits; else the central
        crop at the nearest allowed ratio (the whole slice when the ratio range holds 1).
        """
        area = float(height * width)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.crop_scale[0], self.crop_scale[1])
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            w = math.sqrt(target * ratio)
            h = math.sqrt(target / ratio)
            if 0 < w <= width and 0 < h <= height:
                # top-left corner uniform over the positions that keep the box inside the slice
                x0 = rng.uniform(0.0, width - w)
                y0 = rng.uniform(0.0, height - h)
                return w, h, x0 + w / 2 - width / 2, y0 + h / 2 - height / 2
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            w, h = float(width), width / self.crop_ratio[0]
        elif in_ratio > self.crop_ratio[1]:
            w, h = height * self.crop_ratio[1], float(height)
        else:
            w, h = float(width), float(height)
        return w, h, 0.0, 0.0

    def sample(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """One (2, 3) float32 ``affine_grid`` matrix (normalised coordinates, ``align_corners=False``)
        mapping output positions to input positions: crop, then flips, then rotation, as the public
        code applies them."""
        w, h, cx, cy = self._crop(rng, height, width)
        fx = -1.0 if rng.random() < self.flip_p else 1.0
        fy = -1.0 if rng.random() < self.flip_p else 1.0
        angle = math.radians(rng.uniform(-self.rotate_deg, self.rotate_deg)) if self.rotate_deg > 0 else 0.0
        # In pixel units about the slice centre: input = D_crop @ F_flip @ R(-angle) @ output + centre
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, s], [-s, c]])
        a_pix = np.diag([w / width, h / height]) @ np.diag([fx, fy]) @ rot
        t_pix = np.array([cx, cy])
        # normalised = pixel / (size / 2): conjugate by S = diag(W/2, H/2)
        scale = np.diag([width / 2.0, height / 2.0])
        inv = np.diag([2.0 / width, 2.0 / height])
        theta = np.zeros((2, 3), dtype=np.float64)
        theta[:, :2] = inv @ a_pix @ scale
        theta[:, 2] = inv @ t_pix
        return theta.astype(np.float32)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one slice ``x`` (C, H, W) with parameters drawn from ``rng``."""
        if x.dim() != 3:
            raise ValueError(f"expected one slice (C, H, W), got {tuple(x.shape)}")
        theta = torch.from_numpy(self.sample(rng, int(x.shape[1]), int(x.shape[2])))
        return apply_affine(x[None], theta[None])[0]


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample slices ``x`` (N, C, H, W) with affine maps ``theta`` (N, 2, 3) (output -> input,
    normalised coordinates), bilinear, zero outside. Deterministic on the CPU."""
    if x.dim() != 4 or theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"x must be (N, C, H, W) and theta (N, 2, 3), got {tuple(x.shape)}, {tuple(theta.shape)}")
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def item_rng(seed: int, epoch: int, index: int, stream: Sequence[int] = ()) -> np.random.Generator:
    """The generator of one item's draw: a function of (seed, epoch, index) only, so independent of
    worker count, batch order and resumes. ``stream`` separates uses (e.g. one per sequence)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream], int(epoch), int(index)])
