"""MR sequence identification: which series of a brain MR study is T1, T1CE, T2, FLAIR or OTHER.

The node grades gliomas from four structural contrasts; everything else a
scanner sends (localizers, DWI, perfusion, fMRI, field maps, reformats, ...) must
be recognised and kept away from the models.  The decision is made from header
evidence only and is recorded with its reasons, so a wrong call can be seen and
fixed with a site rule rather than debugged.

Rooms (each small, each answering one question):

* :mod:`.roles` - the role vocabulary and :class:`SeriesAssignment` (the answer);
* :mod:`.keywords` - the words vendors use, false friends, negations;
* :mod:`.evidence` - headers (classic and Enhanced MR) -> a normalized per-series summary;
* :mod:`.classify` - summary -> role for one series, with thresholds as constants;
* :mod:`.select` - the deterministic choice among series that claim the same role;
* :mod:`.rules` - site rules (TOML) that override the heuristics;
* :mod:`.identify` - :func:`identify_study`, tying them together.

See docs/sequences.md for the rules in prose.
"""
from __future__ import annotations

from dicomnode.assemble.sequences.identify import identify_study
from dicomnode.assemble.sequences.roles import ROLES, SeriesAssignment
from dicomnode.assemble.sequences.rules import SiteRule, SiteRules, load_site_rules, parse_site_rules

__all__ = [
    "ROLES",
    "SeriesAssignment",
    "SiteRule",
    "SiteRules",
    "identify_study",
    "load_site_rules",
    "parse_site_rules",
]
