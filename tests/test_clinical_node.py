"""Native whole heads through the real chain: Orthanc -> dicomnode serve -> SR in Orthanc, with clinical checkpoints.

The checkpoints are the suite's tiny real ones in their clinical variant
(``tests/checkpoints.py``: bias field, co-registration, deepbet, MNI152 grid at
6 mm), trained on the synthetic cohort. The studies are whole heads in native
scanner geometry (``training.heads``: a 3D 1 mm T1 beside 2D thick-slice series,
skull, scalp, orbits, neck, bias field). What must hold whatever the models
answer: the SR reports the brain volume and the registration to the template
as numeric items; a model trained on 1 mm data declines a 6 mm study, and the
SR names the measurement, its value and the training range; a declined model
never appears with a grade.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from checkpoints import tiny_checkpoints
from conftest import dcmtk_tool
from nodeutil import RELEASE_COMPLETES, NodeProcess, regate
from pacs import Orthanc
from test_e2e import check_sr, reports_in, route, wait


@pytest.fixture(scope="session")
def clinical_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints(tmp_path_factory, ("fs3dcnn", "mmdlm"), clinical=True)


def head_study(out: Path, *, style: str, vendor: str = "siemens", seed: int = 5,
               thickness_mm: float | None = None) -> list[Path]:
    """A native whole-head study written as DICOM (``training.heads`` + the study writer); its files."""
    import dataclasses

    from dicomnode.synth.writer import write_study
    from training import heads

    geometries = heads.geometry_preset(vendor, style)
    if thickness_mm is not None:
        geometries = {r: dataclasses.replace(g, slice_thickness_mm=thickness_mm, slice_gap_mm=0.0)
                      for r, g in geometries.items()}
    study = heads.native_study(heads.synthetic_case(seed=seed), geometries, vendor=vendor, seed=seed)
    written = write_study(**study.writer_args(), out_dir=out, vendor=vendor, seed=seed)
    return written.all_files()


def dump(orthanc: Orthanc, tmp: Path, study: str) -> str:
    srs = wait("the SR in the PACS", lambda: reports_in(orthanc, study), timeout=900, every=2.0)
    assert len(srs) == 1
    check_sr(orthanc, srs[0], tmp)
    return subprocess.run([dcmtk_tool("dsrdump"), "+Pt", "+Pc", "+Pl", str(tmp / f"{srs[0]}.dcm")],
                          capture_output=True, text=True, check=True).stdout


def start_node(tmp_path: Path, orthanc: Orthanc, port: int, ckpts: Path) -> NodeProcess:
    # completes on Orthanc's clean release, not after a 2 s quiet period a stall mid-transfer could end early
    node = NodeProcess(tmp_path / "data", port=port, allowed_peers=["ORTHANC@127.0.0.1"],
                       destinations=[orthanc.destination], checkpoints_dir=str(ckpts), dispatch_poll_s=0.5,
                       **RELEASE_COMPLETES)
    return node.start()


def test_whole_head_study_sr_reports_brain_volume_and_registration(
        pacs: tuple[Orthanc, int], tmp_path: Path, clinical_ckpts: Path) -> None:
    orthanc, port = pacs
    node = start_node(tmp_path, orthanc, port, clinical_ckpts)
    try:
        study = route(orthanc, head_study(tmp_path / "study", style="mixed"))
        text = dump(orthanc, tmp_path, study)
    finally:
        node.stop()
    # numeric items with units: brain volume in ml, registration to the template
    (tmp_path / "sr.txt").write_text(text)
    volume = re.search(r'"brain volume"\)="([\d.]+)" \(ml,UCUM', text, re.IGNORECASE)
    assert volume, text
    assert 900 <= float(volume.group(1)) <= 2400, volume.group(0)
    assert re.search(r'registration to template \(mutual information\)"\)="[\d.]+"', text, re.IGNORECASE), text
    assert re.search(r'overlap with template brain \(Dice\)"\)="0?\.\d+"', text,
                     re.IGNORECASE), text
    assert "skull-stripped" not in text  # the clinical spec extracts the brain: a whole head is expected
    print(f"\n{volume.group(0)}")
    print("\n".join(line for line in text.splitlines() if "DECLINED" in line or "GATEFINDING" in line
                     or "Probability" in line))


def test_a_model_trained_on_1mm_declines_a_6mm_study_and_the_sr_says_why(
        pacs: tuple[Orthanc, int], tmp_path: Path, clinical_ckpts: Path) -> None:
    orthanc, port = pacs
    one_mm = tmp_path / "one-mm"
    ranges = {f"slice_thickness_mm/{r}": [1.0, 1.0] for r in ("T1", "T1CE", "T2", "FLAIR")}
    for src in clinical_ckpts.glob("*.pt"):
        regate(src, one_mm / src.name, ranges=ranges)
    node = start_node(tmp_path, orthanc, port, one_mm)
    try:
        study = route(orthanc, head_study(tmp_path / "study", style="2d", thickness_mm=6.0))
        text = dump(orthanc, tmp_path, study)
    finally:
        node.stop()
    assert re.search(r"slice thickness \(T2\) 6\.0 mm; this model was trained on 1\.0-1\.0 mm", text), text
    # a declined model states no grade: no Probability, no finding of a grade anywhere in the SR
    assert "Probability" not in text and "High grade glioma" not in text, text
