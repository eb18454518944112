"""A real PACS (Orthanc) routes synthetic brain MR studies to the node; roles come out right.

Also covers `dicomnode send` (our own SCU) and Enhanced MR multi-frame input.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need
from dicomnode.synth import make_phantom, write_study
from nodeutil import NODE_AET, RELEASE_COMPLETES, NodeProcess
from pacs import Orthanc


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    # Orthanc and `dicomnode send` each send a study in one association and release it: the version completes
    # on that release, not after a 2 s quiet period that a stall mid-transfer on a loaded machine could end early
    n = NodeProcess(tmp_path / "data", allowed_peers=["ORTHANC@127.0.0.1", "OPERATOR"], **RELEASE_COMPLETES).start()
    yield n
    n.stop()


def roles_of(doc: dict, study_uid: str) -> dict[str, dict]:
    (st,) = [s for s in doc["studies"] if s["study_instance_uid"] == study_uid]
    return {se["series_instance_uid"]: se for se in st["versions"][-1]["series"]}


def complete(study_uid: str):
    def check(doc: dict) -> bool:
        return any(s["study_instance_uid"] == study_uid and s["versions"][-1]["state"] == "complete"
                   for s in doc["studies"])
    return check


@pytest.mark.parametrize(("vendor", "enhanced"), [("siemens", False), ("ge", True)])
def test_orthanc_routes_a_study_and_the_node_identifies_every_role(
    node: NodeProcess, tmp_path: Path, vendor: str, enhanced: bool
) -> None:
    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    volumes, affine = make_phantom(shape=(48, 48, 24), seed=3)
    study = write_study(volumes, affine, tmp_path / "study", vendor=vendor, enhanced=enhanced, seed=3)
    pacs = Orthanc(tmp_path, node.port)
    try:
        orthanc_study = pacs.upload(study.all_files())
        job = pacs.request("POST", "/modalities/node/store", orthanc_study.encode())
        assert job is not None
        doc = node.wait_for(complete(study.study_instance_uid))
        roles = roles_of(doc, study.study_instance_uid)
        for role, series_uid in study.series.items():
            assert roles[series_uid]["role"] == role, roles[series_uid]
            assert roles[series_uid]["status"] == "selected"
        assert sum(se["instances"] for se in roles.values()) == len(study.all_files())
    finally:
        pacs.stop()


def test_dicomnode_send_cli(node: NodeProcess, tmp_path: Path) -> None:
    volumes, affine = make_phantom(shape=(32, 32, 16), seed=5)
    study = write_study(volumes, affine, tmp_path / "study", vendor="philips", seed=5, roles=["T2", "FLAIR"])
    out = node.cli("send", str(tmp_path / "study"), "--to", f"{NODE_AET}@127.0.0.1:{node.port}", "--calling", "OPERATOR")
    assert f"sent {len(study.all_files())}/{len(study.all_files())}" in out.stdout
    doc = node.wait_for(complete(study.study_instance_uid))
    roles = roles_of(doc, study.study_instance_uid)
    assert {roles[uid]["role"] for uid in study.series.values()} == {"T2", "FLAIR"}
    # a refused send is reported and exits non-zero
    bad = node.cli("send", str(tmp_path / "study"), "--to", f"{NODE_AET}@127.0.0.1:{node.port}",
                   "--calling", "INTRUDER", check=False)
    assert bad.returncode == 1 and "association rejected" in bad.stdout
