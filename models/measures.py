"""The measurements a prepared case carries, named once: label, unit, and which side of the training range declines.

Why a table: the preprocessing transforms write measurements into
``PreprocessedCase.meta["measurements"]`` ({name: float}), the export records
their range over the training data in the checkpoint, the node's gate compares
a study against that range, and the report prints them with units. Four places,
one vocabulary: a name means the same thing in all of them. Role-specific
names end in ``/<ROLE>`` (``slice_thickness_mm/T2``).

``direction`` says which values are unlike the training data:
``"upper"`` only values above the range (a thinner slice than training is
fine: the atlas step resamples it; a thicker one loses detail the model never
had to do without), ``"lower"`` only values below (less coverage, worse
registration), ``"both"`` either side (brain volume, intensity spread).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    """What one measurement is, for people (label, unit) and for the gate (direction)."""

    label: str
    unit: str  # UCUM: "ml", "mm", "1" (dimensionless)
    direction: str  # "upper" | "lower" | "both"
    decimals: int


MEASURES: dict[str, Measure] = {
    "brain_volume_ml": Measure("brain volume", "ml", "both", 0),
    "atlas_mi": Measure("registration to template (mutual information)", "1", "lower", 2),
    "atlas_dice": Measure("overlap of the brain with the template brain (Dice)", "1", "lower", 2),
    "atlas_scale": Measure("head size relative to template", "1", "both", 2),
    "coregister_mi": Measure("co-registration to the reference (mutual information)", "1", "lower", 2),
    "template_coverage": Measure("coverage of the template brain", "1", "lower", 2),
    "slice_thickness_mm": Measure("slice thickness", "mm", "upper", 1),
    "inplane_spacing_mm": Measure("in-plane pixel spacing", "mm", "upper", 2),
    "slices": Measure("number of slices", "1", "lower", 0),
    "intensity_cv": Measure("intensity spread inside the brain (std/mean)", "1", "both", 2),
}


def split(name: str) -> tuple[str, str | None]:
    """``"slices/T2"`` -> ``("slices", "T2")``; ``"atlas_mi"`` -> ``("atlas_mi", None)``."""
    prefix, _, role = name.partition("/")
    return prefix, (role or None)


def describe(name: str) -> Measure:
    """The :class:`Measure` of a measurement name (role suffix ignored); KeyError for an unknown name."""
    return MEASURES[split(name)[0]]


def label_of(name: str) -> str:
    """A reader's label: ``"slice thickness (T2)"``."""
    prefix, role = split(name)
    label = MEASURES[prefix].label if prefix in MEASURES else prefix.replace("_", " ")
    return f"{label} ({role})" if role else label


def format_value(name: str, value: float) -> str:
    """``5.5 mm``, ``1,548 ml``, ``0.61``: the value with its unit at the measure's precision."""
    m = MEASURES.get(split(name)[0])
    decimals = m.decimals if m else 2
    text = f"{value:,.{decimals}f}"
    unit = m.unit if m else "1"
    return text if unit == "1" else f"{text} {unit}"


__all__ = ["MEASURES", "Measure", "describe", "format_value", "label_of", "split"]
