"""The step runner a worker process calls for each delivery: claim the step's row, run its stage, record the outcome.

Each stage (``dicomnode.stages``) reads the previous stage's hand-off in the
version's work directory (``data_dir/work/study-<id>/v<version>/``) and the
index, writes its own atomically, and is safe to run again: conversion reuses
converted files, preprocessing rewrites the same arrays, inference the same
result file, the report has UIDs derived from its inputs, and the outbox ignores
a report it already holds. So a redelivery after a lost worker costs time, never
a second, different report.

Thread pools: a worker process sizes torch's pools (and SimpleITK's) to its
share of the cores (``torch_threads``; :func:`threads_per_slot`). Left at
torch's default, each process runs one thread per core, so two worker
processes on two cores run four busy threads that evict each other and scale
badly. The runtime never imports torch for that (it runs in the listener's
process too): it sizes the pools of the libraries the stage modules it
imported have loaded (:func:`size_native_pools`), once each.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomnode.index.jobs import holder_id
from dicomnode.stages import BY_NAME, NEXT_STAGE, STAGES
from dicomnode.stages.context import StageContext

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and cgroup cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_slot(setting: int, slots: int) -> int:
    """Threads for torch's pools in one task slot: ``torch_threads``, or (0 = auto) usable cores // task slots.

    Auto counts the task slots of THIS process (``worker_concurrency`` or
    ``--concurrency``), not other worker processes on the host, which it cannot
    see when it starts; a host running several worker processes sets the setting.
    """
    if setting > 0:
        return setting
    return max(1, usable_cores() // max(1, slots))


def _loaded(name: str) -> object | None:
    """The module if this process has fully imported it (not while another thread is still importing it)."""
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None)
    if mod is None or getattr(spec, "_initializing", False):
        return None
    return mod


def size_native_pools(threads: int, done: set[str]) -> None:
    """Size the thread pools of torch and SimpleITK if this process has loaded them; ``done`` records which were.

    Looked up in ``sys.modules``, never imported: this must not bring torch into a process that does not use it.
    torch's inter-op pool can be sized only before its first parallel work, hence right after the import.
    """
    torch: Any = _loaded("torch")
    if torch is not None and "torch" not in done:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already sized, or inter-op work already ran: the intra-op size is what matters
            log.debug("torch inter-op threads left at %d", torch.get_num_interop_threads())
        done.add("torch")
        log.info("torch: %d thread(s) per task slot", threads)
    sitk: Any = _loaded("SimpleITK")
    if sitk is not None and "SimpleITK" not in done:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        done.add("SimpleITK")


@dataclass
class Runtime(StageContext):
    """A :class:`StageContext` that also runs steps: one per worker process (built after a prefork child forks)."""

    holder: str = field(default_factory=holder_id)
    threads: int = 0  # torch/SimpleITK threads for this process's task slots; 0 = leave the libraries' defaults
    _sized: set[str] = field(default_factory=set, repr=False)

    def size_pools(self) -> None:
        """After a stage module is imported: size the pools of what it loaded (cheap when nothing is new)."""
        if self.threads > 0 and len(self._sized) < 2:
            size_native_pools(self.threads, self._sized)

    def warm(self, queues: Sequence[str]) -> None:
        """Pay the one-time costs of the stages this process consumes (imports, checkpoint validation, tables).

        Called in a background thread once the worker is up, so neither the listener nor the first study waits.
        """
        started = time.perf_counter()
        for stage in STAGES:
            if stage.queue not in queues:
                continue
            try:
                module = stage.module()
                self.size_pools()
                warm = getattr(module, "warm", None)
                if warm is not None:
                    t0 = time.perf_counter()
                    warm(self)
                    self.size_pools()  # a warm that loads torch itself (a lazy model cache)
                    log.debug("warmed %s in %.2f s", stage.name, time.perf_counter() - t0)
            except Exception:
                log.exception("warming the %s stage failed (its first step will pay instead)", stage.name)
        log.info("stages of queue(s) %s warmed in %.1f s", ",".join(queues), time.perf_counter() - started)

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
            module = BY_NAME[stage].module()
            self.size_pools()
            detail = module.run(self, info)
            self.size_pools()  # a step that loaded a library on first use: sized for the next steps
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
