"""The processing stages (convert, prepare, infer) on synthetic DICOM studies and real tiny checkpoints.

Everything is real: studies written by ``dicomnode.synth``, dicom2nifti and the
dcm2niix binary, checkpoints trained and exported by the training module
(``tests/checkpoints.py``), the registry's selection rule.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import dicom2nifti.settings as dicom2nifti_settings
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from checkpoints import tiny_checkpoints
from conftest import need
from dicomnode.handoff import ModelResult
from dicomnode.stages.convert import (DCM2NIIX, DICOM2NIFTI, MANIFEST_NAME, ConvertedSeries, _fingerprint,
                                       _native_pixels, convert_series, convert_version)
from dicomnode.stages.infer import ModelCache, calibrate, run_model, temperatures_of
from dicomnode.stages.preprocess import PrepareError, load_case, prepare, save_case
from dicomnode.synth import TISSUES, make_phantom, phantom_labels, write_study
from models.checkpoint import CheckpointError, save_checkpoint
from models.registry import CheckpointRegistry

SHAPE = (48, 48, 32)
SPACING = (4.0, 4.0, 5.0)
HAVE_DCM2NIIX = shutil.which("dcm2niix") is not None


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints(tmp_path_factory)


@pytest.fixture(scope="module")
def phantom() -> tuple[dict[str, np.ndarray], np.ndarray]:
    return make_phantom(shape=SHAPE, spacing=SPACING, seed=0)


@pytest.fixture(scope="module")
def siemens(tmp_path_factory: pytest.TempPathFactory, phantom):
    vols, aff = phantom
    return write_study(vols, aff, tmp_path_factory.mktemp("siemens"), vendor="siemens", enhanced=False, seed=1)


@pytest.fixture(scope="module")
def converted(siemens, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConvertedSeries]:
    return convert_version({r: (siemens.series[r], siemens.files[r]) for r in siemens.series},
                           tmp_path_factory.mktemp("work"))


# ----------------------------------------------------------------------------- convert


def _corners(shape, affine) -> np.ndarray:
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    pts = (np.asarray(affine) @ idx.T).T[:, :3]
    return pts[np.lexsort(np.round(pts, 2).T)]


def _check_geometry(conv: ConvertedSeries, shape, affine) -> None:
    """The NIfTI puts every voxel centre where the DICOM does: grid corners, and every image's first pixel."""
    assert conv.ok, conv.error
    img = nib.load(conv.nifti)
    assert sorted(img.shape) == sorted(shape)
    np.testing.assert_allclose(_corners(img.shape, img.affine), _corners(shape, affine), atol=1e-3)
    inv = np.linalg.inv(img.affine)
    slices = set()
    for im in conv.images:
        ras = np.asarray(im.image_position) * np.array([-1.0, -1.0, 1.0])
        ijk = (inv @ np.array([*ras, 1.0]))[:3]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
        slices.add(tuple(np.round(ijk).astype(int)))
    assert len(slices) == len(conv.images)  # one distinct position per source image


@pytest.mark.parametrize("vendor,enhanced,expected", [
    ("siemens", False, {DICOM2NIFTI}),
    ("siemens", True, {DICOM2NIFTI}),
    ("ge", True, {DCM2NIIX}),  # dicom2nifti 2.6.2 cannot read GE Enhanced MR: the fallback runs
])
def test_convert_classic_and_enhanced_with_the_source_geometry(phantom, tmp_path: Path, vendor, enhanced,
                                                              expected) -> None:
    need(HAVE_DCM2NIIX, "dcm2niix not installed")
    vols, aff = phantom
    study = write_study(vols, aff, tmp_path / "study", vendor=vendor, enhanced=enhanced, seed=2)
    for role in ("T1", "T2"):
        files = study.files[role]
        auto = convert_series(files, tmp_path / f"{role}.nii", role=role, series_instance_uid=study.series[role])
        assert auto.converter in expected, auto.attempts
        assert auto.seconds > 0 and auto.shape is not None
        if DCM2NIIX in expected:
            assert auto.attempts and auto.attempts[0].startswith("dicom2nifti: ")
        n_frames = len(files) if not enhanced else int(pydicom.dcmread(files[0]).NumberOfFrames)
        assert len(auto.images) == n_frames
        assert all((im.frame is None) != enhanced for im in auto.images)
        if enhanced:
            assert sorted(im.frame for im in auto.images) == list(range(1, n_frames + 1))
        sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert {im.sop_instance_uid for im in auto.images} == sops
        assert np.all(np.diff([im.position for im in auto.images]) > 0)
        # both converters, each on its own, put the voxels where the DICOM says
        for conv_name in (DICOM2NIFTI, DCM2NIIX):
            if conv_name == DICOM2NIFTI and DCM2NIIX in expected:
                continue
            one = convert_series(files, tmp_path / f"{role}-{conv_name}.nii.gz", role=role,
                                 series_instance_uid=study.series[role], converters=(conv_name,))
            assert one.converter == conv_name, one.error
            _check_geometry(one, vols[role].shape, aff)
        # round trip through JSON, and back to the nearest source image
        again = ConvertedSeries.from_json(auto.to_json())
        assert again == auto
        mid = auto.images[len(auto.images) // 2]
        ras = np.asarray(mid.image_position) * np.array([-1.0, -1.0, 1.0])
        ref, dist = auto.nearest(ras)
        assert (ref.sop_instance_uid, ref.frame, ref.series_instance_uid) == \
            (mid.sop_instance_uid, mid.frame, study.series[role]) and dist < 1e-6


def _rewrite(files, out: Path, **changes) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for k, v in changes.items():
            setattr(ds, k, v)
        p = out / f"{i:04d}.dcm"
        ds.save_as(p)
        written.append(p)
    return written


def test_broken_series_give_a_reason_not_an_exception(siemens, phantom, tmp_path: Path) -> None:
    uid = siemens.series["T2"]
    t2 = siemens.files["T2"]
    one = convert_series(t2[:1], tmp_path / "one.nii", role="T2", series_instance_uid=uid)
    assert one.error and "single slice" in one.error and one.nifti is None and not one.ok
    assert not (tmp_path / "one.nii").exists()

    tilted = _rewrite(t2[:3], tmp_path / "tilted", ImageOrientationPatient=[1, 0, 0, 0, 0.8, 0.6])
    mixed = convert_series([*t2[3:], *tilted], tmp_path / "mixed.nii", role="T2", series_instance_uid=uid)
    assert mixed.error and "mixed image orientations" in mixed.error

    vols, aff = make_phantom(shape=(40, 40, 32), spacing=(4.8, 4.8, 5.0), seed=0)
    other = write_study(vols, aff, tmp_path / "other", vendor="siemens", seed=1, roles=["T2"])
    resized = _rewrite(other.files["T2"][:4], tmp_path / "resized", SeriesInstanceUID=uid)
    sizes = convert_series([*t2[4:], *resized], tmp_path / "sizes.nii", role="T2", series_instance_uid=uid)
    assert sizes.error and "mixed image sizes" in sizes.error

    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    bad = convert_series([*t2[:5], garbage], tmp_path / "bad.nii", role="T2", series_instance_uid=uid)
    assert bad.error and "unreadable" in bad.error

    foreign = convert_series([*t2, *siemens.files["FLAIR"][:2]], tmp_path / "f.nii", role="T2",
                             series_instance_uid=uid)
    assert foreign.error and "another series" in foreign.error

    # in a version: the broken role is recorded, the others convert
    res = convert_version({"T2": (uid, t2[:1]), "FLAIR": (siemens.series["FLAIR"], siemens.files["FLAIR"])},
                          tmp_path / "work")
    assert res["FLAIR"].ok and not res["T2"].ok and "single slice" in (res["T2"].error or "")


def test_convert_version_is_idempotent(siemens, tmp_path: Path) -> None:
    series = {r: (siemens.series[r], siemens.files[r]) for r in ("T2", "FLAIR")}
    first = convert_version(series, tmp_path)
    mtimes = {r: Path(c.nifti).stat().st_mtime_ns for r, c in first.items()}
    again = convert_version(series, tmp_path)
    assert again == first
    assert {r: Path(c.nifti).stat().st_mtime_ns for r, c in again.items()} == mtimes
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(manifest["series"]) == {"T2", "FLAIR"}
    # a changed input file (a re-sent instance) reconverts that role only
    f = siemens.files["FLAIR"][0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = convert_version(series, tmp_path)
    assert Path(third["T2"].nifti).stat().st_mtime_ns == mtimes["T2"]
    assert Path(third["FLAIR"].nifti).stat().st_mtime_ns != mtimes["FLAIR"]
    # a deleted volume is redone
    Path(third["T2"].nifti).unlink()
    assert convert_version(series, tmp_path)["T2"].ok


def test_a_version_converted_in_parallel_equals_it_converted_in_turn(siemens, tmp_path: Path) -> None:
    """Two worker processes give the same volumes and records as one series after the other."""
    series = {r: (siemens.series[r], siemens.files[r]) for r in ("T1", "T1CE", "T2", "FLAIR")}
    serial = convert_version(series, tmp_path / "serial", workers=1)
    parallel = convert_version(series, tmp_path / "parallel", workers=2)
    assert list(parallel) == list(series)  # the caller's order, whichever finished first
    for role in series:
        a, b = serial[role], parallel[role]
        assert a.ok and b.ok and a.converter == b.converter == DICOM2NIFTI
        assert (a.images, a.normal, a.shape, a.affine, a.fingerprint) == (b.images, b.normal, b.shape, b.affine,
                                                                          b.fingerprint)
        ia, ib = nib.load(a.nifti), nib.load(b.nifti)
        assert ia.get_data_dtype() == ib.get_data_dtype() == np.float32  # float32: what every reader loads
        assert np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
    assert set(json.loads((tmp_path / "parallel" / MANIFEST_NAME).read_text())["series"]) == set(series)
    with pytest.raises(ValueError, match="workers"):
        convert_version(series, tmp_path / "bad", workers=0)


def test_native_pixels_are_what_pydicom_decodes(siemens, phantom, tmp_path: Path) -> None:
    """The node's own decoding of plain pixel data gives pydicom's array: dtype, shape, unused bits."""
    vols, aff = phantom
    enhanced = write_study(vols, aff, tmp_path / "enhanced", vendor="philips", enhanced=True, seed=3, roles=["T2"])
    rng = np.random.default_rng(0)
    variants = {"unsigned 16 of 16": pydicom.dcmread(siemens.files["T2"][5]),
                "multi-frame": pydicom.dcmread(enhanced.files["T2"][0])}
    for name, signed, bits, stored in (("unsigned 12 of 16, junk above", 0, 16, 12),
                                       ("signed 12 of 16, negative", 1, 16, 12), ("unsigned 8", 0, 8, 8),
                                       ("signed 32", 1, 32, 32)):
        ds = pydicom.dcmread(siemens.files["T2"][5])
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        raw = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(ds.Rows, ds.Columns), dtype=dtype,
                           endpoint=True)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
        ds.PixelData = raw.tobytes()
        variants[name] = ds
    for name, ds in variants.items():
        ours, theirs = _native_pixels(ds), ds.pixel_array
        assert ours is not None, name
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs), name
        assert ours.flags.writeable, name
    big = pydicom.dcmread(siemens.files["T2"][5])
    big.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    assert _native_pixels(big) is None  # anything but plain little-endian data: pydicom decodes it


def test_dicom2nifti_keeps_the_checks_the_node_does_not_make(siemens, tmp_path: Path) -> None:
    """Gantry tilt and a missing slice are still dicom2nifti's to refuse (then dcm2niix runs, or nothing)."""
    need(HAVE_DCM2NIIX, "dcm2niix not installed")
    uid = siemens.series["T2"]
    ordered = sorted(siemens.files["T2"],
                     key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))

    def rewrite(name: str, skip: int | None = None, shear: float = 0.0) -> list[Path]:
        out, files = tmp_path / name, []
        out.mkdir()
        for i, f in enumerate(ordered):
            if i == skip:
                continue
            ds = pydicom.dcmread(f)
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1] + shear * ipp[2], ipp[2]]  # shear: slices slide along y
            files.append(out / f"{i:04d}.dcm")
            ds.save_as(files[-1])
        return files

    tilted = convert_series(rewrite("tilt", shear=0.2), tmp_path / "tilt.nii", role="T2", series_instance_uid=uid)
    assert tilted.converter == DCM2NIIX and "GANTRY_TILT" in tilted.attempts[0], tilted.attempts
    gap = convert_series(rewrite("gap", skip=10), tmp_path / "gap.nii", role="T2", series_instance_uid=uid)
    assert gap.attempts[0].startswith("dicom2nifti: ") and "SLICE_INCREMENT" in gap.attempts[0], gap.attempts
    assert dicom2nifti_settings.validate_orientation  # switched off for the node's calls only


def test_fingerprint_is_the_fully_resolved_paths(siemens, tmp_path: Path) -> None:
    """The per-folder shortcut gives the value of resolving every path in full (manifests stay valid)."""
    files = siemens.files["T2"][:4]
    (tmp_path / "link.dcm").symlink_to(files[0])
    (tmp_path / "folder").symlink_to(files[0].parent, target_is_directory=True)
    listed = [*files, tmp_path / "link.dcm", tmp_path / "folder" / files[1].name, tmp_path / "gone.dcm"]

    def reference(paths: list[Path]) -> str:
        h = hashlib.sha256()
        for f in sorted(str(Path(p).resolve()) for p in paths):
            try:
                st = os.stat(f)
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}\0missing\n".encode())
        return h.hexdigest()

    assert _fingerprint(listed) == reference(listed)
    assert _fingerprint(listed[::-1]) == reference(listed)


# ----------------------------------------------------------------------------- prepare


def test_prepare_flags_a_head_that_is_not_skull_stripped(phantom, converted, ckpt_dir: Path,
                                                         tmp_path: Path) -> None:
    vols, aff = phantom
    spec = CheckpointRegistry(ckpt_dir).select(["T1", "T2", "FLAIR"])[0].checkpoint.load().spec
    head = prepare(spec, {r: Path(c.nifti) for r, c in converted.items()})
    assert any("skull-stripped" in f for f in head.meta["quality_flags"])
    assert all(m["mask_fraction"] > 0.99 for m in head.meta["quality"].values())
    # the same phantom with everything outside the brain set to 0: a BraTS-like input
    outside = [TISSUES[t] for t in ("background", "scalp", "skull")]
    brain = ~np.isin(phantom_labels(shape=SHAPE, spacing=SPACING, seed=0), outside)
    paths = {}
    for role in ("T1", "T2", "FLAIR"):
        paths[role] = tmp_path / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(np.where(brain, vols[role], 0).astype(np.float32), aff), paths[role])
    stripped = prepare(spec, paths)
    fractions = [m["mask_fraction"] for m in stripped.meta["quality"].values()]
    assert max(fractions) < 0.6, fractions
    assert not any("skull-stripped" in f for f in stripped.meta["quality_flags"])
    # failures become reasons
    with pytest.raises(PrepareError, match="missing FLAIR"):
        prepare(spec, {r: p for r, p in paths.items() if r != "FLAIR"})
    empty = {r: tmp_path / f"empty-{r}.nii.gz" for r in paths}
    for p in empty.values():
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), aff), p)
    with pytest.raises(PrepareError, match="brain mask is empty") as err:
        prepare(spec, empty)
    assert err.value.reason.startswith("the volumes cannot be prepared")


def test_save_and_load_case_round_trip_exactly(converted, ckpt_dir: Path, tmp_path: Path) -> None:
    reg = CheckpointRegistry(ckpt_dir)
    for sel in reg.select(["T1", "T1CE", "T2", "FLAIR"]) + reg.select(["T1", "T2", "FLAIR"]):
        case = prepare(sel.checkpoint.load().spec, {r: Path(c.nifti) for r, c in converted.items()})
        path = tmp_path / f"{sel.family.name}.npz"
        save_case(case, path)
        back = load_case(path)
        assert list(back.arrays) == list(case.arrays)
        for role, a in case.arrays.items():
            assert back.arrays[role].dtype == a.dtype and np.array_equal(back.arrays[role], a)
        for name in ("affine", "mask", "slice_mask", "slice_indices"):
            a, b = getattr(case, name), getattr(back, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), name
        assert back.meta == case.meta
        assert not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- infer


def test_run_model_for_each_tiny_family(siemens, converted, ckpt_dir: Path) -> None:
    reg = CheckpointRegistry(ckpt_dir)
    selections = {s.family.name: s for s in reg.select(["T1", "T1CE", "T2", "FLAIR"])}
    selections.update({s.family.name: s for s in reg.select(["T1", "T2", "FLAIR"])})
    assert set(selections) == {"fs3dcnn", "mmdlm", "promptnet"}
    cache = ModelCache()
    sops = {role: {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
            for role, files in siemens.files.items()}
    for name, sel in selections.items():
        ckpt = cache.get(sel.checkpoint, "cpu")
        case = prepare(ckpt.spec, {r: Path(c.nifti) for r, c in converted.items()})
        result = run_model(sel, case, converted, cache, device="auto")
        assert result.family == name and result.checkpoint_sha256 == sel.checkpoint.sha256
        assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
        assert result.reason == sel.reason and result.training_data and result.metrics
        assert result.quality_flags[: len(case.meta["quality_flags"])] == case.meta["quality_flags"]
        temps = temperatures_of(ckpt)
        for t in result.tasks:
            assert abs(sum(t.probabilities.values()) - 1.0) < 1e-6
            assert t.probability == t.probabilities[list(t.probabilities)[1]]
            # the positive class iff P(positive) >= the checkpoint's threshold (0.5 when none is stored)
            assert t.threshold == ckpt.thresholds.get(t.task, 0.5)
            assert t.label == list(t.probabilities)[1 if t.probability >= t.threshold else 0]
            assert t.calibrated == (temps[t.task] is not None)
        assert {t.task for t in result.tasks} == ({"grade", "idh", "1p19q"} if name == "mmdlm" else {"grade"})
        if name == "mmdlm":
            assert result.key_slices and {k.role for k in result.key_slices} == {"T1CE", "T2", "FLAIR"}
            for k in result.key_slices:
                assert k.ref.series_instance_uid == siemens.series[k.role]
                assert k.ref.sop_instance_uid in sops[k.role] and k.ref.frame is None
                assert 0.0 < k.attention <= 1.0
            # T1CE is sagittal in a Siemens study: an axial key slice cannot be one of its images
            assert any("T1CE" in f and "another orientation" in f for f in result.quality_flags)
            assert not any("T2" in f and "another orientation" in f for f in result.quality_flags)
        else:
            assert result.key_slices == []
        # the result is what the report stage reads back
        d = json.loads(json.dumps(dataclasses.asdict(result)))
        assert ModelResult(**{**d, "tasks": result.tasks, "key_slices": result.key_slices}) == result
    assert cache.loads == 3  # one load per checkpoint, however often it is asked for


def test_calibration_from_probabilities_matches_training_on_logits() -> None:
    from training.calibration import apply_temperature

    rng = np.random.default_rng(0)
    z2 = rng.normal(0, 4, size=(50, 2))
    p2 = torch.softmax(torch.from_numpy(z2), dim=1).numpy()
    np.testing.assert_allclose(calibrate(p2, 2.5), apply_temperature(z2, 2.5), atol=1e-9)
    z1 = rng.normal(0, 4, size=50)  # MMDLM: one logit per task, p = (1 - s(z), s(z))
    s = 1 / (1 + np.exp(-z1))
    np.testing.assert_allclose(calibrate(np.stack([1 - s, s], 1), 0.4)[:, 1], apply_temperature(z1, 0.4), atol=1e-9)
    assert np.all(np.isfinite(calibrate(np.array([[0.0, 1.0]]), 3.0)))


def test_a_checkpoint_changed_after_listing_is_refused(ckpt_dir: Path, converted, tmp_path: Path) -> None:
    src = ckpt_dir / "fs3dcnn-tiny.pt"
    path = tmp_path / src.name
    shutil.copy2(src, path)
    reg = CheckpointRegistry(tmp_path)
    (sel,) = reg.select(["T1", "T1CE", "T2", "FLAIR"])
    cache = ModelCache()
    ckpt = cache.get(sel.checkpoint, "cpu")
    case = prepare(ckpt.spec, {r: Path(c.nifti) for r, c in converted.items()})
    run_model(sel, case, converted, cache, device="cpu")
    # replaced by another VALID checkpoint: same name, other content
    save_checkpoint(path, ckpt.model, "fs3dcnn", ckpt.hparams, ckpt.spec, training_data=ckpt.training_data,
                    metrics={"edited": True}, temperature=ckpt.temperature)
    with pytest.raises(CheckpointError, match="changed since it was listed"):
        run_model(sel, case, converted, cache, device="cpu")
    with pytest.raises(CheckpointError):
        ModelCache().get(sel.checkpoint, "cpu")
    # a byte flipped in the file
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        cache.get(sel.checkpoint, "cpu")


def test_a_case_prepared_for_another_spec_is_refused(converted, ckpt_dir: Path) -> None:
    reg = CheckpointRegistry(ckpt_dir)
    fs = reg.select(["T1", "T1CE", "T2", "FLAIR"])
    by = {s.family.name: s for s in fs}
    cache = ModelCache()
    mm_case = prepare(cache.get(by["mmdlm"].checkpoint, "cpu").spec, {r: Path(c.nifti) for r, c in converted.items()})
    with pytest.raises(ValueError, match="another spec"):
        run_model(by["fs3dcnn"], mm_case, converted, cache, device="cpu")


# ----------------------------------------------------------------------------- the gate


def _niftis(converted) -> dict[str, Path]:
    return {r: Path(c.nifti) for r, c in converted.items()}


def test_gate_findings_before_inference(converted, phantom, ckpt_dir: Path, tmp_path: Path) -> None:
    from models.gate import GateSettings
    from nodeutil import regate

    from dicomnode.stages.preprocess import gate_case

    reg = CheckpointRegistry(ckpt_dir)
    (sel,) = reg.select(["T1", "T2", "FLAIR"])
    ck = sel.checkpoint
    assert ck.extra == ModelCache().get(ck, "cpu").extra  # the registry exposes the checkpoint's extra
    head = prepare(ck.spec, _niftis(converted))
    # an old spec ("brain = nonzero voxels") on a whole head: nothing measured says so, the gate declines
    # it as unchecked; only gate_unchecked = "allow" lets it through
    strict = gate_case(ck.extra.get("gate"), ck.spec, head, GateSettings())
    assert "nonzero_share" in [f.name for f in strict]
    skull = next(f for f in strict if f.name == "nonzero_share")
    assert skull.value == 1.0 and skull.high == 0.6 and "does not look skull-stripped" in skull.reason
    loose = GateSettings(margin=1000.0, feature_factor=1000.0, unchecked="allow")
    assert gate_case(ck.extra.get("gate"), ck.spec, head, loose) == []
    # a training range the case lies outside of: the finding names the measurement, its value and the range
    path = tmp_path / "ranged.pt"
    regate(ck.path, path, ranges={"slice_thickness_mm/T2": [1.0, 1.0]})
    (ranged,) = CheckpointRegistry(path).select(["T1", "T2", "FLAIR"])
    found = gate_case(ranged.checkpoint.extra["gate"], ck.spec, head, GateSettings(unchecked="allow"))
    assert [(f.name, f.value, f.unit, f.low, f.high) for f in found] == [("slice_thickness_mm/T2", 5.0, "mm", 1.0, 1.0)]
    assert found[0].reason == "slice thickness (T2) 5.0 mm; this model was trained on 1.0\u20131.0 mm"
    assert gate_case(ranged.checkpoint.extra["gate"], ck.spec, head, loose) == []  # a margin of 1000 widths
    # a checkpoint from before the gate: declined as unchecked unless allowed
    bare = tmp_path / "bare.pt"
    regate(ck.path, bare, drop=True)
    (old,) = CheckpointRegistry(bare).select(["T1", "T2", "FLAIR"])
    assert "gate" not in old.checkpoint.extra
    assert "training_ranges" in [f.name for f in gate_case(None, ck.spec, head, GateSettings())]
    # the same phantom, skull-stripped: not flagged
    from dicomnode.synth import TISSUES, phantom_labels

    vols, aff = phantom
    outside = [TISSUES[t] for t in ("background", "scalp", "skull")]
    brain = ~np.isin(phantom_labels(shape=SHAPE, spacing=SPACING, seed=0), outside)
    paths = {}
    for role in ("T1", "T2", "FLAIR"):
        paths[role] = tmp_path / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(np.where(brain, vols[role], 0).astype(np.float32), aff), paths[role])
    stripped = prepare(ck.spec, paths)
    assert "nonzero_share" not in [f.name for f in gate_case(ck.extra.get("gate"), ck.spec, stripped,
                                                             GateSettings())]


def test_feature_distance_before_trusting_a_prediction(converted, ckpt_dir: Path, tmp_path: Path) -> None:
    from models.gate import GateSettings, feature_distance
    from nodeutil import regate

    from dicomnode.stages.infer import check_case_features

    reg = CheckpointRegistry(ckpt_dir)
    cache = ModelCache()
    selections = [*reg.select(["T1", "T1CE", "T2", "FLAIR"]), *reg.select(["T1", "T2", "FLAIR"])]
    for sel in selections:
        ckpt = cache.get(sel.checkpoint, "cpu")
        case = prepare(ckpt.spec, _niftis(converted))
        gate = ckpt.extra.get("gate")
        strict = check_case_features(sel, case, cache, GateSettings(), device="cpu")
        if gate and gate.get("features"):
            from models.preprocess import to_batch

            f = ckpt.family.features(ckpt.model, to_batch([case], ckpt.input_roles))
            assert strict.distance == pytest.approx(feature_distance(gate, f.numpy()[0]), rel=1e-6)
            assert strict.threshold == pytest.approx(gate["features"]["threshold"])
            assert (strict.finding is None) == (strict.distance <= strict.threshold)
            if strict.finding is not None:
                assert strict.finding.name == "feature_distance" and strict.finding.value == strict.distance
            huge = check_case_features(sel, case, cache, GateSettings(feature_factor=1e6), device="cpu")
            assert huge.finding is None and huge.threshold == pytest.approx(strict.threshold * 1e6)
        # the prediction carries the case's measurements (the source geometry at least)
        result = run_model(sel, case, converted, cache, device="cpu")
        assert result.measurements["slice_thickness_mm/T2"] == 5.0 and "slices/T2" in result.measurements
    # a checkpoint without feature statistics: unchecked
    path = tmp_path / "bare.pt"
    regate(selections[-1].checkpoint.path, path, drop=True)
    (bare,) = CheckpointRegistry(path).select(["T1", "T2", "FLAIR"])
    case = prepare(bare.checkpoint.spec, _niftis(converted))
    check = check_case_features(bare, case, cache, GateSettings(), device="cpu")
    assert check.distance is None and check.finding is not None and check.finding.name == "feature_distance"
    assert check_case_features(bare, case, cache, GateSettings(unchecked="allow"), device="cpu").finding is None


def _task(task: str, label: str, p_positive: float) -> "TaskResult":
    from dicomnode.handoff import TaskResult
    from models.base import TASKS

    neg, pos = TASKS[task]
    return TaskResult(task=task, label=label, probability=p_positive,
                      probabilities={neg: 1.0 - p_positive, pos: p_positive}, calibrated=True)


def test_who_cns5_no_1p19q_without_an_idh_mutation() -> None:
    """IDH-wildtype with 1p/19q co-deleted is not a WHO CNS5 category: 1p/19q is reported only with IDH-mutant."""
    from dicomnode.stages.infer import who_consistent

    grade = _task("grade", "HGG", 0.8)
    wild = [grade, _task("idh", "IDH-wildtype", 0.21), _task("1p19q", "1p/19q-codeleted", 0.61)]
    kept, flags = who_consistent(wild)
    assert [t.task for t in kept] == ["grade", "idh"]
    assert len(flags) == 1 and "IDH-wildtype (P = 0.79)" in flags[0] and "WHO CNS5" in flags[0]
    mutant = [grade, _task("idh", "IDH-mutant", 0.7), _task("1p19q", "1p/19q-codeleted", 0.61)]
    kept, flags = who_consistent(mutant)
    assert [t.task for t in kept] == ["grade", "idh", "1p19q"] and flags == []
    kept, flags = who_consistent([grade, _task("1p19q", "1p/19q-intact", 0.2)])
    assert [t.task for t in kept] == ["grade"] and "no IDH status" in flags[0]
    assert who_consistent([grade]) == ([grade], [])
