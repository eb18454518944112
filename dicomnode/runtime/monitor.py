"""The status document with the pipeline in it: per version, each step, the report and its deliveries.

Assembled here, above the index, because the index must not import the
pipeline (it sits below it); the schema stays ``dicomnode.status/1`` with
added fields only, so existing readers keep working.
"""
from __future__ import annotations

from typing import Any

from dicomnode.config import Settings
from dicomnode.index.studies import Index
from dicomnode.index.jobs import Jobs
from dicomnode.index.reports import Reports
from dicomnode.stages import STAGE_NAMES as STAGES
from dicomnode.stages.dispatch import Outbox


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
            v["report"] = reports.get(vid)
            v["deliveries"] = deliveries.get(vid, [])
    return doc


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
