"""The checkpoints as the preprocess and infer stages see them: the registry, the model cache, the gate and floor.

Imports torch (through ``models``): only the processes that run those stages
import this module.
"""
from __future__ import annotations

import logging
from dicomnode.config import Settings
from dicomnode.stages.context import StageContext
from models.gate import FloorSettings, GateSettings
from models.registry import CheckpointRegistry

log = logging.getLogger(__name__)

Listing = tuple[tuple[str, int, int], ...]


def checkpoint_listing(settings: Settings) -> Listing:
    """(name, size, mtime) of the checkpoint directory's files: cheap to compare, changes when a file does."""
    root = settings.checkpoints_path
    if not root.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()))


def open_registry(settings: Settings) -> CheckpointRegistry:
    """The checkpoint registry of ``checkpoints_dir`` (empty when the directory does not exist)."""
    root = settings.checkpoints_path
    return CheckpointRegistry(root if root.is_dir() else [], pins=settings.checkpoint_pins)


def registry(ctx: StageContext) -> CheckpointRegistry:
    """The checkpoints, validated again only when the directory changed (validation hashes every weight)."""
    listing = checkpoint_listing(ctx.settings)
    held = ctx.memo("registry", lambda: None)
    if held is None or held[1] != listing:
        reg = open_registry(ctx.settings)
        ctx.put("registry", (reg, listing))
        report_checkpoints(ctx, reg)
        return reg
    return held[0]  # type: ignore[no-any-return]


def report_checkpoints(ctx: StageContext, reg: CheckpointRegistry) -> None:
    """Say once per (re)validation which checkpoints serve and which were refused, so a bad file is seen now."""
    valid = [f"{c.family} {c.path.name} ({c.sha256[:12]})" for c in reg.checkpoints]
    for bad in reg.invalid:
        log.error("checkpoint %s refused: %s", bad.path.name, bad.error)
        ctx.index.add_event("checkpoint_refused", f"{bad.path.name}: {bad.error}")
    if valid:
        log.info("checkpoints in %s: %s", ctx.settings.checkpoints_path, "; ".join(valid))
    else:
        log.warning("no valid checkpoint in %s: every study will get a report saying it could not be graded "
                    "(train one with `python -m training`, or run `dicomnode demo`)", ctx.settings.checkpoints_path)


def gate_settings(settings: Settings) -> GateSettings:
    """The node's gate settings as :class:`models.gate.GateSettings` (validated there too)."""
    return GateSettings(margin=settings.gate_margin, feature_factor=settings.gate_feature_factor,
                        unchecked=settings.gate_unchecked)


def floor_settings(settings: Settings) -> FloorSettings:
    """The node's floor on held-out metrics as :class:`models.gate.FloorSettings` (validated there too)."""
    return FloorSettings(auc=settings.floor_auc, sensitivity=settings.floor_sensitivity,
                         specificity=settings.floor_specificity)


def loosened_text(gate: GateSettings, floor: FloorSettings) -> str | None:
    """The SR's sentence(s) saying what this site loosened: the input gate and/or the floor (None: nothing)."""
    return " ".join(t for t in (gate.describe(), floor.describe()) if t) or None
