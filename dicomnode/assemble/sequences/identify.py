"""The study-level entry point: one assignment per series.

Two passes, because a series' *status* depends on its siblings: first every
series is classified on its own (:mod:`.classify`), then, per role, the
candidates are ranked (:mod:`.select`) and the best becomes ``selected``, the
rest ``alternative``.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Sequence

from pydicom.dataset import Dataset

from dicomnode.assemble.sequences.classify import RoleDecision, classify
from dicomnode.assemble.sequences.evidence import SeriesEvidence, extract_evidence
from dicomnode.assemble.sequences.roles import GRADING_ROLES, ROLES, SeriesAssignment
from dicomnode.assemble.sequences.rules import SiteRules
from dicomnode.assemble.sequences.select import deciding_criterion, rank

# Log lines carry SeriesInstanceUIDs, roles and reasons only: never patient
# names, IDs or birth dates (the evidence never reads them).
log = logging.getLogger(__name__)


def _name(ev: SeriesEvidence) -> str:
    """A short, PHI-free name for a series in reasons (full UIDs are in the evidence)."""
    return f"series #{ev.series_number}" if ev.series_number is not None else "another series"


def identify_study(series: Mapping[str, Sequence[Dataset]], rules: SiteRules | None = None) -> dict[str, SeriesAssignment]:
    """Assign a role and status to every series of one study.

    ``series`` maps SeriesInstanceUID to the headers (``stop_before_pixels=True``
    is enough) of that series' MR Image Storage and Enhanced MR Image Storage
    instances.  Returns one :class:`SeriesAssignment` per key, in key order.
    A series whose headers cannot be read is OTHER with the error as its reason;
    one bad series never costs the study its other assignments.
    """
    decided: dict[str, tuple[SeriesEvidence | None, RoleDecision]] = {}
    for uid, datasets in series.items():
        try:
            ev = extract_evidence(uid, list(datasets))
            decided[uid] = (ev, classify(ev, rules))
        except Exception as exc:  # noqa: BLE001 - one malformed series must not sink the study
            log.warning("series %s: headers could not be interpreted (%s)", uid, type(exc).__name__)
            log.debug("series %s: header error detail", uid, exc_info=True)
            decided[uid] = (None, RoleDecision(role="OTHER", reason=f"OTHER: headers could not be interpreted "
                                                                    f"({type(exc).__name__})",
                                               # the exception text may quote header values: keep it out
                                               evidence=(f"header error: {type(exc).__name__}",)))

    out: dict[str, SeriesAssignment] = {}
    for uid, (_, d) in decided.items():
        if d.role == "OTHER":
            out[uid] = SeriesAssignment(role="OTHER", status="other", reason=d.reason, evidence=d.evidence)

    for role in GRADING_ROLES:
        candidates = [(ev, d) for ev, d in decided.values() if ev is not None and d.role == role]
        if not candidates:
            continue
        ranked = rank(candidates)
        best_ev, best = ranked[0]
        wins = []
        for ev, d in ranked[1:]:
            _, why = deciding_criterion((best_ev, best), (ev, d))
            wins.append(f"preferred over {ev.series_uid} ({why})")
            out[ev.series_uid] = SeriesAssignment(
                role=role, status="alternative",
                reason=f"{d.reason}; alternative: {_name(best_ev)} preferred ({why})",
                evidence=d.evidence + (f"not selected: {best_ev.series_uid} preferred ({why})",))
        out[best_ev.series_uid] = SeriesAssignment(
            role=role, status="selected", reason=best.reason, evidence=best.evidence + tuple(wins),
            chosen_over=tuple(ev.series_uid for ev, _ in ranked[1:]))

    result = {uid: out[uid] for uid in series}
    counts = Counter(a.role for a in result.values())
    log.info("sequence identification: %d series; %s", len(result),
             ", ".join(f"{r}={counts[r]}" for r in ROLES if counts[r]) or "none")
    for uid, a in result.items():
        log.debug("series %s: %s (%s) - %s", uid, a.role, a.status, a.reason)
    return result
