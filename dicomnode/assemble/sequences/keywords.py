"""Words that vendors and technologists put in SeriesDescription / ProtocolName / SequenceName.

Free text is the most informative and the least reliable part of an MR header,
so it is handled in one place, as data, with three rules that prevent the
classic mistakes:

* Match whole *tokens*, never substrings: ``ce`` (contrast-enhanced) must not
  fire inside ``space`` or ``sequence``.  Text is split on separators and on
  camelCase boundaries (``MPRAGE_EnchancedContrast`` -> ``mprage enchanced
  contrast``); ``+`` stays attached (``t1+c``) but the pieces are tokens too.
* Remove *false friends* before matching: Siemens ``EnchancedContrast`` /
  ``EnhancedContrast`` is a contrast-to-noise option of the MPRAGE protocol, not a
  contrast agent; ``post-op`` is not post-contrast; ``phase contrast`` is flow
  imaging.  "Enhanced" on its own is deliberately *not* a contrast word.
* Negations win over affirmations: ``pre``, ``nativ``, ``sin contraste``,
  ``ohne KM``, ``sans gado`` mean no contrast even though they contain a contrast
  word.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable


def normalize(text: str) -> str:
    """Lower-case, accent-free, separator-collapsed text with camelCase split.

    ``"t2_tirm_tra_dark-fluid_FLAIR"`` -> ``"t2 tirm tra dark fluid flair"``;
    ``"*tfl3d1_16"`` -> ``"tfl3d1 16"`` (Siemens marks sequence names with ``*``);
    ``"T2*"`` keeps its star because it means T2-star.
    """
    if not text:
        return ""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)  # camelCase boundary
    text = text.lower().replace("ß", "ss")
    text = re.sub(r"[_\-./\\,;:()\[\]{}|=#\"'<>^~!?&%$@]+", " ", text)
    text = re.sub(r"(?<!\S)\*+(?=\w)", "", text)  # leading * of Siemens sequence names
    return re.sub(r"\s+", " ", text).strip()


def tokenize(norm: str) -> list[str]:
    """Tokens of normalized text; ``a+b`` also yields ``a``, ``b``, ``+b`` and ``a+``."""
    out: list[str] = []
    for tok in norm.split():
        out.append(tok)
        if "+" in tok and tok.strip("+"):
            parts = tok.split("+")
            for i, part in enumerate(parts):
                if not part:
                    continue
                out.append(part)
                if i > 0:
                    out.append("+" + part)
                if i < len(parts) - 1:
                    out.append(part + "+")
    return out


@dataclass(frozen=True)
class Family:
    """One meaning (e.g. "FLAIR") and the token / phrase patterns that express it."""

    name: str
    tokens: re.Pattern[str] | None = None  # full-match against single tokens
    phrases: re.Pattern[str] | None = None  # searched in the normalized text

    def find(self, norm: str, toks: Iterable[str]) -> list[str]:
        """The keywords of this family present in ``norm`` (in order, unique)."""
        found: list[str] = []
        if self.phrases is not None:
            for m in self.phrases.finditer(norm):
                if m.group(0) not in found:
                    found.append(m.group(0))
        if self.tokens is not None:
            for tok in toks:
                if self.tokens.fullmatch(tok) and tok not in found:
                    found.append(tok)
        return found


def _tok(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _phr(pattern: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\S)(?:" + pattern + r")(?!\S)")


# --- false friends: replaced by a neutral token before any matching -------------------
FALSE_FRIENDS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    # Siemens MPRAGE "EnchancedContrast" (sic) / "EnhancedContrast": a CNR option.
    (re.compile(r"\ben?c?hh?ance?d?\s?contrast\b"), "cnroption",
     "vendor contrast-to-noise option, not a contrast agent"),
    (re.compile(r"\bcontrast\s?(to\s?noise|ratio)\b"), "cnroption",
     "contrast-to-noise wording, not a contrast agent"),
    (re.compile(r"\bpost\s?op(erative|eratoire|eratorio|eriert)?\b"), "postoperative",
     "post-operative, not post-contrast"),
    (re.compile(r"\bpost(erior)?\s?fossa\b|\bfosa posterior\b"), "posteriorfossa",
     "posterior fossa, not post-contrast"),
    (re.compile(r"\bphase\s?contrast\b"), "phasecontrast",
     "phase-contrast flow imaging, not a contrast agent"),
)

# --- weighting words -----------------------------------------------------------------
FLAIR = Family(
    "FLAIR",
    _tok(r"(?:3d|s)?(?:t2w?)?flair(?:3d|2d|fs)?|darkfluid|dflair"),
    _phr(r"dark fluid|fluid attenuated(?: inversion recovery)?"),
)
# T1-FLAIR (GE "Ax T1 FLAIR") is a T1-weighted inversion recovery, not a FLAIR.
T1_FLAIR = Family("T1-FLAIR", _tok(r"t1w?flair"), _phr(r"t1w? flair"))
T1 = Family(
    "T1",
    _tok(r"s?(?:3d)?t1w?i?(?:3d|c|ce|gd|post|pre|km|mdc|se|tse|fse|space|cube|vista|ffe|tfe|wce)?"
         r"|t1\+c?|mp ?rage\w*|mprage\w*|mp2rage\w*|spgr|fspgr|ir ?f?spgr|bravo\w*|tfl\d?\w*|tfe\w*"
         r"|flash\w*|vibe|starvibe|t1weighted"),
    _phr(r"mp rage|ir f?spgr|3d t1w?"),
)
T2 = Family(
    "T2",
    _tok(r"s?(?:3d)?t2w?i?(?:3d|se|tse|fse|space|cube|vista|frfse|drive)?|frfse|ssfse|haste|t2weighted"),
)
PD = Family(
    "PD",
    _tok(r"pd(?:w|wi|fs|tse|fse|se|t2)?|dp|rho|protondensity"),
    _phr(r"proton density|densite de protons?|densidad protonica"),
)
T2STAR = Family(
    "T2*",
    _tok(r"t2\*\w*|t2star\w*|swi\w*|swan|hemo\w*|medic|merge|susceptibility\w*|qsm|t2ffe"),
    _phr(r"t2w? ffe|t2 \*|t2 star"),
)

# --- echo family hints (evidence only: the role comes from weighting + physics) --------
SPIN_ECHO_HINT = Family(
    "spin-echo family",
    _tok(r"tse\w*|fse\w*|frfse|ssfse|se|haste|space|spc\w*|cube|vista|blade|propeller|multivane|tirm?\w*|tir\d\w*|irfse"),
)
GRADIENT_ECHO_HINT = Family(
    "gradient-echo family",
    _tok(r"gre|spgr|fspgr|bravo\w*|tfl\w*|tfe\w*|ffe\w*|flash|fl[23]d\w*|vibe|starvibe|mprage\w*|fgre|efgre\w*"),
)

# --- contrast agent words ------------------------------------------------------------
CONTRAST_POST = Family(
    "post-contrast",
    _tok(r"post(?:contrast|kontrast\w*|contrasto|gd|gad\w*|km|mdc|c|inj\w*)?|postgado\w*"
         r"|\+?gd|gd\+|gad|gado\w*|gadolin\w*|\+c|c\+|ce|t1c|t1ce|t1gd|t1post|t1km|t1mdc|t1wce|t1\+c?"
         r"|\+?km|km\+|kontrast\w*|contrast|contraste|contrasto|mdc\+?|\+mdc|inj|inject\w*"
         r"|gadovist|gadavist|dotarem|magnevist|prohance|multihance|clariscan|omniscan|elucirem"
         r"|vueway|artirem|cyclolux|gadobutrol|gadoterate|gadoteridol|gadobenate|contrastada"),
    _phr(r"with contrast|w contrast|con contraste|con mdc|mit km|nach km|apres injection|avec injection"),
)
CONTRAST_PRE = Family(
    "pre-contrast",
    _tok(r"pre(?:contrast|kontrast\w*|gd|gad\w*|km|c|mdc|inj\w*)?|prae|t1pre|native?|nativ|noncontrast"
         r"|nonenhanced|unenhanced|senzamdc"),
    _phr(r"(?:sin|sans|senza|ohne|without|w o|wo|no|non|kein|keine|vor|avant|antes|prima)"
         r" (?:de |del |di |d )?(?:contrast\w*|kontrast\w*|km|gd|gad\w*|mdc|inj\w*|injection|c)"),
)

# --- never a grading input -----------------------------------------------------------
LOCALIZER = Family(
    "localizer",
    _tok(r"loc|locali[sz]er\w*|locator|scout\w*|survey\w*|aahead\w*|aascout\w*|pilot|tripilot|3plane"
         r"|triplane|refscan|calibration|smartbrain|autoalign\w*|plan|planning"),
    _phr(r"3 plane|tri plane|3 pl|asset cal|pure cal|sense ref|coil survey|auto ?align"),
)
DIFFUSION = Family(
    "diffusion",
    _tok(r"dwi\w*|dti\w*|e?adc\w*|trace\w*|diff|diffusion\w*|tensor|dki|ivim|resolve|colfa"
         r"|isodwi|b\d{3,4}|bvals?|ep2ddiff\w*|epidiff\w*|ep2dtrace\w*"),
    _phr(r"ep2d diff\w*|epi diff\w*|ep b\d+\w*|re b\d+\w*"),
)
PERFUSION = Family(
    "perfusion",
    _tok(r"perf\w*|dsc\w*|dce\w*|pwi|asl|pcasl|pasl|casl|rcbv|rcbf|cbf|cbv|mtt|ttp|tmax|twist"
         r"|relcbv|relcbf|dynamic|dyn|bolus"),
    _phr(r"ep2d perf\w*"),
)
FMRI = Family(
    "EPI/fMRI",
    _tok(r"bold\w*|fmri\w*|rs ?fmri|rest\d*|resting\w*|task\w*|mbep2d\w*|ep2dbold\w*|epi|ep|epfid\w*|epse\w*|ep2d\w*"),
    _phr(r"ep2d bold\w*|resting state"),
)
FIELD_MAP = Family(
    "field map/phase",
    _tok(r"field ?map\w*|fieldmap\w*|fmap\w*|b0|b1|b0map\w*|b1map\w*|shim\w*|phase|pha|phasemap|tflb1map"),
    _phr(r"field mapping|b0 map|b1 map|gre field\w*"),
)
DERIVED = Family(
    "derived/reformat",
    _tok(r"mpr|mip|minip|mnip|reformat\w*|reformation|subtraction|subtr\w*|subtracted|projection|proj"
         r"|cpr|moco|3drecon|mprs?"),
    _phr(r"3d recon|thick mip"),
)
OTHER_CONTRAST = Family(
    "non-grading contrast",
    _tok(r"tof\w*|angio\w*|mra|mrv|venc|pc|venography|stir|t1map|t2map|mapping|relaxometry|cine"
         r"|mrs|svs|csi|spectro\w*|myelin|mtr|cest|apt|neuromelanin|ciss|fiesta|trufi|phasecontrast|dir"
         r"|inv1|inv2|t1rho|qmap"),
)
NON_HEAD = Family(
    "non-head anatomy",
    _tok(r"shoulder|schulter|epaule|hombro|spalla|knee|knie|genou|rodilla|ginocchio|spine|wirbelsaeule"
         r"|lws|bws|hws|cspine|tspine|lspine|lumbar|lumbal|thoracic|abdomen|abd|pelvis|becken|liver|leber"
         r"|prostate|prostata|breast|mamma|cardiac|heart|herz|hip|huefte|hanche|ankle|foot|fuss|pied"
         r"|wrist|elbow|ellbogen|femur|thigh|kidney|niere|pancreas|mrcp|hand|fingers?|forearm|leg"),
)

#: BodyPartExamined values (and anatomic region meanings) that cover the brain.
HEAD_BODY_PARTS: frozenset[str] = frozenset({
    "HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK", "HEADANDNECK", "CEREBRUM", "CRANIUM", "NEURO",
    "KOPF", "SCHAEDEL", "SCHADEL", "CRANE", "TETE", "CABEZA", "CRANEO", "CRANIO", "CAPO", "ENCEPHALON",
})
#: BodyPartExamined values that clearly are not the brain (DICOM PS3.16 CID 4031 and usage).
NON_HEAD_BODY_PARTS: frozenset[str] = frozenset({
    "SHOULDER", "KNEE", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "WHOLESPINE", "ABDOMEN", "PELVIS",
    "CHEST", "THORAX", "BREAST", "HEART", "LIVER", "KIDNEY", "PROSTATE", "HIP", "ANKLE", "FOOT", "HAND",
    "WRIST", "ELBOW", "ARM", "LEG", "UPRARM", "LOWRARM", "UPRLEG", "LOWRLEG", "THIGH", "EXTREMITY",
    "ABDOMENPELVIS", "CHESTABDOMEN", "PANCREAS", "UTERUS", "BLADDER", "HEEL", "FINGER", "TOE", "SCAPULA",
    "CLAVICLE", "SACRUM", "COCCYX", "TMJ", "PAROTID",
})

#: Explicit "no agent" values of ContrastBolusAgent, in the languages seen in practice.
NO_AGENT = re.compile(
    r"(none|no|nil|n ?a|0|false|null|keine?|nein|non|sans|aucun|ninguno|nessuno|nativ|native|nat"
    r"|not (given|applicable|used)|no contrast|without contrast|kein km|ohne km|sin contraste)"
)


def strip_false_friends(norm: str) -> tuple[str, list[str]]:
    """Replace false friends by neutral tokens; return the text and what was removed (as evidence)."""
    notes: list[str] = []
    for pattern, neutral, why in FALSE_FRIENDS:
        for m in pattern.finditer(norm):
            notes.append(f"'{m.group(0)}' ignored: {why}")
        norm = pattern.sub(neutral, norm)
    return norm, notes
