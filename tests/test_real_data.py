"""Acceptance: dcmtk storescu sends every series of ../shared/data/real to `dicomnode serve`.

Every instance must be on disk and in the index, and `dicomnode status --json`
must give each series the role its MANIFEST states.
"""
from __future__ import annotations

import os
import subprocess
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread

from conftest import dcmtk_tool
from nodeutil import NODE_AET, NodeProcess

# MANIFEST.md: the role a grading node should give each graded series, per folder.
EXPECTED = {
    "siemens_prisma_brain_T1_FLAIR_HUMAN": {"MPRAGE": "T1", "FLAIR": "FLAIR"},
    "siemens_prisma_PD_T2_TSE_PHANTOM": "OTHER",
    "philips_elition_2D_T1w_enhanced_and_classic_PHANTOM": "T1",
    "siemens_xa30_enhanced_T1w_HUMAN": "T1",
    "siemens_xa30_enhanced_ADC_map_HUMAN": "OTHER",
    "siemens_trio_EPI_9_transfer_syntaxes_HUMAN": "OTHER",
    "ge_mr750_EPI_fMRI_HUMAN": "OTHER",
    "ge_pioneer_DWI_PHANTOM": "OTHER",
    "uih_umr770_DTI_HUMAN": "OTHER",
    "philips_achieva_enhanced_B0map_PHANTOM": "OTHER",
    "siemens_xa10_enhanced_fMRI_PHANTOM": "OTHER",
    "hitachi_echelon_SE_SHOULDER": "OTHER",
}
# dcmtk storescu proposes one compressed transfer syntax per run: pick it per file.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE
    "1.2.840.10008.1.2.4.57": "-xs",  # JPEG lossless (process 14)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
}
GRADABLE = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"}


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a data folder (reference conversions and READMEs left out)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part == "ref" or part.endswith("_ref") for part in p.relative_to(folder).parts):
            continue
        with open(p, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            out.append(p)
    return out


def expected_role(folder: str, description: str) -> str:
    exp = EXPECTED[folder]
    if isinstance(exp, str):
        return exp
    for key, role in exp.items():
        if key.lower() in description.lower():
            return role
    raise AssertionError(f"no expectation for {folder}/{description}")


def test_storescu_sends_every_real_series_and_roles_match_manifest(real_data_dir: Path, tmp_path: Path) -> None:
    storescu = dcmtk_tool("storescu")
    assert set(EXPECTED) == {p.name for p in real_data_dir.iterdir() if p.is_dir()}, "MANIFEST folders changed"
    # several storescu runs (one per transfer syntax) per study, each its own association: the quiet period
    # must outlast the gaps between them on a loaded machine (3 s did not), and a release must not end it
    node = NodeProcess(tmp_path / "data", quiet_period_s=30).start()
    try:
        sent: dict[str, str] = {}  # SOP Instance UID -> folder
        series_folder: dict[str, str] = {}
        series_desc: dict[str, str] = {}
        series_gradable: dict[str, bool] = defaultdict(bool)
        for folder in sorted(EXPECTED):
            files = dicom_files(real_data_dir / folder)
            assert files, folder
            by_option: dict[str, list[Path]] = defaultdict(list)
            for f in files:
                ds = dcmread(f, stop_before_pixels=True)
                by_option[STORESCU_TS_OPTION.get(str(ds.file_meta.TransferSyntaxUID), "-x=")].append(f)
                sent[str(ds.SOPInstanceUID)] = folder
                series_folder[str(ds.SeriesInstanceUID)] = folder
                series_desc.setdefault(str(ds.SeriesInstanceUID), str(ds.get("SeriesDescription", "")))
                series_gradable[str(ds.SeriesInstanceUID)] |= str(ds.SOPClassUID) in GRADABLE
            for option, group in by_option.items():
                r = subprocess.run(
                    [storescu, option, "-aet", "PACS", "-aec", NODE_AET, "127.0.0.1", str(node.port), *map(str, group)],
                    capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=300,
                )
                assert r.returncode == 0, f"{folder}: {r.stdout}{r.stderr}"
        doc = node.wait_for(
            lambda d: d["studies"] and all(v["state"] == "complete" for s in d["studies"] for v in s["versions"]),
            timeout=600,
        )
        # every instance on disk and in the index
        stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in node.spool_files()}
        assert stored == set(sent)
        assert sum(s["instances"] for s in doc["studies"]) == len(sent)
        # one version per study, every series with the MANIFEST's role
        roles: dict[str, dict] = {}
        for st in doc["studies"]:
            assert len(st["versions"]) == 1
            for se in st["versions"][0]["series"]:
                roles[se["series_instance_uid"]] = se
        assert set(roles) == set(series_folder)
        wrong = []
        for uid, se in roles.items():
            want = expected_role(series_folder[uid], series_desc[uid])
            if se["role"] != want:
                wrong.append(f"{series_folder[uid]} / {series_desc[uid]!r}: got {se['role']} ({se['reason']}), want {want}")
        assert not wrong, "\n".join(wrong)
        # several Philips T1 candidates in one study: exactly one selected per study, the rest alternatives
        for st in doc["studies"]:
            t1 = [se for se in st["versions"][0]["series"]
                  if series_folder[se["series_instance_uid"]].startswith("philips_elition") and se["role"] == "T1"]
            if t1:
                statuses = sorted(se["status"] for se in t1)
                assert statuses == ["alternative"] * (len(t1) - 1) + ["selected"], statuses
                (chosen,) = [se for se in t1 if se["status"] == "selected"]
                assert set(chosen["chosen_over"]) == {se["series_instance_uid"] for se in t1} - {chosen["series_instance_uid"]}
        # the non-image objects are stored but never graded
        raw_only = [uid for uid in roles if not series_gradable[uid]]
        assert all(roles[uid]["role"] == "OTHER" for uid in raw_only)
        # human-readable status works too
        text = node.cli("status").stdout
        assert "FLAIR" in text and "selected" in text
    finally:
        node.stop()
