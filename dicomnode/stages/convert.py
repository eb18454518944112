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

One header pass: every file is read once with pydicom, and dicom2nifti converts
those same Dataset objects in memory (:class:`_ReadOnce`: no deep copy, native
pixel data decoded as pydicom does), with the validations the node has already
made switched off for the call, no LAS reorientation and one float32 write
(:func:`_run_dicom2nifti` says why each is safe). Measured on 240x240x155
(``benchmarks/convert.py``): about 5-6x bare dcm2niix per series, from 11-14x;
what remains is pydicom's parsing in Python (``docs/process.md``).

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

import contextlib
import copy
import dataclasses
import hashlib
import logging
import multiprocessing as mp
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import dicom2nifti.convert_dicom as dicom2nifti_convert
import dicom2nifti.settings as dicom2nifti_settings
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.tag import BaseTag, Tag

from dicomnode.handoff import (
    CONVERTED_NAME,
    ConvertedSeries,
    HandoffMissing,
    SourceImage,
    load_converted,
    save_converted,
)
from dicomnode.index.studies import VersionInfo
from dicomnode.logs import uid_tag as _uid_tag
from dicomnode.stages.context import StageContext, graded_inputs

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

# Looked up by tag, not keyword, in the loops over every slice: a third of the cost of ``ds.get(keyword)``.
_SOP_INSTANCE_UID = Tag("SOPInstanceUID")
_SOP_CLASS_UID = Tag("SOPClassUID")
_ROWS = Tag("Rows")
_COLUMNS = Tag("Columns")
_PER_FRAME = Tag("PerFrameFunctionalGroupsSequence")
_IMAGE_POSITION = Tag("ImagePositionPatient")
_IMAGE_ORIENTATION = Tag("ImageOrientationPatient")
_TRANSFER_SYNTAX = Tag("TransferSyntaxUID")
_PIXEL_DATA = Tag("PixelData")
_BITS_ALLOCATED = Tag("BitsAllocated")
_BITS_STORED = Tag("BitsStored")
_PIXEL_REPRESENTATION = Tag("PixelRepresentation")
_SAMPLES_PER_PIXEL = Tag("SamplesPerPixel")
_NUMBER_OF_FRAMES = Tag("NumberOfFrames")


def _get(ds: Dataset, tag: BaseTag) -> Any:
    """The element's value, None when absent (or empty)."""
    try:
        return ds[tag].value
    except KeyError:
        return None


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
        sop = str(_get(ds, _SOP_INSTANCE_UID) or "")
        cls = str(_get(ds, _SOP_CLASS_UID) or "")
        if not sop or not cls:
            raise _SeriesProblem("an instance has no SOPInstanceUID or SOPClassUID")
        rows, cols = int(_get(ds, _ROWS) or 0), int(_get(ds, _COLUMNS) or 0)
        sizes[(rows, cols)] = sizes.get((rows, cols), 0) + 1
        if _PER_FRAME in ds:
            for i, (ipp, iop) in enumerate(_frame_geometry(ds)):
                entries.append((sop, cls, i + 1, ipp, iop))
        else:
            ipp, iop = _get(ds, _IMAGE_POSITION), _get(ds, _IMAGE_ORIENTATION)
            if ipp is None or iop is None:
                raise _SeriesProblem("an instance has no ImagePositionPatient/ImageOrientationPatient")
            entries.append((sop, cls, None, _floats(ipp, 3, "ImagePositionPatient"),
                            _floats(iop, 6, "ImageOrientationPatient")))
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


class _ReadOnce(FileDataset):
    """A dataset the node read once and hands to dicom2nifti as it is: no second parse, no deep copy.

    Why a subclass: dicom2nifti 2.6.2 deep-copies every slice before it asks for
    its pixels (``common.get_volume_pixeldata``), only so that the decoded array
    is not cached on the caller's object; for a 155-slice series that copy was
    the largest single cost of the conversion (every element of every header
    copied). A shallow copy gives dicom2nifti the same guarantee: the copy's
    decoded array lives on the copy, the elements (never modified by dicom2nifti)
    are shared. And pydicom's generic decoder spends milliseconds per slice on
    bookkeeping to return what, for native little-endian monochrome data, is the
    PixelData bytes viewed as integers: :attr:`pixel_array` does exactly that
    (same dtype, shape and unused-bit correction as pydicom) and leaves every
    other encoding to pydicom.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _ReadOnce:
        return copy.copy(self)

    @property
    def pixel_array(self) -> np.ndarray:  # type: ignore[override]
        # Decoded once per object, as pydicom does: dicom2nifti asks a multi-frame object for its
        # pixel_array once per frame.
        cached: np.ndarray | None = self.__dict__.get("_read_once_pixels")
        if cached is None:
            cached = _native_pixels(self)
            if cached is None:
                return super().pixel_array  # pydicom keeps its own cache
            self._read_once_pixels = cached
        return cached


# Transfer syntaxes whose PixelData is the pixels themselves, little-endian, uncompressed.
_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The pixels as pydicom's numpy decoder returns them, for the plain case only; None otherwise.

    The plain case: little-endian uncompressed, one sample per pixel, 8/16/32
    bits allocated. pydicom then returns the bytes as (frames,) rows x columns
    of the integer type given by PixelRepresentation and BitsAllocated, with
    the bits above BitsStored cleared (or sign-extended): so does this.
    """
    meta = getattr(ds, "file_meta", None)
    data = _get(ds, _PIXEL_DATA)
    if meta is None or str(_get(meta, _TRANSFER_SYNTAX) or "") not in _NATIVE_LE or data is None:
        return None
    rows, cols = int(_get(ds, _ROWS) or 0), int(_get(ds, _COLUMNS) or 0)
    bits, stored = int(_get(ds, _BITS_ALLOCATED) or 0), int(_get(ds, _BITS_STORED) or 0)
    signed, samples = _get(ds, _PIXEL_REPRESENTATION), int(_get(ds, _SAMPLES_PER_PIXEL) or 1)
    frames = int(_get(ds, _NUMBER_OF_FRAMES) or 1)
    if bits not in (8, 16, 32) or not 0 < stored <= bits or signed not in (0, 1) or samples != 1 or rows < 1 \
            or cols < 1 or frames < 1:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = frames * rows * cols
    if len(data) < count * dtype.itemsize:
        return None  # short pixel data: pydicom's error message, not ours
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    arr = arr.copy()  # writeable and detached from the file's bytes, as pydicom returns it
    if stored < bits:
        shift = bits - stored
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


# dicom2nifti validations that repeat, on the same datasets, a check _source_images has already made
# (its raising is then unreachable; the pass over every slice is not):
# - validate_orientation: _source_images refuses mixed orientations (per image, or per frame of a
#   multi-frame object) within ORIENTATION_ATOL = 1e-3 per direction cosine, which is at least as
#   strict as dicom2nifti's allclose(rtol=1e-3, atol=1e-3).
# Left on (the node checks nothing equivalent): slice count (>= 4 images), orthogonality (gantry tilt),
# slice increment, multi-frame implicit VR; and resampling stays off (its default).
_NODE_CHECKED_VALIDATIONS: dict[str, bool] = {"validate_orientation": False}
_DICOM2NIFTI_SETTINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _dicom2nifti_settings() -> Iterator[None]:
    """dicom2nifti's settings are module globals: set ours for one call and restore, one call at a time."""
    with _DICOM2NIFTI_SETTINGS_LOCK:
        saved = {name: getattr(dicom2nifti_settings, name) for name in _NODE_CHECKED_VALIDATIONS}
        try:
            for name, value in _NODE_CHECKED_VALIDATIONS.items():
                setattr(dicom2nifti_settings, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(dicom2nifti_settings, name, value)


def _tmp_name(out_file: Path) -> Path:
    # The suffix decides compression in nibabel and dcm2niix; keep it, prefix a hidden tmp marker.
    return out_file.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{out_file.name}")


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def _run_dicom2nifti(datasets: list[Dataset], out_file: Path) -> None:
    """dicom2nifti on the datasets the node read, in memory; the node writes the one file.

    ``reorient_nifti=False``: dicom2nifti's LAS reorientation permutes and flips
    the whole array and writes the file a second time; every reader of these
    volumes (the preprocessing spec's ``reorient`` to RAS, nibabel) goes by the
    affine, and the dcm2niix fallback writes its own orientation anyway.
    ``output_file=None``: dicom2nifti would write float64 when a rescale slope
    is fractional (every MR series here); every reader loads float32
    (``get_fdata(dtype=float32)``, ``dataobj`` as float32), so float32 on disk
    gives them the same values in half the bytes.
    """
    with _dicom2nifti_settings():
        img = dicom2nifti_convert.dicom_array_to_nifti(datasets, None, reorient_nifti=False)["NII"]
    if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise RuntimeError(f"made a volume of shape {list(img.shape)}, expected 3D")  # and wrote nothing
    if img.get_data_dtype() == np.float64:
        img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine, img.header)
        img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1, 0)  # what dicom2nifti sets before it writes: the data are the values
    img.header.set_xyzt_units(2)  # mm
    tmp = _tmp_name(out_file)
    try:
        img.to_filename(str(tmp))
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
    img = nib.load(str(path))
    shape = [int(n) for n in img.shape]
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise RuntimeError(f"wrote a volume of shape {shape}, expected 3D")
    return shape[:3], [[float(v) for v in row] for row in np.asarray(img.affine, dtype=np.float64)]


def _fingerprint(files: Sequence[Path]) -> str:
    """sha256 over (resolved path, size, mtime) of every file, in path order.

    The same value as resolving each path in full, at a fraction of the system
    calls: a folder is resolved once (a series' files share one), and a file
    that is not itself a link resolves to its resolved folder plus its name.
    """
    folders: dict[Path, Path] = {}
    entries: list[tuple[str, str]] = []
    for p in files:
        p = Path(p)
        try:
            st = os.lstat(p)
        except OSError:
            st = None
        if st is None or stat.S_ISLNK(st.st_mode):
            f = str(p.resolve())
            try:
                st = os.stat(f)
            except OSError:
                st = None
        else:
            if p.parent not in folders:
                folders[p.parent] = p.parent.resolve()
            f = str(folders[p.parent] / p.name)
        entries.append((f, f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n" if st is not None else f"{f}\0missing\n"))
    h = hashlib.sha256()
    for _, line in sorted(entries):
        h.update(line.encode())
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
    result = _convert_series(files, out_file, role=role, series_instance_uid=series_instance_uid,
                             converters=converters)
    _log_result(result)
    return result


def _log_result(result: ConvertedSeries) -> None:
    """Logged by the process that asked for the conversion (a pool worker's logging is not configured)."""
    if result.error is not None:
        log.warning("series %s (%s): not converted: %s", result.role, _uid_tag(result.series_instance_uid),
                    result.error)
    else:
        log.info("series %s (%s): %s in %.2f s, shape %s", result.role, _uid_tag(result.series_instance_uid),
                 result.converter, result.seconds, result.shape)


def _convert_series(files: Sequence[Path], out_file: Path, *, role: str, series_instance_uid: str,
                    converters: Sequence[str] = CONVERTERS) -> ConvertedSeries:
    """:func:`convert_series` without the log line."""
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
        return ConvertedSeries(role=role, series_instance_uid=series_instance_uid, error=error,
                               seconds=round(time.perf_counter() - t0, 4), n_files=len(files),
                               fingerprint=_fingerprint(files), **found)

    if not files:
        return done("no files")
    datasets: list[Dataset] = []
    headers_only = DICOM2NIFTI not in converters  # dcm2niix reads the pixels itself
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=headers_only)
        except Exception as exc:  # any unreadable file: the series is not convertible as given
            return done(f"unreadable DICOM file {f.name}: {_short(exc)}")
        ds.__class__ = _ReadOnce  # the one read of this file; dicom2nifti gets this object (see _ReadOnce)
        datasets.append(ds)
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


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Cores nobody is using now: usable cores less the 1-minute load average (at least 1).

    Why the load and not just the core count: measured on the 2-core shared
    machine (load 6-8), converting a version's 4 series in 2 processes or 2
    threads was slower than one after the other (``benchmarks/convert.py``);
    a pool pays only where a core would otherwise idle.
    """
    cores = _usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume busy
        return 1
    return max(1, min(cores, round(cores - load)))


def _pool_context() -> BaseContext:
    """Processes started by a fork server that has already imported this module.

    Why not threads: dicom2nifti and pydicom are mostly Python and hold the GIL.
    Why not ``fork``: the Celery worker that runs this stage has threads (and may
    hold a CUDA context), and forking a threaded process can deadlock the child.
    Why not ``spawn``: every worker would import this module afresh (measured:
    about 4 s on the shared machine, more than a version's conversion). The fork
    server imports it once, the first time a pool is needed, and forks each
    worker from a process that has no threads.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # takes effect only before the server starts: harmless afterwards
    return ctx


def _convert_job(job: tuple[list[Path], Path, str, str]) -> ConvertedSeries:
    files, out_file, role, uid = job
    return _convert_series(files, out_file, role=role, series_instance_uid=uid)


def _convert_jobs(jobs: dict[str, tuple[list[Path], Path, str, str]], workers: int) -> dict[str, ConvertedSeries]:
    """Each role's conversion, in ``workers`` processes when more than one; results in ``jobs``' order."""
    if workers > 1 and len(jobs) > 1:
        try:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_pool_context())
        except (OSError, ValueError) as exc:  # no fork server here (platform, sandbox): one after the other
            log.warning("convert: no process pool (%s); converting one series after the other", _short(exc))
        else:
            with pool:
                futures = {role: pool.submit(_convert_job, job) for role, job in jobs.items()}
                return {role: f.result() for role, f in futures.items()}
    return {role: _convert_job(job) for role, job in jobs.items()}


def convert_version(series: Mapping[str, tuple[str, Sequence[Path]]], work_dir: Path, *,
                    workers: int | None = None) -> dict[str, ConvertedSeries]:
    """Convert each role's series into ``work_dir/<role>.nii``; idempotent through ``work_dir``'s manifest.

    ``series``: role -> (SeriesInstanceUID, files). A role whose series and
    files are unchanged since a successful earlier run is reused, not
    converted again (the manifest records a fingerprint of the files); failed
    conversions are retried, since their cause may have been transient.
    ``workers``: processes converting the series side by side; None = the idle
    cores (:func:`default_workers`), 1 = one after the other. The volumes and
    records are the same either way.
    """
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(work_dir)
    out: dict[str, ConvertedSeries] = {}
    jobs: dict[str, tuple[list[Path], Path, str, str]] = {}
    for role, (uid, files) in series.items():
        if not _ROLE_NAME.match(role):
            raise ValueError(f"role must be a short identifier (it names a file), got {role!r}")
        files = [Path(f) for f in files]
        reused = _reusable(previous.get(role), uid, files)
        if reused is not None:
            out[role] = reused
            continue
        jobs[role] = (files, work_dir / f"{role}.nii", role, uid)
    if jobs:
        n = workers if workers is not None else default_workers()
        for role, result in _convert_jobs(jobs, n).items():
            _log_result(result)
            out[role] = result
    out = {role: out[role] for role in series}  # the caller's order, whatever finished first
    save_converted(work_dir, out)
    return out


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """The convert stage: every selected grading series to NIfTI, once; its hand-off is the manifest.

    The only stage that converts: preprocess, infer and report read
    :func:`dicomnode.handoff.load_converted`. A series that cannot be converted
    is recorded with its reason (the version is graded without it, and the SR
    says so); only a failure of the stage itself (disk, a bug) fails the step,
    visibly and retryably as ``convert``.

    One series after another (``workers=1``): a pool was slower than serial on
    the 2-core machine we measured (``benchmarks/convert.py``), the worker
    already runs ``worker_concurrency`` steps side by side, and a fork server
    per worker process is one more thing to outlive a ``kill -9``. Scripts and
    the benchmark can ask for more.
    """
    converted = convert_version(graded_inputs(ctx, info), ctx.nifti_dir(info), workers=1)
    return {role: {"converter": c.converter, "error": c.error, "seconds": round(c.seconds, 3)}
            for role, c in converted.items()}
