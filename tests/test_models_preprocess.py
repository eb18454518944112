"""The preprocessing spec and apply_spec: orientation, world-correct resampling, crop/pad,
normalisation, slice selection, validation, NIfTI files on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import aff2axcodes
from scipy import ndimage

from models.preprocess import (
    PreprocessError,
    SpecError,
    apply_spec,
    slice_spec,
    to_batch,
    validate_spec,
    volume_spec,
)


def spec(roles: list[str], *transforms: dict[str, Any], slices: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"version": 1, "roles": roles, "transforms": list(transforms), "slices": slices}


def ras_affine(spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
               origin: tuple[float, float, float] = (-10.0, 5.0, 7.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def brain_volume(shape: tuple[int, int, int] = (30, 40, 20), box: tuple[slice, ...] | None = None,
                 seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, dtype=np.float32)
    box = box or (slice(5, 25), slice(8, 30), slice(4, 16))
    a[box] = rng.uniform(50, 150, size=a[box].shape).astype(np.float32)
    return a


def world_com(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    com = np.array(ndimage.center_of_mass(data))
    return affine[:3, :3] @ com + affine[:3, 3]


# ----------------------------------------------------------------------------- orientation


def test_lps_volume_comes_out_like_its_ras_twin() -> None:
    ras = brain_volume()
    aff = ras_affine()
    n0, n1 = ras.shape[0], ras.shape[1]
    flip = np.array([[-1, 0, 0, n0 - 1], [0, -1, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    lps, lps_aff = np.ascontiguousarray(ras[::-1, ::-1, :]), aff @ flip
    assert aff2axcodes(lps_aff) == ("L", "P", "S")
    s = spec(["T1"], {"name": "reorient", "axcodes": "RAS"})
    a = apply_spec(s, {"T1": (ras, aff)})
    b = apply_spec(s, {"T1": (lps, lps_aff)})
    np.testing.assert_array_equal(a.arrays["T1"], b.arrays["T1"])
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    assert b.meta["steps"][0]["from"] == {"T1": "LPS"}


def test_permuted_axes_are_reoriented_too() -> None:
    ras = brain_volume()
    aff = ras_affine()
    # store with axes permuted (S, R, A): voxel (k, i, j) = ras (i, j, k)
    perm = np.ascontiguousarray(np.transpose(ras, (2, 0, 1)))
    p = np.zeros((4, 4))
    p[0, 1] = p[1, 2] = p[2, 0] = p[3, 3] = 1.0  # (k, i, j) -> (i, j, k)
    perm_aff = aff @ p
    assert aff2axcodes(perm_aff) == ("S", "R", "A")
    s = spec(["T1"], {"name": "reorient"})
    out = apply_spec(s, {"T1": (perm, perm_aff)})
    np.testing.assert_array_equal(out.arrays["T1"], ras)
    np.testing.assert_allclose(out.affine, aff, atol=1e-9)


# ----------------------------------------------------------------------------- resampling


def blob(shape: tuple[int, int, int], affine: np.ndarray, centre: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    d2 = ((world - centre) ** 2).sum(1)
    return np.exp(-d2 / (2 * sigma**2)).reshape(shape).astype(np.float32)


def test_resampling_keeps_the_world_position_of_a_landmark() -> None:
    theta = np.deg2rad(10.0)  # an oblique acquisition: the grid is rotated about z
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.5, 1.2, 3.0])
    aff[:3, 3] = [-20.0, -15.0, 4.0]
    shape = (40, 48, 20)
    landmark = aff[:3, :3] @ np.array([18.3, 22.7, 9.2]) + aff[:3, 3]
    data = blob(shape, aff, landmark)
    np.testing.assert_allclose(world_com(data, aff), landmark, atol=0.05)
    s = spec(["T2"], {"name": "resample", "spacing": [1.0, 1.0, 1.0]})
    out = apply_spec(s, {"T2": (data, aff)})
    assert out.arrays["T2"].shape == (60, 58, 60)  # same extent: 40*1.5, 48*1.2, 20*3
    np.testing.assert_allclose(np.sqrt((out.affine[:3, :3] ** 2).sum(0)), [1, 1, 1], atol=1e-9)
    np.testing.assert_allclose(world_com(out.arrays["T2"], out.affine), landmark, atol=0.3)


def test_resample_puts_roles_from_different_grids_on_one_grid() -> None:
    landmark = np.array([3.0, -2.0, 10.0])
    a_aff = ras_affine((1.0, 1.0, 1.0), (-20.0, -20.0, -5.0))
    b_aff = ras_affine((2.0, 2.0, 4.0), (-19.5, -19.5, -3.5))
    a = blob((40, 40, 32), a_aff, landmark)
    b = blob((20, 20, 8), b_aff, landmark)
    s = spec(["T1", "FLAIR"], {"name": "resample", "spacing": [1.0, 1.0, 1.0]})
    out = apply_spec(s, {"T1": (a, a_aff), "FLAIR": (b, b_aff)})
    assert out.arrays["T1"].shape == out.arrays["FLAIR"].shape == (40, 40, 32)
    np.testing.assert_array_equal(out.arrays["T1"], a)  # the reference role is untouched at its own spacing
    np.testing.assert_allclose(world_com(out.arrays["FLAIR"], out.affine), landmark, atol=0.5)


def test_roles_on_different_grids_without_resample_are_refused() -> None:
    a = brain_volume()
    s = spec(["T1", "T2"], {"name": "reorient"}, {"name": "brain_mask"})
    with pytest.raises(PreprocessError, match="do not share a grid.*T2"):
        apply_spec(s, {"T1": (a, ras_affine()), "T2": (a, ras_affine(origin=(0.0, 0.0, 0.0)))})
    with pytest.raises(PreprocessError, match="shape"):
        apply_spec(s, {"T1": (a, ras_affine()), "T2": (a[:-1], ras_affine())})


def test_a_role_outside_the_reference_field_of_view_is_refused() -> None:
    a = brain_volume()
    s = spec(["T1", "T2"], {"name": "resample", "spacing": [2.0, 2.0, 3.0]})
    far = ras_affine(origin=(500.0, 500.0, 500.0))
    with pytest.raises(PreprocessError, match="T2 covers only 0%"):
        apply_spec(s, {"T1": (a, ras_affine()), "T2": (a, far)})


# ----------------------------------------------------------------------------- crop/pad and normalisation


def test_crop_or_pad_shapes_and_world_coordinates() -> None:
    a = brain_volume()  # (30, 40, 20), brain box [5,25) x [8,30) x [4,16)
    a[12, 20, 9] = 1000.0  # a marker inside the brain
    aff = ras_affine()
    s = spec(["T1"], {"name": "brain_mask"}, {"name": "crop_or_pad", "shape": [16, 50, 20]})
    out = apply_spec(s, {"T1": (a, aff)})
    arr = out.arrays["T1"]
    assert arr.shape == (16, 50, 20)
    step = out.meta["steps"][1]
    assert step["box"] == [[7, 23], [-6, 44], [0, 20]]  # centred on the brain box centre (15, 19, 10)
    assert step["brain_truncated"] is True
    marker_world = aff[:3, :3] @ [12, 20, 9] + aff[:3, 3]
    idx = np.linalg.solve(out.affine[:3, :3], marker_world - out.affine[:3, 3])
    assert arr[tuple(np.round(idx).astype(int))] == 1000.0
    assert (arr[:, :6] == 0).all() and (arr[:, 46:] == 0).all()  # padding
    centre = apply_spec(spec(["T1"], {"name": "crop_or_pad", "shape": [10, 10, 10], "anchor": "center"}),
                        {"T1": (a, aff)})
    assert centre.arrays["T1"].shape == (10, 10, 10)
    assert centre.meta["steps"][0]["box"] == [[10, 20], [15, 25], [5, 15]]


def test_zscore_within_the_brain() -> None:
    a = brain_volume()
    s = spec(["T1", "T2"], {"name": "brain_mask"}, {"name": "normalize", "method": "zscore", "where": "brain"})
    out = apply_spec(s, {"T1": (a, ras_affine()), "T2": ((a * 3 + 7) * (a > 0), ras_affine())})
    assert out.mask is not None and out.mask.sum() == 20 * 22 * 12
    for role in ("T1", "T2"):
        inside = out.arrays[role][out.mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1.0) < 1e-5
        assert (out.arrays[role][~out.mask] == 0).all()
        assert out.arrays[role].dtype == np.float32
    np.testing.assert_allclose(out.arrays["T1"], out.arrays["T2"], atol=1e-5)


def test_percentile_normalisation_scales_to_unit_range() -> None:
    a = brain_volume()
    s = spec(["T1"], {"name": "brain_mask"}, {"name": "normalize", "method": "percentile", "low": 1, "high": 99})
    out = apply_spec(s, {"T1": (a, ras_affine())})
    inside = out.arrays["T1"][out.mask]
    assert inside.min() == 0.0 and inside.max() == 1.0


def test_brain_mask_threshold_and_empty_mask() -> None:
    a = brain_volume()
    a[0, 0, 0] = 1.0  # noise outside the brain
    s = spec(["T1"], {"name": "brain_mask", "threshold": 5.0})
    assert apply_spec(s, {"T1": (a, ras_affine())}).mask.sum() == 20 * 22 * 12
    with pytest.raises(PreprocessError, match="brain mask is empty"):
        apply_spec(s, {"T1": (np.zeros((4, 4, 4), np.float32), ras_affine())})


# ----------------------------------------------------------------------------- slices


def slices_spec(count: int, size: list[int]) -> dict[str, Any]:
    return spec(["T2", "FLAIR"], {"name": "brain_mask"},
                slices={"axis": 2, "selection": "brain_range", "count": count, "size": size,
                        "normalize": "zscore_per_slice"})


def test_slice_selection_is_evenly_spaced_in_the_brain_range() -> None:
    a = brain_volume(box=(slice(5, 25), slice(8, 30), slice(5, 15)))  # brain on slices 5..14
    out = apply_spec(slices_spec(4, [8, 8]), {"T2": (a, ras_affine()), "FLAIR": (a, ras_affine())})
    assert out.arrays["T2"].shape == (4, 8, 8)
    assert out.slice_indices.tolist() == [5, 8, 11, 14]
    assert out.slice_mask.tolist() == [True] * 4
    for k in range(4):
        sl = out.arrays["FLAIR"][k].astype(np.float64)
        assert abs(sl.mean()) < 1e-5 and abs(sl.std() - 1) < 1e-4


def test_fewer_brain_slices_than_count_are_padded_and_masked() -> None:
    a = brain_volume(box=(slice(5, 25), slice(8, 30), slice(5, 15)))
    out = apply_spec(slices_spec(16, [30, 40]), {"T2": (a, ras_affine()), "FLAIR": (a, ras_affine())})
    assert out.arrays["T2"].shape == (16, 30, 40)
    assert out.slice_mask.tolist() == [True] * 10 + [False] * 6
    assert out.slice_indices.tolist() == list(range(5, 15)) + [-1] * 6
    assert (out.arrays["T2"][10:] == 0).all()
    # size equal to the slice size: no interpolation, just the z-scored source slice
    src = a[:, :, 7].astype(np.float64)
    np.testing.assert_allclose(out.arrays["T2"][2], (src - src.mean()) / src.std(), atol=1e-5)
    batch = to_batch([out, out], ["T2", "FLAIR"])
    assert batch["T2"].shape == (2, 16, 30, 40) and batch["T2"].dtype == torch.float32
    assert batch["slice_mask"].shape == (2, 16) and batch["slice_mask"].dtype == torch.bool


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad, message", [
    ({"version": 1, "roles": ["T1"], "transforms": [{"name": "sharpen"}], "slices": None}, "unknown transform 'sharpen'"),
    (spec(["T1"], {"name": "resample", "spacing": [1, -1, 1]}), r"spacing\[1\]: must be > 0"),
    (spec(["T1"], {"name": "resample", "spacing": [1, 1]}), "expected a list of 3 numbers"),
    (spec(["T1"], {"name": "resample"}), "'spacing'.*required"),
    (spec(["T1"], {"name": "reorient", "axcodes": "RAR"}), "axcodes"),
    (spec(["T1"], {"name": "crop_or_pad", "shape": [1, 2, 3], "anchor": "center", "colour": 1}), r"unknown parameter\(s\) \['colour'\]"),
    (spec(["T1"], {"name": "crop_or_pad", "shape": [1, 2, 3]}), "needs a brain mask"),
    (spec(["T1"], {"name": "normalize", "method": "zscore", "where": "brain"}), "needs a brain mask"),
    (spec(["T1"], {"name": "brain_mask"}, {"name": "normalize", "method": "minmax"}), "method: expected one of"),
    (spec(["T1"], {"name": "brain_mask"}, {"name": "resample", "spacing": [1, 1, 1]}), "must come before 'brain_mask'"),
    (spec(["T1", "ADC"]), r"\['ADC'\] not in"),
    (spec([]), "non-empty list"),
    (spec(["T1", "T1"]), "duplicates"),
    ({"version": 2, "roles": ["T1"], "transforms": [], "slices": None}, "newer than this code reads"),
    ({"roles": ["T1"], "transforms": [], "slices": None}, "version"),
    ({"version": 1, "roles": ["T1"], "transforms": [], "slices": None, "x": 1}, r"unknown key\(s\) \['x'\]"),
    (spec(["T1"], slices={"axis": 2, "count": 4, "size": [8, 8]}), "brain_range.*needs a 'brain_mask'"),
    (spec(["T1"], slices={"axis": 3, "selection": "all", "count": 4, "size": [8, 8]}), "slices.axis"),
    (spec(["T1"], slices={"selection": "all", "count": 0, "size": [8, 8]}), "slices.count"),
])
def test_invalid_specs_are_refused_with_a_clear_message(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_spec(bad)
    with pytest.raises(SpecError):
        apply_spec(bad, {"T1": (brain_volume(), ras_affine())})


def test_validate_makes_defaults_explicit_and_is_idempotent() -> None:
    s = validate_spec(spec(["T1"], {"name": "resample", "spacing": [1, 1, 1]}, {"name": "brain_mask"},
                           {"name": "normalize"}))
    assert s["transforms"][0] == {"name": "resample", "spacing": [1.0, 1.0, 1.0], "order": 1, "min_overlap": 0.25}
    assert s["transforms"][2] == {"name": "normalize", "method": "zscore", "where": "brain"}
    assert validate_spec(s) == s
    assert validate_spec(volume_spec(["T1", "T2"], [8, 8, 8]))["transforms"][3]["shape"] == [8, 8, 8]
    assert slice_spec(["T2"], count=24)["slices"]["size"] == [224, 224]


def test_missing_role_and_bad_volumes_are_refused() -> None:
    s = spec(["T1", "FLAIR"])
    with pytest.raises(PreprocessError, match=r"missing role\(s\) \['FLAIR'\]"):
        apply_spec(s, {"T1": (brain_volume(), ras_affine())})
    with pytest.raises(PreprocessError, match="3D volume"):
        apply_spec(spec(["T1"]), {"T1": (np.zeros((4, 4)), ras_affine())})
    with pytest.raises(PreprocessError, match="affine"):
        apply_spec(spec(["T1"]), {"T1": (np.zeros((4, 4, 4)), np.zeros((4, 4)))})


# ----------------------------------------------------------------------------- NIfTI on disk, determinism


def test_nifti_files_on_disk_give_the_same_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    aff = ras_affine((1.2, 1.2, 2.5))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [29, 39]
    vols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, role in enumerate(["T1", "T1CE", "T2", "FLAIR"]):
        a = brain_volume(seed=i) * rng.uniform(0.5, 2)
        a[3, 3, 3] = np.nan  # conversions sometimes write NaN: it becomes 0
        # store LPS on disk, as DICOM converters often do
        vols[role] = (np.ascontiguousarray(a[::-1, ::-1]), aff @ flip)
        nib.save(nib.Nifti1Image(vols[role][0], vols[role][1]), tmp_path / f"{role}.nii.gz")
        # the header keeps the affine in float32: compare against what the file holds
        vols[role] = (vols[role][0], nib.load(tmp_path / f"{role}.nii.gz").affine)
    s = volume_spec(["T1", "T1CE", "T2", "FLAIR"], [24, 24, 16], spacing=(1.0, 1.0, 2.0))
    from_arrays = apply_spec(s, vols)
    from_images = apply_spec(s, {r: nib.load(tmp_path / f"{r}.nii.gz") for r in vols})
    from_paths = apply_spec(s, {r: tmp_path / f"{r}.nii.gz" for r in vols})
    again = apply_spec(s, vols)
    for role in vols:
        assert from_arrays.arrays[role].shape == (24, 24, 16)
        assert np.isfinite(from_arrays.arrays[role]).all()
        np.testing.assert_array_equal(from_arrays.arrays[role], from_images.arrays[role])
        np.testing.assert_array_equal(from_arrays.arrays[role], from_paths.arrays[role])
        assert from_arrays.arrays[role].tobytes() == again.arrays[role].tobytes()
    assert from_arrays.meta["original"]["T1"]["nonfinite_voxels"] == 1
    assert from_arrays.meta["original"]["T1"]["axcodes"] == "LPS"
    assert "".join(aff2axcodes(from_arrays.affine)) == "RAS"
    batch = to_batch([from_arrays, from_paths], ["T1", "T1CE", "T2", "FLAIR"])
    assert set(batch) == {"T1", "T1CE", "T2", "FLAIR"}
    assert batch["FLAIR"].shape == (2, 24, 24, 16)


def test_extra_roles_are_ignored_and_recorded() -> None:
    a = brain_volume()
    out = apply_spec(spec(["T2"]), {"T2": (a, ras_affine()), "T1": (a, ras_affine())})
    assert list(out.arrays) == ["T2"] and out.meta["ignored_roles"] == ["T1"]


def test_to_batch_refuses_mismatched_cases() -> None:
    a = apply_spec(spec(["T1"]), {"T1": (brain_volume(), ras_affine())})
    b = apply_spec(spec(["T1"]), {"T1": (brain_volume((10, 10, 10), (slice(2, 8),) * 3), ras_affine())})
    with pytest.raises(PreprocessError, match="differ in shape"):
        to_batch([a, b], ["T1"])
    with pytest.raises(PreprocessError, match="no T2"):
        to_batch([a], ["T2"])


def test_transpose_permutes_axes_and_keeps_world_coordinates() -> None:
    a = brain_volume()  # (x, y, z) = (30, 40, 20)
    a[12, 20, 9] = 1000.0
    aff = ras_affine()
    s = spec(["T1"], {"name": "brain_mask"}, {"name": "crop_or_pad", "shape": [24, 32, 16]},
             {"name": "transpose", "axes": [2, 1, 0]})
    out = apply_spec(s, {"T1": (a, aff)})
    arr = out.arrays["T1"]
    assert arr.shape == (16, 32, 24)  # (z, y, x): a network whose D axis is the slice axis
    assert out.mask is not None and out.mask.shape == (16, 32, 24)
    marker_world = aff[:3, :3] @ [12, 20, 9] + aff[:3, 3]
    idx = np.linalg.solve(out.affine[:3, :3], marker_world - out.affine[:3, 3])
    assert arr[tuple(np.round(idx).astype(int))] == 1000.0
    with pytest.raises(SpecError, match="permutation"):
        validate_spec(spec(["T1"], {"name": "transpose", "axes": [0, 0, 1]}))


def test_slice_zscore_inside_the_brain_only() -> None:
    """zscore_brain_per_slice: brain pixels of each slice have mean 0 / std 1, background exactly 0."""
    import numpy as np

    from models.preprocess import apply_spec

    rng = np.random.default_rng(0)
    vol = np.zeros((24, 24, 12), dtype=np.float32)
    vol[4:20, 4:20, 2:10] = rng.normal(100.0, 10.0, size=(16, 16, 8))
    spec = {"version": 1, "roles": ["T2"], "transforms": [{"name": "brain_mask", "method": "nonzero"}],
            "slices": {"axis": 2, "selection": "brain_range", "count": 8, "size": [24, 24],
                       "normalize": "zscore_brain_per_slice"}}
    case = apply_spec(spec, {"T2": (vol, np.eye(4))})
    arr = case.arrays["T2"]
    inside = arr[:, 4:20, 4:20]
    assert np.allclose(inside.mean(axis=(1, 2)), 0.0, atol=1e-4)
    assert np.allclose(inside.std(axis=(1, 2)), 1.0, atol=1e-3)
    assert np.count_nonzero(arr[:, :4, :]) == 0 and np.count_nonzero(arr[:, 20:, :]) == 0
