"""The input gate with real parts: a PACS (Orthanc), a ``dicomnode serve`` process, real checkpoints.

Decline rather than guess (DESIGN.md): a model whose checkpoint says its
training data looked different from this study does not grade it, and the SR
says which measurement, its value and the training range. The checkpoints are
the suite's tiny real ones (``tests/checkpoints.py``) re-saved with a hand-set
training range (``nodeutil.regate``: the content hash stays valid), so the
node's own validation accepts them. Studies are ``make_phantom`` whole heads
at 3 mm, so "slice thickness (T2) 3.0 mm" lies outside a 1.0-1.0 mm range.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from checkpoints import tiny_checkpoints
from conftest import dcmtk_tool
from nodeutil import GATE_LOOSENED_TEXT, LOOSE_GATE, NO_FLOOR, RELEASE_COMPLETES, NodeProcess, regate
from pacs import Orthanc
from test_e2e import check_sc, check_sr, reports_in, route, study_files, wait  # noqa: F401

THIN_T2 = {"slice_thickness_mm/T2": [1.0, 1.0]}
# held-out metrics above the node's default floor, so the default gate is about the measurements alone
# (the tiny checkpoints record none: the floor would decline them too)
HELDOUT_OK = {"test": {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.8}}
SLICE_REASON = re.compile(r"slice thickness \(T2\) (\d+\.\d) mm; this model was trained on 1\.0-1\.0 mm")


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints(tmp_path_factory)


def start_node(tmp_path: Path, orthanc: Orthanc, port: int, ckpts: Path, **gate: object) -> NodeProcess:
    # completes on Orthanc's clean release, not after a 2 s quiet period a stall mid-transfer could end early
    node = NodeProcess(tmp_path / "data", port=port, allowed_peers=["ORTHANC@127.0.0.1"],
                       destinations=[orthanc.destination], checkpoints_dir=str(ckpts), dispatch_poll_s=0.5,
                       **{**RELEASE_COMPLETES, **gate})
    return node.start()


def sr_text(orthanc: Orthanc, instance: str, tmp: Path, *expected: str) -> str:
    """check_sr (dciodvfy without errors, TID 1500), then dsrdump's full text with codes, each expected piece in it."""
    check_sr(orthanc, instance, tmp)
    dump = subprocess.run([dcmtk_tool("dsrdump"), "+Pt", "+Pc", "+Pl", "+Pu", str(tmp / f"{instance}.dcm")],
                          capture_output=True, text=True, check=True).stdout
    for text in expected:
        assert text in dump, f"{text!r} not in dsrdump output:\n{dump}"
    return dump


def groups_of(dump: str) -> dict[str, str]:
    """dsrdump text of each TID 1501 group, by tracking identifier."""
    out = {}
    for chunk in dump.split('CONTAINER:(125007,DCM,"Measurement Group")')[1:]:
        m = re.search(r'"Tracking Identifier"\)="([^"]+)"', chunk)
        if m:
            out[m.group(1)] = chunk.split('CONTAINER:(C0034375,UMLS,"Qualitative Evaluations")')[0]
    return out


def report_of(node: NodeProcess) -> dict:
    # the SR can reach Orthanc before the dispatch step is recorded as done: wait for that state
    def done() -> dict | None:
        version = node.status()["studies"][0]["versions"][-1]
        return version if version["pipeline_state"] == "done" else None

    version = wait("pipeline done", done, 240)
    assert version["pipeline_state"] == "done", version
    return version["report"]


@pytest.mark.slow
def test_a_study_outside_the_training_ranges_gets_a_cannot_grade_sr_naming_the_measurement(
        pacs: tuple[Orthanc, int], ckpt_dir: Path, tmp_path: Path) -> None:
    orthanc, port = pacs
    ckpts = tmp_path / "ckpts"
    regate(ckpt_dir / "promptnet-tiny.pt", ckpts / "promptnet-thin.pt", ranges=THIN_T2, metrics=HELDOUT_OK)
    node = start_node(tmp_path, orthanc, port, ckpts)  # the default gate and floor: nothing loosened
    try:
        study = route(orthanc, study_files(tmp_path / "study", roles=("T1", "T2", "FLAIR"), seed=21))
        srs = wait("SR in Orthanc", lambda: reports_in(orthanc, study), 240)
        dump = sr_text(orthanc, srs[0], tmp_path, "No model could grade this study.",
                        '"Model declined by the input gate"', 'NUM:(SLICETHICK-T2,99DCMNODE,"Slice thickness (T2)")')
        # the measurement, its value and the training range, in the reason and as a NUM with its unit
        value = SLICE_REASON.search(dump)
        assert value is not None, dump
        assert f'"Slice thickness (T2)")="{value.group(1)}" (mm,UCUM,"mm")' in dump
        assert '"Finding"' not in dump and '"Probability"' not in dump and '"Class probabilities"' not in dump
        assert GATE_LOOSENED_TEXT not in dump
        assert set(groups_of(dump)) == {"grading not possible", "promptnet declined"}
        sc = wait("summary image", lambda: reports_in(orthanc, study, "OT") or reports_in(orthanc, study, "SC"), 240)
        check_sc(orthanc, sc[0], tmp_path)
        report = report_of(node)
        assert report["models"] == [] and report["gate_loosened"] is None
        assert report["cannot_grade"].startswith("No model could grade this study. ")
        assert SLICE_REASON.search(report["cannot_grade"].replace("\u2013", "-"))
        (declined,) = report["declined"]
        assert declined["family"] == "promptnet" and declined["stage"] == "measurements"
        assert any(SLICE_REASON.search(r.replace("\u2013", "-")) for r in declined["reasons"])
        assert "probability" not in json.dumps(report) and "label" not in json.dumps(report)
    finally:
        node.stop()


@pytest.mark.slow
def test_a_loosened_gate_grades_and_the_sr_says_so(pacs: tuple[Orthanc, int], ckpt_dir: Path,
                                                   tmp_path: Path) -> None:
    orthanc, port = pacs
    ckpts = tmp_path / "ckpts"
    regate(ckpt_dir / "promptnet-tiny.pt", ckpts / "promptnet-thin.pt", ranges=THIN_T2)
    node = start_node(tmp_path, orthanc, port, ckpts, **LOOSE_GATE)
    try:
        study = route(orthanc, study_files(tmp_path / "study", roles=("T1", "T2", "FLAIR"), seed=21))
        srs = wait("SR in Orthanc", lambda: reports_in(orthanc, study), 240)
        dump = sr_text(orthanc, srs[0], tmp_path, "Probability", "Finding", '"Input gate loosened"',
                        GATE_LOOSENED_TEXT, "measurement ranges widened by",
                        'NUM:(SLICETHICK-T2,99DCMNODE,"Slice thickness (T2)")')
        assert "Model declined by the input gate" not in dump
        assert set(groups_of(dump)) == {"promptnet grade", "promptnet input measurements"}
        report = report_of(node)
        assert [m["family"] for m in report["models"]] == ["promptnet"] and report["declined"] == []
        assert report["models"][0]["findings"]["grade"]["label"] in ("LGG", "HGG")
        assert report["gate_loosened"].startswith(GATE_LOOSENED_TEXT) and report["cannot_grade"] is None
    finally:
        node.stop()


@pytest.mark.slow
def test_a_declined_model_never_shows_a_grade_in_the_sr_or_the_status(pacs: tuple[Orthanc, int], ckpt_dir: Path,
                                                                      tmp_path: Path) -> None:
    """All four roles: the full-sequence CNN is declined (its range), MMDLM grades; only MMDLM has a grade."""
    orthanc, port = pacs
    ckpts = tmp_path / "ckpts"
    regate(ckpt_dir / "fs3dcnn-tiny.pt", ckpts / "fs3dcnn-thin.pt", ranges=THIN_T2)
    regate(ckpt_dir / "mmdlm-tiny.pt", ckpts / "mmdlm-tiny.pt")  # its own training ranges, unchanged
    # the ranges at their default margin; the old specs' unmeasured input and the tiny models' features allowed
    node = start_node(tmp_path, orthanc, port, ckpts, gate_unchecked="allow", gate_feature_factor=1000.0,
                      **NO_FLOOR)
    try:
        study = route(orthanc, study_files(tmp_path / "study", seed=22))
        srs = wait("SR in Orthanc", lambda: reports_in(orthanc, study), 240)
        dump = sr_text(orthanc, srs[0], tmp_path, "Probability", "Finding", GATE_LOOSENED_TEXT)
        groups = groups_of(dump)
        assert {"mmdlm grade", "mmdlm IDH", "mmdlm 1p/19q", "fs3dcnn declined"} <= set(groups)
        assert not [g for g in groups if g.startswith("fs3dcnn") and g != "fs3dcnn declined"]
        declined = groups["fs3dcnn declined"]
        for word in ('"Finding"', '"Probability"', '"Histologic grade"', '"Class probabilities"', "Low grade glioma",
                     "High grade glioma"):
            assert word not in declined, word
        assert SLICE_REASON.search(declined) and '"Model declined by the input gate"' in declined
        assert '"Finding"' in groups["mmdlm grade"] and '"Probability"' in groups["mmdlm grade"]
        # the one place a family's name and a class meet is the graded model's own groups
        assert dump.count('"Algorithm Name")="dicomnode glioma grading: fs3dcnn"') == 1
        raw = node.cli("status", "--json").stdout
        version = json.loads(raw)["studies"][0]["versions"][-1]
        report = version["report"]
        assert [m["family"] for m in report["models"]] == ["mmdlm"]
        assert [d["family"] for d in report["declined"]] == ["fs3dcnn"]
        assert set(report["declined"][0]) == {"family", "checkpoint", "stage", "reasons"}
        # outside its "declined" entry (reasons only), the status names the declined model nowhere
        assert "fs3dcnn" not in json.dumps({k: v for k, v in version.items() if k != "report"})
        assert "fs3dcnn" not in json.dumps({k: v for k, v in report.items() if k != "declined"})
    finally:
        node.stop()


def test_gate_settings_are_validated_and_reach_the_models_gate(tmp_path: Path) -> None:
    from models.gate import GateSettings

    from dicomnode.config import SettingsError, load_settings
    from dicomnode.stages.models import gate_settings

    default = load_settings(None, environ={})
    assert gate_settings(default) == GateSettings() and not gate_settings(default).loosened
    loose = load_settings(None, environ={"DICOMNODE_GATE_MARGIN": "1000", "DICOMNODE_GATE_FEATURE_FACTOR": "1000",
                                         "DICOMNODE_GATE_UNCHECKED": "allow"})
    gs = gate_settings(loose)
    assert gs == GateSettings(margin=1000.0, feature_factor=1000.0, unchecked="allow") and gs.loosened
    assert gs.describe().startswith(GATE_LOOSENED_TEXT)
    cfg = tmp_path / "node.toml"
    for text, message in (("gate_margin = -0.1", "gate_margin"), ("gate_feature_factor = 0", "gate_feature_factor"),
                          ('gate_unchecked = "maybe"', "gate_unchecked"), ('gate_margin = "wide"', "gate_margin")):
        cfg.write_text(text + "\n")
        with pytest.raises(SettingsError, match=message):
            load_settings(cfg, environ={})
    example = Path(__file__).resolve().parent.parent / "deploy" / "node.example.toml"
    assert gate_settings(load_settings(example, environ={})) == GateSettings()
