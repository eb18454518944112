"""The vocabulary of sequence identification: the roles and the per-series answer.

The role names are a contract with the rest of the node (model routing, the
results SR), so they live here, at the bottom of the package, importing nothing
of ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: What a series can be for grading. ``OTHER`` covers everything that must never
#: be fed to a model (localizers, DWI, perfusion, derived images, ...).
ROLES: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR", "OTHER")

#: The grading inputs, i.e. every role except ``OTHER``.
GRADING_ROLES: tuple[str, ...] = ROLES[:-1]

#: ``selected``: the grading input for its role; ``alternative``: same role, not
#: chosen; ``other``: role ``OTHER``.
STATUSES: tuple[str, ...] = ("selected", "alternative", "other")


@dataclass(frozen=True)
class SeriesAssignment:
    """The decision for one series, with the facts that decided it.

    ``reason`` is one sentence for people (it ends up in the SR and the web UI);
    ``evidence`` is the list of individual facts, so an operator can see *why*
    without re-reading headers.  ``chosen_over`` is filled only on a selected
    series and names (by SeriesInstanceUID) the alternatives it beat, best first.
    """

    role: str
    status: str
    reason: str
    evidence: tuple[str, ...]
    chosen_over: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Validate at construction (the highdicom habit): a wrong assignment
        # cannot exist, so no consumer has to re-check it.
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if (self.role == "OTHER") != (self.status == "other"):
            raise ValueError(f"role {self.role!r} cannot have status {self.status!r}")
        if self.chosen_over and self.status != "selected":
            raise ValueError("only a selected series can list chosen_over")
        # Accept lists from callers but store tuples, so the object stays hashable.
        object.__setattr__(self, "evidence", tuple(self.evidence))
        object.__setattr__(self, "chosen_over", tuple(self.chosen_over))

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict of all fields (tuples become lists)."""
        return {
            "role": self.role,
            "status": self.status,
            "reason": self.reason,
            "evidence": list(self.evidence),
            "chosen_over": list(self.chosen_over),
        }
