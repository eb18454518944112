"""``dicomnode demo``: the whole product on one machine in a few minutes, with nothing to configure.

It trains demo checkpoints with the training module if the node has none
(clearly labelled: synthetic data, not for clinical use), starts the node in
embedded mode and a minimal local receiving PACS (a pynetdicom storage SCP
standing in for the hospital's), sends a synthetic study made from a held-out
case of the synthetic cohort, waits for the report to come back to the PACS,
and shows it: the SR's content in the terminal, an HTML rendering of the SR,
a PNG of the summary image, and the time each stage took.

It says what it is doing while it does it, because on a busy machine the
training alone can take half an hour: a line when each long step starts and
when it ends (with its wall time), the training's own progress on stderr (per
model a bar on a terminal, a line per epoch with loss and validation AUC in a
log), the instances sent, what the node is doing while the report is awaited
(its pipeline state from the index, on every change and every
``HEARTBEAT_S``), and at the end where everything is: report text, HTML and
PNG, the node's data folder and log, the checkpoints and their figures, and
the dashboard the node served meanwhile. ``progress=False`` (``--quiet``)
keeps only the step lines and the end.

This is the only place the node calls into ``training`` (DESIGN.md: the top
floor may, to make a demo cohort and checkpoint).
"""
from __future__ import annotations

import logging
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
from dicomnode.dicom.scu import Destination, OutgoingFile, Timeouts, store
from dicomnode.logs import PhiFilter
from dicomnode.node import Node
from dicomnode.runtime.monitor import full_status
from dicomnode.stages.report.render import describe, render_html, summary_png
from dicomnode.synth import write_study
from dicomnode.web.server import PortInUse
from models.registry import CheckpointRegistry
from training.cohort import generate_cohort
from training.demo import make_demo_checkpoints, summary_lines

log = logging.getLogger(__name__)

PACS_AET = "DEMOPACS"
DEMO_SCU = "DEMOSCU"
#: the node's HTTP side (dashboard) in the demo, on DASHBOARD_PORT when it is free on 127.0.0.1, else on
#: any free port; False runs the demo's node with http_port = 0 (no HTTP side)
SERVE_DASHBOARD = True
DASHBOARD_PORT = 8081
HEARTBEAT_S = 12.0   # a line at least this often while the node works on the study
SEND_EVERY_S = 2.0   # a progress line this often while the study is being sent
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


def _flushed_print(line: str) -> None:
    """print, flushed: with stdout piped into a log (CI, ``| tee``) Python buffers it in blocks, and the
    demo's step lines would arrive minutes late and out of order with the training progress on stderr."""
    print(line, flush=True)


class Steps:
    """The demo's long steps, each announced when it starts and when it ends, with its wall time.

    Why: on a busy machine training alone can take half an hour; a demo that says nothing meanwhile
    cannot be told from a hung one.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self._t0: dict[str, float] = {}

    def start(self, name: str, detail: str = "") -> None:
        self._t0[name] = time.perf_counter()
        self.echo(f"{name} ..." + (f" ({detail})" if detail else ""))

    def elapsed(self, name: str) -> float:
        return time.perf_counter() - self._t0[name]

    def done(self, name: str, detail: str = "") -> float:
        took = self.seconds[name] = self.elapsed(name)
        self.echo(f"{name}: done in {_duration(took)}" + (f" ({detail})" if detail else ""))
        return took


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def dashboard_port(preferred: int = DASHBOARD_PORT) -> int:
    """The HTTP side's port for the demo: ``preferred`` when free on 127.0.0.1, else any free one
    (a real node on the same machine keeps its 8081)."""
    return preferred if _port_free(preferred) else _free_port()


def _log_to_file(path: Path) -> Callable[[], None]:
    """Send the node's log (INFO and up, through the PHI filter) to ``path`` as well; returns the undo.

    The terminal keeps what the CLI set up for it (warnings only, unless ``--verbose``): the handlers
    already installed get the root level as their own before the root is opened up to INFO for the file.
    """
    root = logging.getLogger()
    before = root.level
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(PhiFilter())
    raised = [h for h in root.handlers if h.level == logging.NOTSET]
    for h in raised:
        h.setLevel(before)
    root.addHandler(handler)
    root.setLevel(min(before, logging.INFO) if before != logging.NOTSET else logging.INFO)

    def undo() -> None:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(before)
        for h in raised:
            h.setLevel(logging.NOTSET)

    return undo


def _send_study(files: list[Path], node_settings: Settings, steps: Steps, *, progress: bool) -> bool:
    """C-STORE the study over one association (its release completes the study), saying how far it got."""
    name = "sending the study to the node"
    outgoing = []
    for path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        outgoing.append(OutgoingFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    steps.start(name, f"{len(outgoing)} instances to {node_settings.ae_title} on 127.0.0.1:{node_settings.port}")
    dest = Destination(node_settings.ae_title, "127.0.0.1", node_settings.port).settings()
    sent, failed, said = 0, 0, time.perf_counter()
    for _f, outcome in store(dest, outgoing, calling_ae=DEMO_SCU, timeouts=Timeouts.uniform(60.0)):
        if outcome.status == 0x0000:
            sent += 1
        else:
            failed += 1
        if progress and time.perf_counter() - said >= SEND_EVERY_S and sent + failed < len(outgoing):
            steps.echo(f"  sent {sent}/{len(outgoing)} instances ({_duration(steps.elapsed(name))})")
            said = time.perf_counter()
    if failed:
        steps.echo(f"{name}: {failed} of {len(outgoing)} instances were not stored")
        return False
    steps.done(name, f"sent {sent}/{len(outgoing)} instances")
    return True


def _doing(version: dict[str, Any] | None) -> str:
    """What the node is doing with the demo's study, in the words of its index (``pipeline_state``)."""
    if version is None:
        return "the study is not in the index yet"
    state = str(version.get("pipeline_state", ""))
    if state == "receiving":
        return "receiving (the study completes once the association is released and quiet)"
    if state == "done":
        sent = sum(d.get("state") == "sent" for d in version.get("deliveries", []))
        return f"done; sending the report to the PACS ({sent}/{len(version.get('deliveries', []))} objects sent)"
    return state


def _wait_for_report(node: Node, node_settings: Settings, pacs: LocalPACS, study_uid: str, steps: Steps, *,
                     timeout_s: float, progress: bool) -> dict[str, Any] | None:
    """Poll the node's index until the report reached the PACS (or the pipeline failed, or time ran out).

    A line whenever the version's state changes, and a heartbeat every ``HEARTBEAT_S`` while it does not.
    """
    name = "waiting for the report"
    steps.start(name, "the node completes the study, then convert, preprocess, infer, report, dispatch")
    deadline = time.time() + timeout_s
    last_said, last_state = time.perf_counter(), ""
    version: dict[str, Any] | None = None
    while time.time() < deadline:
        doc = full_status(node.index, node_settings)
        versions = [v for st in doc["studies"] if st["study_instance_uid"] == study_uid for v in st["versions"]]
        version = versions[-1] if versions else None
        state = _doing(version)
        if progress and (state != last_state or time.perf_counter() - last_said >= HEARTBEAT_S):
            steps.echo(f"  {_duration(steps.elapsed(name))}: {state}")
            last_said, last_state = time.perf_counter(), state
        if version is not None and version.get("pipeline_state", "").startswith("failed"):
            return version
        if version is not None and version.get("pipeline_state") == "done":
            deliveries = version.get("deliveries", [])
            if deliveries and all(d.get("state") == "sent" for d in deliveries) and len(pacs.received) >= len(deliveries):
                steps.done(name, f"the PACS has {len(deliveries)} object(s) from the node")
                return version
            if any(d.get("state") == "parked" for d in deliveries):
                return version
        if node.failure is not None:
            return version
        time.sleep(0.5)
    return None


def run_demo(settings: Settings, workdir: Path, *, without_t1ce: bool = False, timeout_s: float = 900.0,
             quick: bool = False, progress: bool = True, echo: Callable[[str], None] = _flushed_print) -> int:
    """Everything the module docstring says; returns a process exit code.

    ``progress`` False (``--quiet``): no training bars or per-epoch lines, no send progress and no
    heartbeats; the lines that open and close each step and the closing summary remain.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "node.log"
    undo_log = _log_to_file(log_file)
    try:
        return _run(settings, workdir, log_file, without_t1ce=without_t1ce, timeout_s=timeout_s, quick=quick,
                    progress=progress, echo=echo)
    finally:
        undo_log()


def _run(settings: Settings, workdir: Path, log_file: Path, *, without_t1ce: bool, timeout_s: float, quick: bool,
         progress: bool, echo: Callable[[str], None]) -> int:
    steps = Steps(echo)
    t_demo = time.perf_counter()
    ck_dir = settings.checkpoints_path
    ck_dir.mkdir(parents=True, exist_ok=True)
    registry = CheckpointRegistry(ck_dir)
    case_dirs: list[Path] = []
    training_dir = workdir / "training"
    if not registry.checkpoints:
        echo(f"No checkpoint in {ck_dir}: training demo checkpoints on a synthetic cohort "
             f"(synthetic data only, NOT for clinical use; "
             f"{'--quick: tiny models that grade nothing meaningfully' if quick else 'a few minutes on 2 idle CPU cores'})"
             + ("; per model a progress bar, or a line per epoch, on stderr" if progress else ""))
        steps.start("training")
        art = make_demo_checkpoints(ck_dir, work_dir=training_dir, seed=0, size="tiny" if quick else "demo",
                                    progress=progress, say=lambda line: echo(f"  {line}"))
        steps.done("training")
        for line in summary_lines(art):
            echo(f"  {line}")
        case_dirs = list(art.held_out_cases)
    else:
        echo(f"Using {len(registry.checkpoints)} checkpoint(s) from {ck_dir}")
    if not case_dirs:
        cohort = workdir / "cohort"
        if not any(cohort.glob("*/")):
            steps.start("writing a synthetic cohort of 2 cases", str(cohort))
            generate_cohort(cohort, profile="small", seed=7, n_cases=2)
            steps.done("writing a synthetic cohort of 2 cases")
        case_dirs = sorted(p for p in cohort.iterdir() if p.is_dir())
    case = case_dirs[0]
    roles = ("T1", "T2", "FLAIR") if without_t1ce else ("T1", "T1CE", "T2", "FLAIR")
    study_uid, study_files = held_out_study(case, workdir / "study", roles=roles, seed=11)
    echo(f"Synthetic study from held-out case {case.name}: {len(study_files)} files, roles {'+'.join(roles)}")

    pacs = LocalPACS(workdir / "pacs")
    http_port = dashboard_port() if SERVE_DASHBOARD else 0
    node_settings = settings.replace(
        port=_free_port() if settings.port == 11112 else settings.port,
        destinations=[{"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        # the demo sends the study in one association and releases it: the release completes it a second
        # later; the quiet period is only the fall-back, long enough that a stall on a busy machine cannot
        # split the study in two versions
        quiet_period_s=min(settings.quiet_period_s, 60.0), release_quiet_s=1.0, allowed_peers=[f"{DEMO_SCU}@127.0.0.1"],
        http_port=http_port)
    steps.start("starting the node", f"{node_settings.ae_title} on 127.0.0.1:{node_settings.port}, embedded "
                                     f"pipeline, data in {node_settings.data_path}")
    try:
        node = Node(node_settings)
    except PortInUse:  # taken between the check and the bind (another node's 8081): any free port will do
        http_port = _free_port()
        node_settings = node_settings.replace(http_port=http_port)
        node = Node(node_settings)
    node.start()
    pacs_started = False
    try:
        if not node.wait_ready(timeout=300):
            echo(f"the node could not start its pipeline: {node.failure or 'not ready within 300 s'}")
            return 1
        steps.done("starting the node", "listening; pipeline, torch and checkpoints loaded"
                   + (f"; dashboard at {_dashboard_url(http_port)}" if http_port else ""))
        steps.start("starting the local receiving PACS", f"{PACS_AET} on 127.0.0.1:{pacs.port}, writes to {pacs.folder}")
        pacs.start()
        pacs_started = True
        steps.done("starting the local receiving PACS")
        t_send = time.perf_counter()
        if not _send_study(study_files, node_settings, steps, progress=progress):
            return 1
        steps.seconds["send study to node"] = steps.seconds.pop("sending the study to the node")
        version = _wait_for_report(node, node_settings, pacs, study_uid, steps, timeout_s=timeout_s, progress=progress)
        steps.seconds["from send to report in PACS"] = time.perf_counter() - t_send
        if version is None:
            echo(f"no report within {timeout_s:.0f} s (the node's log: {log_file})")
            return 1
        if version["pipeline_state"] != "done" or node.failure is not None:
            echo(f"the pipeline stopped: {version['pipeline_state']}: {version['pipeline']} "
                 f"{node.failure or ''} (the node's log: {log_file})")
            return 1
        if any(d.get("state") != "sent" for d in version.get("deliveries", [])):
            echo(f"the report could not be delivered to the PACS: {version['deliveries']} (the node's log: {log_file})")
            return 1
        dashboard = _probe(_dashboard_url(http_port)) if http_port else ""
    finally:
        steps.start("stopping the node")
        node.stop()
        if pacs_started:
            pacs.stop()
        steps.done("stopping the node")
    steps.start("reading the report the PACS received")
    sr = next((p for p in pacs.received if dcmread(p, stop_before_pixels=True).Modality == "SR"), None)
    if sr is None:
        echo("the PACS received no SR")
        return 1
    text = describe(sr)
    report_txt = workdir / "report.txt"
    report_txt.write_text(text + "\n", encoding="utf-8")
    html = workdir / "report.html"
    render_html(sr, html)
    # the summary may continue on further images of its series (a long report): every page, in order
    headers = [(p, dcmread(p, stop_before_pixels=True)) for p in pacs.received]
    scs = sorted(((p, ds) for p, ds in headers if ds.Modality != "SR"),
                 key=lambda pd: int(pd[1].get("InstanceNumber") or 1))
    pngs: list[Path] = []
    for k, (sc, _ds) in enumerate(scs, start=1):
        pngs.append(workdir / ("summary.png" if k == 1 else f"summary-{k}.png"))
        summary_png(sc, pngs[-1])
    steps.done("reading the report the PACS received")
    echo("")
    echo(text)
    echo("")
    echo("Time per stage (node, measured):")
    echo(_stage_table(version))
    echo("Time per demo step:")
    for k, v in steps.seconds.items():
        echo(f"  {k}: {v:.1f} s")
    echo(f"  whole demo: {time.perf_counter() - t_demo:.1f} s")
    echo("")
    echo("Where everything is:")
    for label, where in where_everything_is(workdir, node_settings, sr=sr, report_txt=report_txt, html=html,
                                            pngs=pngs, log_file=log_file, training_dir=training_dir):
        echo(f"  {label + ':' if label else '':22} {where}")
    if http_port:
        echo(f"dashboard: {_dashboard_url(http_port)}")
        echo(f"  ({dashboard} while the demo's node ran; the node has stopped: to browse this data again, "
             f"DICOMNODE_DATA_DIR={node_settings.data_path} DICOMNODE_CHECKPOINTS_DIR={node_settings.checkpoints_path} "
             f"DICOMNODE_HTTP_PORT={http_port} dicomnode web)")
    else:
        echo("dashboard: not served (the demo's node ran with http_port = 0)")
    return 0


def _dashboard_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/"


def _probe(url: str) -> str:
    """Whether the dashboard answered (said in the closing block rather than assumed)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return f"answered HTTP {rsp.status}"
    except urllib.error.HTTPError as exc:
        return f"answered HTTP {exc.code}"
    except OSError as exc:
        return f"did not answer ({exc})"


def where_everything_is(workdir: Path, node_settings: Settings, *, sr: Path, report_txt: Path, html: Path,
                        pngs: list[Path], log_file: Path, training_dir: Path) -> list[tuple[str, str]]:
    """The closing block's rows: what the demo made and where it lies (every path exists)."""
    ck = node_settings.checkpoints_path
    rows: list[tuple[str, str]] = [
        ("report (text)", str(report_txt)),
        ("report (HTML)", str(html)),
    ]
    for k, png in enumerate(pngs, start=1):
        rows.append(("summary image (PNG)" if len(pngs) == 1 else f"summary image {k}/{len(pngs)} (PNG)", str(png)))
    rows += [
        ("SR as the PACS got it", str(sr)),
        ("local PACS folder", str(sr.parent)),
        ("node data dir", str(node_settings.data_path)),
        ("node log", str(log_file)),
        ("checkpoints", str(ck)),
    ]
    figures = sorted((ck / "figures").glob("*.png")) if (ck / "figures").is_dir() else []
    if figures:
        rows.append(("training figures", str(ck / "figures")))
        rows += [("", str(p)) for p in figures]
    if training_dir.is_dir():
        rows.append(("training runs", str(training_dir)))
    return rows
