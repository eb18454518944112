"""THE stage list: one study version's journey, in order, each stage with its queue and its module.

The runner (``dicomnode.runtime.runner``), the Celery routing (``runtime.app``), the
status document (``runtime.monitor``) and the benchmarks read this list; nothing
else writes the stage names down.

Why modules by NAME, resolved on first use (:meth:`Stage.module`): this is the one
place in dicomnode where an import is deferred. The listener process reads the list
(routing, status) and must not import torch, which the preprocess and infer stages
need; a stage's module is imported only in a process that runs (or warms) it.

Every stage module has the same two entry points:

- ``run(ctx: StageContext, info: VersionInfo) -> dict``: do the step for one study version, reading the
  previous stage's hand-off (``dicomnode.handoff``), writing its own; the dict is the step's detail in the index;
- ``warm(ctx: StageContext) -> None`` (optional): pay a process's one-time costs (imports, module tables,
  checkpoint validation) before the first study, off the listener's path.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str
    queue: str  # "cpu" | "gpu": a GPU worker consumes only "gpu"
    module_name: str

    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)


STAGES: tuple[Stage, ...] = (
    Stage("convert", "cpu", "dicomnode.stages.convert"),
    Stage("preprocess", "cpu", "dicomnode.stages.preprocess"),
    Stage("infer", "gpu", "dicomnode.stages.infer"),
    Stage("report", "cpu", "dicomnode.stages.report"),
    Stage("dispatch", "cpu", "dicomnode.stages.dispatch"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
QUEUE_OF: dict[str, str] = {s.name: s.queue for s in STAGES}
NEXT_STAGE: dict[str, str | None] = {s: (STAGE_NAMES[i + 1] if i + 1 < len(STAGES) else None)
                                     for i, s in enumerate(STAGE_NAMES)}
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(s.queue for s in STAGES))
