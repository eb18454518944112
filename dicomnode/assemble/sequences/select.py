"""Choosing one series when several claim the same role.

Studies often hold a role twice: a repeat after motion, a 2D and a 3D T1, the
enhanced and classic copy of a Philips series.  The model needs exactly one, and
the choice must be *deterministic* (a re-run of the same study must grade the
same inputs, or the SR's deterministic UIDs would lie) and *explainable*.

Rule: compare the candidates criterion by criterion, the first difference decides:

1. original/primary acquisition over derived/secondary (only reachable through site rules);
2. for T1, T2 and FLAIR: pre-contrast over post-contrast;
3. 3D over 2D (isotropic volumes reformat and register better);
4. thinner slices (SliceThickness, to 0.01 mm);
5. smaller voxel volume (PixelSpacing x SliceThickness);
6. more slice positions (more coverage);
7. later acquisition (AcquisitionDateTime / AcquisitionTime, else SeriesTime): a
   repeat is usually acquired because the first was degraded;
8. higher SeriesNumber;
9. lexicographically smaller SeriesInstanceUID (last resort, only for determinism).
"""
from __future__ import annotations

import math
from functools import cmp_to_key
from typing import Any, Callable, Sequence

from dicomnode.assemble.sequences.classify import RoleDecision
from dicomnode.assemble.sequences.evidence import SeriesEvidence

_INF = math.inf


def _primary(ev: SeriesEvidence, d: RoleDecision) -> int:
    it = ev.image_type
    if it[:1] == ("DERIVED",) or it[1:2] == ("SECONDARY",):
        return 2
    return 0 if it[:1] == ("ORIGINAL",) else 1


def _contrast_state(ev: SeriesEvidence, d: RoleDecision) -> int:
    return 1 if (d.role != "T1CE" and d.post_contrast) else 0


def _three_d(ev: SeriesEvidence, d: RoleDecision) -> int:
    return 0 if ev.mr_acquisition_type == "3D" else 1


def _thickness(ev: SeriesEvidence, d: RoleDecision) -> float:
    return round(ev.slice_thickness, 2) if ev.slice_thickness is not None else _INF


def _voxel(ev: SeriesEvidence, d: RoleDecision) -> float:
    v = ev.voxel_volume
    return round(v, 3) if v is not None else _INF


def _slices(ev: SeriesEvidence, d: RoleDecision) -> int:
    return -(ev.n_positions or ev.n_images)


def _later(ev: SeriesEvidence, d: RoleDecision) -> tuple[int, int, int]:
    s = ev.acquisition_datetime
    if not s:
        return (1, 0, 0)  # unknown time loses to any known time
    whole, _, frac = s.partition(".")
    return (0, -int(whole or 0), -int(frac or 0))


def _series_number(ev: SeriesEvidence, d: RoleDecision) -> tuple[int, int]:
    return (1, 0) if ev.series_number is None else (0, -ev.series_number)


def _uid(ev: SeriesEvidence, d: RoleDecision) -> str:
    return ev.series_uid


#: (name used in evidence, key: smaller is better), in priority order.
CRITERIA: tuple[tuple[str, Callable[[SeriesEvidence, RoleDecision], Any]], ...] = (
    ("original/primary over derived", _primary),
    ("pre-contrast over post-contrast", _contrast_state),
    ("3D over 2D", _three_d),
    ("thinner slices", _thickness),
    ("smaller voxels", _voxel),
    ("more slices", _slices),
    ("later acquisition", _later),
    ("higher SeriesNumber", _series_number),
    ("SeriesInstanceUID order", _uid),
)


def deciding_criterion(a: tuple[SeriesEvidence, RoleDecision],
                       b: tuple[SeriesEvidence, RoleDecision]) -> tuple[int, str]:
    """Compare two candidates: (-1 if a is better, 1 if b is, 0 if identical; the criterion that decided)."""
    for name, key in CRITERIA:
        ka, kb = key(*a), key(*b)
        if ka != kb:
            return (-1 if ka < kb else 1), name
    return 0, "identical"


def rank(candidates: Sequence[tuple[SeriesEvidence, RoleDecision]]) -> list[tuple[SeriesEvidence, RoleDecision]]:
    """Candidates best first (a total, deterministic order)."""
    return sorted(candidates, key=cmp_to_key(lambda a, b: deciding_criterion(a, b)[0]))
