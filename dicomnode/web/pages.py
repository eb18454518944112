"""The dashboard: server-rendered HTML an operator and a radiologist read without JavaScript.

Pages:

- ``/``: what needs attention (failed steps, parked deliveries, each with a
  retry button), then every study's versions with their pipeline steps,
  findings and deliveries;
- ``/events``: the event log, filtered by study, kind and time (GET query
  parameters, so a filtered view is a link one can send);
- ``/versions/{version_id}``: one version's report, laid out to be read in ten
  seconds: the research-use disclaimer on top (and, when a model learned from
  synthetic data, that), then the findings, large, then the key-slice summary
  image (``/versions/{version_id}/summary.png``; ``summary-2.png``... when the
  summary runs to more images), which models ran and why,
  which declined and why, the quality measurements, and the plumbing last;
- ``POST /versions/{id}/retry`` and ``POST /deliveries/{id}/retry``: the
  buttons; they answer 303 back to the page they were pressed on.

Patient name and ID are read from the report's own DICOM file and shown only
to an authenticated request (never in the open loopback mode); URLs carry
index ids only. No CDN, no external script or font: the node may sit on a
network with no internet.

Why the SR is read here: the index keeps the findings (``summarise``), but
the sentences that say why a model ran, what it was trained on and what the
gate measured live in the SR the PACS received; reading that file shows the
radiologist the same words. The summary image's pixels are converted with
pydicom and Pillow here rather than with ``dicomnode.stages.report.render
.summary_png`` because importing that package pulls in matplotlib (2.4 s
measured), and ``dicomnode.node`` (so every CLI command) imports this module.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pydicom
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from PIL import Image
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.files import write_atomic
from dicomnode.handoff import FAMILY_TITLES, family_title
from dicomnode.index.reports import Reports
from dicomnode.index.schema import StudyVersion
from dicomnode.runtime.monitor import full_status
from dicomnode.stages.dispatch import describe as describe_delivery
from dicomnode.web import api
from dicomnode.web.auth import user_of
from dicomnode.web.state import WebState

log = logging.getLogger(__name__)

DISCLAIMER = ("Research use only. Not for diagnostic use. Produced automatically by machine-learning models that are "
              "not cleared or approved as a medical device; not for diagnosis, treatment or any clinical decision. "
              "Probabilities are model outputs, not clinical certainty.")
STUDIES_SHOWN = 100  # the dashboard lists the newest studies; the API has them all
REFRESH_S = 15  # the dashboard and a running version's page reload themselves (a meta refresh: no script)
TASK_TITLES = {"grade": "Grade", "idh": "IDH", "1p19q": "1p/19q"}
TASK_ORDER = {"grade": 0, "idh": 1, "1p19q": 2}
LABEL_TITLES = {"HGG": "High-grade glioma", "LGG": "Low-grade glioma"}

CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2430;
 background:#f4f6f9}
header.top{background:#1f2d3d;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:baseline;flex-wrap:wrap}
header.top a{color:#cfe3ff;text-decoration:none;margin-right:1em}
header.top .node{font-weight:600;font-size:1.1em}
header.top .who{margin-left:auto;color:#d8dee8;font-size:.9em}
main{padding:1em 1.2em;max-width:1400px}
h1{font-size:1.5em;margin:.3em 0 .4em} h2{font-size:1.15em;margin:1.4em 0 .5em}
table{border-collapse:collapse;background:#fff;width:100%;margin:.3em 0 1em}
th,td{border:1px solid #d5dbe3;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#e9eef4;font-weight:600}
.muted{color:#5b6675}.small{font-size:.85em}.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.85em}
.badge{display:inline-block;padding:.05em .5em;border-radius:.8em;font-size:.85em;font-weight:600;white-space:nowrap}
.ok{background:#d8f3dc;color:#14532d}.bad{background:#fde2e1;color:#8a1c1c}.busy{background:#fff1c2;color:#6b4e00}
.idle{background:#e5e7eb;color:#374151}
.steps{display:flex;gap:.3em;flex-wrap:wrap}
form.inline{display:inline;margin:0}
button{font:inherit;font-size:.85em;padding:.15em .7em;border:1px solid #8a1c1c;background:#fff;color:#8a1c1c;
 border-radius:.3em;cursor:pointer}
button:hover{background:#8a1c1c;color:#fff}
.attention{background:#fff;border-left:6px solid #c0392b;padding:.6em 1em;margin:.5em 0 1em}
.calm{background:#fff;border-left:6px solid #2e7d32;padding:.6em 1em;margin:.5em 0 1em}
.disclaimer{background:#fff4e5;border:2px solid #e67e22;padding:.7em 1em;margin:.2em 0 1em;font-size:.95em}
.disclaimer strong{color:#9a3412}
.synthetic{background:#fde2e1;border:2px solid #c0392b;padding:.6em 1em;margin:0 0 1em;font-weight:600}
.purged{background:#e5e7eb;border-left:6px solid #6b7280;padding:.6em 1em;margin:0 0 1em}
.patient{font-size:1.05em;margin:0 0 .8em}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:.3em 0 1em}
.card{background:#fff;border:1px solid #cbd5e1;border-radius:.5em;padding:.7em 1.1em;min-width:15em}
.card .task{font-size:.9em;color:#5b6675;text-transform:uppercase;letter-spacing:.04em}
.card .label{font-size:2.1em;font-weight:700;line-height:1.15}
.card .prob{font-size:1.35em;font-weight:600}
.card .model{font-size:.85em;color:#5b6675}
.card.nograde{border:2px solid #c0392b}.card.nograde .label{color:#8a1c1c;font-size:1.6em}
.summary img{display:block;max-width:100%;border:1px solid #cbd5e1;background:#000;margin:0 0 .6em}
ul.tight{margin:.2em 0 .6em;padding-left:1.3em}
fieldset{border:1px solid #d5dbe3;background:#fff;padding:.5em 1em;margin:0 0 1em}
fieldset label{margin-right:1em}
"""


def e(value: Any) -> str:
    """HTML-escaped text of anything (None as an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def when(iso: str | None) -> str:
    """A status document's time as "2026-01-02 03:04:05 UTC" (empty for None)."""
    if not iso:
        return ""
    return iso.replace("T", " ").split(".")[0].rstrip("Z") + " UTC"


def badge(text: str) -> str:
    t = text.lower()
    if t.startswith(("done", "sent", "complete", "confirmed")) and "not confirmed" not in t:
        cls = "ok"
    elif t.startswith(("failed", "parked")) or "not confirmed" in t:
        cls = "bad"
    elif t.startswith(("running", "pending", "queued", "receiving", "awaiting")):
        cls = "busy"
    else:
        cls = "idle"
    return f'<span class="badge {cls}">{e(text)}</span>'


def retry_button(action: str, label: str = "Retry") -> str:
    return f'<form class="inline" method="post" action="{e(action)}"><button type="submit">{e(label)}</button></form>'


def layout(state: WebState, request: Request, title: str, body: str, *, refresh: int | None = None) -> HTMLResponse:
    s = state.settings
    user = user_of(request.scope)
    if user is not None:
        who = f"signed in as {e(user)}"
    elif state.settings.http_token_hash or state.settings.http_users:
        who = "not signed in"
    else:
        who = "open on loopback (no credentials configured): patient names are not shown"
    if state.listener is not None:
        back = "" if state.ready is None else (" · pipeline running" if state.ready() else " · pipeline starting")
        node = f"{e(s.ae_title)} · DICOM {e(s.host)}:{e(getattr(state.listener, 'port', s.port))}{back}"
    else:
        node = f"{e(s.ae_title)} · dashboard only (the listener runs elsewhere)"
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">{meta}'
           f"<title>{e(title)} · dicomnode</title><style>{CSS}</style></head><body>"
           f'<header class="top"><span class="node">dicomnode</span><span>{node}</span>'
           f'<nav><a href="/">Studies</a><a href="/events">Events</a><a href="/readyz">Ready?</a>'
           f'<a href="/metrics">Metrics</a><a href="/openapi.json">API</a></nav>'
           f'<span class="who">{who}</span></header><main>{body}</main></body></html>')
    return HTMLResponse(doc, headers={"Cache-Control": "no-store", "Referrer-Policy": "same-origin",
                                      "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                                      "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                                 "script-src 'none'; form-action 'self'; frame-ancestors 'none'"})


# -- the version's report, as the SR the PACS received says it --------------------------------------------


@dataclass
class SrGroup:
    title: str  # the tracking identifier: "<family> <task>", "<family> input measurements", "<family> declined"
    fields: dict[str, list[str]] = field(default_factory=dict)
    nums: list[tuple[str, str]] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.title.split(" ", 1)[0]


@dataclass
class SrView:
    evaluations: dict[str, list[str]]
    groups: list[SrGroup]

    def for_family(self, family: str) -> list[SrGroup]:
        return [g for g in self.groups if g.family == family]

    def texts(self, family: str, name: str) -> list[str]:
        """Distinct values of one item over a family's groups, in order."""
        return list(dict.fromkeys(v for g in self.for_family(family) for v in g.fields.get(name, [])))


def _name(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _value(item: Dataset) -> str:
    vt = item.get("ValueType", "")
    if vt == "TEXT":
        return str(item.get("TextValue", ""))
    if vt == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if vt == "NUM" and item.get("MeasuredValueSequence"):
        mv = item.MeasuredValueSequence[0]
        unit = mv.MeasurementUnitsCodeSequence[0].CodeValue if mv.get("MeasurementUnitsCodeSequence") else ""
        return f"{mv.NumericValue}" + ("" if unit in ("1", "") else f" {unit}")
    return ""


def _collect(items: Iterable[Dataset], out: list[Dataset]) -> None:
    for item in items:
        out.append(item)
        _collect(item.get("ContentSequence", []), out)


_SR_CACHE: dict[tuple[str, int], SrView] = {}
_SR_LOCK = threading.Lock()


def read_sr(path: Path) -> SrView | None:
    """The SR's version-level evaluations and its measurement groups (None when the file is not there)."""
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    with _SR_LOCK:
        if key in _SR_CACHE:
            return _SR_CACHE[key]
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    evaluations: dict[str, list[str]] = {}
    groups: list[SrGroup] = []
    every: list[Dataset] = []
    _collect(ds.get("ContentSequence", []), every)
    for item in every:
        if item.get("ValueType") != "CONTAINER":
            continue
        kids = list(item.get("ContentSequence", []))
        if _name(item) == "Qualitative Evaluations":
            for k in kids:
                evaluations.setdefault(_name(k), []).append(_value(k))
        elif _name(item) == "Measurement Group":
            g = SrGroup(title="")
            for k in kids:
                name = _name(k)
                if name == "Tracking Identifier":
                    g.title = _value(k)
                elif k.get("ValueType") == "NUM" and name != "Probability":
                    g.nums.append((name, _value(k)))
                else:
                    g.fields.setdefault(name, []).append(_value(k))
            groups.append(g)
    view = SrView(evaluations, groups)
    with _SR_LOCK:
        if len(_SR_CACHE) > 256:
            _SR_CACHE.clear()
        _SR_CACHE[key] = view
    return view


def _header(path: Path, *tags: str) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
    except (OSError, pydicom.errors.InvalidDicomError):
        return None


def report_files(state: WebState, report: dict[str, Any] | None) -> tuple[Path | None, list[Path]]:
    """(SR, summary images in page order) among a report's files, by their Modality; only what is on disk."""
    sr: Path | None = None
    pages: list[Path] = []
    for rel in (report or {}).get("files") or []:
        path = state.settings.data_path / rel
        ds = _header(path, "Modality")
        if ds is None:
            continue
        if str(ds.get("Modality", "")) == "SR":
            sr = sr or path
        else:
            pages.append(path)
    return sr, pages


def summary_url(version_id: int, page: int) -> str:
    """``/versions/N/summary.png`` for the first image of the summary, ``summary-2.png``... for the next ones."""
    return f"/versions/{version_id}/summary.png" if page == 1 else f"/versions/{version_id}/summary-{page}.png"


def patient_of(sr: Path | None) -> tuple[str, str] | None:
    """(PatientName, PatientID) as the report carries them; only ever called for an authenticated request."""
    if sr is None:
        return None
    ds = _header(sr, "PatientName", "PatientID")
    if ds is None:
        return None
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")


def purged_at(state: WebState, version_id: int) -> float | None:
    with state.index.engine.connect() as c:
        return c.execute(select(StudyVersion.purged_at).where(StudyVersion.id == version_id)).scalar()


def summary_png(state: WebState, version_id: int, page: int, sc: Path) -> Path:
    """One summary image as PNG, made once per report object under data_dir (``cache/web``) and kept."""
    ds = _header(sc, "SOPInstanceUID")
    uid = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
    tag = hashlib.sha256(f"{uid}|{sc.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    out_dir = state.settings.data_path / "cache" / "web"
    out = out_dir / f"summary-v{version_id}-p{page}-{tag}.png"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"summary-v{version_id}-p{page}-*.png"):  # an earlier rendering of a re-made report
        old.unlink(missing_ok=True)

    def render(tmp: Path) -> None:
        arr = np.asarray(pydicom.dcmread(sc).pixel_array, dtype=np.uint8)
        Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L").save(tmp, format="PNG")

    return write_atomic(out, render, fsync=False)


def drop_cached_png(state: WebState, version_id: int) -> None:
    for old in (state.settings.data_path / "cache" / "web").glob(f"summary-v{version_id}-*.png"):
        old.unlink(missing_ok=True)


# -- pieces shared by the pages ----------------------------------------------------------------------------


def p_of_label(finding: dict[str, Any]) -> float:
    """The probability of the predicted label (the index keeps P(positive class); every task is binary)."""
    p = float(finding.get("probability", 0.0))
    return p if finding.get("label") == finding.get("positive_class") else 1.0 - p


def findings_line(report: dict[str, Any] | None) -> str:
    """One line for the dashboard: the findings, or why there are none."""
    if not report:
        return '<span class="muted">no report yet</span>'
    parts = []
    for m in report.get("models") or []:
        for task, f in sorted(m.get("findings", {}).items(), key=lambda kv: TASK_ORDER.get(kv[0], 9)):
            parts.append(f"<b>{e(f.get('label'))}</b> {p_of_label(f):.2f} "
                         f'<span class="muted small">{e(TASK_TITLES.get(task, task))}, {e(m.get("family"))}</span>')
    for d in report.get("declined") or []:
        parts.append(f'<span class="badge bad">{e(d.get("family"))} declined</span>')
    if report.get("cannot_grade"):
        parts.append(f'<span class="badge bad">not graded</span> <span class="small">{e(report["cannot_grade"])}'
                     "</span>")
    return "<br>".join(parts) or '<span class="muted">no findings</span>'


def steps_cell(v: dict[str, Any]) -> str:
    chips = []
    for stage, step in (v.get("pipeline") or {}).items():
        secs = f" {step['seconds']:.2f} s" if step.get("seconds") is not None else ""
        times = f" ×{step['deliveries']}" if (step.get("deliveries") or 0) > 1 else ""
        title = f' title="{e(step["error"])}"' if step.get("error") else ""
        label = f"{stage} {step.get('state')}"
        chips.append(f'<span{title}>{badge(label)}<span class="small muted">{e(secs)}{e(times)}</span></span>')
    return f'<div class="steps">{"".join(chips)}</div>' if chips else '<span class="muted">not queued</span>'


def deliveries_table(deliveries: list[dict[str, Any]], *, compact: bool = False) -> str:
    if not deliveries:
        return '<span class="muted">none</span>'
    rows = []
    for d in deliveries:
        button = retry_button(f"/deliveries/{int(d['id'])}/retry") if d.get("state") == "parked" else ""
        err = f'<div class="small muted">{e(d.get("last_error"))}</div>' if d.get("last_error") else ""
        name = Path(str(d.get("path") or "")).name
        what = "SR" if name == "sr.dcm" else "summary image" if name.startswith("summary") else ""
        rows.append(f'<tr id="delivery-{int(d["id"])}"><td>{e(d.get("destination"))}'
                    f'{"" if compact else f" <span class=small>{e(what)}</span>"}</td>'
                    f"<td>{badge(describe_delivery(d))}{err}</td><td>{e(d.get('attempts'))}</td><td>{button}</td></tr>")
    return ("<table><tr><th>destination</th><th>state</th><th>attempts</th><th></th></tr>"
            + "".join(rows) + "</table>")


def attention(doc: dict[str, Any]) -> str:
    """Failed steps and parked deliveries, each with its retry button: what an operator must act on."""
    items = []
    for st in doc["studies"]:
        for v in st["versions"]:
            vid = int(v["version_id"])
            link = f'<a href="/versions/{vid}">study {int(st["id"])} v{int(v["version"])}</a>'
            for stage, step in (v.get("pipeline") or {}).items():
                if step.get("state") == "failed":
                    items.append(f"<li>{link}: step <b>{e(stage)}</b> failed: {e(step.get('error'))} "
                                 f"{retry_button(f'/versions/{vid}/retry', 'Retry failed steps')}</li>")
            for d in v.get("deliveries") or []:
                if d.get("state") == "parked":
                    button = retry_button(f"/deliveries/{int(d['id'])}/retry")
                    items.append(f"<li>{link}: delivery to <b>{e(d.get('destination'))}</b> parked after "
                                 f"{e(d.get('attempts'))} attempt(s): {e(d.get('last_error'))} {button}</li>")
    if not items:
        return '<div class="calm">Nothing needs attention: no failed step, no parked delivery.</div>'
    return f'<div class="attention"><b>Needs attention</b><ul class="tight">{"".join(items)}</ul></div>'


def dashboard_body(doc: dict[str, Any]) -> str:
    studies = list(reversed(doc["studies"]))
    shown = studies[:STUDIES_SHOWN]
    rows = []
    for st in shown:
        versions = list(reversed(st["versions"]))
        for i, v in enumerate(versions):
            vid = int(v["version_id"])
            study_cell = ""
            if i == 0:
                study_cell = (f'<td rowspan="{len(versions)}" id="study-{int(st["id"])}"><b>study {int(st["id"])}</b>'
                              f'<div class="small muted">{int(st["instances"])} instances'
                              f'{", " + str(int(st["duplicates"])) + " duplicates" if st["duplicates"] else ""}</div>'
                              f'<div class="small"><a href="/events?study={int(st["id"])}">events</a></div></td>')
            rows.append(
                f'<tr id="version-{vid}">{study_cell}'
                f'<td><a href="/versions/{vid}"><b>v{int(v["version"])}</b> report</a>'
                f'<div class="small muted">{e(when(v.get("completed_at") or v.get("opened_at")))}</div></td>'
                f'<td>{badge(v.get("pipeline_state") or v["state"])}'
                f'<div class="small muted">{e(v.get("delivery") or "")}</div></td>'
                f"<td>{steps_cell(v)}</td><td>{findings_line(v.get('report'))}</td>"
                f"<td>{deliveries_table(v.get('deliveries') or [], compact=True)}</td></tr>")
    more = (f'<p class="muted">Showing the newest {len(shown)} of {len(studies)} studies; '
            f'<a href="/api/status">/api/status</a> has them all.</p>' if len(studies) > len(shown) else "")
    table = ("<table><tr><th>study</th><th>version</th><th>state</th><th>pipeline steps</th><th>findings</th>"
             f"<th>deliveries</th></tr>{''.join(rows)}</table>" if rows else
             '<p class="muted">No study received yet.</p>')
    return f"{attention(doc)}<h1>Studies</h1>{table}{more}"


def finding_cards(report: dict[str, Any]) -> str:
    cards = []
    tasks = []
    for m in report.get("models") or []:
        for task, f in m.get("findings", {}).items():
            tasks.append((TASK_ORDER.get(task, 9), m, task, f))
    for _, m, task, f in sorted(tasks, key=lambda t: t[0]):
        label = str(f.get("label", ""))
        cards.append(
            f'<div class="card finding"><div class="task">{e(TASK_TITLES.get(task, task))}</div>'
            f'<div class="label">{e(label)}</div>'
            f'<div class="prob">P = {p_of_label(f):.2f}</div>'
            f'<div class="model">{e(LABEL_TITLES.get(label, ""))}{" · " if label in LABEL_TITLES else ""}'
            f'{e(family_title(str(m.get("family"))))} ({e(m.get("family"))})</div></div>')
    if report.get("cannot_grade") or not cards:
        cards.append(f'<div class="card nograde"><div class="task">Grade</div><div class="label">Not graded</div>'
                     f'<div>{e(report.get("cannot_grade") or "no model produced a result")}</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def findings_table(report: dict[str, Any]) -> str:
    rows = []
    for m in report.get("models") or []:
        for task, f in sorted(m.get("findings", {}).items(), key=lambda kv: TASK_ORDER.get(kv[0], 9)):
            pos = f.get("positive_class", "positive")
            rows.append(f"<tr><td>{e(family_title(str(m.get('family'))))} <span class=mono>{e(m.get('family'))}</span>"
                        f"</td><td>{e(TASK_TITLES.get(task, task))}</td><td><b>{e(f.get('label'))}</b></td>"
                        f"<td><b>{p_of_label(f):.3f}</b></td><td>P({e(pos)}) = {float(f.get('probability', 0)):.3f}</td>"
                        f"<td class=mono>{e(m.get('checkpoint'))}</td><td>{e(m.get('device'))}, "
                        f"{float(m.get('seconds') or 0):.2f} s</td></tr>")
    if not rows:
        return ""
    return ("<table><tr><th>model</th><th>task</th><th>finding</th><th>calibrated probability of the finding</th>"
            "<th>as recorded</th><th>checkpoint</th><th>ran on</th></tr>" + "".join(rows) + "</table>")


def synthetic_models(report: dict[str, Any], sr: SrView | None) -> list[tuple[str, str]]:
    """(family, training-data sentence) of every model whose checkpoint says it learned from synthetic data."""
    if sr is None:
        return []
    fams = [m.get("family") for m in report.get("models") or []]
    fams += [d.get("family") for d in report.get("declined") or []]
    out = []
    for fam in dict.fromkeys(str(f) for f in fams if f):
        texts = [t for t in sr.texts(fam, "Training data") if "synthetic" in t.lower()]
        if texts:
            out.append((fam, texts[0]))
    return out


def model_story(report: dict[str, Any], sr: SrView | None) -> str:
    """Which models ran and why, which did not or were declined and why."""
    items = []
    decisions = (sr.evaluations.get("Model path and reason", []) if sr else [])
    if decisions:
        codes = {title: code for code, title in FAMILY_TITLES.items()}
        for text in decisions:  # "<family title or code name>: ran. <why>"
            name, _, rest = text.partition(": ")
            code = name if name in FAMILY_TITLES else codes.get(name, "")
            items.append(f"<li><b>{e(family_title(code) if code else name)}</b>"
                         f"{f' <span class=mono>{e(code)}</span>' if code else ''}: {e(rest)}</li>")
    else:  # the SR is gone (retention) or not written yet: what the index kept
        for m in report.get("models") or []:
            items.append(f"<li><b>{e(family_title(str(m.get('family'))))}</b>: ran</li>")
    declined = []
    for d in report.get("declined") or []:
        reasons = "".join(f"<li>{e(r)}</li>" for r in d.get("reasons") or [])
        declined.append(f"<li><b>{e(family_title(str(d.get('family'))))}</b> <span class=mono>{e(d.get('family'))}"
                        f"</span> declined by the input gate ({e(d.get('stage'))} check): no grade from this model"
                        f'<ul class="tight">{reasons}</ul></li>')
    out = f'<ul class="tight">{"".join(items)}</ul>' if items else '<p class="muted">not recorded</p>'
    if declined:
        out += f'<h3>Declined</h3><ul class="tight">{"".join(declined)}</ul>'
    if report.get("missing_roles"):
        out += f"<p>Missing sequences: <b>{e(', '.join(report['missing_roles']))}</b>; available: " \
               f"{e(', '.join(report.get('available_roles') or []) or 'none')}.</p>"
    return out


def quality_section(report: dict[str, Any], sr: SrView | None) -> str:
    flags = list(dict.fromkeys(report.get("quality_flags") or []))
    out = ""
    if flags:
        out += '<ul class="tight">' + "".join(f"<li>{e(f)}</li>" for f in flags) + "</ul>"
    else:
        out += '<p class="muted">No quality flag.</p>'
    if sr is None:
        return out
    for g in sr.groups:
        if not (g.title.endswith(" input measurements") or g.title.endswith(" declined")) or not g.nums:
            continue
        gate = "".join(f"<li>{e(t)}</li>" for t in g.fields.get("Input gate finding", []))
        rows = "".join(f"<tr><td>{e(n)}</td><td>{e(v)}</td></tr>" for n, v in g.nums)
        out += (f"<h3>{e(family_title(g.family))} <span class=mono>{e(g.family)}</span>: measurements of this case"
                f"</h3>{'<ul class=tight>' + gate + '</ul>' if gate else ''}"
                f"<table><tr><th>measurement</th><th>value</th></tr>{rows}</table>")
    return out


def training_section(report: dict[str, Any], sr: SrView | None) -> str:
    if sr is None:
        return '<p class="muted">The report file is not available.</p>'
    rows = []
    for m in report.get("models") or []:
        fam = str(m.get("family"))
        train = "<br>".join(e(t) for t in sr.texts(fam, "Training data")) or "not recorded"
        metrics = "<br>".join(e(t) for t in sr.texts(fam, "Validation metrics")) or "not recorded"
        rows.append(f"<tr><td>{e(family_title(fam))} <span class=mono>{e(fam)}</span></td><td>{train}</td>"
                    f"<td>{metrics}</td></tr>")
    if not rows:
        return '<p class="muted">No model graded this version.</p>'
    return ("<table><tr><th>model</th><th>training data</th><th>validation metrics</th></tr>"
            + "".join(rows) + "</table>")


def pipeline_table(v: dict[str, Any]) -> str:
    rows = []
    failed = False
    for stage, step in (v.get("pipeline") or {}).items():
        failed = failed or step.get("state") == "failed"
        secs = f"{step['seconds']:.2f} s" if step.get("seconds") is not None else ""
        rows.append(f"<tr><td>{e(stage)}</td><td>{badge(str(step.get('state')))}</td><td>{e(secs)}</td>"
                    f"<td>{e(step.get('deliveries'))}</td><td class=small>{e(step.get('error'))}</td></tr>")
    if not rows:
        return '<p class="muted">Not queued yet.</p>'
    button = retry_button(f"/versions/{int(v['version_id'])}/retry", "Retry failed steps") if failed else ""
    return ("<table><tr><th>step</th><th>state</th><th>time</th><th>deliveries</th><th>error</th></tr>"
            + "".join(rows) + f"</table>{button}")


def series_table(v: dict[str, Any]) -> str:
    rows = []
    for se in v.get("series") or []:
        rows.append(f"<tr><td>{e(se.get('series_number'))}</td><td>{e(se.get('description'))}</td>"
                    f"<td>{e(se.get('modality'))}</td><td>{e(se.get('instances'))}</td>"
                    f"<td><b>{e(se.get('role') or '-')}</b> {e(se.get('status') or '')}</td>"
                    f"<td class=small>{e(se.get('reason'))}</td></tr>")
    return ("<table><tr><th>#</th><th>description</th><th>modality</th><th>instances</th><th>role</th>"
            "<th>why</th></tr>" + "".join(rows) + "</table>")


def version_body(state: WebState, st: dict[str, Any], v: dict[str, Any], user: str | None) -> tuple[str, bool]:
    """The report page's body, and whether the version is still moving (the page then refreshes itself)."""
    vid = int(v["version_id"])
    report = v.get("report")
    purged = purged_at(state, vid)
    sr_path, sc_pages = report_files(state, report)  # reports/ is kept when retention purges a version
    sr = read_sr(sr_path) if sr_path is not None else None
    parts: list[str] = []
    disclaimer = (sr.evaluations.get("Research use disclaimer") or [DISCLAIMER])[0] if sr else DISCLAIMER
    parts.append(f'<div class="disclaimer"><strong>RESEARCH USE ONLY · NOT FOR DIAGNOSTIC USE.</strong> '
                 f"{e(disclaimer)}</div>")
    if report:
        for fam, text in synthetic_models(report, sr):
            parts.append(f'<div class="synthetic">{e(family_title(fam))} ({e(fam)}) was trained on synthetic data '
                         f"({e(text)}): its output says nothing about a real patient.</div>")
        if report.get("gate_loosened"):
            parts.append(f'<div class="disclaimer"><strong>Input gate loosened.</strong> '
                         f"{e(report['gate_loosened'])}</div>")
    parts.append(f"<h1>Study {int(st['id'])} · version {int(v['version'])} "
                 f"{badge(v.get('pipeline_state') or v['state'])}</h1>")
    if user is not None:
        pat = patient_of(sr_path)
        parts.append(f'<div class="patient">Patient <b>{e(pat[0])}</b> · ID <b>{e(pat[1])}</b></div>' if pat else
                     '<div class="patient muted">Patient name and ID: not available (no report file on disk).</div>')
    else:
        parts.append('<div class="patient muted small">Patient name and ID are shown to signed-in users only.</div>')
    if purged is not None:
        stamp = _dt.datetime.fromtimestamp(purged, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        kept = ("the report below is the one the node made and sent" if sr_path is not None else
                "the report files are gone too: what follows is what the index kept (findings, steps, deliveries); "
                "the report itself is in the PACS")
        parts.append(f'<div class="purged">The received images and work files of this version were removed by '
                     f"retention on {e(stamp)}; {kept}.</div>")
    if report:
        parts.append("<h2>Findings</h2>" + finding_cards(report) + findings_table(report))
        if sc_pages:
            imgs = "".join(f'<img src="{summary_url(vid, k)}" alt="Summary image {k} of {len(sc_pages)}: key slices '
                           f'and findings of study {int(st["id"])} version {int(v["version"])}">'
                           for k in range(1, len(sc_pages) + 1))
            parts.append(f'<h2>Key slices</h2><div class="summary">{imgs}</div>')
        else:
            parts.append('<p class="muted">No summary image on disk for this version.</p>')
        parts.append("<h2>Which models ran, and why</h2>" + model_story(report, sr))
        parts.append("<h2>Quality</h2>" + quality_section(report, sr))
        parts.append("<h2>What the models learned from</h2>" + training_section(report, sr))
    else:
        parts.append('<p class="muted">No report yet: the pipeline has not reached the report step.</p>')
    parts.append("<h2>Pipeline</h2>" + pipeline_table(v))
    parts.append("<h2>Deliveries</h2>" + deliveries_table(v.get("deliveries") or []))
    parts.append("<h2>Series</h2>" + series_table(v))
    parts.append(f'<p class="small"><a href="/events?study={int(st["id"])}">Events of study {int(st["id"])}</a> · '
                 f'<a href="/api/versions/{vid}">this version as JSON</a></p>')
    moving = (v.get("pipeline_state") not in ("done",) and not str(v.get("pipeline_state", "")).startswith("failed")) \
        or any(d.get("state") == "pending" for d in v.get("deliveries") or [])
    return "".join(parts), moving


def events_body(state: WebState, study: int | None, kind: str | None, since: str | None, limit: int) -> str:
    error = ""
    try:
        t = api.parse_since(since)
    except ValueError as exc:
        t, error = None, f'<p class="attention">{e(exc)}</p>'
    kinds = [k.strip() for k in kind.split(",") if k.strip()] if kind else None
    rows = api.events(state, study=study, kinds=kinds, since=t, limit=limit)
    options = "".join(f'<option value="{e(k)}"{" selected" if kind == k else ""}>{e(k)}</option>'
                      for k in api.event_kinds(state))
    now = time.time()
    keep = {k: v for k, v in (("study", study), ("kind", kind)) if v is not None}
    presets = " · ".join(f'<a href="/events?{e(urlencode({**keep, "since": int(now - secs)}))}">{label}</a>'
                         for label, secs in (("last hour", 3600), ("last day", 86400), ("last week", 7 * 86400)))
    form = (f'<form method="get" action="/events"><fieldset><legend>Filter</legend>'
            f'<label>study id <input name="study" type="number" min="1" value="{e(study)}" size="6"></label>'
            f'<label>kind <select name="kind"><option value="">any</option>{options}</select></label>'
            f'<label>since <input name="since" value="{e(since or "")}" placeholder="2026-01-02T03:04:05Z or epoch" '
            f'size="26"></label><label>at most <input name="limit" type="number" min="1" max="{api.MAX_EVENTS}" '
            f'value="{int(limit)}" size="6"></label><button type="submit">Show</button> '
            f'<span class="small">{presets} · <a href="/events">clear</a></span></fieldset></form>')
    trs = []
    for ev in rows:
        sid = ev.get("study_id")
        study_link = f'<a href="/events?study={int(sid)}">{int(sid)}</a>' if sid is not None else ""
        detail = ev.get("detail") or {}
        vid = ev.get("version_id") or detail.get("version_id")
        version_link = f'<a href="/versions/{int(vid)}">{int(vid)}</a>' if isinstance(vid, int) else ""
        trs.append(f"<tr><td class=small>{e(when(ev['at']))}</td><td>{e(ev['kind'])}</td><td>{study_link}</td>"
                   f"<td>{version_link}</td><td>{e(ev['message'])}"
                   f"{'<div class=mono>' + e(json.dumps(detail, sort_keys=True)) + '</div>' if detail else ''}</td></tr>")
    table = ("<table><tr><th>time</th><th>kind</th><th>study</th><th>version</th><th>what happened</th></tr>"
             + "".join(reversed(trs)) + "</table>") if trs else '<p class="muted">No event matches.</p>'
    return f"<h1>Events</h1>{error}{form}<p class=small>Newest first; {len(rows)} shown.</p>{table}"


def _back(request: Request, default: str) -> str:
    """Where a button's 303 goes: the page it was pressed on (same host only), else ``default``."""
    ref = request.headers.get("referer")
    if ref:
        parts = urlsplit(ref)
        if parts.netloc == request.headers.get("host") and parts.path.startswith("/") \
                and not parts.path.startswith("//"):
            return parts.path + (f"?{parts.query}" if parts.query else "")
    return default


def router(state: WebState) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        doc = full_status(state.index, state.settings)
        return layout(state, request, "Studies", dashboard_body(doc), refresh=REFRESH_S)

    @r.get("/events", response_class=HTMLResponse)
    def events_page(request: Request, study: str | None = Query(None), kind: str | None = Query(None),
                    since: str | None = Query(None), limit: int = Query(200, ge=1, le=api.MAX_EVENTS)) -> HTMLResponse:
        sid = int(study) if study and study.strip().isdigit() else None
        return layout(state, request, "Events", events_body(state, sid, kind or None, since, limit))

    @r.get("/versions/{version_id}", response_class=HTMLResponse)
    def version_page(request: Request, version_id: int) -> HTMLResponse:
        found = api.find_version(full_status(state.index, state.settings), version_id)
        if found is None:
            raise HTTPException(404, f"no study version {version_id}")
        body, moving = version_body(state, *found, user_of(request.scope))
        return layout(state, request, f"Study {found[0]['id']} v{found[1]['version']}", body,
                      refresh=REFRESH_S if moving else None)

    def summary_page(version_id: int, page: int) -> Response:
        if state.index.version_info(version_id) is None:
            raise HTTPException(404, f"no study version {version_id}")
        _, pages = report_files(state, {"files": Reports(state.index, state.settings.data_path).files(version_id)})
        if not pages:
            drop_cached_png(state, version_id)  # a report removed from disk takes its renderings with it
        if not 1 <= page <= len(pages):
            raise HTTPException(404, f"this version has no summary image {page} on disk")
        try:
            png = summary_png(state, version_id, page, pages[page - 1])
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("version %d: summary image %d could not be rendered: %s", version_id, page,
                        type(exc).__name__)
            raise HTTPException(500, "the summary image could not be rendered") from None
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @r.get("/versions/{version_id}/summary.png")
    def summary_image(version_id: int) -> Response:
        return summary_page(version_id, 1)

    @r.get("/versions/{version_id}/summary-{page}.png")
    def summary_image_n(version_id: int, page: int) -> Response:
        return summary_page(version_id, page)

    @r.post("/versions/{version_id}/retry")
    def retry_version(request: Request, version_id: int) -> RedirectResponse:
        try:
            api.retry_version(state, version_id)
        except api.NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return RedirectResponse(_back(request, f"/versions/{version_id}"), status_code=303)

    @r.post("/deliveries/{delivery_id}/retry")
    def retry_delivery(request: Request, delivery_id: int) -> RedirectResponse:
        try:
            done = api.retry_delivery(state, delivery_id)
            default = f"/versions/{done['version_id']}" if done.get("version_id") else "/"
        except api.NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except api.Conflict:
            default = "/"  # pressed twice, or the row moved on meanwhile: the page shows its state
        return RedirectResponse(_back(request, default), status_code=303)

    return r
