"""Stage-1 slice augmentation (models/mmdlm/augment.py): geometry, ranges, reproducibility.

The geometry test uses a linear ramp image: bilinear interpolation reproduces a linear function
exactly, so every output pixel inside the input must equal the ramp evaluated at the input position
the affine map names. That checks crop, flips and rotation together, not just "something changed".
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.mmdlm.augment import SliceAugment, apply_affine, item_rng

H = W = 32


def _pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates of pixel centres (align_corners=False): x along W, y along H."""
    xs = (2 * np.arange(w) + 1) / w - 1
    ys = (2 * np.arange(h) + 1) / h - 1
    return np.meshgrid(xs, ys)  # (h, w) each


def _ramp(a: float = 0.7, b: float = -0.4, c: float = 0.2) -> torch.Tensor:
    x, y = _pixel_centres(H, W)
    return torch.tensor(a * x + b * y + c, dtype=torch.float32)[None]  # (1, H, W)


def test_identity_settings_leave_a_slice_unchanged() -> None:
    aug = SliceAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, rotate_deg=0.0)
    x = torch.randn(1, H, W, generator=torch.Generator().manual_seed(0))
    out = aug(x, np.random.default_rng(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flips_alone_are_exact_flips() -> None:
    aug = SliceAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0, rotate_deg=0.0)
    x = torch.randn(1, H, W, generator=torch.Generator().manual_seed(1))
    out = aug(x, np.random.default_rng(0))
    torch.testing.assert_close(out, torch.flip(x, dims=(1, 2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("draw", range(6))
def test_crop_flip_rotation_map_each_output_pixel_where_the_affine_says(draw: int) -> None:
    a, b, c = 0.7, -0.4, 0.2
    x = _ramp(a, b, c)
    aug = SliceAugment(crop_scale=(0.5, 0.9), flip_p=0.5, rotate_deg=30.0)
    theta = aug.sample(np.random.default_rng(draw), H, W).astype(np.float64)
    out = apply_affine(x[None], torch.from_numpy(theta).float()[None])[0, 0].numpy()
    u, v = _pixel_centres(H, W)
    src_x = theta[0, 0] * u + theta[0, 1] * v + theta[0, 2]
    src_y = theta[1, 0] * u + theta[1, 1] * v + theta[1, 2]
    # inside the outermost pixel centres bilinear interpolation of the ramp is exact
    lim_x, lim_y = 1 - 1 / W, 1 - 1 / H
    inside = (np.abs(src_x) <= lim_x - 1e-6) & (np.abs(src_y) <= lim_y - 1e-6)
    assert inside.sum() > 0.3 * H * W  # a crop of >= half the area rotated by <= 30 degrees stays mostly inside
    expected = a * src_x + b * src_y + c
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4)


def test_parameters_stay_in_the_public_code_ranges() -> None:
    aug = SliceAugment(crop_scale=(0.7, 1.0), crop_ratio=(0.75, 4 / 3), flip_p=0.5, rotate_deg=30.0)
    areas, angles, hflips = [], [], []
    for i in range(400):
        theta = aug.sample(np.random.default_rng(i), 64, 64).astype(np.float64)
        m = theta[:, :2]
        areas.append(abs(np.linalg.det(m)))  # crop area fraction: rotation and flips keep |det| = 1
        # m = D F R(-angle) on a square slice: the rows' norms are the crop's scales, and with them
        # divided out r = F R, whose off-diagonal is +-sin(angle)
        r = np.diag(1 / np.linalg.norm(m, axis=1)) @ m
        angles.append(math.degrees(math.asin(min(1.0, abs(r[0, 1])))))
        hflips.append(np.sign(np.linalg.det(m)))
    areas_a = np.array(areas)
    assert areas_a.min() >= 0.7 - 1e-6 and areas_a.max() <= 1.0 + 1e-6
    assert max(angles) <= 30.0 + 0.5 and max(angles) > 20.0  # the full range is used
    share = float(np.mean(np.array(hflips) < 0))  # one flip (not both) reverses orientation: p = 0.5
    assert 0.4 < share < 0.6


def test_draws_depend_on_seed_epoch_and_item_only() -> None:
    aug = SliceAugment()
    one = aug.sample(item_rng(7, 2, 11, (1,)), 64, 64)
    assert np.array_equal(one, aug.sample(item_rng(7, 2, 11, (1,)), 64, 64))
    for other in (item_rng(8, 2, 11, (1,)), item_rng(7, 3, 11, (1,)), item_rng(7, 2, 12, (1,)),
                  item_rng(7, 2, 11, (2,))):
        assert not np.array_equal(one, aug.sample(other, 64, 64))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        SliceAugment(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_p"):
        SliceAugment(flip_p=1.5)
    with pytest.raises(ValueError, match="rotate_deg"):
        SliceAugment(rotate_deg=-1.0)
    assert SliceAugment.from_config({"enabled": False}) is None
    got = SliceAugment.from_config({"enabled": True, "crop_scale": [0.7, 1.0], "crop_ratio": [0.75, 1.25],
                                    "flip_p": 0.5, "rotate_deg": 30.0})
    assert got == SliceAugment(crop_scale=(0.7, 1.0), crop_ratio=(0.75, 1.25), flip_p=0.5, rotate_deg=30.0)
