"""``dicomnode demo``: the whole product on one machine in a few minutes, with nothing to configure.

It trains demo checkpoints with the training module if the node has none
(clearly labelled: synthetic data, not for clinical use), starts the node in
embedded mode and a minimal local receiving PACS (a pynetdicom storage SCP
standing in for the hospital's), sends a synthetic study made from a held-out
case of the synthetic cohort, waits for the report to come back to the PACS,
and shows it: the SR's content in the terminal, an HTML rendering of the SR,
a PNG of the summary image, and the time each stage took.

This is the only place the node calls into ``training`` (DESIGN.md: the top
floor may, to make a demo cohort and checkpoint).
"""
from __future__ import annotations

import logging
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pydicom.uid import generate_uid

from dicomnode.config import Settings
from dicomnode.dicom.scu import Destination, send
from dicomnode.node import Node
from dicomnode.runtime.monitor import full_status
from dicomnode.stages.report.render import describe, render_html, summary_png
from dicomnode.synth import write_study
from models.registry import CheckpointRegistry
from training.cohort import generate_cohort
from training.demo import make_demo_checkpoints, summary_lines

log = logging.getLogger(__name__)

PACS_AET = "DEMOPACS"
BRATS_SUFFIX = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPACS:
    """A minimal storage SCP writing what it receives under ``folder`` (the demo's PACS)."""

    folder: Path
    port: int = field(default_factory=_free_port)
    received: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.dcm"):  # a previous demo's objects: this run shows its own
            old.unlink()
        ae = AE(ae_title=PACS_AET)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            path = self.folder / f"{ds.Modality}-{len(self.received) + 1:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.received.append(path)
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self._server.shutdown()


def held_out_study(case_dir: Path, out_dir: Path, *, roles: tuple[str, ...], seed: int) -> tuple[str, list[Path]]:
    """A BraTS-layout case written as a DICOM study (the node's tests and demo use the cohort this way).

    A new Study Instance UID per call: a second demo run is a new study, not
    duplicates of the first one.
    """
    volumes: dict[str, np.ndarray] = {}
    affine = None
    for role in roles:
        matches = sorted(case_dir.glob(f"*_{BRATS_SUFFIX[role]}.nii*"))
        if not matches:
            raise FileNotFoundError(f"{case_dir} has no {BRATS_SUFFIX[role]} volume")
        img = nib.load(str(matches[0]))
        volumes[role] = np.asarray(img.dataobj, dtype=np.float32)
        affine = img.affine if affine is None else affine
    assert affine is not None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    written = write_study(volumes, affine, out_dir, vendor="siemens", seed=seed, patient_name="DEMO^SYNTHETIC",
                          patient_id="DEMO0001", study_instance_uid=generate_uid())
    return written.study_instance_uid, written.all_files()


def _stage_table(version: dict[str, Any]) -> str:
    rows = [f"  {stage:10} {step['seconds']:.2f} s" for stage, step in version.get("pipeline", {}).items()
            if step.get("seconds") is not None]
    return "\n".join(rows)


def run_demo(settings: Settings, workdir: Path, *, without_t1ce: bool = False, timeout_s: float = 900.0,
             quick: bool = False, echo: Any = print) -> int:
    """Everything the module docstring says; returns a process exit code."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    ck_dir = settings.checkpoints_path
    ck_dir.mkdir(parents=True, exist_ok=True)
    registry = CheckpointRegistry(ck_dir)
    case_dirs: list[Path] = []
    if not registry.checkpoints:
        echo(f"No checkpoint in {ck_dir}: training demo checkpoints on a synthetic cohort "
             f"(synthetic data only, NOT for clinical use; "
             f"{'--quick: tiny models that grade nothing meaningfully' if quick else 'a few minutes on 2 CPU cores'}) ...")
        t0 = time.perf_counter()
        art = make_demo_checkpoints(ck_dir, work_dir=workdir / "training", seed=0, size="tiny" if quick else "demo")
        timings["train demo checkpoints"] = time.perf_counter() - t0
        for line in summary_lines(art):
            echo(f"  {line}")
        case_dirs = list(art.held_out_cases)
    else:
        echo(f"Using {len(registry.checkpoints)} checkpoint(s) from {ck_dir}")
    if not case_dirs:
        cohort = workdir / "cohort"
        if not any(cohort.glob("*/")):
            generate_cohort(cohort, profile="small", seed=7, n_cases=2)
        case_dirs = sorted(p for p in cohort.iterdir() if p.is_dir())
    case = case_dirs[0]
    roles = ("T1", "T2", "FLAIR") if without_t1ce else ("T1", "T1CE", "T2", "FLAIR")
    study_uid, study_files = held_out_study(case, workdir / "study", roles=roles, seed=11)
    echo(f"Synthetic study from held-out case {case.name}: {len(study_files)} files, roles {'+'.join(roles)}")

    pacs = LocalPACS(workdir / "pacs")
    pacs.start()
    node_settings = settings.replace(
        port=_free_port() if settings.port == 11112 else settings.port,
        destinations=[{"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        # the demo sends the study in one association and releases it: the release completes it a second
        # later; the quiet period is only the fall-back, long enough that a stall on a busy machine cannot
        # split the study in two versions
        quiet_period_s=min(settings.quiet_period_s, 60.0), release_quiet_s=1.0, allowed_peers=["DEMOSCU@127.0.0.1"])
    node = Node(node_settings)
    node.start()
    try:
        t_send = time.perf_counter()
        results = send(study_files, Destination(node_settings.ae_title, "127.0.0.1", node_settings.port),
                       calling_ae="DEMOSCU")
        if not all(r.ok for r in results):
            echo("sending the study to the node failed")
            return 1
        timings["send study to node"] = time.perf_counter() - t_send
        echo(f"Sent to the node ({node_settings.ae_title} on port {node_settings.port}); waiting for the report ...")
        deadline = time.time() + timeout_s
        version: dict[str, Any] | None = None
        while time.time() < deadline:
            doc = full_status(node.index, node_settings)
            versions = [v for st in doc["studies"] if st["study_instance_uid"] == study_uid for v in st["versions"]]
            if versions and versions[-1].get("pipeline_state", "").startswith("failed"):
                version = versions[-1]
                break
            if versions and versions[-1].get("pipeline_state") == "done" and len(pacs.received) >= 1:
                version = versions[-1]
                break
            time.sleep(0.5)
        timings["from send to report in PACS"] = time.perf_counter() - t_send
        if version is None:
            echo(f"no report within {timeout_s:.0f} s")
            return 1
        if version["pipeline_state"] != "done":
            echo(f"the pipeline stopped: {version['pipeline_state']}: {version['pipeline']}")
            return 1
        time.sleep(1.0)  # the summary image follows the SR on the same association
    finally:
        node.stop()
        pacs.stop()
    sr = next((p for p in pacs.received if dcmread(p, stop_before_pixels=True).Modality == "SR"), None)
    if sr is None:
        echo("the PACS received no SR")
        return 1
    echo("")
    echo(describe(sr))
    html = workdir / "report.html"
    render_html(sr, html)
    outputs = [f"SR (DICOM): {sr}", f"SR rendered: {html}"]
    sc = next((p for p in pacs.received if dcmread(p, stop_before_pixels=True).Modality != "SR"), None)
    if sc is not None:
        png = workdir / "summary.png"
        summary_png(sc, png)
        outputs.append(f"summary image: {png}")
    echo("")
    echo("Time per stage (node, measured):")
    echo(_stage_table(version))
    for k, v in timings.items():
        echo(f"  {k}: {v:.1f} s")
    echo("")
    echo("\n".join(outputs))
    return 0
