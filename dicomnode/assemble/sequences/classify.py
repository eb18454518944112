"""The per-series decision: which role one series plays, and the facts that decided it.

Order of decision (first that applies wins):

1. **Site rule** - the first matching rule of the site rules file decides, over
   everything below.  A site knows its protocols better than any heuristic.
2. **OTHER gates** - things that must never be a grading input, whatever they are
   called: no MR image, not head, localizer, diffusion, perfusion, EPI/fMRI,
   field map / phase / complex data, derived or reformatted, non-grading contrasts
   (TOF, SWI/T2*, STIR, maps...), multi-echo, dynamic (repeated volumes), too
   few slices.  These run before weighting because a DWI b0 *is* T2-weighted
   and an ADC map of a FLAIR-named protocol is still an ADC map.
3. **Weighting** - two independent witnesses: the words (SeriesDescription,
   ProtocolName, SequenceName; else Enhanced AcquisitionContrast) and the physics
   (ScanningSequence / echo type, TR, TE, TI).  When both speak they must agree;
   disagreement gives OTHER ("conflicting evidence") rather than a guess, because
   feeding a model the wrong sequence is worse than telling the site to add a
   rule.  One speaking alone decides.
4. **Contrast** (T1 vs T1CE) - description negation ("pre", "nativ", "sin
   contraste") > header agent (ContrastBolusAgent, volume, dose, start time,
   Enhanced ContrastBolusUsageSequence) > description affirmation ("KM", "gado",
   "+C", "post", token "ce") > no evidence (pre-contrast).

The thresholds are module constants so the documentation (docs/sequences.md)
and the code cannot drift apart silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dicomnode.assemble.sequences import keywords as kw
from dicomnode.assemble.sequences.evidence import SeriesEvidence
from dicomnode.assemble.sequences.rules import SiteRules

# --- physics thresholds (ms, degrees); valid at 1.5 T and 3 T ------------------------
#: FLAIR: inversion recovery with a long TI (nulls CSF: ~2000-2500 ms at 1.5/3 T,
#: ~1800 ms for 3D SPACE/CUBE FLAIR) and a T2-weighted (long TE) readout.
FLAIR_MIN_TI_MS = 1400.0
FLAIR_MIN_TE_MS = 60.0
#: T1 by inversion recovery: MPRAGE / IR-SPGR / BRAVO (TI ~400-1100 ms, TE a few ms)
#: and T1-FLAIR (TI ~750-1000 ms, TE < 30 ms).
T1_IR_MIN_TI_MS = 300.0
T1_IR_MAX_TE_MS = 30.0
#: STIR: a short TI (~150-250 ms) nulls fat; not a grading input.
STIR_MAX_TI_MS = 300.0
#: Spin echo / TSE: T1 = short TR and short TE; T2 = long TR and long TE; PD = long TR, short TE.
T1_SE_MAX_TR_MS = 1200.0
T1_SE_MAX_TE_MS = 30.0
T2_MIN_TR_MS = 2000.0
T2_MIN_TE_MS = 70.0
PD_MIN_TR_MS = 1500.0
PD_MAX_TE_MS = 40.0
#: Spoiled gradient echo T1 (SPGR/FLASH/FFE/VIBE): short TE, and either a very
#: short TR (3D) or a moderate TR with a large flip angle (2D FLASH).
T1_GRE_MAX_TE_MS = 10.0
T1_GRE_SHORT_TR_MS = 50.0
T1_GRE_MAX_TR_MS = 600.0
T1_GRE_MIN_FLIP_DEG = 30.0
#: Gradient echo with a long TE is T2*-weighted (susceptibility), not T2.
T2STAR_GRE_MIN_TE_MS = 15.0
#: Fewer distinct slice positions than this cannot cover a brain (scouts, shoulders, tests).
MIN_SLICES = 8
#: A series with several slice orientations and at most this many images is a
#: 3-plane localizer; a bigger one is a multi-stack series (also OTHER).
LOCALIZER_MAX_IMAGES = 60

# ImageType / FrameType values that put a series in an OTHER gate.
_DIFFUSION_TYPES = frozenset({"ADC", "TRACEW", "TRACE", "FA", "DIFFUSION", "EADC", "TENSOR", "ISODWI", "DWI",
                              "TRACE_W", "EXP", "CALC_BVALUE", "DIFFUSION_ADC", "B_VALUE"})
_PERFUSION_TYPES = frozenset({"PERFUSION", "CBF", "CBV", "MTT", "TTP", "RELCBV", "RELCBF", "ASL", "TMAX", "PWI"})
_EPI_TYPES = frozenset({"MOSAIC", "EPI", "FMRI"})
_FIELD_MAP_TYPES = frozenset({"FIELD_MAP", "FIELDMAP", "B0", "B1", "B0_MAP", "B1_MAP", "P", "PHASE", "PHASE MAP",
                              "PHASE_MAP", "R", "I", "REAL", "IMAGINARY"})
_DERIVED_TYPES = frozenset({"MPR", "REFORMATTED", "REFORMAT", "PROJECTION IMAGE", "PROJECTION", "MIP", "MNIP",
                            "MINIP", "MIN IP", "MAX IP", "SUBTRACTION", "SUB", "CPR", "CSA MPR", "CSAMPR",
                            "CSA RESAMPLED", "RESAMPLED", "MPR THICK", "COMPOSED", "FUSED", "COLLAPSE", "MOCO"})
_OTHER_CONTRAST_TYPES = frozenset({"SWI", "TOF", "ANGIO", "T1 MAP", "T2 MAP", "T2_MAP", "T1_MAP", "T2_STAR", "R2STAR",
                                   "T2STAR", "STIR", "VELOCITY", "FLOW_ENCODED"})
_OTHER_ACQ_CONTRASTS = frozenset({"TOF", "FLOW_ENCODED", "T2_STAR", "STIR", "TAGGING"})
_HEADER_WEIGHTING = {"T1": "T1", "T2": "T2", "FLUID_ATTENUATED": "FLAIR", "FLAIR": "FLAIR",
                     "PROTON_DENSITY": "PD"}

_NOT_GRADED = {
    "PD": "proton-density weighted (not a grading input)",
    "T2*": "T2*/susceptibility weighted (not a grading input)",
    "STIR": "STIR fat-suppressed inversion recovery (not a grading input)",
}


@dataclass(frozen=True)
class RoleDecision:
    """The classifier's answer for one series (before selection among candidates)."""

    role: str
    reason: str
    evidence: tuple[str, ...]
    post_contrast: bool = False  # contrast given before this series (selection prefers pre for T1/T2/FLAIR)
    site_rule: int | None = None


@dataclass(frozen=True)
class _Words:
    """Keyword findings over SeriesDescription, ProtocolName and SequenceName."""

    found: dict[str, list[tuple[str, str]]]  # family name -> [(field label, keyword)]
    false_friends: list[str]
    contrast_field: str  # the most specific field that talks about contrast ("" if none)

    def has(self, family: str) -> bool:
        return bool(self.found.get(family))

    def facts(self, *families: str) -> list[str]:
        out = []
        for family in families:
            for field, word in self.found.get(family, []):
                out.append(f"{field} keyword '{word}'")
        return out


_FIELDS = (("description", "series_description"), ("protocol", "protocol_name"), ("sequence name", "sequence_name"))
_ALL_FAMILIES = (kw.FLAIR, kw.T1_FLAIR, kw.T1, kw.T2, kw.PD, kw.T2STAR, kw.SPIN_ECHO_HINT, kw.GRADIENT_ECHO_HINT,
                 kw.CONTRAST_POST, kw.CONTRAST_PRE, kw.LOCALIZER, kw.DIFFUSION, kw.PERFUSION, kw.FMRI,
                 kw.FIELD_MAP, kw.DERIVED, kw.OTHER_CONTRAST, kw.NON_HEAD)


def _read_words(ev: SeriesEvidence) -> _Words:
    found: dict[str, list[tuple[str, str]]] = {}
    notes: list[str] = []
    contrast_field = ""
    per_field_contrast: dict[str, tuple[list[str], list[str]]] = {}
    for label, attr in _FIELDS:
        raw = getattr(ev, attr)
        norm, removed = kw.strip_false_friends(kw.normalize(raw))
        for note in removed:
            if note not in notes:
                notes.append(note)
        toks = kw.tokenize(norm)
        for family in _ALL_FAMILIES:
            for word in family.find(norm, toks):
                entries = found.setdefault(family.name, [])
                if all(w != word for _, w in entries):
                    entries.append((label, word))
        per_field_contrast[label] = (kw.CONTRAST_PRE.find(norm, toks), kw.CONTRAST_POST.find(norm, toks))
    # Contrast words are read from the most specific field only: technologists
    # edit SeriesDescription ("T1 post"), protocols get reused ("T1_pre").
    for label, _attr in _FIELDS:
        pre, post = per_field_contrast[label]
        if pre or post:
            contrast_field = label
            break
    if contrast_field:
        pre, post = per_field_contrast[contrast_field]
        found["pre-contrast"] = [(contrast_field, w) for w in pre]
        found["post-contrast"] = [(contrast_field, w) for w in post]
    else:
        found["pre-contrast"] = []
        found["post-contrast"] = []
    return _Words(found=found, false_friends=notes, contrast_field=contrast_field)


def _named_by(ev: SeriesEvidence) -> tuple[str, str]:
    """The most specific free-text field that is filled: (label, value)."""
    for label, attr in _FIELDS:
        value = getattr(ev, attr)
        if value:
            return label, value
    return "description", ""


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def _gates(ev: SeriesEvidence, words: _Words) -> list[tuple[str, list[str]]]:
    """Every OTHER gate that fires, in priority order, with its facts."""
    gates: list[tuple[str, list[str]]] = []
    types = ev.image_type_values

    def gate(name: str, facts: Iterable[str]) -> None:
        facts = [f for f in facts if f]
        if facts:
            gates.append((name, facts))

    if ev.n_instances == 0:
        gate("no MR image instances", ["no MR Image / Enhanced MR Image instance in the series"])
        return gates

    head_declared = ev.body_part in kw.HEAD_BODY_PARTS or bool(
        ev.anatomic_regions & {"BRAIN", "HEAD", "SKULL", "HEAD AND NECK"})
    facts = []
    if ev.body_part in kw.NON_HEAD_BODY_PARTS:
        facts.append(f"BodyPartExamined={ev.body_part}")
    facts += [f"anatomic region '{r.title()}'" for r in sorted(ev.anatomic_regions)
              if r.replace(" ", "") in kw.NON_HEAD_BODY_PARTS]
    if not head_declared:
        facts += words.facts("non-head anatomy")
    gate("not a head/brain series", facts)

    # Several slice orientations in one series: a 3-plane localizer when small,
    # otherwise a multi-stack series; neither is one volume a model can take.
    multi_orient = [f"{ev.n_orientations} slice orientations in one series"] if ev.n_orientations >= 2 else []
    small = ev.n_images <= LOCALIZER_MAX_IMAGES
    gate("localizer/scout", words.facts("localizer")
         + (["ImageType LOCALIZER"] if "LOCALIZER" in types else [])
         + (multi_orient if small else []))
    gate("several slice orientations (not one volume)", [] if small else multi_orient)

    gate("diffusion", words.facts("diffusion")
         + [f"ImageType {t}" for t in sorted(types & _DIFFUSION_TYPES)]
         + ([f"b-values {', '.join(_fmt(b) for b in ev.b_values)}"] if ev.b_values else [])
         + [f"DiffusionDirectionality={d}" for d in sorted(ev.diffusion_directionality)]
         + (["AcquisitionContrast=DIFFUSION"] if "DIFFUSION" in ev.acquisition_contrast else []))

    gate("perfusion", words.facts("perfusion")
         + [f"ImageType {t}" for t in sorted(types & _PERFUSION_TYPES)]
         + (["AcquisitionContrast=PERFUSION"] if "PERFUSION" in ev.acquisition_contrast else []))

    gate("echo-planar (fMRI/BOLD/EPI)", words.facts("EPI/fMRI")
         + (["ScanningSequence EP"] if "EP" in ev.scanning_sequence else [])
         + (["EchoPlanarPulseSequence=YES"] if ev.echo_planar else [])
         + [f"ImageType {t}" for t in sorted(types & _EPI_TYPES)])

    gate("field map / phase / complex data", words.facts("field map/phase")
         + [f"ImageType {t}" for t in sorted(types & _FIELD_MAP_TYPES)]
         + [f"ImageType {t}" for t in sorted(types) if t[:2] in ("P_", "R_", "I_")]
         + [f"ComplexImageComponent={c}" for c in sorted(ev.complex_components - {"MAGNITUDE"})])

    gate("derived/reformatted", words.facts("derived/reformat")
         + (["ImageType DERIVED"] if "DERIVED" in types else [])  # value 1 of ImageType or any FrameType
         + (["ImageType SECONDARY"] if "SECONDARY" in types else [])
         + [f"ImageType {t}" for t in sorted(types & _DERIVED_TYPES)])

    gate("non-grading contrast (angio/T2*/STIR/maps)", words.facts("non-grading contrast", "T2*")
         + [f"ImageType {t}" for t in sorted(types & _OTHER_CONTRAST_TYPES)]
         + [f"AcquisitionContrast={c}" for c in sorted(ev.acquisition_contrast & _OTHER_ACQ_CONTRASTS)])

    facts = []
    if len(ev.echo_times) > 1:
        facts.append(f"{len(ev.echo_times)} echo times in one series (TE {', '.join(_fmt(t) for t in ev.echo_times)} ms)")
    if len(ev.echo_numbers) > 1:
        facts.append(f"EchoNumbers {', '.join(str(n) for n in ev.echo_numbers)}")
    gate("multi-echo (echoes not separated)", facts)

    facts = []
    if ev.temporal_positions > 1:
        facts.append(f"{ev.temporal_positions} temporal positions")
    if ev.n_positions > 0 and ev.images_per_position >= 2:
        facts.append(f"{ev.n_images} images at {ev.n_positions} slice positions (repeated volumes)")
    gate("dynamic/repeated volumes", facts)

    slices = ev.n_positions if ev.n_positions > 0 else ev.n_images
    if slices < MIN_SLICES:
        gate("too few slices", [f"only {slices} slice position(s), fewer than {MIN_SLICES}: not a whole-brain volume"])
    return gates


def _echo_type(ev: SeriesEvidence, words: _Words) -> tuple[str, list[str]]:
    """spin / gradient / "" (unknown), with the fact it came from."""
    seq = ev.scanning_sequence
    if seq:
        shown = "ScanningSequence=" + "\\".join(seq)
        if "SE" in seq and "GR" not in seq:
            return "spin", [shown]
        if "GR" in seq and "SE" not in seq:
            return "gradient", [shown]
    if ev.echo_pulse_sequence == "SPIN":
        return "spin", ["EchoPulseSequence=SPIN"]
    if ev.echo_pulse_sequence == "GRADIENT":
        return "gradient", ["EchoPulseSequence=GRADIENT"]
    if words.has("spin-echo family") and not words.has("gradient-echo family"):
        return "spin", words.facts("spin-echo family")[:1]
    if words.has("gradient-echo family") and not words.has("spin-echo family"):
        return "gradient", words.facts("gradient-echo family")[:1]
    return "", []


def _physics(ev: SeriesEvidence, words: _Words) -> tuple[str | None, str, list[str], bool | None]:
    """Weighting from TR/TE/TI and echo type.

    Returns (label or None, one-phrase summary, facts, inversion-recovery known?):
    the last value is True/False when the headers say whether an inversion pulse
    was used, None when they do not (then a missing TI proves nothing).
    """
    echo, facts = _echo_type(ev, words)
    tr = ev.repetition_time
    te = ev.echo_times[0] if len(ev.echo_times) == 1 else None
    ti = ev.inversion_time
    ir_flags = []
    if "IR" in ev.scanning_sequence:
        ir_flags.append("ScanningSequence IR")
    if ev.inversion_recovery:
        ir_flags.append("InversionRecovery=YES")
    if "IR" in ev.scan_options:
        ir_flags.append("ScanOptions IR")
    ir_known: bool | None
    if ir_flags or ti is not None:
        ir_known = True
    elif ev.inversion_recovery is False or ev.scanning_sequence:
        ir_known = False
    else:
        ir_known = None
    if tr is not None:
        facts.append(f"TR={_fmt(tr)}ms")
    if te is not None:
        facts.append(f"TE={_fmt(te)}ms")
    if ti is not None:
        facts.append(f"TI={_fmt(ti)}ms")
    if te is None:
        return None, "TE not recorded", facts, ir_known
    if ti is not None:
        if ti < STIR_MAX_TI_MS:
            return "STIR", f"inversion recovery with short TI {_fmt(ti)} ms", facts, ir_known
        if ti >= FLAIR_MIN_TI_MS:
            if te >= FLAIR_MIN_TE_MS:
                return "FLAIR", f"IR with TI {_fmt(ti)} ms and long TE {_fmt(te)} ms", facts, ir_known
            return None, f"long TI {_fmt(ti)} ms with short TE {_fmt(te)} ms (not FLAIR-like)", facts, ir_known
        if te < T1_IR_MAX_TE_MS:
            kind = "gradient-echo " if echo == "gradient" else ""
            return "T1", f"{kind}IR with TI {_fmt(ti)} ms and short TE {_fmt(te)} ms", facts, ir_known
        return None, f"IR with TI {_fmt(ti)} ms but TE {_fmt(te)} ms", facts, ir_known
    if ir_flags:
        return None, "inversion recovery without a recorded TI", facts, ir_known
    if tr is None:
        return None, "TR not recorded", facts, ir_known
    flip = ev.flip_angle
    if echo == "gradient":
        if te >= T2STAR_GRE_MIN_TE_MS:
            return "T2*", f"gradient echo with TE {_fmt(te)} ms", facts, ir_known
        if te <= T1_GRE_MAX_TE_MS and (tr <= T1_GRE_SHORT_TR_MS or (
                tr <= T1_GRE_MAX_TR_MS and (flip is None or flip >= T1_GRE_MIN_FLIP_DEG))):
            if flip is not None:
                facts.append(f"flip={_fmt(flip)}deg")
            return "T1", f"spoiled gradient echo TR {_fmt(tr)} ms, TE {_fmt(te)} ms", facts, ir_known
        return None, f"gradient echo TR {_fmt(tr)} ms, TE {_fmt(te)} ms (not T1-like)", facts, ir_known
    kind = "spin echo" if echo == "spin" else "echo type unknown"
    if tr < T1_SE_MAX_TR_MS and te < T1_SE_MAX_TE_MS:
        return "T1", f"{kind}, short TR {_fmt(tr)} ms and TE {_fmt(te)} ms", facts, ir_known
    if tr >= T2_MIN_TR_MS and te >= T2_MIN_TE_MS:
        return "T2", f"{kind}, long TR {_fmt(tr)} ms and TE {_fmt(te)} ms", facts, ir_known
    if tr >= PD_MIN_TR_MS and te < PD_MAX_TE_MS:
        return "PD", f"{kind}, long TR {_fmt(tr)} ms with short TE {_fmt(te)} ms", facts, ir_known
    return None, f"{kind}, TR {_fmt(tr)} ms / TE {_fmt(te)} ms between the T1 and T2 ranges", facts, ir_known


def _text_weighting(words: _Words, ev: SeriesEvidence) -> tuple[str | None, list[str], str]:
    """Weighting named by the words (else the Enhanced header): (label, facts, source)."""
    if words.has("T1-FLAIR") and not words.has("T2"):
        return "T1", words.facts("T1-FLAIR"), "T1-FLAIR naming"
    flair, t1, t2, pd = (words.has(n) for n in ("FLAIR", "T1", "T2", "PD"))
    if flair and not t1:
        return "FLAIR", words.facts("FLAIR"), "FLAIR naming"
    if flair or (t1 and (t2 or pd)):
        return None, words.facts("FLAIR", "T1", "T2", "PD"), "contradictory naming"
    if t1:
        return "T1", words.facts("T1"), "T1 naming"
    if t2 and pd:
        return None, words.facts("T2", "PD"), "PD and T2 both named"
    if t2:
        return "T2", words.facts("T2"), "T2 naming"
    if pd:
        return "PD", words.facts("PD"), "PD naming"
    # No words: the Enhanced MR header may still say it (AcquisitionContrast, Philips ImageType value 3).
    header = sorted(ev.acquisition_contrast & set(_HEADER_WEIGHTING))
    if header:
        return _HEADER_WEIGHTING[header[0]], [f"AcquisitionContrast={header[0]}"], "AcquisitionContrast"
    if len(ev.image_type) >= 3 and ev.image_type[2] in _HEADER_WEIGHTING:
        value = ev.image_type[2]
        return _HEADER_WEIGHTING[value], [f"ImageType value 3 {value}"], "ImageType"
    return None, [], ""


def _contrast(ev: SeriesEvidence, words: _Words) -> tuple[bool, list[str], str]:
    """Was contrast given before this series? (post, facts, short phrase for the reason)."""
    pre = words.facts("pre-contrast")
    post = words.facts("post-contrast")
    header_pos = list(ev.contrast_positive)
    header_neg = list(ev.contrast_negative)
    if pre:
        facts = pre + ([f"{f} (overruled by the description)" for f in header_pos])
        return False, facts, f"{words.contrast_field} says pre-contrast"
    if header_pos:
        return True, header_pos + post, header_pos[0]
    if post:
        facts = post + [f"{f} (overruled by the description)" for f in header_neg]
        return True, facts, f"{words.contrast_field} keyword '{words.found['post-contrast'][0][1]}'"
    return False, header_neg or ["no contrast agent in headers or description"], "no contrast agent recorded"


def classify(ev: SeriesEvidence, rules: SiteRules | None = None) -> RoleDecision:
    """Decide the role of one series from its evidence (see the module docstring for the order)."""
    words = _read_words(ev)

    if rules is not None and len(rules):
        hit = rules.first_match({"series_description": ev.series_description, "protocol_name": ev.protocol_name,
                                 "sequence_name": ev.sequence_name})
        if hit is not None:
            rule, value = hit
            post = _contrast(ev, words)[0]
            line = rule.describe(value)
            return RoleDecision(role=rule.role, reason=f"{rule.role}: {line}", evidence=(line,),
                                post_contrast=post if rule.role != "T1CE" else True, site_rule=rule.number)

    friends = [f"false friend {n}" for n in words.false_friends]
    gates = _gates(ev, words)
    if gates:
        name, facts = gates[0]
        evidence = [f for _, fs in gates for f in fs] + friends
        return RoleDecision(role="OTHER", reason=f"OTHER: {name} ({'; '.join(facts[:2])})",
                            evidence=tuple(dict.fromkeys(evidence)))

    text_label, text_facts, text_source = _text_weighting(words, ev)
    phys_label, phys_summary, phys_facts, ir_known = _physics(ev, words)
    facts = text_facts + phys_facts + friends

    if text_label and phys_label and text_label != phys_label:
        if text_label == "FLAIR" and phys_label == "T2" and ir_known is None:
            label = "FLAIR"
            facts.append("TI not recorded: long TR/TE consistent with FLAIR")
        else:
            src = text_source if text_source in ("AcquisitionContrast", "ImageType") else _named_by(ev)[0]
            return RoleDecision(role="OTHER", reason=(f"OTHER: conflicting evidence ({src} says {text_label}, "
                                                      f"{phys_summary} says {phys_label})"),
                                evidence=tuple(dict.fromkeys(facts)))
    else:
        label = text_label or phys_label
    if label is None:
        why = text_source if text_source and text_facts else phys_summary
        return RoleDecision(role="OTHER", reason=f"OTHER: no T1/T2/FLAIR evidence ({why})",
                            evidence=tuple(dict.fromkeys(facts or [phys_summary])))
    if label in _NOT_GRADED:
        source = phys_summary if phys_label else text_source
        return RoleDecision(role="OTHER", reason=f"OTHER: {_NOT_GRADED[label]} ({source})",
                            evidence=tuple(dict.fromkeys(facts)))

    parts = []
    if phys_label == label:
        parts.append(phys_summary)
    if text_label == label:
        if text_source in ("AcquisitionContrast", "ImageType"):
            parts.append(text_facts[0])
        else:
            field, value = _named_by(ev)
            note = " (T1-FLAIR is T1-weighted)" if text_source == "T1-FLAIR naming" else ""
            parts.append(f"{field} '{value}'{note}")
    post, cfacts, cphrase = _contrast(ev, words)
    role = label
    if label == "T1":
        role = "T1CE" if post else "T1"
        parts.append(cphrase)
    elif post:
        parts.append(f"post-contrast ({cphrase})")
    evidence = facts + (cfacts if (label == "T1" or post) else [])
    return RoleDecision(role=role, reason=f"{role}: " + "; ".join(p for p in parts if p),
                        evidence=tuple(dict.fromkeys(evidence)), post_contrast=post)
