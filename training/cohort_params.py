"""Every number that shapes the synthetic cohort, in one place, as data.

Why a frozen dataclass and not constants in the code: the cohort exists to
test claims ("grade shows strongly on T1CE and weakly without contrast"), so
each effect size must be visible, recorded with the data (``cohort.json``),
and changeable without editing code (``CohortParams.with_overrides``). The
defaults are set from the clinical picture the issue describes and from the
literature's rough frequencies, NOT tuned toward any model ranking; change
them to ask "what if", and the change is recorded in the cohort's JSON. One
exception is tuned, toward the papers' BASELINE rows only (never toward the
method under test): ``ne_signal``, the scale of what the non-enhanced
sequences show of the tumour's inside (docs/training-data.md, "Calibration").

Units: lengths in mm; intensities relative to white matter on the same
sequence before the scanner model (gain, gamma, bias, noise) is applied.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GradeParams:
    """What differs between HGG and LGG (one instance per grade).

    The contrast-enhanced signs (``p_enhancing``, ``enhancement_*``,
    ``p_necrosis`` through its enhancing rim) differ strongly; the signs a
    non-enhanced sequence can see (``edema_ratio_*``, ``heterogeneity_*``,
    ``irregularity``, the faint necrosis contrast) differ weakly.
    """

    #: tumour core (necrosis + enhancing + non-enhancing solid) radius: log-normal
    core_radius_median_mm: float
    core_radius_log_sd: float
    #: outer oedema radius / core radius (normal, clipped to [1.05, 2.6])
    edema_ratio_mean: float
    edema_ratio_sd: float
    #: probability of a necrotic core
    p_necrosis: float
    #: probability of contrast enhancement (HGG: a rim around necrosis, or a nodular
    #: solid core without necrosis; LGG: faint patches)
    p_enhancing: float
    #: T1CE signal of enhancing tissue / white matter (normal, clipped to >= 1.02)
    enhancement_mean: float
    enhancement_sd: float
    #: amplitude (relative s.d.) of the tumour's T2/FLAIR texture (normal, clipped >= 0.01);
    #: T1 and T1CE get ``t1_texture_factor`` times this
    heterogeneity_mean: float
    heterogeneity_sd: float
    #: amplitude of the low-frequency perturbation of the tumour boundary (0 = ellipsoid)
    irregularity: float
    #: P(IDH mutant | grade)
    p_idh_mutant: float
    #: P(1p/19q codeleted | IDH mutant, grade); IDH-wildtype is never codeleted
    p_codeleted_given_idh_mutant: float


def _hgg() -> GradeParams:
    return GradeParams(
        core_radius_median_mm=17.0, core_radius_log_sd=0.25,
        edema_ratio_mean=1.55, edema_ratio_sd=0.28,
        p_necrosis=0.90, p_enhancing=0.97,
        enhancement_mean=1.55, enhancement_sd=0.15,
        heterogeneity_mean=0.10, heterogeneity_sd=0.03,
        irregularity=0.20,
        p_idh_mutant=0.12, p_codeleted_given_idh_mutant=0.30,
    )


def _lgg() -> GradeParams:
    return GradeParams(
        core_radius_median_mm=16.0, core_radius_log_sd=0.25,
        edema_ratio_mean=1.38, edema_ratio_sd=0.28,
        p_necrosis=0.05, p_enhancing=0.20,
        enhancement_mean=1.15, enhancement_sd=0.06,
        heterogeneity_mean=0.075, heterogeneity_sd=0.03,
        irregularity=0.15,
        p_idh_mutant=0.80, p_codeleted_given_idh_mutant=0.45,
    )


@dataclass(frozen=True)
class CohortParams:
    """All generator parameters; ``dataclasses.asdict`` of it is written to ``cohort.json``."""

    hgg: GradeParams = field(default_factory=_hgg)
    lgg: GradeParams = field(default_factory=_lgg)

    # --- tumour structure (both grades)
    #: enhancing rim thickness around necrosis (normal, clipped to [2, 10] mm)
    rim_thickness_mean_mm: float = 4.5
    rim_thickness_sd_mm: float = 1.5
    #: fraction of the rim that enhances (uniform range); the rest is non-enhancing tumour
    rim_completeness_range: tuple[float, float] = (0.75, 1.0)
    #: fraction of a solid (non-necrotic) HGG core that enhances (uniform range)
    nodular_enhancing_range: tuple[float, float] = (0.4, 0.8)
    #: fraction of an LGG core covered by faint enhancing patches, when it enhances
    lgg_enhancing_fraction_range: tuple[float, float] = (0.05, 0.25)
    #: how much necrosis differs from solid tumour on T1, T2 and FLAIR (relative): the
    #: faint non-enhanced trace of necrosis (T1 and FLAIR darker, T2 brighter)
    necrosis_ne_contrast: float = 0.10
    #: how much enhancing tissue differs from solid tumour BEFORE contrast (relative)
    rim_ne_contrast: float = 0.05
    #: T1/T1CE texture amplitude relative to T2/FLAIR's
    t1_texture_factor: float = 0.6
    #: feature size of the tumour texture (mm)
    texture_feature_mm: float = 4.0
    #: soft edge width of tumour compartments (mm, before partial volume at the grid's spacing)
    edge_mm: float = 0.8
    #: oedema edge width (mm): oedema fades out
    edema_edge_mm: float = 2.0
    #: mass effect: tissue around the tumour is pushed outward; compression factor at the
    #: centre for a 25 mm tumour (scaled by tumour size, capped at 1.4x)
    mass_effect: float = 0.4

    # --- molecular correlates (weak by design)
    #: relative weight of frontal (and insular) sites for IDH-mutant tumours (1 = no preference)
    idh_mutant_frontal_weight: float = 2.5
    #: relative weight of temporal sites for IDH-wildtype tumours
    idh_wildtype_temporal_weight: float = 1.5
    #: IDH-mutant tumours: oedema ratio excess over 1 is multiplied by this (less oedema)
    idh_mutant_edema_factor: float = 0.8
    #: IDH-mutant HGG: P(necrosis) multiplied by this (IDH-mutant grade 3-4 astrocytomas necrose less)
    idh_mutant_necrosis_factor: float = 0.6
    #: IDH-mutant: boundary irregularity multiplied by this (sharper margins)
    idh_mutant_irregularity_factor: float = 0.8
    #: P(T2-FLAIR mismatch sign | IDH-mutant, 1p/19q intact); 0 otherwise (it is ~100% specific)
    p_mismatch_idh_mutant_intact: float = 0.40
    #: FLAIR signal of solid tumour inside a mismatch case (relative to WM; rim stays bright)
    mismatch_flair_core: float = 0.45
    #: P(calcification | 1p/19q codeleted) and otherwise
    p_calcification_codeleted: float = 0.45
    p_calcification_other: float = 0.03
    #: extra texture amplitude of codeleted tumours (oligodendrogliomas are heterogeneous)
    codeleted_extra_heterogeneity: float = 0.03
    #: P(a molecular label is withheld as missing) in labels.csv (truth.csv keeps it)
    p_missing_molecular: float = 0.0

    # --- how much of the grade the non-enhanced sequences show (the calibration knob)
    #: one scale for what a non-enhanced sequence shows of the tumour's inside: the contrast of
    #: necrosis and of the (future) enhancing rim before gadolinium (``necrosis_ne_contrast``,
    #: ``rim_ne_contrast``) and the HGG-minus-LGG difference of texture (``heterogeneity_mean``; LGG
    #: stays put). All three go with the enhancing pattern (necrosis sits inside the rim), which is what
    #: a contrast-enhanced template can teach a student. Oedema extent and margins are NOT scaled: they
    #: keep their literature values (scaling them made oedema volume alone separate the grades).
    #: 1 = the values as written above. Set from the papers' BASELINE rows (docs/training-data.md,
    #: "Calibration"), never from the method under test; :meth:`CohortParams.effective` applies it.
    ne_signal: float = 9.0

    # --- anatomy variation (around the MNI152 2009 template)
    brain_scale_sd: float = 0.04
    rotation_sd_deg: float = 3.0
    translation_sd_mm: float = 2.0
    warp_amplitude_mm: float = 1.5
    warp_feature_mm: float = 40.0
    #: s.d. of the per-case, per-tissue contrast jitter (relative)
    tissue_jitter_sd: float = 0.03

    # --- scanners (sites share settings; each case gets its own fields and noise)
    n_sites: int = 8
    #: log s.d. of the smooth multiplicative bias field, per site (uniform range)
    bias_log_sd_range: tuple[float, float] = (0.04, 0.15)
    bias_feature_mm: float = 90.0
    #: Rician noise sigma relative to white matter, per site and role (uniform range)
    noise_range: tuple[float, float] = (0.015, 0.05)
    #: intensity gamma per site and role (uniform range)
    gamma_range: tuple[float, float] = (0.9, 1.1)
    #: white-matter level in stored units: log-normal gain per site and role
    gain_median: float = 600.0
    gain_log_sd: float = 0.5
    #: slice thickness of the 2D T2 and FLAIR acquisitions per site (uniform, mm);
    #: T1 and T1CE are 3D acquisitions at ~1 mm
    slice_thickness_range_mm: tuple[float, float] = (3.0, 6.0)
    #: in-plane resolution (FWHM, mm) per site and role (uniform range)
    inplane_fwhm_range_mm: tuple[float, float] = (0.9, 1.4)

    def grade(self, name: str) -> GradeParams:
        """``hgg`` or ``lgg`` parameters by grade name ("HGG"/"LGG")."""
        if name not in ("HGG", "LGG"):
            raise ValueError(f"grade must be HGG or LGG, not {name!r}")
        return self.hgg if name == "HGG" else self.lgg

    def effective(self) -> CohortParams:
        """The parameters the generator draws from: ``ne_signal`` applied, then set to 1.

        Why one scale and not three free parameters: the cohort's difficulty is calibrated against
        two published baseline rows, and a one-dimensional search over a knob that moves the
        non-enhanced signs together (each correlated with the enhancing pattern) cannot be steered
        toward a preferred method, while free parameters could. Idempotent: ``p.effective().effective() ==
        p.effective()``.
        """
        s = float(self.ne_signal)
        if s == 1.0:
            return self

        def away(h: float, lo: float) -> float:
            return lo + s * (h - lo)

        hgg = dataclasses.replace(
            self.hgg, heterogeneity_mean=away(self.hgg.heterogeneity_mean, self.lgg.heterogeneity_mean))
        out = dataclasses.replace(self, hgg=hgg, necrosis_ne_contrast=self.necrosis_ne_contrast * s,
                                  rim_ne_contrast=self.rim_ne_contrast * s, ne_signal=1.0)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CohortParams:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not pass silently)."""
        return cls().with_overrides(_flatten(d))

    def with_overrides(self, overrides: Mapping[str, Any]) -> CohortParams:
        """A copy with dotted keys replaced, e.g. ``{"hgg.edema_ratio_mean": 1.4, "n_sites": 3}``."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        names = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if head not in names:
                raise ValueError(f"unknown cohort parameter {key!r}")
            if head in ("hgg", "lgg"):
                if not rest:
                    if isinstance(value, Mapping):
                        nested.setdefault(head, {}).update(value)
                        continue
                    raise ValueError(f"{key!r} needs a field, e.g. {head}.edema_ratio_mean")
                if rest not in {f.name for f in dataclasses.fields(GradeParams)}:
                    raise ValueError(f"unknown cohort parameter {key!r}")
                nested.setdefault(head, {})[rest] = value
            else:
                default = getattr(self, head)
                top[head] = tuple(value) if isinstance(default, tuple) else type(default)(value)
        for head, fields_ in nested.items():
            gp: GradeParams = getattr(self, head)
            unknown = set(fields_) - {f.name for f in dataclasses.fields(GradeParams)}
            if unknown:
                raise ValueError(f"unknown cohort parameter(s) {sorted(head + '.' + u for u in unknown)}")
            top[head] = dataclasses.replace(gp, **{k: float(v) for k, v in fields_.items()})
        out = dataclasses.replace(self, **top)
        out.validate()
        return out

    def validate(self) -> None:
        """Probabilities in [0, 1], positive sizes, ordered ranges: fail before generating."""
        for g in (self.hgg, self.lgg):
            for name in ("p_necrosis", "p_enhancing", "p_idh_mutant", "p_codeleted_given_idh_mutant"):
                v = getattr(g, name)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {v}")
            if g.core_radius_median_mm <= 0 or g.edema_ratio_mean < 1.0:
                raise ValueError("core radius must be > 0 and edema ratio >= 1")
        for name in ("p_mismatch_idh_mutant_intact", "p_calcification_codeleted", "p_calcification_other",
                     "p_missing_molecular"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple) and (len(v) != 2 or v[0] > v[1]):
                raise ValueError(f"{f.name} must be a (low, high) range, got {v}")
        if self.n_sites < 1:
            raise ValueError("n_sites must be >= 1")
        if not 0.0 <= self.ne_signal <= 20.0:
            raise ValueError(f"ne_signal must be in [0, 20], got {self.ne_signal}")
        if not 0.0 <= self.necrosis_ne_contrast < 1.0 or not 0.0 <= self.rim_ne_contrast < 1.0:
            raise ValueError("necrosis_ne_contrast and rim_ne_contrast (after ne_signal) must be in [0, 1)")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
