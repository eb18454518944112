"""DICOM series -> NIfTI volume, with the source images kept addressable for the report.

Why this stage keeps more than the NIfTI: the report must point at the source
images a model looked at (MMDLM's key slices), and the models see a resampled
grid, not the source slices. So each converted series records every source
image (instance, or frame of a multi-frame instance, 1-based) with its position
along the series' slice normal; :meth:`ConvertedSeries.nearest` maps any world
point back to the source image whose plane is closest to it.

Converters: ``dicom2nifti`` (in-process, pure Python) first, ``dcm2niix`` (the
Debian binary) as the fallback. Measured on synthetic studies (48x48x32,
``benchmarks/convert.py`` for 240x240x155): dicom2nifti 2.6.2 converts classic
Siemens/GE/Philips series and Siemens/Philips Enhanced MR, but fails on GE-style
Enhanced MR in about 2 ms (its GE path reads a top-level ImagePositionPatient
before it looks for frames), so Enhanced objects also try dicom2nifti first:
the failed attempt costs nothing measurable and the rule stays one rule. Every
failed attempt is recorded in ``attempts``.

Bad data never raises: a series that cannot be converted (one image, mixed
orientations or image sizes, unreadable files, both converters failing) comes
back with ``error`` set to one sentence an operator can act on. Programming
errors (a bad argument) still raise.

Files: written to a temporary name in the target directory, then renamed, so
a reader never sees half a volume. :func:`convert_version` keeps a manifest in
its work directory and reuses a conversion whose inputs (paths, sizes,
modification times) are unchanged, so a re-delivered Celery task is cheap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.index.studies import VersionInfo
from dicomnode.logs import uid_tag as _uid_tag
from dicomnode.stages.context import StageContext, graded_inputs
from dicomnode.handoff import CONVERTED_NAME, ConvertedSeries, HandoffMissing, SourceImage, load_converted, save_converted  # noqa: F401

log = logging.getLogger(__name__)

MANIFEST_NAME = CONVERTED_NAME  # the hand-off file (dicomnode.handoff)
DICOM2NIFTI = "dicom2nifti"
DCM2NIIX = "dcm2niix"
CONVERTERS: tuple[str, ...] = (DICOM2NIFTI, DCM2NIIX)
# Two image orientations are "the same" within this (direction cosines, unitless).
ORIENTATION_ATOL = 1e-3
DCM2NIIX_TIMEOUT_S = 300.0
_ROLE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")


class _SeriesProblem(Exception):
    """Bad data in a series: becomes ``ConvertedSeries.error``, never escapes this module."""


# --------------------------------------------------------------------------- reading the headers


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _SeriesProblem(f"{what} is not numeric") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise _SeriesProblem(f"{what} must be {n} finite numbers")
    return arr


def _first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _frame_geometry(ds: Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ImagePositionPatient, ImageOrientationPatient) per frame of a multi-frame object."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise _SeriesProblem(f"multi-frame object has {n} frames but {len(per_frame)} per-frame items")
    shared_iop = _first_item(shared, "PlaneOrientationSequence")
    out = []
    for i, item in enumerate(per_frame):
        pos = _first_item(item, "PlanePositionSequence")
        ori = _first_item(item, "PlaneOrientationSequence") or shared_iop
        if pos is None or "ImagePositionPatient" not in pos:
            raise _SeriesProblem(f"frame {i + 1} has no PlanePositionSequence/ImagePositionPatient")
        if ori is None or "ImageOrientationPatient" not in ori:
            raise _SeriesProblem(f"frame {i + 1} has no PlaneOrientationSequence/ImageOrientationPatient")
        out.append((_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient"),
                    _floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient")))
    return out


def _source_images(datasets: Sequence[Dataset]) -> tuple[list[SourceImage], list[float]]:
    """Every image of the series with its position along the slice normal; checks one orientation and size."""
    entries: list[tuple[str, str, int | None, np.ndarray, np.ndarray]] = []
    sizes: dict[tuple[int, int], int] = {}
    for ds in datasets:
        sop = str(ds.get("SOPInstanceUID", ""))
        cls = str(ds.get("SOPClassUID", ""))
        if not sop or not cls:
            raise _SeriesProblem("an instance has no SOPInstanceUID or SOPClassUID")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        sizes[(rows, cols)] = sizes.get((rows, cols), 0) + 1
        if "PerFrameFunctionalGroupsSequence" in ds:
            for i, (ipp, iop) in enumerate(_frame_geometry(ds)):
                entries.append((sop, cls, i + 1, ipp, iop))
        else:
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                raise _SeriesProblem("an instance has no ImagePositionPatient/ImageOrientationPatient")
            entries.append((sop, cls, None, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
                            _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")))
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c} in {n}" for (r, c), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        raise _SeriesProblem(f"mixed image sizes (rows x columns: {desc} files); not one volume")
    if len(entries) < 2:
        raise _SeriesProblem(f"{len(entries)} image(s): a single slice is not a volume")
    iop0 = entries[0][4]
    differing = sum(1 for e in entries if np.abs(e[4] - iop0).max() > ORIENTATION_ATOL)
    if differing:
        raise _SeriesProblem(f"mixed image orientations ({differing} of {len(entries)} images differ from the "
                             f"first); not one volume")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise _SeriesProblem("ImageOrientationPatient rows and columns are parallel")
    normal /= norm
    images = [SourceImage(sop, cls, frame, float(ipp @ normal), [float(v) for v in ipp])
              for sop, cls, frame, ipp, _ in entries]
    images.sort(key=lambda im: (im.position, im.sop_instance_uid, im.frame or 0))
    pos = np.array([im.position for im in images])
    if np.unique(np.round(pos, 3)).size < 2:
        raise _SeriesProblem(f"all {len(images)} images lie in one plane; not a volume")
    return images, [float(v) for v in normal]


# --------------------------------------------------------------------------- the converters


def _tmp_name(out_file: Path) -> Path:
    # The suffix decides compression in nibabel and dcm2niix; keep it, prefix a hidden tmp marker.
    return out_file.with_name(f".tmp-{os.getpid()}-{out_file.name}")


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _run_dicom2nifti(datasets: list[Dataset], out_file: Path) -> None:
    import dicom2nifti.convert_dicom as convert_dicom  # heavy import; only where conversion runs

    tmp = _tmp_name(out_file)
    try:
        convert_dicom.dicom_array_to_nifti(datasets, str(tmp), reorient_nifti=True)
        if not tmp.exists():
            raise RuntimeError("dicom2nifti wrote no file")
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)


def _run_dcm2niix(files: Sequence[Path], out_file: Path) -> None:
    """dcm2niix on exactly these files: it reads directories, so the files are linked into a private one."""
    exe = shutil.which(DCM2NIIX)
    if exe is None:
        raise RuntimeError("dcm2niix is not installed")
    with tempfile.TemporaryDirectory(prefix="dcm2niix-", dir=out_file.parent) as work:
        src, dst = Path(work) / "in", Path(work) / "out"
        src.mkdir()
        dst.mkdir()
        for i, f in enumerate(files):
            link = src / f"{i:06d}.dcm"
            try:
                os.symlink(Path(f).resolve(), link)
            except OSError:
                shutil.copyfile(f, link)
        gz = "y" if _nifti_suffix(out_file) == ".nii.gz" else "n"
        proc = subprocess.run([exe, "-z", gz, "-b", "n", "-f", "volume", "-o", str(dst), str(src)],
                              capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT_S)
        outputs = sorted(p for p in dst.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if proc.returncode != 0 or not outputs:
            tail = " | ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                              if "rror" in line or "arning" in line)[-300:]
            raise RuntimeError(f"exit status {proc.returncode}, {len(outputs)} volume(s)"
                               + (f": {tail}" if tail else ""))
        if len(outputs) > 1:
            raise RuntimeError(f"split the series into {len(outputs)} volumes "
                               f"({', '.join(p.name for p in outputs)}); not one volume")
        tmp = _tmp_name(out_file)
        shutil.move(str(outputs[0]), tmp)
        os.replace(tmp, out_file)


def _nifti_geometry(path: Path) -> tuple[list[int], list[list[float]]]:
    import nibabel as nib

    img = nib.load(str(path))
    shape = [int(n) for n in img.shape]
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise RuntimeError(f"wrote a volume of shape {shape}, expected 3D")
    return shape[:3], [[float(v) for v in row] for row in np.asarray(img.affine, dtype=np.float64)]


def _fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(str(Path(p).resolve()) for p in files):
        try:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}" if not isinstance(exc, _SeriesProblem) else text[:300]


def convert_series(files: Sequence[Path], out_file: Path, *, role: str, series_instance_uid: str,
                   converters: Sequence[str] = CONVERTERS) -> ConvertedSeries:
    """Convert one series to ``out_file`` (``.nii`` or ``.nii.gz``): dicom2nifti, then dcm2niix.

    ``converters`` names which to try, in order (benchmarks and tests pin one).
    Never raises for bad data: the result's ``error`` says why there is no
    volume. The source images are read from the headers whichever converter
    runs, so the report can cite them even when the conversion failed.
    """
    out_file = Path(out_file)
    if not out_file.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"out_file must end in .nii or .nii.gz, got {out_file.name}")
    unknown = [c for c in converters if c not in CONVERTERS]
    if unknown or not converters:
        raise ValueError(f"converters must be some of {CONVERTERS}, got {list(converters)}")
    files = [Path(f) for f in files]
    t0 = time.perf_counter()
    found: dict[str, Any] = {"images": [], "normal": None, "attempts": [], "shape": None, "affine": None,
                             "converter": None, "nifti": None}

    def done(error: str | None) -> ConvertedSeries:
        result = ConvertedSeries(role=role, series_instance_uid=series_instance_uid, error=error,
                                 seconds=round(time.perf_counter() - t0, 4), n_files=len(files),
                                 fingerprint=_fingerprint(files), **found)
        if error is not None:
            log.warning("series %s (%s): not converted: %s", role, _uid_tag(series_instance_uid), error)
        else:
            log.info("series %s (%s): %s in %.2f s, shape %s", role, _uid_tag(series_instance_uid),
                     result.converter, result.seconds, result.shape)
        return result

    if not files:
        return done("no files")
    datasets: list[Dataset] = []
    headers_only = DICOM2NIFTI not in converters  # dcm2niix reads the pixels itself
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=headers_only))
        except Exception as exc:  # any unreadable file: the series is not convertible as given
            return done(f"unreadable DICOM file {f.name}: {_short(exc)}")
    other = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets} - {series_instance_uid}
    if other:
        return done(f"{sum(str(ds.get('SeriesInstanceUID', '')) != series_instance_uid for ds in datasets)} "
                    f"file(s) belong to another series")
    try:
        found["images"], found["normal"] = _source_images(datasets)
    except _SeriesProblem as exc:
        return done(str(exc))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    runners = {DICOM2NIFTI: lambda: _run_dicom2nifti(datasets, out_file),
               DCM2NIIX: lambda: _run_dcm2niix(files, out_file)}
    for name in converters:
        run = runners[name]
        try:
            run()
            found["shape"], found["affine"] = _nifti_geometry(out_file)
        except Exception as exc:  # a converter's failure on this data: try the next one
            found["attempts"].append(f"{name}: {_short(exc)}")
            continue
        found["converter"], found["nifti"] = name, str(out_file.resolve())
        return done(None)
    return done("no converter could convert the series (" + "; ".join(found["attempts"]) + ")")


# --------------------------------------------------------------------------- one study version


def _read_manifest(work_dir: Path) -> dict[str, Any]:
    """The previous run's entries as plain data (an unreadable or foreign manifest: nothing to reuse)."""
    try:
        return {role: dataclasses.asdict(c) for role, c in load_converted(work_dir).items()}
    except (HandoffMissing, TypeError, ValueError, KeyError):
        return {}


def _reusable(entry: Any, series_uid: str, files: Sequence[Path]) -> ConvertedSeries | None:
    try:
        prev = ConvertedSeries.from_json(entry)
    except (TypeError, ValueError, KeyError):
        return None
    if (not prev.ok or prev.series_instance_uid != series_uid or prev.fingerprint != _fingerprint(files)
            or prev.n_files != len(files) or not Path(prev.nifti or "").is_file()):
        return None
    return prev


def convert_version(series: Mapping[str, tuple[str, Sequence[Path]]], work_dir: Path) -> dict[str, ConvertedSeries]:
    """Convert each role's series into ``work_dir/<role>.nii``; idempotent through ``work_dir``'s manifest.

    ``series``: role -> (SeriesInstanceUID, files). A role whose series and
    files are unchanged since a successful earlier run is reused, not
    converted again (the manifest records a fingerprint of the files); failed
    conversions are retried, since their cause may have been transient.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(work_dir)
    out: dict[str, ConvertedSeries] = {}
    for role, (uid, files) in series.items():
        if not _ROLE_NAME.match(role):
            raise ValueError(f"role must be a short identifier (it names a file), got {role!r}")
        files = [Path(f) for f in files]
        reused = _reusable(previous.get(role), uid, files)
        if reused is not None:
            out[role] = reused
            continue
        out[role] = convert_series(files, work_dir / f"{role}.nii", role=role, series_instance_uid=uid)
    save_converted(work_dir, out)
    return out


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """The convert stage: every selected grading series to NIfTI, once; its hand-off is the manifest.

    The only stage that converts: preprocess, infer and report read
    :func:`dicomnode.handoff.load_converted`. A series that cannot be converted
    is recorded with its reason (the version is graded without it, and the SR
    says so); only a failure of the stage itself (disk, a bug) fails the step,
    visibly and retryably as ``convert``.
    """
    converted = convert_version(graded_inputs(ctx, info), ctx.nifti_dir(info))
    return {role: {"converter": c.converter, "error": c.error, "seconds": round(c.seconds, 3)}
            for role, c in converted.items()}
