"""The vocabulary of sequence identification: the roles and the per-series answer.

The role names are a contract with the rest of the node (model routing, the
results SR), so they are not typed here: they come from :mod:`models.vocab`,
the one light (torch-free) module every layer reads them from.  This module
sits at the bottom of the package and imports nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.vocab import OTHER
from models.vocab import ROLES as GRADING_ROLES

# GRADING_ROLES: the grading inputs, in canonical channel order (T1, T1CE, T2, FLAIR).
# OTHER: everything never fed to a model (localizers, DWI, perfusion, derived images, ...).

#: What a series can be: a grading input or ``OTHER``.
ROLES: tuple[str, ...] = (*GRADING_ROLES, OTHER)

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
        if (self.role == OTHER) != (self.status == "other"):
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
