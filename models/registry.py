"""Which checkpoints exist, and which of them can grade a study with the roles it has.

Why here and not in the node: the rule binds roles to families, which is what
a model IS; the node only asks ``select(roles)`` and puts ``explain(roles)``
into its report, so a study with too little to grade still says why.

Selection rule (DESIGN.md, "Which model runs"), stated on each family's input
roles so it stays true when a family changes:

1. A family can run when every one of its input roles is available and a
   valid checkpoint of it is registered.
2. A contrast-free family (no ``T1CE`` among its inputs: PromptNet) is the
   path for studies WITHOUT contrast. When ``T1CE`` is present it steps aside
   for the contrast-using families that can run; only when none of those has a
   checkpoint does it run (a choice the design leaves open: grading with the
   contrast-free model beats grading with none).
3. Several checkpoints of one family: the newest by its recorded creation
   time (ties broken by hash, deterministically), unless a pin names one.

With the four built-in families this gives: T1+T2+FLAIR (no T1CE) ->
promptnet; all four -> fs3dcnn, crossmodal and mmdlm; T1CE+T2+FLAIR (no T1)
-> mmdlm; anything less -> nothing, with the missing roles named.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import ModelFamily, ROLES
from models.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, read_header
from models.families import FAMILY_NAMES, resolve_family

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint that validated when listed; the weights are not kept in memory."""

    path: Path
    family: str
    sha256: str
    created: str
    input_roles: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]
    metrics: dict[str, Any]
    hparams: dict[str, Any]
    training_data: dict[str, Any]
    versions: dict[str, str]
    spec: dict[str, Any] = field(default_factory=dict)  # the validated preprocessing spec (serving prepares with it)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. extra["gate"]: training ranges the node's gate checks

    def load(self, *, map_location: str = "cpu", families: Mapping[str, ModelFamily] | None = None
             ) -> LoadedCheckpoint:
        """Load and validate again; refuse a file that changed since it was listed."""
        loaded = load_checkpoint(self.path, map_location=map_location, families=families)
        if loaded.sha256 != self.sha256:
            raise CheckpointError(f"{self.path.name}: changed since it was listed "
                                  f"(hash {loaded.sha256[:16]}..., listed {self.sha256[:16]}...)")
        return loaded


@dataclass(frozen=True)
class InvalidCheckpoint:
    """A file that looks like a checkpoint but did not validate, with the reason."""

    path: Path
    error: str
    family: str | None = None  # as the file claims (unvalidated), to report it under its family


@dataclass(frozen=True)
class Selection:
    """One model to run: its checkpoint, its family and why it was chosen (one sentence)."""

    checkpoint: CheckpointInfo
    family: ModelFamily
    reason: str


@dataclass(frozen=True)
class Decision:
    """Whether one family runs for a set of roles, and why (for the report); ``checkpoint`` when it runs."""

    family: str
    runs: bool
    reason: str
    checkpoint: CheckpointInfo | None = None


def _claimed_family(path: Path) -> str | None:
    """The family a refused file says it is (unvalidated; only to file the refusal under it)."""
    try:
        name = read_header(path).get("family")
    except Exception:  # unreadable files claim nothing
        return None
    return name if isinstance(name, str) else None


def _created_key(info: CheckpointInfo) -> tuple[_dt.datetime, str]:
    try:
        when = _dt.datetime.fromisoformat(info.created)
    except ValueError:
        when = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when, info.sha256


@dataclass
class CheckpointRegistry:
    """The checkpoints of a directory (or an explicit list of files), each validated when listed.

    ``source``: a directory (its ``*.pt``, ``*.pth``, ``*.ckpt`` files, not
    recursive) or an iterable of file paths. ``pins``: family -> a checkpoint's
    file name, path or sha256 (or a prefix of it, 8+ characters) to use instead
    of the newest. Files that fail validation are kept in ``invalid`` with the
    reason and logged as warnings; they are never used and never silently
    dropped. ``families`` adds families beyond the built-in ones (tests, site
    plug-ins).
    """

    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
    pins: Mapping[str, str] = field(default_factory=dict)
    families: Mapping[str, ModelFamily] | None = None
    checkpoints: list[CheckpointInfo] = field(init=False, default_factory=list)
    invalid: list[InvalidCheckpoint] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.refresh()

    def _paths(self) -> list[Path]:
        if isinstance(self.source, (str, os.PathLike)):
            root = Path(self.source)
            if root.is_dir():
                return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
            return [root]
        return [Path(p) for p in self.source]

    def refresh(self) -> None:
        """List and validate again (a new checkpoint was dropped into the directory)."""
        self.checkpoints, self.invalid = [], []
        for path in self._paths():
            try:
                loaded = load_checkpoint(path, families=self.families)
            except CheckpointError as exc:
                log.warning("invalid checkpoint %s: %s", path, exc)
                self.invalid.append(InvalidCheckpoint(path, str(exc), _claimed_family(path)))
                continue
            self.checkpoints.append(CheckpointInfo(
                path=path, family=loaded.family.name, sha256=loaded.sha256, created=loaded.created,
                input_roles=loaded.input_roles, labels=loaded.labels, metrics=loaded.metrics,
                hparams=loaded.hparams, training_data=loaded.training_data, versions=loaded.versions,
                spec=loaded.spec, extra=dict(loaded.extra or {})))
            del loaded

    # ------------------------------------------------------------------ choosing

    def family_names(self) -> list[str]:
        """Built-in families first (in ``FAMILY_NAMES`` order), then any other family with checkpoints."""
        names = list(FAMILY_NAMES)
        for extra in [*(self.families or {}), *(c.family for c in self.checkpoints)]:
            if extra not in names:
                names.append(extra)
        return names

    def _chosen(self, family: str) -> tuple[CheckpointInfo | None, str]:
        """The checkpoint to use for ``family`` and, when none, why."""
        candidates = [c for c in self.checkpoints if c.family == family]
        pin = self.pins.get(family)
        if pin is not None:
            for c in candidates:
                if pin in (c.path.name, str(c.path)) or (len(pin) >= 8 and c.sha256.startswith(pin)):
                    return c, "the pinned checkpoint"
            return None, f"its pinned checkpoint {pin!r} is not among the valid checkpoints"
        if not candidates:
            bad = [i.path.name for i in self.invalid if i.family == family]
            extra = f" ({len(bad)} invalid file(s) refused: {', '.join(bad)})" if bad else ""
            return None, f"no valid {family} checkpoint is registered{extra}"
        best = max(candidates, key=_created_key)
        return best, f"the newest of {len(candidates)} valid checkpoint(s), created {best.created}"

    def _input_roles(self, family: str) -> tuple[str, ...] | None:
        ckpt = next((c for c in self.checkpoints if c.family == family), None)
        if ckpt is not None:
            return ckpt.input_roles
        try:
            return resolve_family(family, self.families).input_roles
        except (ValueError, ImportError):
            return None

    def explain(self, available_roles: Iterable[str]) -> list[Decision]:
        """For every family, whether it runs for these roles and why: one sentence each, for the report."""
        have = {r for r in available_roles if r in ROLES}
        have_txt = "+".join(r for r in ROLES if r in have) or "none"
        names = self.family_names()
        roles_of = {name: self._input_roles(name) for name in names}
        chosen = {name: self._chosen(name) for name in names}

        def can_run(name: str) -> bool:
            roles = roles_of[name]
            return roles is not None and set(roles) <= have and chosen[name][0] is not None

        contrast_runners = [n for n in names if roles_of[n] is not None and "T1CE" in roles_of[n] and can_run(n)]
        out: list[Decision] = []
        for name in names:
            roles = roles_of[name]
            ckpt, why = chosen[name]
            if roles is None:
                out.append(Decision(name, False, f"{name} does not run: its family code is not available."))
                continue
            need = "+".join(roles)
            missing = [r for r in roles if r not in have]
            if missing:
                out.append(Decision(name, False, f"{name} does not run: it needs {need} and "
                                                 f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                                 f"missing (available: {have_txt})."))
                continue
            if ckpt is None:
                out.append(Decision(name, False, f"{name} does not run: {why}."))
                continue
            if "T1CE" not in roles and "T1CE" in have and contrast_runners:
                out.append(Decision(name, False, f"{name} does not run: it is the contrast-free path and T1CE "
                                                 f"is present, so {', '.join(contrast_runners)} grade(s) the "
                                                 f"study instead."))
                continue
            if "T1CE" not in roles and "T1CE" in have:
                reason = (f"{name} runs on {need}: T1CE is present but no contrast-using model has a valid "
                          f"checkpoint for {have_txt}; using {ckpt.path.name}, {why}.")
            elif "T1CE" not in roles:
                reason = f"{name} runs on {need}: no T1CE, the contrast-free path; using {ckpt.path.name}, {why}."
            else:
                reason = f"{name} runs on {need}, all present; using {ckpt.path.name}, {why}."
            out.append(Decision(name, True, reason, ckpt))
        return out

    def select(self, available_roles: Iterable[str]) -> list[Selection]:
        """The models to run for these roles (possibly none: then ``explain`` says what was missing)."""
        out = []
        for d in self.explain(available_roles):
            if d.runs and d.checkpoint is not None:
                out.append(Selection(d.checkpoint, resolve_family(d.family, self.families), d.reason))
        return out
