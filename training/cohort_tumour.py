"""Tumours of the synthetic cohort: what each case's glioma is (biology) and where its compartments lie.

Two steps, kept apart so each can be inspected: :func:`draw_biology` turns
(grade, IDH, 1p/19q) into a latent description (size, oedema extent,
necrosis, enhancement, texture, mismatch sign, calcification, site), using
the effect sizes of :class:`~training.cohort_params.CohortParams`; the
description goes to ``truth.csv``, so any model result can be traced back to
what was in the images. :func:`render_tumour` then draws the compartments as
soft membership maps (partial volume) on the output grid.

Compartments follow the BraTS labels: necrosis and non-enhancing solid tumour
(label 1, "NCR/NET"), peritumoural oedema (2), enhancing tumour (4).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special

from .cohort_anatomy import LOBES, Anatomy, F32, rotation, smooth_noise
from .cohort_params import CohortParams

#: enhancement patterns
ENHANCEMENT = ("none", "ring", "nodular", "faint")


@dataclass(frozen=True)
class Biology:
    """The latent description of one case's tumour (all lengths in mm)."""

    grade: str
    idh: int
    codel: int
    lobe: str
    centre_mni: tuple[float, float, float]
    core_radius_mm: float
    axes: tuple[float, float, float]  # relative semi-axes (product 1)
    angles_rad: tuple[float, float, float]
    edema_ratio: float
    irregularity: float
    necrosis: bool
    necrosis_fraction: float  # necrosis radius / core radius (0 without necrosis)
    rim_thickness_mm: float
    enhancement_pattern: str  # one of ENHANCEMENT
    enhancing_fraction: float  # of the rim (ring), of the core (nodular, faint)
    enhancement: float  # T1CE signal of enhancing tissue / white matter
    heterogeneity: float  # T2/FLAIR texture amplitude
    mismatch: bool  # T2-FLAIR mismatch sign
    calcification: bool

    def to_row(self) -> dict[str, Any]:
        d = asdict(self)
        d["centre_mni"] = " ".join(f"{v:.1f}" for v in self.centre_mni)
        d["axes"] = " ".join(f"{v:.3f}" for v in self.axes)
        d["angles_rad"] = " ".join(f"{v:.3f}" for v in self.angles_rad)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
            elif isinstance(v, bool):
                d[k] = int(v)
        return d


def _normal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def draw_biology(rng: np.random.Generator, grade: str, idh: int, codel: int, p: CohortParams,
                 anat: Anatomy) -> Biology:
    """Draw one tumour given its labels: the grade's distributions, nudged by IDH and 1p/19q."""
    g = p.grade(grade)
    mutant = idh == 1
    radius = float(np.clip(g.core_radius_median_mm * math.exp(rng.normal(0.0, g.core_radius_log_sd)), 6.0, 34.0))
    axes = np.exp(rng.normal(0.0, 0.12, 3))
    axes /= np.prod(axes) ** (1 / 3)
    angles = rng.uniform(-math.pi, math.pi, 3)
    edema = _normal(rng, g.edema_ratio_mean, g.edema_ratio_sd, 1.05, 2.6)
    if mutant:
        edema = 1.0 + (edema - 1.0) * p.idh_mutant_edema_factor
        edema = max(edema, 1.05)
    irregular = g.irregularity * (p.idh_mutant_irregularity_factor if mutant else 1.0)
    p_nec = g.p_necrosis * (p.idh_mutant_necrosis_factor if (mutant and grade == "HGG") else 1.0)
    necrosis = bool(rng.random() < p_nec)
    rim = _normal(rng, p.rim_thickness_mean_mm, p.rim_thickness_sd_mm, 2.0, 10.0)
    enhancing = bool(rng.random() < g.p_enhancing)
    if grade == "HGG":
        nec_frac = float(np.clip(1.0 - rim / radius, 0.15, 0.9)) if necrosis else 0.0
        if enhancing:
            pattern = "ring" if necrosis else "nodular"
            frac = float(rng.uniform(*(p.rim_completeness_range if necrosis else p.nodular_enhancing_range)))
        else:
            pattern, frac = "none", 0.0
    else:
        nec_frac = float(rng.uniform(0.2, 0.45)) if necrosis else 0.0
        if enhancing:
            pattern, frac = "faint", float(rng.uniform(*p.lgg_enhancing_fraction_range))
        else:
            pattern, frac = "none", 0.0
    if pattern != "ring":
        rim = 0.0
    enh = _normal(rng, g.enhancement_mean, g.enhancement_sd, 1.02, 3.0) if pattern != "none" else 1.0
    het = _normal(rng, g.heterogeneity_mean, g.heterogeneity_sd, 0.01, 0.5)
    if codel:
        het += p.codeleted_extra_heterogeneity
    mismatch = bool(mutant and not codel and rng.random() < p.p_mismatch_idh_mutant_intact)
    calc = bool(rng.random() < (p.p_calcification_codeleted if codel else p.p_calcification_other))
    # site: lobe preferences by IDH; deep enough that most of the core is inside the brain
    weights = np.ones(len(LOBES))
    if mutant:
        weights[LOBES.index("frontal")] *= p.idh_mutant_frontal_weight
        weights[LOBES.index("insular")] *= p.idh_mutant_frontal_weight
    else:
        weights[LOBES.index("temporal")] *= p.idh_wildtype_temporal_weight
    min_depth = radius * (0.3 if codel else 0.55)
    ok = anat.candidate_depth >= min_depth
    if ok.sum() < 20:
        ok = anat.candidate_depth >= np.sort(anat.candidate_depth)[-20]
    w = weights[anat.candidate_lobe] * ok
    pick = int(rng.choice(len(w), p=w / w.sum()))
    centre = tuple(float(v) for v in anat.candidates[pick] + rng.uniform(-1.5, 1.5, 3))
    return Biology(
        grade=grade, idh=int(idh), codel=int(codel), lobe=LOBES[int(anat.candidate_lobe[pick])],
        centre_mni=centre, core_radius_mm=radius, axes=tuple(float(a) for a in axes),  # type: ignore[arg-type]
        angles_rad=tuple(float(a) for a in angles),  # type: ignore[arg-type]
        edema_ratio=edema, irregularity=irregular, necrosis=necrosis, necrosis_fraction=nec_frac,
        rim_thickness_mm=rim, enhancement_pattern=pattern, enhancing_fraction=frac, enhancement=enh,
        heterogeneity=het, mismatch=mismatch, calcification=calc)


@dataclass
class TumourMaps:
    """Soft memberships on a bounding box of the grid (core = necrosis + enhancing + solid + calcification)."""

    box: tuple[slice, slice, slice]
    core: F32
    necrosis: F32
    enhancing: F32
    solid: F32  # non-enhancing solid tumour
    calcification: F32
    edema: F32  # oedema extent (before tissue affinity: oedema spreads in white matter)
    radius: F32  # perturbed normalised radius (1 = core boundary): shapes the mismatch rim
    texture: F32  # unit-variance texture field


def tumour_box(centre_vox: npt.NDArray[np.float64], bio: Biology, spacing: tuple[float, float, float],
               shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The grid box that can contain oedema: generous, so nothing is cut at its faces."""
    reach = bio.core_radius_mm * max(bio.axes) * bio.edema_ratio / max(1.0 - 1.5 * bio.irregularity, 0.3) + 8.0
    out = []
    for c, s, n in zip(centre_vox, spacing, shape):
        lo = max(int(math.floor(c - reach / s)), 0)
        hi = min(int(math.ceil(c + reach / s)) + 1, n)
        out.append(slice(lo, max(hi, lo + 1)))
    return tuple(out)  # type: ignore[return-value]


def render_tumour(bio: Biology, centre: npt.NDArray[np.float64], world_box: F32,
                  box: tuple[slice, slice, slice], spacing: tuple[float, float, float],
                  rng: np.random.Generator, p: CohortParams) -> TumourMaps:
    """Soft compartment maps from level sets of a perturbed ellipsoidal radius.

    Edges are sigmoids about ``edge_mm`` wide, widened by a quarter voxel so a
    coarse grid sees partial volume rather than staircase edges. Enhancing
    patches (incomplete rims, nodules, faint LGG patches) are thresholded
    smooth noise, so the enhancing fraction is a parameter, not an accident.
    """
    shape = world_box.shape[1:]
    R = bio.core_radius_mm
    d = world_box - np.asarray(centre, np.float32)[:, None, None, None]
    rot = rotation(bio.angles_rad).astype(np.float32)
    u = np.tensordot(rot.T, d, axes=1) / (R * np.asarray(bio.axes, np.float32))[:, None, None, None]
    r = np.sqrt(np.einsum("i...,i...->...", u, u)).astype(np.float32)
    pv = 0.23 * float(np.mean(spacing))
    e = math.hypot(p.edge_mm, pv) / R
    e_ed = math.hypot(p.edema_edge_mm, pv) / R
    n_shape = smooth_noise(shape, spacing, 14.0, rng)
    n_edema = smooth_noise(shape, spacing, 12.0, rng)
    n_nec = smooth_noise(shape, spacing, 8.0, rng)
    n_patch = smooth_noise(shape, spacing, 8.0, rng)
    texture = smooth_noise(shape, spacing, p.texture_feature_mm, rng)
    irr = np.float32(bio.irregularity)
    # boundary perturbations are bounded (tanh): a blob may be lumpy, never scattered islands
    r_core = r * (1.0 + irr * np.tanh(n_shape))
    core = special.expit((1.0 - r_core) / e).astype(np.float32)
    if bio.necrosis:
        r_nec = r * (1.0 + 0.5 * irr * np.tanh(n_nec))
        nec = special.expit((bio.necrosis_fraction - r_nec) / e).astype(np.float32) * core
    else:
        nec = np.zeros(shape, np.float32)
    if bio.enhancement_pattern == "none":
        enh = np.zeros(shape, np.float32)
    else:
        q = float(special.ndtri(1.0 - min(max(bio.enhancing_fraction, 1e-3), 1 - 1e-3)))
        patch = special.expit((n_patch - q) / 0.3).astype(np.float32)
        enh = (core - nec) * patch
    solid = np.clip(core - nec - enh, 0.0, None)
    calc = np.zeros(shape, np.float32)
    if bio.calcification:
        for _ in range(int(rng.integers(1, 5))):
            v = rng.normal(size=3)
            v *= rng.uniform(0.0, 0.6) * R / np.linalg.norm(v)
            rho = rng.uniform(1.5, 3.0)
            dist = np.sqrt(np.einsum("i...,i...->...", d - v.astype(np.float32)[:, None, None, None],
                                     d - v.astype(np.float32)[:, None, None, None]))
            calc = np.maximum(calc, special.expit((rho - dist) / math.hypot(0.5, pv)).astype(np.float32))
        calc = np.minimum(calc * core, solid + nec)
        from_solid = np.minimum(calc, solid)
        solid = solid - from_solid
        nec = nec - (calc - from_solid)
    edema = special.expit((bio.edema_ratio - r * (1.0 + 1.5 * irr * np.tanh(n_edema))) / e_ed).astype(np.float32)
    return TumourMaps(box=box, core=core, necrosis=nec, enhancing=enh, solid=solid, calcification=calc,
                      edema=edema, radius=r_core.astype(np.float32), texture=texture)
