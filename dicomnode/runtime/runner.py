"""The step runner a worker process calls for each delivery: claim the step's row, run its stage, record the outcome.

Each stage (``dicomnode.stages``) reads the previous stage's hand-off in the
version's work directory (``data_dir/work/study-<id>/v<version>/``) and the
index, writes its own atomically, and is safe to run again: conversion reuses
converted files, preprocessing rewrites the same arrays, inference the same
result file, the report has UIDs derived from its inputs, and the outbox ignores
a report it already holds. So a redelivery after a lost worker costs time, never
a second, different report.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicomnode.index.jobs import holder_id
from dicomnode.stages import BY_NAME, NEXT_STAGE, STAGES
from dicomnode.stages.context import StageContext

log = logging.getLogger(__name__)


@dataclass
class Runtime(StageContext):
    """A :class:`StageContext` that also runs steps: one per worker process (built after a prefork child forks)."""

    holder: str = field(default_factory=holder_id)

    def warm(self, queues: Sequence[str]) -> None:
        """Pay the one-time costs of the stages this process consumes (imports, checkpoint validation, tables).

        Called in a background thread once the worker is up, so neither the listener nor the first study waits.
        """
        for stage in STAGES:
            if stage.queue not in queues:
                continue
            try:
                warm = getattr(stage.module(), "warm", None)
                if warm is not None:
                    t0 = time.perf_counter()
                    warm(self)
                    log.debug("warmed %s in %.2f s", stage.name, time.perf_counter() - t0)
            except Exception:
                log.exception("warming the %s stage failed (its first step will pay instead)", stage.name)

    def warm_in_background(self, queues: Sequence[str]) -> threading.Thread:
        t = threading.Thread(target=self.warm, args=(tuple(queues),), name="warm-stages", daemon=True)
        t.start()
        return t

    def __call__(self, version_id: int, stage: str) -> None:
        s = self.settings
        claim = self.jobs.claim(version_id, stage, holder=self.holder, lease_s=s.task_hard_time_limit_s,
                                max_deliveries=s.max_deliveries)
        if claim.outcome != "run":
            log.info("version %d %s: not run (%s)", version_id, stage, claim.outcome)
            return
        info = self.index.version_info(version_id)
        t0 = time.perf_counter()
        try:
            if info is None:
                raise RuntimeError(f"study version {version_id} is not in the index")
            detail = BY_NAME[stage].module().run(self, info)
        except BaseException as exc:  # SoftTimeLimitExceeded included; a hard kill never gets here
            seconds = time.perf_counter() - t0
            text = f"{type(exc).__name__}: {exc}"
            log.error("version %d %s failed after %.1f s: %s", version_id, stage, seconds, text)
            log.debug("%s", traceback.format_exc())
            self.jobs.fail(version_id, stage, holder=self.holder, error=text, seconds=seconds)
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - t0
        nxt = NEXT_STAGE[stage]
        if self.jobs.finish(version_id, stage, holder=self.holder, seconds=seconds, detail=detail, next_stage=nxt):
            log.info("study %d version %d: %s done in %.2f s", info.study_id, info.version, stage, seconds)
            if nxt:
                self.send(version_id, nxt)
