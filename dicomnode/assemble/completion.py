"""Study assembly: decide when a study version is complete, then identify its series.

A version is complete after ``quiet_period_s`` with no new instance for its
StudyInstanceUID, however many associations carried it. With
``release_quiet_s`` set, a clean A-RELEASE by the last sender starts a shorter
wait instead; an abort never does. All state is read from the index on every
pass, so there are no timers to lose: after a restart the same query finds the
same due versions.

Identification reads the stored headers here, in the assembler's own thread,
never in an association thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydicom import Dataset, dcmread

from dicomnode.config import Settings
from dicomnode.index.studies import DueVersion, Index
from dicomnode.assemble.sequences import SiteRules, identify_study, load_site_rules
from dicomnode.spool import Spool

log = logging.getLogger(__name__)


class Assembler:
    def __init__(
        self,
        settings: Settings,
        index: Index,
        spool: Spool,
        on_complete: Callable[[DueVersion], None] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.spool = spool
        self.on_complete = on_complete
        self.rules: SiteRules | None = (
            load_site_rules(settings.sequence_rules_file) if settings.sequence_rules_file else None
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def nudge(self) -> None:
        """Bring the next check forward (called on a clean association release)."""
        self._wake.set()

    def _run(self) -> None:
        """Check, wait, repeat; a pass that keeps failing backs off instead of logging a traceback per poll.

        A full disk under the index failed every pass (71 identical tracebacks
        in a minute at a 0.2 s poll): the first failure is logged in full,
        repeats as one line each with the count, at growing intervals (up to
        a minute), and recovery is logged once.
        """
        failures = 0
        while not self._stop.is_set():
            try:
                self.check(time.time())
                if failures:
                    log.warning("assembly passes work again after %d failure(s)", failures)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.exception("assembly pass failed; retrying")
                else:
                    log.warning("assembly pass failed again (%d in a row): %s", failures, type(exc).__name__)
            wait = self.settings.assembly_poll_s if not failures else \
                min(max(self.settings.assembly_poll_s, 1.0) * 2 ** min(failures - 1, 6), 60.0)
            self._wake.wait(wait)
            self._wake.clear()

    def check(self, now: float) -> list[DueVersion]:
        """One pass: complete every due version. Returns those completed."""
        s = self.settings
        done = []
        for due in self.index.due_versions(now, s.quiet_period_s, s.release_quiet_s):
            assignments = self.identify(due)
            if self.index.complete_version(due, assignments, time.time()):
                roles = sorted(a["role"] for a in assignments.values() if a["status"] == "selected")
                log.info("study %d version %d complete (%s): %d series, roles %s",
                         due.study_id, due.version, due.reason, len(assignments), ",".join(roles) or "none")
                done.append(due)
                if self.on_complete:
                    self.on_complete(due)
        return done

    def identify(self, due: DueVersion) -> dict[str, dict[str, Any]]:
        """Roles for every series of the version; a failure still yields an answer, never a stuck study."""
        files = self.index.version_files(due.study_id, due.version)
        gradable: dict[str, list[Dataset]] = defaultdict(list)
        all_series: list[str] = []
        for f in files:
            if f.series_instance_uid not in all_series:
                all_series.append(f.series_instance_uid)
            if not f.gradable:
                continue
            try:
                gradable[f.series_instance_uid].append(dcmread(self.spool.path(f.path), stop_before_pixels=True))
            except Exception as exc:
                log.warning("study %d: cannot re-read a stored header (%s); instance left out of identification",
                            due.study_id, type(exc).__name__)
        out: dict[str, dict[str, Any]] = {}
        try:
            if gradable:
                for uid, a in identify_study(dict(gradable), self.rules).items():
                    out[uid] = a.to_json()
        except Exception as exc:
            log.exception("study %d version %d: sequence identification failed", due.study_id, due.version)
            for uid in gradable:
                out[uid] = _other(f"identification failed: {type(exc).__name__}: {exc}")
        for uid in all_series:
            if uid not in out:
                out[uid] = _other("no MR Image / Enhanced MR Image instances: stored, not for grading")
        return out


def _other(reason: str) -> dict[str, Any]:
    return {"role": "OTHER", "status": "other", "reason": reason, "evidence": [], "chosen_over": []}
