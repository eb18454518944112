"""training.heads: whole synthetic heads in native scanner geometry, through the DICOM writer and back."""
from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicomnode.cli import main as cli_main
from dicomnode.synth import write_study
from training.heads import (
    HEAD_LABELS,
    BrainCase,
    NativeGeometry,
    geometry_preset,
    head_on_case_grid,
    load_brats_case,
    make_head,
    native_study,
    resample_native,
    swap_patient,
    synthetic_case,
)

from conftest import need

DCM2NIIX = "/usr/bin/dcm2niix"
#: small grids for the tests that only need a few of them (determinism, swapping)
SMALL_GEOMETRY = {
    "T1": NativeGeometry("sag", 2.0, 0.0, 2.0, (110, 100), n_slices=80),
    "T1CE": NativeGeometry("sag", 2.0, 0.0, 2.0, (110, 100), n_slices=80),
    "T2": NativeGeometry("cor", 4.0, 1.0, 1.5, (120, 110), coverage_mm=180.0, tilt_deg=12.0, acquisition="2D"),
}


@pytest.fixture(scope="module")
def case() -> BrainCase:
    return synthetic_case(seed=3, grade="HGG")


@pytest.fixture(scope="module")
def study(case):
    # Siemens "mixed": 3D 1 mm sagittal T1/T1CE, 2D 5 mm axial T2/FLAIR tilted 10 degrees
    return native_study(case, "mixed", vendor="siemens", seed=3, head_mask=True)


@pytest.fixture(scope="module")
def written(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "dicom"
    return out, write_study(**study.writer_args(), out_dir=out, vendor="siemens", seed=3)


def _dicom2nifti(series_dir: Path, out: Path) -> nib.Nifti1Image:
    """As the node converts (dicom2nifti, reoriented)."""
    from dicom2nifti.convert_dicom import dicom_series_to_nifti
    out.mkdir(parents=True, exist_ok=True)
    result = dicom_series_to_nifti(str(series_dir), str(out / "conv.nii.gz"), reorient_nifti=True)
    return nib.load(result["NII_FILE"])


def _same_grid(native_affine: np.ndarray, shape: tuple[int, ...], img: nib.Nifti1Image) -> None:
    """The converted grid is the native one up to axis flips/permutation: every corner within 0.01 mm."""
    b = img.affine.astype(np.float64)
    m = np.linalg.inv(b) @ native_affine
    perm = np.round(m[:3, :3])
    assert np.allclose(np.abs(perm).sum(0), 1) and np.allclose(np.abs(perm).sum(1), 1), m
    np.testing.assert_allclose(m[:3, :3], perm, atol=1e-3)
    assert sorted(img.shape[:3]) == sorted(shape)
    n = np.asarray(shape) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
    there = np.round(m @ corners)
    np.testing.assert_allclose((b @ there)[:3], (native_affine @ corners)[:3], atol=0.01)


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0) @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------- the head
def test_head_on_case_grid_keeps_the_brain_and_adds_tissues(case):
    head = head_on_case_grid(case, seed=3)
    assert head.labels.shape == case.brain_mask.shape
    np.testing.assert_array_equal(head.affine, case.affine)
    L = HEAD_LABELS
    np.testing.assert_array_equal(head.labels == L["brain"], case.brain_mask)
    for role, vol in case.volumes.items():
        np.testing.assert_array_equal(head.volumes[role][case.brain_mask], vol[case.brain_mask])
    full = make_head(case, seed=3)  # the neck and face reach past the case grid
    assert full.labels.shape[2] > case.brain_mask.shape[2]
    for name in ("csf", "bone", "marrow", "fat", "muscle", "eye", "air"):
        assert (full.labels == L[name]).sum() * full.voxel_ml > 2.0, name
    assert 2.0 <= full.head_ml / case.brain_ml <= 4.0

    def rel(role: str, name: str) -> float:
        """Median of a head tissue over the median normal brain, same sequence."""
        brain = np.median(case.volumes[role][case.brain_mask & (case.seg == 0)])
        return float(np.median(full.volumes[role][full.labels == L[name]]) / brain)

    for role in case.volumes:
        assert rel(role, "bone") < 0.1, role                 # skull dark on everything
    assert rel("T1", "fat") > 1.3 and rel("T1CE", "fat") > 1.3  # fat bright on T1
    assert 0.6 < rel("T2", "fat") < 1.6 and 0.6 < rel("FLAIR", "fat") < 1.6  # medium on T2/FLAIR
    assert rel("T1", "eye") < 0.5 and rel("FLAIR", "eye") < 0.4 and rel("T2", "eye") > 1.3  # vitreous: fluid
    # eyes in front of the brain and below its frontal lobes, one each side
    left, right = full.landmarks["eye_left"], full.landmarks["eye_right"]
    assert left[0] > 15 > -15 > right[0] and left[1] > full.brain_centre[1] + 40


# --------------------------------------------------------------------------- native geometry
def test_presets_have_the_promised_geometry():
    from dicomnode.synth.geometry import PLANES
    from training import heads
    assert heads._PLANES == PLANES  # training keeps its own copy of the writer's plane layout
    for vendor in ("siemens", "ge", "philips"):
        g = geometry_preset(vendor, "mixed")
        assert g["T1"].acquisition == "3D" and g["T1"].slice_thickness_mm == 1.0 and min(g["T1"].matrix) >= 176
        for role in ("T2", "FLAIR"):
            assert g[role].acquisition == "2D" and g[role].plane == "ax" and g[role].slice_thickness_mm == 5.0
            assert 0.5 <= min(g[role].pixel_spacing) <= 0.9
        assert g["T2"].matrix != g["FLAIR"].matrix
    assert any(g.tilt_deg != 0 for v in ("siemens", "ge", "philips") for g in geometry_preset(v, "2d").values())
    assert all(g.acquisition == "3D" for g in geometry_preset("ge", "3d").values())
    with pytest.raises(ValueError, match="vendor"):
        geometry_preset("canon")
    with pytest.raises(ValueError, match="n_slices"):
        NativeGeometry("ax", 5.0)


def test_thick_slices_average_the_slice_profile():
    """A 1 mm bright sheet inside a 5 mm slice is averaged over the slice, not point-sampled."""
    src = np.zeros((40, 40, 40), np.float32)
    src[:, :, 20] = 100.0
    geom = NativeGeometry("ax", 5.0, 0.0, 1.0, (20, 20), n_slices=4, acquisition="2D")
    out, aff = resample_native(src, np.eye(4), geom, centre=(20.0, 20.0, 20.0))
    column = out[10, 10, :]
    assert column.max() < 50.0                       # a point sample would give 100 (or 0)
    np.testing.assert_allclose(column.sum() * 5.0, 100.0, rtol=0.02)  # the sheet's signal is kept
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), [1.0, 1.0, 5.0])


def test_native_masks_have_the_brain_volume(case, study):
    assert set(study.series) == {"T1", "T1CE", "T2", "FLAIR"}
    for role, s in study.series.items():
        assert s.volume.dtype == np.int16 and s.volume.shape == s.geometry.shape
        assert s.brain_ml == pytest.approx(case.brain_ml, rel=0.05), role
        assert s.seg.any() and set(np.unique(s.seg)) <= {0, 1, 2, 4}
        assert ((s.seg > 0) & ~s.brain_mask).sum() <= 0.01 * (s.seg > 0).sum()  # the tumour is in the brain
    t1 = study.series["T1"]
    assert t1.head_mask is not None
    assert 2.0 <= t1.head_mask.sum() * t1.voxel_ml / case.brain_ml <= 4.0
    # background outside the head is noise only, the brain is well above it
    bg = t1.volume[~t1.head_mask]
    assert np.median(t1.volume[t1.brain_mask]) > 10 * np.median(bg)


def test_native_study_is_deterministic_by_seed(case):
    head = make_head(case, seed=3)
    a = native_study(head, SMALL_GEOMETRY, seed=5)
    b = native_study(head, SMALL_GEOMETRY, seed=5)
    c = native_study(head, SMALL_GEOMETRY, seed=6)
    for role in SMALL_GEOMETRY:
        np.testing.assert_array_equal(a.series[role].volume, b.series[role].volume)
        np.testing.assert_array_equal(a.series[role].brain_mask, b.series[role].brain_mask)
        np.testing.assert_array_equal(a.series[role].affine, c.series[role].affine)  # the plan is the same
        assert not np.array_equal(a.series[role].volume, c.series[role].volume)     # the head moved
    assert not np.allclose(a.pose.matrix, c.pose.matrix)
    # T2: 4 mm coronal slices + 1 mm gap, 12 degrees tilted about left-right
    aff = a.series["T2"].affine
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), [1.5, 1.5, 5.0])
    assert abs(np.degrees(np.arccos(abs(aff[2, 1] / 1.5))) - 12.0) < 1e-6


def test_swap_patient_takes_one_role_from_another_head(case):
    other = synthetic_case(seed=8, grade="LGG")
    mine = native_study(case, SMALL_GEOMETRY, seed=1)
    donor = native_study(other, SMALL_GEOMETRY, seed=2)
    swapped = swap_patient(mine, donor, "T1CE")
    assert swapped.sources == {"T1": case.case_id, "T1CE": other.case_id, "T2": case.case_id}
    assert swapped.series["T1CE"] is donor.series["T1CE"] and swapped.series["T1"] is mine.series["T1"]
    assert not np.array_equal(swapped.series["T1CE"].brain_mask, swapped.series["T1"].brain_mask)
    with pytest.raises(ValueError, match="FLAIR"):
        swap_patient(mine, donor, "FLAIR")


# --------------------------------------------------------------------------- through DICOM and back
def test_dicom_headers_carry_the_native_geometry(study, written):
    out, w = written
    assert set(w.series) == set(study.series)
    for role, s in study.series.items():
        ds = pydicom.dcmread(w.files[role][0], stop_before_pixels=True)
        assert len(w.files[role]) == s.geometry.slices
        assert (int(ds.Rows), int(ds.Columns)) == tuple(s.geometry.matrix)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], s.geometry.pixel_spacing)
        assert float(ds.SliceThickness) == s.geometry.slice_thickness_mm
        assert float(ds.SpacingBetweenSlices) == pytest.approx(s.geometry.slice_spacing_mm)
        assert ds.MRAcquisitionType == s.geometry.acquisition
    t2 = pydicom.dcmread(w.files["T2"][0], stop_before_pixels=True)
    assert float(t2.SliceThickness) == 5.0 and float(t2.SpacingBetweenSlices) == 5.5
    # tilted 10 degrees about left-right: the column direction leaves the axial plane
    iop = [float(v) for v in t2.ImageOrientationPatient]
    np.testing.assert_allclose(iop, [1, 0, 0, 0, np.cos(np.radians(10)), -np.sin(np.radians(10))], atol=1e-6)
    t1 = pydicom.dcmread(w.files["T1"][0], stop_before_pixels=True)
    assert float(t1.SliceThickness) == 1.0 and np.allclose([float(v) for v in t1.ImageOrientationPatient][:3],
                                                           [0, 1, 0], atol=0.01)


@pytest.mark.parametrize("role", ["T1", "T2", "FLAIR"])
def test_dicom2nifti_gives_back_the_native_grid(study, written, tmp_path, role):
    out, _ = written
    s = study.series[role]
    img = _dicom2nifti(out / role, tmp_path / role)
    _same_grid(s.affine, s.volume.shape, img)


def test_tumour_centroid_survives_the_round_trip(case, study, tmp_path):
    """The tumour, written as a series on each native grid and converted, sits where the pose put it."""
    truth = study.pose.apply(_centroid(case.seg > 0, case.affine))
    roles = ("T1", "T2")
    vols = {r: (study.series[r].seg > 0).astype(np.int16) * 1000 for r in roles}
    args = study.writer_args()
    w = write_study(vols, {r: args["affine"][r] for r in roles}, tmp_path / "seg", seed=4,
                    planes={r: args["planes"][r] for r in roles},
                    slice_thickness={r: args["slice_thickness"][r] for r in roles})
    assert set(w.series) == set(roles)
    for role in roles:
        img = _dicom2nifti(tmp_path / "seg" / role, tmp_path / f"{role}-nii")
        got = _centroid(np.asarray(img.dataobj) > 500, img.affine)
        assert np.linalg.norm(got - truth) < 1.5, (role, got, truth)
    # and dcm2niix agrees on the tilted 2D one
    need(Path(DCM2NIIX).exists(), "dcm2niix not installed")
    conv = tmp_path / "dcm2niix"
    conv.mkdir()
    proc = subprocess.run([DCM2NIIX, "-b", "n", "-z", "n", "-f", "t2", "-o", str(conv), str(tmp_path / "seg" / "T2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    img = nib.load(sorted(conv.glob("*.nii"))[0])
    _same_grid(study.series["T2"].affine, study.series["T2"].volume.shape, img)
    assert np.linalg.norm(_centroid(np.asarray(img.dataobj) > 500, img.affine) - truth) < 1.5


def test_writer_per_role_options_are_checked(study, tmp_path):
    args = study.writer_args()
    vols = {"T2": args["volumes"]["T2"]}
    with pytest.raises(ValueError, match="no affine"):
        write_study(vols, {"T1": args["affine"]["T1"]}, tmp_path)
    with pytest.raises(ValueError, match="not written"):
        write_study(vols, args["affine"], tmp_path, planes={"T1": "sag"})
    with pytest.raises(ValueError, match="plane"):
        write_study(vols, args["affine"], tmp_path, planes={"T2": "oblique"})
    with pytest.raises(ValueError, match="thickness"):
        write_study(vols, args["affine"], tmp_path, slice_thickness={"T2": -1})
    # enhanced: the thickness goes into the shared PixelMeasures group
    w = write_study(vols, args["affine"], tmp_path / "enh", enhanced=True, planes={"T2": "ax"},
                    slice_thickness={"T2": 5.0}, acquisition_types={"T2": "2D"})
    ds = pydicom.dcmread(w.files["T2"][0], stop_before_pixels=True)
    pm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(pm.SliceThickness) == 5.0 and float(pm.SpacingBetweenSlices) == 5.5


# --------------------------------------------------------------------------- inputs and the CLI
def test_load_brats_case(tmp_path, case):
    folder = tmp_path / "Case_7"
    folder.mkdir()
    for role, suffix in (("T1", "t1"), ("T2", "t2")):
        nib.save(nib.Nifti1Image(case.volumes[role].astype(np.int16), case.affine), folder / f"Case_7_{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(case.seg, case.affine), folder / "Case_7_seg.nii.gz")
    loaded = load_brats_case(folder)
    assert set(loaded.volumes) == {"T1", "T2"} and loaded.case_id == "Case_7"
    np.testing.assert_array_equal(loaded.seg, case.seg)
    assert loaded.brain_ml == pytest.approx(case.brain_ml, rel=0.01)
    with pytest.raises(FileNotFoundError, match="BraTS layout"):
        load_brats_case(tmp_path)


def test_cli_synth_head_writes_four_series(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["synth", str(out), "--head", "--geometry", "2d", "--vendor", "ge", "--seed", "1"]) == 0
    assert "4 series" in capsys.readouterr().out
    for role in ("T1", "T1CE", "T2", "FLAIR"):
        files = sorted((out / role).glob("*.dcm"))
        assert len(files) == 28, role
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert float(ds.SliceThickness) == 5.0 and ds.MRAcquisitionType == "2D"
    assert cli_main(["synth", str(tmp_path / "x"), "--head", "--case-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dicomnode synth:") and err.count("\n") == 1
    assert cli_main(["synth", str(tmp_path / "y"), "--geometry", "3d"]) == 2
