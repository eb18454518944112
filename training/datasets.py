"""Readers that turn data on disk into ``list[Case]``, failing loudly and precisely.

Layouts read (see docs/training-data.md for every column and rule):

- BraTS2020 training: ``BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii[.gz]``
  with ``name_mapping.csv`` (its ``Grade`` column); an optional ``labels.csv``
  next to it adds molecular labels (the synthetic cohort writes one).
- BraTS2018/2019: ``HGG/<case>/<case>_{t1,...}.nii.gz`` and ``LGG/...``; the
  folder is the grade.
- A site manifest CSV: one row per case, a path per role, labels grade / idh / 1p19q.
- UCSF-PDGM: ``UCSF-PDGM-NNNN_nifti/UCSF-PDGM-NNNN_{T1,T1c,T2,FLAIR,tumor_segmentation}.nii.gz``
  plus its metadata CSV (``ID``, ``WHO CNS Grade``, ``IDH``, ``1p/19q``).

Why so strict: a case with a missing file, a role on another grid or a label
typo found in hour three of a training run costs the run; found here it costs
a line in a CSV. Every problem raises :class:`DatasetError`, which names the
file, the row and the case, and says what is wrong. Geometry is checked from
NIfTI headers only by default (cheap: no voxel data is read); ``verify="data"``
also reads every voxel, which catches truncated files.
"""
from __future__ import annotations

import csv
import gzip
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from .cases import BRATS_SUFFIX, ROLES, TASKS, Case, LabelError, check_unique, is_missing, label_name, parse_label

Verify = Literal["none", "header", "data"]

#: BraTS2020 name_mapping.csv header (the real file's columns, in order)
NAME_MAPPING_HEADER: tuple[str, ...] = (
    "Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID", "BraTS_2020_subject_ID",
)
#: manifest columns per role (lower case; header matching is case-insensitive)
MANIFEST_ROLE_COLUMNS: dict[str, str] = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}
#: UCSF-PDGM file suffix per role
UCSF_SUFFIX: dict[str, str] = {"T1": "T1", "T1CE": "T1c", "T2": "T2", "FLAIR": "FLAIR"}

_AFFINE_TOL_MM = 1e-3   # roles of one case must agree to a micrometre: they are one grid
_NIFTI_EXT = (".nii.gz", ".nii")


class DatasetError(ValueError):
    """A data problem, with where it is: ``path``, ``row`` (1-based CSV line), ``case_id``.

    The message reads "<path>, row N, case X: what is wrong", so it can be
    acted on without a debugger.
    """

    def __init__(self, problem: str, *, path: Path | str | None = None, row: int | None = None,
                 case_id: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.row = row
        self.case_id = case_id
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if case_id is not None:
            where.append(f"case {case_id}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


# --------------------------------------------------------------------------- files and geometry
def _nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists (gz preferred)."""
    for ext in _NIFTI_EXT:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _load_header(path: Path, case_id: str, verify: Verify) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape (3D, a trailing singleton dropped) and affine of a NIfTI file, or a DatasetError."""
    if not path.is_file():
        raise DatasetError("file not found", path=path, case_id=case_id)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=float)
        if verify == "data":
            data = np.asanyarray(img.dataobj)
            if data.size and not np.isfinite(data).any():
                raise DatasetError("no finite voxel values", path=path, case_id=case_id)
    except DatasetError:
        raise
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, gzip.BadGzipFile, zlib.error,
            ValueError, TypeError) as exc:
        raise DatasetError(f"unreadable NIfTI ({type(exc).__name__}: {exc})", path=path,
                           case_id=case_id) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DatasetError(f"not a NIfTI image ({type(img).__name__})", path=path, case_id=case_id)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DatasetError(f"expected a 3D volume, got shape {shape}", path=path, case_id=case_id)
    if not np.isfinite(affine).all():
        raise DatasetError("affine has non-finite values", path=path, case_id=case_id)
    return shape, affine


def check_geometry(case_id: str, images: Mapping[str, Path], seg: Path | None,
                   verify: Verify = "header") -> None:
    """Every role (and the segmentation) of one case must be readable 3D NIfTI on ONE grid.

    The BraTS convention is co-registered volumes of one shape; a role on
    another grid would be silently mis-aligned by a channel stack, so it is an
    error here. Sites whose roles differ in grid resample first (the models'
    ``resample`` transform does that at preprocessing; the manifest reader
    accepts ``same_grid=False`` for such data).
    """
    if verify == "none":
        return
    ref: tuple[str, tuple[int, ...], np.ndarray] | None = None
    items: list[tuple[str, Path]] = list(images.items())
    if seg is not None:
        items.append(("seg", seg))
    for role, path in items:
        shape, affine = _load_header(path, case_id, verify)
        if ref is None:
            ref = (role, shape, affine)
            continue
        if shape != ref[1]:
            raise DatasetError(f"shape {shape} of {role} differs from {ref[1]} of {ref[0]}: "
                               f"the roles of a case must share one grid", path=path, case_id=case_id)
        if not np.allclose(affine, ref[2], atol=_AFFINE_TOL_MM, rtol=0):
            raise DatasetError(f"affine of {role} differs from that of {ref[0]} (max difference "
                               f"{float(np.abs(affine - ref[2]).max()):.4g} mm): the roles of a case "
                               f"must share one grid", path=path, case_id=case_id)


def _check_headers_only(images: Mapping[str, Path], seg: Path | None, case_id: str, verify: Verify) -> None:
    """Readability and 3D-ness per file, without requiring one shared grid."""
    if verify == "none":
        return
    for path in [*images.values(), *([seg] if seg is not None else [])]:
        _load_header(path, case_id, verify)


# --------------------------------------------------------------------------- CSV
def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs; BOM-tolerant; a clear error on a broken file."""
    if not path.is_file():
        raise DatasetError("file not found", path=path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DatasetError("empty CSV file (no header)", path=path) from None
            rows: list[tuple[int, dict[str, str]]] = []
            for values in reader:
                line = reader.line_num
                if not any(v.strip() for v in values):
                    continue
                if len(values) > len(header):
                    raise DatasetError(f"{len(values)} values but the header has {len(header)} columns",
                                       path=path, row=line)
                values = values + [""] * (len(header) - len(values))
                rows.append((line, {h: v.strip() for h, v in zip(header, values)}))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not a UTF-8 text CSV ({exc})", path=path) from exc
    except csv.Error as exc:
        raise DatasetError(f"malformed CSV ({exc})", path=path) from exc
    return header, rows


def _column(header: Sequence[str], *names: str) -> str | None:
    """The header entry matching any of ``names`` case- and space-insensitively."""
    norm = {"".join(h.lower().split()): h for h in header}
    for n in names:
        hit = norm.get("".join(n.lower().split()))
        if hit is not None:
            return hit
    return None


def _parse(task: str, value: str, *, path: Path, row: int, case_id: str | None, column: str) -> int | None:
    try:
        return parse_label(task, value)
    except LabelError as exc:
        raise DatasetError(f"column {column!r}: {exc}", path=path, row=row, case_id=case_id) from exc


def read_labels_csv(path: str | Path, *, key: str = "case_id") -> dict[str, dict[str, int | None]]:
    """A labels file: ``case_id`` (or ``key``) plus any of ``grade``, ``idh``, ``1p19q``.

    Why a separate file: the BraTS layout has no molecular labels, and a site's
    converted studies carry none; labels arrive from pathology as a table.
    Values parse like the manifest's (HGG/LGG/1/0, mutant/wildtype/1/0,
    codeleted/intact/1/0, missing allowed).
    """
    path = Path(path)
    header, rows = _read_csv(path)
    kcol = _column(header, key)
    if kcol is None:
        raise DatasetError(f"no {key!r} column (header: {', '.join(header)})", path=path)
    cols = {task: _column(header, *_TASK_COLUMNS[task]) for task in TASKS}
    if not any(cols.values()):
        raise DatasetError(f"no label column (expected any of grade, idh, 1p19q; header: {', '.join(header)})",
                           path=path)
    out: dict[str, dict[str, int | None]] = {}
    for line, row in rows:
        cid = row[kcol]
        if not cid:
            raise DatasetError(f"empty {key!r}", path=path, row=line)
        if cid in out:
            raise DatasetError(f"{key} {cid!r} appears twice", path=path, row=line, case_id=cid)
        out[cid] = {task: _parse(task, row[c], path=path, row=line, case_id=cid, column=c)
                    for task, c in cols.items() if c is not None}
    return out


_TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "grade": ("grade",),
    "idh": ("idh", "idh_status"),
    "1p19q": ("1p19q", "1p/19q", "codeletion", "1p19q_status"),
}


def _merge_labels(case_id: str, base: dict[str, int | None], extra: Mapping[str, int | None],
                  path: Path) -> dict[str, int | None]:
    """Add labels from a labels file; a contradiction (HGG here, LGG there) is an error."""
    out = dict(base)
    for task, v in extra.items():
        if v is None:
            continue
        if out.get(task) is not None and out[task] != v:
            raise DatasetError(f"{task} is {label_name(task, v)} here but {label_name(task, out[task])} "
                               f"in the dataset's own labels", path=path, case_id=case_id)
        out[task] = v
    return out


# --------------------------------------------------------------------------- BraTS2020
_BRATS20_RE = re.compile(r"^BraTS20_(Training|Validation)_(\d+)$")
# Case 355 in some copies: the segmentation is named after the original scan
# ("W39_1998.09.19_Segm.nii") instead of "<case>_seg.nii".
_ODD_SEG_RE = re.compile(r"(?i).*seg(m|mentation)?\.nii(\.gz)?$")


def _seg_file(folder: Path, case_id: str) -> Path | None:
    """``<case>_seg.nii[.gz]``, or the one odd ``*Segm.nii`` file some copies have (case 355)."""
    std = _nifti(folder, f"{case_id}_seg")
    if std is not None:
        return std
    role_files = {f"{case_id}_{s}{e}".lower() for s in BRATS_SUFFIX.values() for e in _NIFTI_EXT}
    odd = sorted(p for p in folder.iterdir()
                 if p.is_file() and _ODD_SEG_RE.match(p.name) and p.name.lower() not in role_files)
    if len(odd) == 1:
        return odd[0]
    if len(odd) > 1:
        raise DatasetError(f"several candidate segmentation files ({', '.join(p.name for p in odd)}) "
                           f"and no {case_id}_seg.nii.gz", path=folder, case_id=case_id)
    return None


def _brats_case_files(folder: Path, case_id: str, *, require_seg: bool) -> tuple[dict[str, Path], Path | None]:
    images: dict[str, Path] = {}
    for role, suffix in BRATS_SUFFIX.items():
        p = _nifti(folder, f"{case_id}_{suffix}")
        if p is None:
            raise DatasetError(f"missing {role} file {case_id}_{suffix}.nii.gz (or .nii)",
                               path=folder, case_id=case_id)
        images[role] = p
    seg = _seg_file(folder, case_id)
    if seg is None and require_seg:
        raise DatasetError(f"missing segmentation {case_id}_seg.nii.gz (or .nii)", path=folder, case_id=case_id)
    return images, seg


def _read_name_mapping(path: Path) -> dict[str, tuple[int | None, str | None]]:
    """BraTS_2020_subject_ID -> (grade, TCGA/TCIA subject id or None)."""
    header, rows = _read_csv(path)
    gcol = _column(header, "Grade")
    idcol = _column(header, "BraTS_2020_subject_ID")
    if gcol is None or idcol is None:
        raise DatasetError(f"needs columns Grade and BraTS_2020_subject_ID (header: {', '.join(header)})",
                           path=path)
    tcol = _column(header, "TCGA_TCIA_subject_ID")
    out: dict[str, tuple[int | None, str | None]] = {}
    for line, row in rows:
        cid = row[idcol]
        if not cid:
            raise DatasetError("empty BraTS_2020_subject_ID", path=path, row=line)
        grade = _parse("grade", row[gcol], path=path, row=line, case_id=cid, column=gcol)
        tcga = row.get(tcol, "") if tcol else ""
        out[cid] = (grade, None if is_missing(tcga) else tcga)
    return out


def read_brats2020(root: str | Path, *, name_mapping: str | Path | None = None,
                   labels: str | Path | None = None, require_grade: bool = True,
                   require_seg: bool = False, verify: Verify = "header") -> list[Case]:
    """Read a BraTS2020 training folder (``MICCAI_BraTS2020_TrainingData``).

    ``name_mapping`` defaults to ``root/name_mapping.csv``; ``labels`` (a
    labels file, see :func:`read_labels_csv`) defaults to ``root/labels.csv``
    when that exists. Every case folder must have a name_mapping row (or
    ``require_grade=False`` for unlabelled copies such as the validation set),
    and every name_mapping row must have a folder: a partial copy is an error,
    not a smaller dataset. ``patient_id`` is the TCGA/TCIA subject ID when the
    mapping gives one (it identifies the patient across BraTS editions), else
    the case id.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("not a folder", path=root)
    found = [(m, p) for p in root.iterdir() if p.is_dir() and (m := _BRATS20_RE.match(p.name))]
    folders = [p for m, p in sorted(found, key=lambda mp: (mp[0].group(1), int(mp[0].group(2))))]
    if not folders:
        raise DatasetError("no BraTS20_Training_NNN case folders", path=root)
    nm_path = Path(name_mapping) if name_mapping is not None else root / "name_mapping.csv"
    mapping: dict[str, tuple[int | None, str | None]] = {}
    if nm_path.is_file():
        mapping = _read_name_mapping(nm_path)
    elif require_grade:
        raise DatasetError("name_mapping.csv not found (it holds the Grade column); pass "
                           "name_mapping=... or require_grade=False", path=nm_path)
    lab_path = Path(labels) if labels is not None else root / "labels.csv"
    extra: dict[str, dict[str, int | None]] = {}
    if labels is not None or lab_path.is_file():
        extra = read_labels_csv(lab_path)
    cases: list[Case] = []
    names = {f.name for f in folders}
    if mapping and require_grade:
        orphans = sorted(set(mapping) - names)
        if orphans:
            raise DatasetError(f"{len(orphans)} name_mapping row(s) without a case folder, e.g. "
                               f"{', '.join(orphans[:3])}", path=nm_path)
    unknown = sorted(set(extra) - names)
    if unknown:
        raise DatasetError(f"{len(unknown)} labels row(s) for cases that are not here, e.g. "
                           f"{', '.join(unknown[:3])}", path=lab_path)
    for folder in folders:
        cid = folder.name
        if cid not in mapping and require_grade:
            raise DatasetError("no row in name_mapping.csv", path=nm_path, case_id=cid)
        grade, tcga = mapping.get(cid, (None, None))
        lab = _merge_labels(cid, {"grade": grade}, extra.get(cid, {}), lab_path)
        images, seg = _brats_case_files(folder, cid, require_seg=require_seg)
        check_geometry(cid, images, seg, verify)
        cases.append(Case(case_id=cid, patient_id=tcga or cid, images=images, seg=seg, labels=lab,
                          source="brats2020", meta={} if tcga is None else {"tcga_id": tcga}))
    check_unique(cases)
    return cases


# --------------------------------------------------------------------------- BraTS2018/2019
def read_brats_hgg_lgg(root: str | Path, *, labels: str | Path | None = None, require_seg: bool = False,
                       verify: Verify = "header") -> list[Case]:
    """Read the BraTS2018/2019 layout: ``root/HGG/<case>/<case>_t1.nii.gz`` and ``root/LGG/...``.

    The grade is the folder. A case id found under both HGG and LGG is an error
    (it would be a contradicting label for one case). ``labels`` adds molecular
    labels as in :func:`read_brats2020`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("not a folder", path=root)
    lab_path = Path(labels) if labels is not None else root / "labels.csv"
    extra = read_labels_csv(lab_path) if (labels is not None or lab_path.is_file()) else {}
    cases: list[Case] = []
    found = False
    for grade_name, grade in (("HGG", 1), ("LGG", 0)):
        gdir = root / grade_name
        if not gdir.is_dir():
            continue
        found = True
        for folder in sorted(p for p in gdir.iterdir() if p.is_dir()):
            cid = folder.name
            images, seg = _brats_case_files(folder, cid, require_seg=require_seg)
            check_geometry(cid, images, seg, verify)
            lab = _merge_labels(cid, {"grade": grade}, extra.get(cid, {}), lab_path)
            cases.append(Case(case_id=cid, patient_id=cid, images=images, seg=seg, labels=lab,
                              source=f"brats-{grade_name.lower()}-folders"))
    if not found:
        raise DatasetError("neither HGG/ nor LGG/ folder (BraTS2018/2019 layout)", path=root)
    try:
        check_unique(cases)
    except ValueError as exc:
        raise DatasetError(f"{exc}: a case under both HGG/ and LGG/", path=root) from exc
    unknown = sorted(set(extra) - {c.case_id for c in cases})
    if unknown:
        raise DatasetError(f"{len(unknown)} labels row(s) for cases that are not here, e.g. "
                           f"{', '.join(unknown[:3])}", path=lab_path)
    return cases


# --------------------------------------------------------------------------- site manifest
def read_manifest(path: str | Path, *, labels: str | Path | None = None,
                  require_roles: Iterable[str] = (), same_grid: bool = True,
                  verify: Verify = "header", source: str = "manifest") -> list[Case]:
    """Read a site manifest CSV: one row per case, a NIfTI path per role, labels.

    Columns (header case-insensitive): ``case_id``; optional ``patient_id``
    (defaults to case_id); ``t1``, ``t1ce``, ``t2``, ``flair`` (at least one
    per row; an empty cell means the case lacks that role); optional ``seg``;
    optional labels ``grade`` (HGG/LGG/1/0), ``idh`` (mutant/wildtype/1/0),
    ``1p19q`` (codeleted/intact/1/0), each may be empty/NA/unknown. Relative
    paths resolve against the CSV's folder, so a manifest travels with its data.
    ``labels`` merges a separate labels file keyed by case_id (how a site adds
    pathology results to the node's converted studies). ``require_roles``
    turns a missing role into an error. ``same_grid=False`` accepts roles on
    different grids (each file is still checked to be a readable 3D NIfTI).
    """
    path = Path(path)
    header, rows = _read_csv(path)
    idcol = _column(header, "case_id")
    if idcol is None:
        raise DatasetError(f"no case_id column (header: {', '.join(header)})", path=path)
    pcol = _column(header, "patient_id")
    rcols = {role: _column(header, col) for role, col in MANIFEST_ROLE_COLUMNS.items()}
    if not any(rcols.values()):
        raise DatasetError(f"no image column (expected any of t1, t1ce, t2, flair; header: "
                           f"{', '.join(header)})", path=path)
    scol = _column(header, "seg")
    lcols = {task: _column(header, *_TASK_COLUMNS[task]) for task in TASKS}
    required = tuple(require_roles)
    bad = set(required) - set(ROLES)
    if bad:
        raise ValueError(f"unknown role(s) in require_roles: {sorted(bad)}")
    extra = read_labels_csv(labels) if labels is not None else {}
    base = path.parent
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        cid = row[idcol]
        if not cid:
            raise DatasetError("empty case_id", path=path, row=line)
        if cid in seen:
            raise DatasetError(f"case_id appears twice (also row {seen[cid]})", path=path, row=line, case_id=cid)
        seen[cid] = line
        images: dict[str, Path] = {}
        for role, col in rcols.items():
            value = row.get(col, "") if col else ""
            if is_missing(value):
                if role in required:
                    raise DatasetError(f"no {role} path (required)", path=path, row=line, case_id=cid)
                continue
            p = Path(value).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise DatasetError(f"{role} file not found: {p}", path=path, row=line, case_id=cid)
            images[role] = p
        if not images:
            raise DatasetError("no image path in any role column", path=path, row=line, case_id=cid)
        seg: Path | None = None
        if scol and not is_missing(row.get(scol, "")):
            seg = Path(row[scol]).expanduser()
            seg = seg if seg.is_absolute() else base / seg
            if not seg.is_file():
                raise DatasetError(f"seg file not found: {seg}", path=path, row=line, case_id=cid)
        lab = {task: _parse(task, row[c], path=path, row=line, case_id=cid, column=c)
               for task, c in lcols.items() if c is not None}
        if extra:
            lab = _merge_labels(cid, lab, extra.get(cid, {}), Path(labels))  # type: ignore[arg-type]
        try:
            if same_grid:
                check_geometry(cid, images, seg, verify)
            else:
                _check_headers_only(images, seg, cid, verify)
        except DatasetError as exc:
            raise DatasetError(exc.problem, path=exc.path, row=line, case_id=cid) from exc
        pid = row.get(pcol, "") if pcol else ""
        cases.append(Case(case_id=cid, patient_id=pid or cid, images=images, seg=seg, labels=lab,
                          source=source))
    if not cases:
        raise DatasetError("no rows", path=path)
    if extra:
        unknown = sorted(set(extra) - set(seen))
        if unknown:
            raise DatasetError(f"{len(unknown)} labels row(s) for cases not in the manifest, e.g. "
                               f"{', '.join(unknown[:3])}", path=labels)
    return cases


#: the words :func:`write_manifest` writes per task and label (read back by :func:`parse_label`)
_MANIFEST_WORDS: dict[str, dict[int | None, str]] = {
    "grade": {None: "", 0: "LGG", 1: "HGG"},
    "idh": {None: "", 0: "wildtype", 1: "mutant"},
    "1p19q": {None: "", 0: "intact", 1: "codeleted"},
}


def write_manifest(cases: Sequence[Case], path: str | Path, *, relative: bool = True) -> Path:
    """Write cases as a manifest CSV that :func:`read_manifest` reads back to the same cases.

    Why: any reader's output (BraTS, UCSF-PDGM, the synthetic cohort) can be
    frozen as one reviewable file, edited (drop a case, fix a label) and used
    as the training set; the splits and checkpoints then name that file.
    Paths are written relative to the CSV's folder when ``relative`` and possible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()

    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        if relative:
            try:
                return Path(p).resolve().relative_to(base).as_posix()
            except ValueError:
                pass
        return str(Path(p).resolve())

    cols = ["case_id", "patient_id", *MANIFEST_ROLE_COLUMNS.values(), "seg", *TASKS]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for c in cases:
            w.writerow([c.case_id, c.patient_id, *(rel(c.images.get(r)) for r in MANIFEST_ROLE_COLUMNS),
                        rel(c.seg), *(_MANIFEST_WORDS[t][c.labels[t]] for t in TASKS)])
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- UCSF-PDGM
_UCSF_DIR_RE = re.compile(r"^UCSF-PDGM-(\d+)_nifti$", re.IGNORECASE)
_UCSF_ID_RE = re.compile(r"UCSF-PDGM-(\d+)", re.IGNORECASE)


def parse_ucsf_idh(value: object) -> int | None:
    """UCSF-PDGM's free-text IDH: "wildtype" -> 0; "mutated (NOS)", "IDH1 p.R132H", "IDH2 mutant"... -> 1.

    Anything naming a mutation (mut, R132, R172, Arg132, Arg172, IDH1/IDH2
    with a variant) counts as mutant; an unrecognised text raises LabelError
    rather than guessing.
    """
    if is_missing(value):
        return None
    t = " ".join(str(value).lower().split())
    if re.search(r"wild[\s-]?type|\bwt\b|negative", t):
        return 0
    if re.search(r"mut|r13\d|r17\d|arg13\d|arg17\d|p\.\w+|positive", t) or re.search(r"idh[12]\b", t):
        return 1
    raise LabelError(f"IDH value {str(value)!r} not understood (expected wildtype or a mutation)")


def parse_ucsf_1p19q(value: object, *, relative_codeletion: int | None = 1) -> int | None:
    """UCSF-PDGM 1p/19q: intact -> 0, co-deletion -> 1, relative co-deletion -> ``relative_codeletion``.

    "relative co-deletion" (FISH: relative loss, often with polysomy) is not
    the whole-arm codeletion that defines oligodendroglioma; most published
    uses of this dataset count it as codeleted, which is our default; pass
    ``relative_codeletion=None`` to treat it as unknown instead.
    """
    if is_missing(value):
        return None
    t = " ".join(str(value).lower().split())
    if "relative" in t:
        return relative_codeletion
    return parse_label("1p19q", t)


def parse_who_grade(value: object) -> int | None:
    """WHO CNS grade -> HGG/LGG label, the BraTS convention: HGG = WHO III-IV, LGG = WHO I-II.

    Accepts 1-4, roman numerals I-IV, "grade 4", "G4"; anything else raises LabelError.
    """
    if is_missing(value):
        return None
    t = " ".join(str(value).strip().upper().replace("GRADE", "").replace("WHO", "").split())
    t = t.lstrip("G").strip()
    roman = {"I": 1, "II": 2, "III": 3, "IV": 4}
    try:
        g = roman[t] if t in roman else int(float(t))
    except ValueError:
        raise LabelError(f"WHO CNS grade {str(value)!r} does not parse (expected 1-4 or I-IV)") from None
    if g not in (1, 2, 3, 4):
        raise LabelError(f"WHO CNS grade {g} out of range 1-4")
    return 1 if g >= 3 else 0


def _ucsf_number(text: str) -> int | None:
    m = _UCSF_ID_RE.search(text)
    return None if m is None else int(m.group(1))


def read_ucsf_pdgm(root: str | Path, *, metadata: str | Path | None = None,
                   relative_codeletion: int | None = 1, bias_corrected: bool = False,
                   require_roles: Iterable[str] = (), skip_missing_folders: bool = False,
                   verify: Verify = "header") -> list[Case]:
    """Read UCSF-PDGM: ``UCSF-PDGM-NNNN_nifti`` folders (in ``root`` or one level down) + metadata CSV.

    ``metadata`` defaults to the single ``UCSF-PDGM-metadata*.csv`` in ``root``.
    IDs match by number: the metadata writes ``UCSF-PDGM-004`` while folders are
    ``UCSF-PDGM-0004_nifti``. Labels: grade from ``WHO CNS Grade`` (WHO 2 -> LGG,
    3 and 4 -> HGG, following BraTS's HGG = WHO III-IV), IDH from the free text,
    1p/19q as :func:`parse_ucsf_1p19q`. ``bias_corrected`` picks the
    ``*_T1_bias.nii.gz``-style files the collection also ships. A metadata row
    without an image folder is an error unless ``skip_missing_folders``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("not a folder", path=root)
    if metadata is None:
        cands = sorted(root.glob("UCSF-PDGM-metadata*.csv"))
        if len(cands) != 1:
            raise DatasetError(f"expected one UCSF-PDGM-metadata*.csv, found {len(cands)}; pass metadata=...",
                               path=root)
        meta_path = cands[0]
    else:
        meta_path = Path(metadata)
    header, rows = _read_csv(meta_path)
    idcol = _column(header, "ID")
    gcol = _column(header, "WHO CNS Grade")
    icol = _column(header, "IDH")
    ccol = _column(header, "1p/19q")
    if idcol is None:
        raise DatasetError(f"no ID column (header: {', '.join(header)})", path=meta_path)
    folders: dict[int, Path] = {}
    for d in [*root.iterdir(), *(q for p in root.iterdir() if p.is_dir() for q in p.iterdir())]:
        m = _UCSF_DIR_RE.match(d.name)
        if m and d.is_dir():
            folders.setdefault(int(m.group(1)), d)
    required = tuple(require_roles)
    cases: list[Case] = []
    for line, row in rows:
        raw_id = row[idcol]
        num = _ucsf_number(raw_id)
        if num is None:
            raise DatasetError(f"ID {raw_id!r} is not UCSF-PDGM-<number>", path=meta_path, row=line)
        folder = folders.get(num)
        if folder is None:
            if skip_missing_folders:
                continue
            raise DatasetError(f"no image folder UCSF-PDGM-{num:04d}_nifti", path=meta_path, row=line,
                               case_id=raw_id)
        cid = folder.name[: -len("_nifti")]
        try:
            grade = parse_who_grade(row[gcol]) if gcol else None
            idh = parse_ucsf_idh(row[icol]) if icol else None
            codel = parse_ucsf_1p19q(row[ccol], relative_codeletion=relative_codeletion) if ccol else None
        except LabelError as exc:
            raise DatasetError(str(exc), path=meta_path, row=line, case_id=cid) from exc
        if codel == 1 and idh == 0:
            # WHO 2021: 1p/19q codeletion defines IDH-mutant oligodendroglioma; keep the
            # labels as recorded (the source is the truth) but say so in the case.
            note = {"note": "1p/19q codeleted but IDH wildtype in the metadata"}
        else:
            note = {}
        images: dict[str, Path] = {}
        for role, suffix in UCSF_SUFFIX.items():
            stem = f"{cid}_{suffix}_bias" if bias_corrected else f"{cid}_{suffix}"
            p = _nifti(folder, stem)
            if p is None:
                if role in required:
                    raise DatasetError(f"missing {role} file {stem}.nii.gz", path=folder, case_id=cid)
                continue
            images[role] = p
        if not images:
            raise DatasetError("no T1/T1c/T2/FLAIR file", path=folder, case_id=cid)
        seg = _nifti(folder, f"{cid}_tumor_segmentation")
        check_geometry(cid, images, seg, verify)
        cases.append(Case(case_id=cid, patient_id=cid, images=images, seg=seg,
                          labels={"grade": grade, "idh": idh, "1p19q": codel}, source="ucsf-pdgm",
                          meta={"metadata_id": raw_id, **note}))
    if not cases:
        raise DatasetError("no case with an image folder", path=meta_path)
    check_unique(cases)
    return cases


# --------------------------------------------------------------------------- dispatch
def read_dataset(path: str | Path, **kwargs: Any) -> list[Case]:
    """Read whatever ``path`` is: a manifest CSV, a BraTS2020 / BraTS2018-19 / UCSF-PDGM folder.

    Why: the CLI takes one ``--data PATH``; this picks the reader by what is on
    disk and passes ``kwargs`` on. An unrecognised folder is a DatasetError
    that lists the layouts it looked for.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return read_manifest(p, **kwargs)
    if not p.exists():
        raise DatasetError("not found", path=p)
    if p.is_dir():
        names = [q.name for q in p.iterdir()]
        if (p / "HGG").is_dir() or (p / "LGG").is_dir():
            return read_brats_hgg_lgg(p, **kwargs)
        if any(_BRATS20_RE.match(n) for n in names):
            return read_brats2020(p, **kwargs)
        if any(_UCSF_DIR_RE.match(n) for n in names) or any(n.startswith("UCSF-PDGM-metadata") for n in names):
            return read_ucsf_pdgm(p, **kwargs)
    raise DatasetError("not a recognised dataset: expected a manifest .csv, a BraTS2020 folder "
                       "(BraTS20_Training_NNN/), a BraTS2018/2019 folder (HGG/, LGG/) or a UCSF-PDGM "
                       "folder (UCSF-PDGM-NNNN_nifti/)", path=p)
