"""The status document with the pipeline in it: per version, each step, the report and its deliveries.

Assembled here, above the index, because the index must not import the
pipeline (it sits below it); the schema stays ``dicomnode.status/1`` with
added fields only, so existing readers keep working.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dicomnode.config import Settings
from dicomnode.dicom.commit import AWAITING, CONFIRMED, FAILED, PARKED, SENT
from dicomnode.index.studies import Index
from dicomnode.index.jobs import Jobs
from dicomnode.index.reports import Reports
from dicomnode.stages import STAGE_NAMES as STAGES
from dicomnode.stages.dispatch import NOT_SENT_NO_DESTINATION, Outbox


def full_status(index: Index, settings: Settings) -> dict[str, Any]:
    doc = index.status()
    jobs = Jobs(index).all_by_version()
    reports = Reports(index, settings.data_path).by_version()
    deliveries: dict[int, list[dict[str, Any]]] = {}
    for d in Outbox(index, settings).status():
        if d["version_id"] is not None:
            deliveries.setdefault(d["version_id"], []).append(d)
    for st in doc["studies"]:
        for v in st["versions"]:
            vid = v["version_id"]
            steps = jobs.get(vid, {})
            v["pipeline"] = {stage: steps[stage] for stage in STAGES if stage in steps}
            v["pipeline_state"] = _overall(steps, v["state"])
            v["deliveries"] = deliveries.get(vid, [])
            report = reports.get(vid)
            if report is not None:
                # what the outbox knows, never what the report step hoped: every object of it accepted by a PACS
                report["report_sent"] = bool(v["deliveries"]) and all(d["state"] == SENT for d in v["deliveries"])
            v["report"] = report
            v["delivery"] = delivery(report, v["deliveries"], bool(settings.destinations),
                                     (steps.get("dispatch") or {}).get("state"))
    return doc


def delivery(report: dict[str, Any] | None, rows: Sequence[dict[str, Any]], destinations_configured: bool,
             dispatch_state: str | None) -> str | None:
    """Where a version's report went, in one phrase for operators; None until the report step ran.

    Said from the outbox's rows, so a node without destinations never looks as
    if it delivered: "not sent: no destination". The confirmation of sent rows
    (docs/dispatch.md) is folded in with the weakest one winning, because a
    single object the PACS has not vouched for is what an operator must see.
    """
    if report is None:
        return None
    if not rows:
        if not report.get("report_written", True):
            return "not sent: no report written"
        if not destinations_configured:
            return NOT_SENT_NO_DESTINATION
        if dispatch_state == "done":  # dispatched while no destination was configured; nothing was queued
            return f"{NOT_SENT_NO_DESTINATION} when it was dispatched"
        return "waiting for the dispatch step"
    n = len(rows)
    states = [r.get("state") for r in rows]
    sent = states.count(SENT)
    if PARKED in states:
        return f"parked: {states.count(PARKED)} of {n} object(s) not sent (dicomnode retry --deliveries)"
    if sent < n:
        return f"sending: {sent} of {n} object(s) sent"
    confirmations = {r.get("confirmation") for r in rows}
    if FAILED in confirmations:
        return "sent, not confirmed"
    if AWAITING in confirmations:
        return "sent, awaiting confirmation"
    if confirmations == {CONFIRMED}:
        return "sent, confirmed"
    return "sent (unconfirmed)"


def _overall(steps: dict[str, dict[str, Any]], version_state: str) -> str:
    """One word per version for operators: receiving, queued, running <stage>, failed <stage>, done."""
    if version_state != "complete":
        return version_state
    if not steps:
        return "queued"
    for stage in STAGES:
        st = steps.get(stage)
        if st is None:
            return "queued"
        if st["state"] == "failed":
            return f"failed at {stage}"
        if st["state"] != "done":
            return f"{st['state']} {stage}"
    return "done"
