"""The words every layer shares, written once: sequence roles and tasks with their label coding.

Why a module of its own: the node's listener, the sequence identifier, the
hand-off records and the synthetic writers all need these names, and none of
them may import torch (``models.base`` does). Import from here, never re-type
the tuple.
"""
from __future__ import annotations

# The sequence roles, in the canonical channel order every family uses.
ROLES: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR")
NON_ENHANCED_ROLES: tuple[str, ...] = ("T1", "T2", "FLAIR")
# A series that is none of the grading roles (localizer, DWI, perfusion, ...): the identifier's fifth answer.
OTHER = "OTHER"

# Tasks and the coding of their labels: index i of the probability vector is
# the probability of class name i. Binary tasks are coded (negative, positive).
TASKS: dict[str, tuple[str, ...]] = {
    "grade": ("LGG", "HGG"),
    "idh": ("IDH-wildtype", "IDH-mutant"),
    "1p19q": ("1p/19q-intact", "1p/19q-codeleted"),
}
