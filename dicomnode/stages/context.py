"""What a stage is given: settings, the index (jobs, reports), where its version's files live, a per-process memo.

Torch-free on purpose (the runner that builds it lives in every process, the
listener's included); what needs torch (the checkpoint registry, the model
cache) is built by the stage modules themselves through :meth:`StageContext.memo`.
"""
from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dicomnode.config import Settings
from dicomnode.index.jobs import Jobs
from dicomnode.index.reports import Reports
from dicomnode.index.studies import Index, VersionInfo
from models.vocab import ROLES

T = TypeVar("T")


def package_version() -> str:
    try:
        return importlib.metadata.version("dicomnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class StageContext:
    """One per worker process (built after a prefork child forks): what every stage's ``run`` receives."""

    settings: Settings
    index: Index
    send: Callable[[int, str], None]  # queue a step (the next one, after this one finishes)
    after_dispatch: Callable[[], None] | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.jobs = Jobs(self.index)
        self.reports = Reports(self.index, self.settings.data_path)

    def memo(self, key: str, build: Callable[[], T]) -> T:
        """A per-process object built once (a registry, a model cache, the outbox), shared by every step."""
        with self._memo_lock:
            if key not in self._memo:
                self._memo[key] = build()
            return self._memo[key]  # type: ignore[no-any-return]

    def put(self, key: str, value: Any) -> None:
        with self._memo_lock:
            self._memo[key] = value

    def work_dir(self, info: VersionInfo) -> Path:
        d = self.settings.data_path / "work" / f"study-{info.study_id}" / f"v{info.version}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def nifti_dir(self, info: VersionInfo) -> Path:
        """Where the convert stage writes the volumes and its hand-off (the manifest)."""
        return self.work_dir(info) / "nifti"


def graded_inputs(ctx: StageContext, info: VersionInfo) -> dict[str, tuple[str, list[Path]]]:
    """The selected series of each grading role, as absolute file lists."""
    out: dict[str, tuple[str, list[Path]]] = {}
    for vi in ctx.index.version_inputs(info.version_id):
        if vi.status == "selected" and vi.role in ROLES:
            out[vi.role] = (vi.series_instance_uid, [ctx.settings.data_path / p for p, _, _ in vi.instances])
    return out
