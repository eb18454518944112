"""training.cases and training.datasets: readers on small trees written here, and their errors."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.cases import (
    ROLES,
    TASKS,
    Case,
    LabelError,
    check_unique,
    class_counts,
    describe,
    has_label,
    labelled,
    labels_array,
    parse_label,
    patient_groups,
    with_roles,
)
from training.datasets import (
    NAME_MAPPING_HEADER,
    DatasetError,
    parse_ucsf_1p19q,
    parse_ucsf_idh,
    parse_who_grade,
    read_brats2020,
    read_brats_hgg_lgg,
    read_dataset,
    read_labels_csv,
    read_manifest,
    read_ucsf_pdgm,
    write_manifest,
)

SHAPE = (6, 7, 5)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
SUFFIXES = ("t1", "t1ce", "t2", "flair")


def nii(path: Path, shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE, dtype: type = np.int16,
        value: int = 100) -> Path:
    """A tiny NIfTI volume (constant inside, so readers have something to read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=dtype)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def brats2020_tree(root: Path, grades: dict[str, str], *, ext: str = ".nii.gz", seg: bool = True,
                   tcga: dict[str, str] | None = None) -> Path:
    """BraTS20_Training_NNN folders + name_mapping.csv with the real header."""
    rows = []
    for cid, grade in grades.items():
        for s in SUFFIXES:
            nii(root / cid / f"{cid}_{s}{ext}")
        if seg:
            nii(root / cid / f"{cid}_seg{ext}", dtype=np.uint8, value=0)
        rows.append([grade, "NA", "NA", (tcga or {}).get(cid, "NA"), "NA", cid])
    write_csv(root / "name_mapping.csv", list(NAME_MAPPING_HEADER), rows)
    return root


THREE = {"BraTS20_Training_001": "HGG", "BraTS20_Training_002": "LGG", "BraTS20_Training_010": "HGG"}


# --------------------------------------------------------------------------- cases
def test_case_is_frozen_and_complete():
    c = Case("a", "", {"T2": "x.nii.gz", "T1": "y.nii.gz"}, None, {"grade": 1}, "test")
    assert c.patient_id == "a"  # defaults to the case id
    assert c.roles == ("T1", "T2")  # canonical order
    assert dict(c.labels) == {"grade": 1, "idh": None, "1p19q": None}
    assert isinstance(c.images["T1"], Path)
    with pytest.raises(TypeError):
        c.images["T1CE"] = Path("z")  # type: ignore[index]
    with pytest.raises(Exception):
        c.case_id = "b"  # type: ignore[misc]
    assert hash(c) == hash(Case("a", "a", {}, None, {}, "test"))
    assert Case.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown role"):
        Case("a", "a", {"T1c": "x"}, None, {}, "t")
    with pytest.raises(ValueError, match="must be 0, 1 or None"):
        Case("a", "a", {}, None, {"grade": 2}, "t")


def test_label_coding_matches_models():
    models_base = pytest.importorskip("models.base")
    assert ROLES == models_base.ROLES
    assert {t: tuple(v) for t, v in TASKS.items()} == {t: tuple(v) for t, v in models_base.TASKS.items()}


@pytest.mark.parametrize("task,value,expected", [
    ("grade", "HGG", 1), ("grade", "lgg", 0), ("grade", " 1 ", 1), ("grade", "0.0", 0), ("grade", 1, 1),
    ("grade", "NA", None), ("grade", "", None), ("grade", None, None), ("grade", float("nan"), None),
    ("idh", "mutant", 1), ("idh", "Wild-type", 0), ("idh", "unknown", None), ("idh", "0", 0),
    ("1p19q", "codeleted", 1), ("1p19q", "co-deletion", 1), ("1p19q", "intact", 0), ("1p19q", "n/a", None),
])
def test_parse_label(task, value, expected):
    assert parse_label(task, value) == expected


@pytest.mark.parametrize("task,value", [("grade", "HHG"), ("grade", "4"), ("idh", "maybe"), ("1p19q", "2")])
def test_parse_label_rejects_typos(task, value):
    with pytest.raises(LabelError, match="does not parse"):
        parse_label(task, value)


def test_case_helpers():
    cases = [
        Case("a", "p1", {"T1": "a", "T1CE": "b"}, None, {"grade": 1, "idh": 0}, "s"),
        Case("b", "p1", {"T1": "a"}, None, {"grade": 0}, "s"),
        Case("c", "p2", {"T1": "a", "T1CE": "b"}, None, {"grade": None, "idh": 1}, "t"),
    ]
    assert labels_array(cases, "grade").tolist() == [1, 0, -1]
    assert has_label(cases, "idh").tolist() == [True, False, True]
    assert [c.case_id for c in labelled(cases, "grade")] == ["a", "b"]
    assert [c.case_id for c in with_roles(cases, ["T1CE"])] == ["a", "c"]
    assert patient_groups(cases).tolist() == [0, 0, 1]
    assert class_counts(cases, "grade") == {"LGG": 1, "HGG": 1, "missing": 1}
    d = describe(cases)
    assert d["n_cases"] == 3 and d["n_patients"] == 2 and d["roles"]["T1CE"] == 2
    assert d["sources"] == {"s": 2, "t": 1}
    with pytest.raises(ValueError, match="appears twice"):
        check_unique([cases[0], cases[0]])


# --------------------------------------------------------------------------- BraTS2020
def test_read_brats2020(tmp_path):
    root = brats2020_tree(tmp_path / "MICCAI_BraTS2020_TrainingData", THREE,
                          tcga={"BraTS20_Training_010": "TCGA-02-0006"})
    cases = read_brats2020(root)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_010"]
    assert [c.labels["grade"] for c in cases] == [1, 0, 1]
    assert all(c.roles == ROLES and c.seg is not None and c.source == "brats2020" for c in cases)
    assert cases[0].images["T1CE"].name == "BraTS20_Training_001_t1ce.nii.gz"
    assert cases[2].patient_id == "TCGA-02-0006"  # the patient behind the case, for patient-level splits
    assert cases[0].patient_id == "BraTS20_Training_001"


def test_read_brats2020_uncompressed_nii(tmp_path):
    cases = read_brats2020(brats2020_tree(tmp_path, THREE, ext=".nii"))
    assert cases[1].images["FLAIR"].name == "BraTS20_Training_002_flair.nii"


def test_case_355_odd_segmentation_name_is_tolerated(tmp_path):
    root = brats2020_tree(tmp_path, {"BraTS20_Training_355": "HGG"}, ext=".nii", seg=False)
    nii(root / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii", dtype=np.uint8, value=0)
    (case,) = read_brats2020(root, require_seg=True)
    assert case.seg is not None and case.seg.name == "W39_1998.09.19_Segm.nii"


def test_missing_role_file_names_file_and_case(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case BraTS20_Training_002: missing T2 file BraTS20_Training_002_t2") as e:
        read_brats2020(root)
    assert e.value.case_id == "BraTS20_Training_002"


def test_missing_seg_only_an_error_when_required(tmp_path):
    root = brats2020_tree(tmp_path, THREE, seg=False)
    assert all(c.seg is None for c in read_brats2020(root))
    with pytest.raises(DatasetError, match="missing segmentation"):
        read_brats2020(root, require_seg=True)


def test_roles_that_disagree_in_shape(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    nii(root / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz", shape=(6, 7, 4))
    with pytest.raises(DatasetError, match=r"shape \(6, 7, 4\) of FLAIR differs from \(6, 7, 5\) of T1") as e:
        read_brats2020(root)
    assert e.value.path is not None and e.value.path.name == "BraTS20_Training_001_flair.nii.gz"


def test_roles_that_disagree_in_affine(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    nii(root / "BraTS20_Training_010" / "BraTS20_Training_010_seg.nii.gz", affine=shifted, dtype=np.uint8)
    with pytest.raises(DatasetError, match="affine of seg differs from that of T1"):
        read_brats2020(root)


def test_non_3d_volume(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    nii(root / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz", shape=(6, 7, 5, 2))
    with pytest.raises(DatasetError, match=r"expected a 3D volume, got shape \(6, 7, 5, 2\)"):
        read_brats2020(root)


def test_unreadable_nifti(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    bad = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(DatasetError, match=r"BraTS20_Training_002_t1ce.nii.gz, case BraTS20_Training_002: unreadable NIfTI"):
        read_brats2020(root)


def test_truncated_file_found_by_data_verification(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    path = root / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    for s in SUFFIXES:  # big enough that half a compressed file still holds the whole header
        nii(path.with_name(f"BraTS20_Training_001_{s}.nii.gz"), shape=(40, 40, 30))
    nii(path.with_name("BraTS20_Training_001_seg.nii.gz"), shape=(40, 40, 30), dtype=np.uint8, value=0)
    data = np.random.default_rng(0).integers(0, 1000, (40, 40, 30)).astype(np.int16)
    packed = gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes())
    path.write_bytes(packed[: len(packed) // 2])  # header intact, data cut
    assert len(read_brats2020(root)) == 3  # a header check cannot see it
    with pytest.raises(DatasetError, match="unreadable NIfTI"):
        read_brats2020(root, verify="data")


def test_grade_that_does_not_parse_names_the_row(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    text = (root / "name_mapping.csv").read_text().replace("LGG", "LLG")
    (root / "name_mapping.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"name_mapping.csv, row 3, case BraTS20_Training_002: column 'Grade': "
                                           r"grade value 'LLG' does not parse"):
        read_brats2020(root)


def test_name_mapping_missing_or_incomplete(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    (root / "name_mapping.csv").unlink()
    with pytest.raises(DatasetError, match="name_mapping.csv not found"):
        read_brats2020(root)
    assert [c.labels["grade"] for c in read_brats2020(root, require_grade=False)] == [None, None, None]
    write_csv(root / "name_mapping.csv", list(NAME_MAPPING_HEADER), [["HGG", "NA", "NA", "NA", "NA", "BraTS20_Training_001"]])
    with pytest.raises(DatasetError, match="case BraTS20_Training_002: no row in name_mapping.csv"):
        read_brats2020(root)
    write_csv(root / "name_mapping.csv", list(NAME_MAPPING_HEADER),
              [[g, "NA", "NA", "NA", "NA", c] for c, g in {**THREE, "BraTS20_Training_099": "LGG"}.items()])
    with pytest.raises(DatasetError, match="1 name_mapping row.*without a case folder, e.g. BraTS20_Training_099"):
        read_brats2020(root)


def test_labels_csv_adds_molecular_labels_and_catches_contradictions(tmp_path):
    root = brats2020_tree(tmp_path, THREE)
    write_csv(root / "labels.csv", ["case_id", "grade", "idh", "1p19q"],
              [["BraTS20_Training_001", "HGG", "wildtype", "intact"],
               ["BraTS20_Training_002", "", "mutant", "codeleted"],
               ["BraTS20_Training_010", "HGG", "NA", ""]])
    cases = read_brats2020(root)
    assert [dict(c.labels) for c in cases] == [
        {"grade": 1, "idh": 0, "1p19q": 0}, {"grade": 0, "idh": 1, "1p19q": 1},
        {"grade": 1, "idh": None, "1p19q": None}]
    write_csv(root / "labels.csv", ["case_id", "grade"], [["BraTS20_Training_002", "HGG"]])
    with pytest.raises(DatasetError, match="case BraTS20_Training_002: grade is HGG here but LGG"):
        read_brats2020(root)
    write_csv(root / "labels.csv", ["case_id", "idh"], [["BraTS20_Training_777", "mutant"]])
    with pytest.raises(DatasetError, match="labels row.*not here.*BraTS20_Training_777"):
        read_brats2020(root)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no BraTS20_Training_NNN case folders"):
        read_brats2020(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        read_brats2020(tmp_path / "nope")


# --------------------------------------------------------------------------- BraTS2018/2019
def test_read_brats_hgg_lgg_folders(tmp_path):
    for grade, cid in (("HGG", "Brats18_2013_10_1"), ("HGG", "Brats18_CBICA_AAB_1"), ("LGG", "Brats18_TCIA09_141_1")):
        for s in (*SUFFIXES, "seg"):
            nii(tmp_path / grade / cid / f"{cid}_{s}.nii.gz")
    cases = read_brats_hgg_lgg(tmp_path)
    assert {c.case_id: c.labels["grade"] for c in cases} == {
        "Brats18_2013_10_1": 1, "Brats18_CBICA_AAB_1": 1, "Brats18_TCIA09_141_1": 0}
    assert read_dataset(tmp_path) == cases
    for s in (*SUFFIXES, "seg"):
        nii(tmp_path / "LGG" / "Brats18_2013_10_1" / f"Brats18_2013_10_1_{s}.nii.gz")
    with pytest.raises(DatasetError, match="under both HGG/ and LGG/"):
        read_brats_hgg_lgg(tmp_path)


def test_read_brats_hgg_lgg_needs_the_folders(tmp_path):
    with pytest.raises(DatasetError, match="neither HGG/ nor LGG/"):
        read_brats_hgg_lgg(tmp_path)


# --------------------------------------------------------------------------- manifest
MANIFEST_HEADER = ["case_id", "patient_id", "t1", "t1ce", "t2", "flair", "seg", "grade", "idh", "1p19q"]


def manifest_tree(tmp_path: Path) -> Path:
    for cid in ("s1", "s2", "s3"):
        for role in ("T1", "T1CE", "T2", "FLAIR"):
            nii(tmp_path / "studies" / cid / f"{role}.nii.gz")
    return write_csv(tmp_path / "manifest.csv", MANIFEST_HEADER, [
        ["s1", "P001", "studies/s1/T1.nii.gz", "studies/s1/T1CE.nii.gz", "studies/s1/T2.nii.gz",
         "studies/s1/FLAIR.nii.gz", "", "HGG", "wildtype", "intact"],
        ["s2", "P001", "studies/s2/T1.nii.gz", "", "studies/s2/T2.nii.gz", "studies/s2/FLAIR.nii.gz", "",
         "0", "1", "codeleted"],
        ["s3", "", str(tmp_path / "studies/s3/T1.nii.gz"), "studies/s3/T1CE.nii.gz", "", "", "", "NA", "unknown", ""],
    ])


def test_read_manifest(tmp_path):
    cases = read_manifest(manifest_tree(tmp_path))
    assert [c.case_id for c in cases] == ["s1", "s2", "s3"]
    assert [c.patient_id for c in cases] == ["P001", "P001", "s3"]
    assert cases[1].roles == ("T1", "T2", "FLAIR")  # empty cell: the case lacks T1CE
    assert cases[2].roles == ("T1", "T1CE")
    assert cases[0].images["T1CE"] == tmp_path / "studies/s1/T1CE.nii.gz"  # relative to the CSV's folder
    assert [dict(c.labels) for c in cases] == [
        {"grade": 1, "idh": 0, "1p19q": 0}, {"grade": 0, "idh": 1, "1p19q": 1},
        {"grade": None, "idh": None, "1p19q": None}]
    assert patient_groups(cases).tolist() == [0, 0, 1]
    assert read_dataset(tmp_path / "manifest.csv") == cases


def test_manifest_plus_labels_file(tmp_path):
    """The loop from PACS to training: converted studies listed without labels, pathology in another file."""
    path = manifest_tree(tmp_path)
    rows = list(csv.reader(path.open()))
    write_csv(path, rows[0][:7], [r[:7] for r in rows[1:]])  # no label columns
    labels = write_csv(tmp_path / "pathology.csv", ["case_id", "grade", "IDH", "1p/19q"],
                       [["s1", "HGG", "wildtype", "intact"], ["s3", "LGG", "mutant", "co-deleted"]])
    cases = read_manifest(path, labels=labels)
    assert [c.labels["grade"] for c in cases] == [1, None, 0]
    assert cases[2].labels["1p19q"] == 1
    write_csv(labels, ["case_id", "grade"], [["s9", "HGG"]])
    with pytest.raises(DatasetError, match="cases not in the manifest, e.g. s9"):
        read_manifest(path, labels=labels)


def test_manifest_errors(tmp_path):
    path = manifest_tree(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("studies/s2/T2.nii.gz", "studies/s2/T2_missing.nii.gz"))
    with pytest.raises(DatasetError, match=r"manifest.csv, row 3, case s2: T2 file not found: .*T2_missing"):
        read_manifest(path)
    path.write_text(text.replace("codeleted", "codel"))
    with pytest.raises(DatasetError, match=r"row 3, case s2: column '1p19q': 1p19q value 'codel' does not parse"):
        read_manifest(path)
    path.write_text(text.replace("s3,", "s1,", 1))
    with pytest.raises(DatasetError, match=r"row 4, case s1: case_id appears twice \(also row 2\)"):
        read_manifest(path)
    path.write_text(text)
    with pytest.raises(DatasetError, match=r"row 3, case s2: no T1CE path \(required\)"):
        read_manifest(path, require_roles=["T1CE"])
    nii(tmp_path / "studies/s1/T2.nii.gz", shape=(5, 5, 5))
    with pytest.raises(DatasetError, match=r"row 2, case s1: shape \(5, 5, 5\) of T2 differs"):
        read_manifest(path)
    assert len(read_manifest(path, same_grid=False)) == 3  # sites that resample later may opt out
    write_csv(path, ["id", "t1"], [["x", "a.nii"]])
    with pytest.raises(DatasetError, match="no case_id column"):
        read_manifest(path)
    write_csv(path, ["case_id", "t1"], [["x", ""]])
    with pytest.raises(DatasetError, match="row 2, case x: no image path in any role column"):
        read_manifest(path)
    with pytest.raises(DatasetError, match="file not found"):
        read_manifest(tmp_path / "absent.csv")


def test_write_manifest_round_trip(tmp_path):
    root = brats2020_tree(tmp_path / "brats", THREE)
    write_csv(root / "labels.csv", ["case_id", "idh", "1p19q"], [["BraTS20_Training_002", "mutant", "codeleted"]])
    cases = read_brats2020(root)
    out = write_manifest(cases, tmp_path / "frozen" / "train.csv")
    back = read_manifest(out, source="brats2020")
    assert [(c.case_id, c.patient_id, dict(c.images), c.seg, dict(c.labels)) for c in back] == \
        [(c.case_id, c.patient_id, dict(c.images), c.seg, dict(c.labels)) for c in cases]
    assert "../brats/BraTS20_Training_001" not in out.read_text()  # outside its folder: absolute paths


def test_read_labels_csv_errors(tmp_path):
    p = write_csv(tmp_path / "l.csv", ["case_id", "grade"], [["a", "HGG"], ["a", "LGG"]])
    with pytest.raises(DatasetError, match="row 3, case a: case_id 'a' appears twice"):
        read_labels_csv(p)
    p = write_csv(tmp_path / "l.csv", ["case_id", "age"], [["a", "50"]])
    with pytest.raises(DatasetError, match="no label column"):
        read_labels_csv(p)


# --------------------------------------------------------------------------- UCSF-PDGM
def ucsf_tree(root: Path) -> Path:
    for num in (4, 5, 7):
        cid = f"UCSF-PDGM-{num:04d}"
        for s in ("T1", "T1c", "T2", "FLAIR", "tumor_segmentation"):
            nii(root / "UCSF-PDGM-v3" / f"{cid}_nifti" / f"{cid}_{s}.nii.gz")
    write_csv(root / "UCSF-PDGM-metadata_v2.csv",
              ["ID", "Sex", "Age at MRI", "WHO CNS Grade", "Final pathologic diagnosis (WHO 2021)", "MGMT status",
               "1p/19q", "IDH"],
              [["UCSF-PDGM-004", "M", "66", "4", "Glioblastoma, IDH-wildtype", "negative", "unknown", "wildtype"],
               ["UCSF-PDGM-005", "F", "40", "2", "Oligodendroglioma, IDH-mutant, 1p/19q-codeleted", "",
                "co-deletion", "IDH1 p.R132H"],
               ["UCSF-PDGM-007", "F", "35", "3", "Astrocytoma, IDH-mutant", "", "relative co-deletion",
                "mutated (NOS)"]])
    return root


def test_read_ucsf_pdgm(tmp_path):
    root = ucsf_tree(tmp_path)
    cases = read_ucsf_pdgm(root)
    assert [c.case_id for c in cases] == ["UCSF-PDGM-0004", "UCSF-PDGM-0005", "UCSF-PDGM-0007"]
    assert [dict(c.labels) for c in cases] == [
        {"grade": 1, "idh": 0, "1p19q": None},  # WHO 4 -> HGG
        {"grade": 0, "idh": 1, "1p19q": 1},     # WHO 2 -> LGG
        {"grade": 1, "idh": 1, "1p19q": 1}]     # WHO 3 -> HGG (BraTS: HGG = WHO III-IV)
    assert cases[0].images["T1CE"].name == "UCSF-PDGM-0004_T1c.nii.gz"
    assert cases[0].seg is not None and cases[0].seg.name == "UCSF-PDGM-0004_tumor_segmentation.nii.gz"
    assert cases[0].meta["metadata_id"] == "UCSF-PDGM-004"
    assert read_ucsf_pdgm(root, relative_codeletion=None)[2].labels["1p19q"] is None
    assert read_dataset(root)[1].labels == cases[1].labels


def test_ucsf_pdgm_errors(tmp_path):
    root = ucsf_tree(tmp_path)
    meta = root / "UCSF-PDGM-metadata_v2.csv"
    text = meta.read_text()
    meta.write_text(text + "UCSF-PDGM-009,M,70,4,GBM,,intact,wildtype\n")
    with pytest.raises(DatasetError, match="row 5, case UCSF-PDGM-009: no image folder UCSF-PDGM-0009_nifti"):
        read_ucsf_pdgm(root)
    assert len(read_ucsf_pdgm(root, skip_missing_folders=True)) == 3
    meta.write_text(text.replace("mutated (NOS)", "probably"))
    with pytest.raises(DatasetError, match="row 4, case UCSF-PDGM-0007: IDH value 'probably' not understood"):
        read_ucsf_pdgm(root)
    meta.write_text(text.replace(",3,", ",5,"))
    with pytest.raises(DatasetError, match="WHO CNS grade 5 out of range"):
        read_ucsf_pdgm(root)


@pytest.mark.parametrize("text,expected", [
    ("wildtype", 0), ("mutated (NOS)", 1), ("IDH1 p.R132H", 1), ("IDH2 p.R172K", 1), ("mutant (IDH1 R132H)", 1),
    ("IDH2 mutant", 1), ("IDH1 p.Arg132His", 1), ("", None), ("NA", None)])
def test_parse_ucsf_idh(text, expected):
    assert parse_ucsf_idh(text) == expected


def test_parse_ucsf_1p19q_and_who_grade():
    assert parse_ucsf_1p19q("intact") == 0 and parse_ucsf_1p19q("co-deletion") == 1
    assert parse_ucsf_1p19q("relative co-deletion") == 1
    assert parse_ucsf_1p19q("relative co-deletion", relative_codeletion=None) is None
    assert parse_ucsf_1p19q("unknown") is None
    assert [parse_who_grade(v) for v in (2, "3", "IV", "grade 4", "G2", "II", "")] == [0, 1, 1, 1, 0, 0, None]
    with pytest.raises(LabelError):
        parse_who_grade("high")


def test_read_dataset_unknown_layout(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match="not a recognised dataset"):
        read_dataset(tmp_path)
