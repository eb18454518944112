"""From tissue fractions to the four MR sequences: tissue contrasts, then a scanner.

Contrasts (:data:`CONTRAST`) are relative signal levels per sequence, set to
the textbook ordering: T1 WM > GM > CSF with lesions hypointense; T2 CSF >
oedema ~ tumour > GM > WM; FLAIR as T2 with CSF suppressed; T1CE as T1 except
enhancing tissue. Necrosis and enhancing tissue differ from solid tumour on
the non-enhanced sequences only by ``necrosis_ne_contrast`` and
``rim_ne_contrast`` (see :mod:`training.cohort_params`): this is where the
cohort encodes "strong on T1CE, weak without contrast".

The scanner model, per site and sequence: point-spread blur (3D T1/T1CE at
about 1 mm; 2D T2/FLAIR with thick slices), a smooth multiplicative bias
field, a gamma (contrast) change, a gain (arbitrary units differ between
scanners) and Rician noise (the magnitude of complex Gaussian noise), then
skull stripping (0 outside the brain, as BraTS). Sites share settings; each
case draws its own bias field, noise and a small gain jitter.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from .cohort_anatomy import F32, Grid, smooth_noise
from .cohort_params import CohortParams
from .cohort_tumour import Biology, TumourMaps

from models.vocab import ROLES

#: signal per sequence and tissue, relative to white matter on T1 (= 1). ``solid`` is
#: non-enhancing solid tumour; necrosis and enhancing tissue are derived from it (see module doc).
CONTRAST: dict[str, dict[str, float]] = {
    "T1": {"csf": 0.30, "gm": 0.70, "wm": 1.00, "edema": 0.62, "solid": 0.55, "calcification": 0.45},
    "T1CE": {"csf": 0.32, "gm": 0.72, "wm": 1.00, "edema": 0.63, "solid": 0.56, "calcification": 0.45},
    "T2": {"csf": 1.00, "gm": 0.62, "wm": 0.45, "edema": 0.80, "solid": 0.82, "calcification": 0.25},
    "FLAIR": {"csf": 0.12, "gm": 0.68, "wm": 0.52, "edema": 0.88, "solid": 0.85, "calcification": 0.35},
}
#: sign of the necrosis / pre-contrast rim difference from solid tumour per sequence
_NECROSIS_SIGN = {"T1": -1.0, "T1CE": -1.0, "T2": +1.0, "FLAIR": -1.0}
_RIM_SIGN = {"T1": +1.0, "T2": -1.0, "FLAIR": -1.0}
#: oedema spreads in white matter; grey matter takes this share (cortex is largely spared)
GM_EDEMA_SHARE = 0.3


@dataclass(frozen=True)
class Site:
    """One scanner/site's settings per sequence."""

    index: int
    gain: dict[str, float]
    gamma: dict[str, float]
    noise: dict[str, float]
    inplane_fwhm_mm: dict[str, float]
    slice_thickness_mm: float
    bias_log_sd: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else
                    {r: round(x, 4) for r, x in v.items()} if isinstance(v, dict) else v)
                for k, v in asdict(self).items()}


def draw_sites(seed: int, p: CohortParams) -> list[Site]:
    """The cohort's sites, from their own random stream (so site settings do not depend on n_cases)."""
    rng = np.random.default_rng([seed, 51731])
    sites = []
    for i in range(p.n_sites):
        sites.append(Site(
            index=i,
            gain={r: float(p.gain_median * math.exp(rng.normal(0.0, p.gain_log_sd))) for r in ROLES},
            gamma={r: float(rng.uniform(*p.gamma_range)) for r in ROLES},
            noise={r: float(rng.uniform(*p.noise_range)) for r in ROLES},
            inplane_fwhm_mm={r: float(rng.uniform(*p.inplane_fwhm_range_mm)) for r in ROLES},
            slice_thickness_mm=float(rng.uniform(*p.slice_thickness_range_mm)),
            bias_log_sd=float(rng.uniform(*p.bias_log_sd_range)),
        ))
    return sites


@dataclass
class Tissues:
    """Per-voxel fractions of every tissue class on the full grid (they sum to 1 in the brain)."""

    csf: F32
    gm: F32
    wm: F32
    edema: F32
    solid: F32
    necrosis: F32
    enhancing: F32
    calcification: F32
    mask: npt.NDArray[np.bool_]


def compose(gm: F32, wm: F32, csf: F32, mask: npt.NDArray[np.bool_], tm: TumourMaps | None) -> Tissues:
    """Put the tumour into the brain: the core displaces tissue; oedema replaces white matter mostly."""
    z = np.zeros_like(gm)
    t = Tissues(csf=csf.copy(), gm=gm.copy(), wm=wm.copy(), edema=z.copy(), solid=z.copy(), necrosis=z.copy(),
                enhancing=z.copy(), calcification=z, mask=mask)
    if tm is None:
        return t
    b = tm.box
    m = mask[b].astype(np.float32)
    core = tm.core * m
    keep = 1.0 - core
    gm1, wm1, csf1 = gm[b] * keep, wm[b] * keep, csf[b] * keep
    ed = tm.edema * m
    t.edema[b] = ed * (wm1 + GM_EDEMA_SHARE * gm1)
    t.wm[b] = wm1 * (1.0 - ed)
    t.gm[b] = gm1 * (1.0 - GM_EDEMA_SHARE * ed)
    t.csf[b] = csf1
    t.solid[b] = tm.solid * m
    t.necrosis[b] = tm.necrosis * m
    t.enhancing[b] = tm.enhancing * m
    t.calcification = z.copy()
    t.calcification[b] = tm.calcification * m
    return t


def segmentation(t: Tissues) -> npt.NDArray[np.uint8]:
    """BraTS labels: 1 necrosis/non-enhancing core, 2 oedema, 4 enhancing; a voxel goes to what dominates it."""
    core = t.solid + t.necrosis + t.enhancing + t.calcification
    seg = np.zeros(core.shape, np.uint8)
    is_core = (core >= 0.5) & t.mask
    seg[is_core] = 1
    seg[is_core & (t.enhancing >= t.solid + t.necrosis + t.calcification)] = 4
    seg[(~is_core) & (t.edema >= 0.4) & t.mask] = 2
    return seg


def _texture_full(tm: TumourMaps | None, shape: tuple[int, ...]) -> F32:
    tex = np.zeros(shape, np.float32)
    if tm is not None:
        tex[tm.box] = tm.texture
    return tex


def clean_signal(role: str, t: Tissues, tm: TumourMaps | None, bio: Biology | None, p: CohortParams,
                 jitter: dict[str, float]) -> F32:
    """Noise-free signal of one sequence (relative units), before the scanner."""
    c = {k: v * jitter.get(k, 1.0) for k, v in CONTRAST[role].items()}
    sig = t.csf * c["csf"] + t.gm * c["gm"] + t.wm * c["wm"]
    if tm is None or bio is None:
        return sig.astype(np.float32)
    b = tm.box
    het = bio.heterogeneity * (p.t1_texture_factor if role in ("T1", "T1CE") else 1.0)
    tex = 1.0 + np.float32(het) * tm.texture
    solid_c: F32 | float = c["solid"]
    if bio.mismatch and role == "FLAIR":
        # T2-FLAIR mismatch: the solid tumour is FLAIR-suppressed except for a bright rim
        rim = 1.0 / (1.0 + np.exp(-(tm.radius - 0.8) / 0.05))
        solid_c = (p.mismatch_flair_core + (c["solid"] - p.mismatch_flair_core) * rim).astype(np.float32)
    solid_tex = tex
    if bio.mismatch and role == "T2":
        solid_tex = 1.0 + np.float32(0.3 * het) * tm.texture  # homogeneous on T2
    nec_c = c["solid"] * (1.0 + _NECROSIS_SIGN[role] * p.necrosis_ne_contrast)
    enh_c = bio.enhancement * jitter.get("enhancing", 1.0) if role == "T1CE" else \
        c["solid"] * (1.0 + _RIM_SIGN[role] * p.rim_ne_contrast)
    edema_tex = 1.0 + np.float32(0.5 * het) * tm.texture
    sig[b] += (t.edema[b] * c["edema"] * edema_tex + t.solid[b] * solid_c * solid_tex
               + t.necrosis[b] * nec_c * tex + t.enhancing[b] * enh_c * tex
               + t.calcification[b] * c["calcification"])
    return sig.astype(np.float32)


def acquire(sig: F32, role: str, site: Site, grid: Grid, mask: npt.NDArray[np.bool_],
            rng: np.random.Generator, p: CohortParams) -> npt.NDArray[np.int16]:
    """The scanner: blur, bias, gamma, gain, Rician noise, skull strip, store as int16."""
    fwhm = [site.inplane_fwhm_mm[role]] * 3
    if role in ("T2", "FLAIR"):
        fwhm[2] = site.slice_thickness_mm  # 2D axial acquisition: thick slices
    sigma = [math.sqrt(max(f * f - s * s, 0.0)) / 2.355 / s for f, s in zip(fwhm, grid.spacing)]
    out = sig
    if max(sigma) > 0.1:
        out = ndimage.gaussian_filter(out, sigma, mode="nearest").astype(np.float32)
    bias = np.exp(np.float32(site.bias_log_sd) * smooth_noise(grid.shape, grid.spacing, p.bias_feature_mm, rng))
    out = np.power(np.clip(out * bias, 0.0, None), np.float32(site.gamma[role]))
    gain = site.gain[role] * math.exp(rng.normal(0.0, 0.1))
    out *= np.float32(gain)
    s = np.float32(site.noise[role] * gain)
    n1 = rng.standard_normal(grid.shape, dtype=np.float32)
    n2 = rng.standard_normal(grid.shape, dtype=np.float32)
    out = np.sqrt((out + s * n1) ** 2 + (s * n2) ** 2)
    out[~mask] = 0.0
    return np.clip(np.rint(out), 0, 32767).astype(np.int16)


def draw_jitter(rng: np.random.Generator, p: CohortParams) -> dict[str, dict[str, float]]:
    """Per-case, per-sequence tissue contrast jitter (people differ; so do protocols)."""
    out: dict[str, dict[str, float]] = {}
    for role in ROLES:
        out[role] = {k: float(1.0 + rng.normal(0.0, p.tissue_jitter_sd)) for k in
                     ("csf", "gm", "wm", "edema", "solid", "calcification", "enhancing")}
    return out
