"""Site rules: a site's own naming, stated once in a TOML file, overriding the heuristics.

Every site has protocol names the heuristics cannot know ("AX T1 POST" that is
really a subtraction, a research sequence named "ignore_me").  Rather than
growing the heuristics per site, a site lists regular expressions:

.. code-block:: toml

    [[rule]]
    match = "series_description"   # or "protocol_name", "sequence_name"
    pattern = "(?i)^AX T1 POST"     # Python regex, searched (re.search)
    role = "T1CE"
    note = "our post-gad axial"     # optional, for people

Rules are tried in file order; the first that matches decides the role and
overrides every heuristic (including the OTHER gates), and the evidence says
``site rule N: ...`` (N counts from 1 in file order).  A file that is not valid
TOML, has unknown keys, an unknown field, a bad regex or an unknown role is
rejected with a ValueError that names the file, the rule and the problem, so a
typo cannot silently switch a rule off.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dicomnode.assemble.sequences.roles import ROLES

#: ``match`` values and what they read.  ``sequence_name`` is SequenceName
#: (classic) or PulseSequenceName (Enhanced MR).
MATCH_FIELDS: dict[str, str] = {
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "sequence_name": "SequenceName",
}
_RULE_KEYS = {"match", "pattern", "role", "note"}


@dataclass(frozen=True)
class SiteRule:
    """One validated rule; ``number`` is its 1-based position in the file."""

    number: int
    match: str
    pattern: re.Pattern[str]
    role: str
    note: str = ""

    def matches(self, values: Mapping[str, str]) -> str | None:
        """The matched field value when this rule applies to ``values``, else None."""
        value = values.get(self.match, "")
        if self.pattern.search(value):
            return value
        return None

    def describe(self, value: str) -> str:
        """Evidence line: ``site rule 2: series_description 'AX T1 POST GD' matches '(?i)^AX T1 POST'``."""
        text = f"site rule {self.number}: {self.match} '{value}' matches '{self.pattern.pattern}'"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class SiteRules:
    """An ordered, validated list of site rules (possibly empty)."""

    rules: tuple[SiteRule, ...] = field(default=())
    source: str = "<memory>"

    @classmethod
    def from_list(cls, items: Sequence[Mapping[str, Any]], source: str = "<memory>") -> "SiteRules":
        """Validate rule dicts (the ``[[rule]]`` tables) into a SiteRules; ValueError on any problem."""
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{source}: 'rule' must be an array of tables ([[rule]]), not {type(items).__name__}")
        rules = []
        for number, item in enumerate(items, start=1):
            where = f"{source}: rule {number}"
            if not isinstance(item, Mapping):
                raise ValueError(f"{where}: must be a table with match, pattern and role")
            unknown = set(item) - _RULE_KEYS
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
            for key in ("match", "pattern", "role"):
                if key not in item:
                    raise ValueError(f"{where}: missing required key '{key}'")
                if not isinstance(item[key], str) or not item[key]:
                    raise ValueError(f"{where}: '{key}' must be a non-empty string")
            match = item["match"]
            if match not in MATCH_FIELDS:
                raise ValueError(f"{where}: match '{match}' is not one of {sorted(MATCH_FIELDS)}")
            role = item["role"]
            if role not in ROLES:
                raise ValueError(f"{where}: role '{role}' is not one of {list(ROLES)}")
            try:
                pattern = re.compile(item["pattern"])
            except re.error as exc:
                raise ValueError(f"{where}: pattern {item['pattern']!r} is not a valid regex: {exc}") from exc
            note = item.get("note", "")
            if not isinstance(note, str):
                raise ValueError(f"{where}: 'note' must be a string")
            rules.append(SiteRule(number=number, match=match, pattern=pattern, role=role, note=note))
        return cls(rules=tuple(rules), source=source)

    def first_match(self, values: Mapping[str, str]) -> tuple[SiteRule, str] | None:
        """The first rule (in file order) that matches, with the matched value."""
        for rule in self.rules:
            value = rule.matches(values)
            if value is not None:
                return rule, value
        return None

    def __len__(self) -> int:
        return len(self.rules)


def parse_site_rules(text: str, source: str = "<memory>") -> SiteRules:
    """Parse TOML text into SiteRules (ValueError naming ``source`` on any problem)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"rule"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected only [[rule]] tables")
    return SiteRules.from_list(data.get("rule", []), source=source)


def load_site_rules(path: str | Path) -> SiteRules:
    """Read and validate a site rules TOML file.

    Raises ValueError (never a bare OSError or TOMLDecodeError) naming the file
    and the problem, so the node can refuse to start with a message an operator
    can act on.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read site rules file: {exc}") from exc
    return parse_site_rules(text, source=str(path))
