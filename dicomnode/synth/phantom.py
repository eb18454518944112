"""A procedural brain-like MR phantom with a glioma (numpy only, deterministic by seed).

Nested soft-edged ellipsoids make scalp, skull, CSF, cortex (grey matter),
white matter and two lateral ventricles; the boundaries are made wavy by a
few seed-dependent low-frequency ripples.  An optional tumour sits in one
hemisphere's white matter: peritumoural oedema around a solid part; for HGG
the solid part is an enhancing rim around a necrotic core, for LGG it is
non-enhancing.  Each role gets its own tissue contrast, a smooth bias field
and Rician noise.

The head has adult proportions in millimetres (scaled down uniformly when
the field of view is smaller), so any shape and spacing give a whole head.
"""
from __future__ import annotations

import numpy as np

from dicomnode.synth.geometry import rotation_affine

from models.vocab import ROLES

#: label values of :func:`phantom_labels`
TISSUES = {
    "background": 0,
    "scalp": 1,
    "skull": 2,
    "csf": 3,
    "grey_matter": 4,
    "white_matter": 5,
    "oedema": 6,
    "necrosis": 7,          # HGG necrotic core
    "enhancing": 8,         # HGG enhancing rim
    "non_enhancing": 9,     # LGG solid tumour
}

#: mean signal per role and tissue (arbitrary scanner-like units)
CONTRAST: dict[str, dict[str, float]] = {
    # T1: fat-rich scalp and WM bright, CSF dark, lesions hypo-intense
    "T1": {"background": 0, "scalp": 700, "skull": 40, "csf": 150, "grey_matter": 430,
           "white_matter": 620, "oedema": 360, "necrosis": 120, "enhancing": 380,
           "non_enhancing": 300},
    # T1CE: as T1, and the HGG rim takes up gadolinium
    "T1CE": {"background": 0, "scalp": 710, "skull": 40, "csf": 160, "grey_matter": 440,
             "white_matter": 625, "oedema": 370, "necrosis": 125, "enhancing": 1250,
             "non_enhancing": 310},
    # T2: CSF and fluid bright, WM darker than GM
    "T2": {"background": 0, "scalp": 420, "skull": 30, "csf": 1000, "grey_matter": 560,
           "white_matter": 400, "oedema": 820, "necrosis": 950, "enhancing": 640,
           "non_enhancing": 780},
    # FLAIR: CSF suppressed, oedema and tumour bright
    "FLAIR": {"background": 0, "scalp": 380, "skull": 30, "csf": 70, "grey_matter": 480,
              "white_matter": 360, "oedema": 900, "necrosis": 260, "enhancing": 700,
              "non_enhancing": 850},
}

_NOISE_SIGMA = 8.0          # Rician noise sigma, same units as CONTRAST
_BIAS_AMPLITUDE = 0.06      # +/- fraction of the smooth receive-field bias


#: outer scalp semi-axes of an adult head (mm) along voxel axes 0, 1, 2 (L-R, A-P, S-I)
HEAD_SEMI_AXES_MM = (74.0, 94.0, 80.0)


def _grid(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in head units: the scalp is (about) the unit sphere.

    The head keeps adult proportions in millimetres; when the field of view is
    smaller than a head it is scaled down uniformly (never squashed) to fit.
    """
    semi = np.asarray(HEAD_SEMI_AXES_MM)
    half_fov = np.asarray(shape, float) * np.asarray(spacing, float) / 2
    scale = min(1.0, float(np.min(half_fov / (semi * 1.06))))
    axes = [((np.arange(n) - (n - 1) / 2) * sp / (scale * a)).astype(np.float32)
            for n, sp, a in zip(shape, spacing, semi)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid_radius(x, y, z, centre, radii) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    return np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)


def _soft(r: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator of ``r < 1`` with a boundary ``edge`` wide (partial volume)."""
    one = np.float32(1.0)
    return one / (one + np.exp(np.clip((r - one) / np.float32(edge), -60, 60)))


def _fractions(shape, spacing, seed: int, tumour: bool, grade: str) -> dict[str, np.ndarray]:
    """Partial-volume fraction of each tissue per voxel (they sum to 1)."""
    rng = np.random.default_rng([seed, 7321])
    x, y, z = _grid(shape, spacing)
    head_r = np.array([1.0, 1.0, 1.0])
    centre = np.array([0.0, 0.0, 0.0])
    # gyral ripple: a few random low-frequency waves modulate the cortical boundaries
    phase = rng.uniform(0, 2 * np.pi, size=3)
    ripple = 0.025 * (np.sin(9 * np.arctan2(y, x) + phase[0])
                      + np.sin(7 * np.arctan2(z, x) + phase[1])
                      + np.sin(8 * np.arctan2(z, y) + phase[2])) / 3

    r_head = _ellipsoid_radius(x, y, z, centre, head_r)
    edge = 0.012
    inside_head = _soft(r_head, edge)
    inside_skull = _soft(r_head / 0.93, edge)          # scalp shell 0.93..1
    inside_csf = _soft(r_head / 0.86, edge)            # skull shell 0.86..0.93
    inside_gm = _soft((r_head + ripple) / 0.81, edge)  # subarachnoid CSF 0.81..0.86
    inside_wm = _soft((r_head + 1.6 * ripple) / 0.66, edge)  # cortex 0.66..0.81

    # lateral ventricles: two small ellipsoids either side of the midline
    vent = np.zeros(shape, dtype=np.float32)
    for side in (-1, 1):
        r_v = _ellipsoid_radius(x, y, z, (side * 0.13, 0.04, 0.10), (0.10, 0.32, 0.16))
        vent = np.maximum(vent, _soft(r_v, edge)).astype(np.float32)

    frac = {
        "background": 1 - inside_head,
        "scalp": inside_head - inside_skull,
        "skull": inside_skull - inside_csf,
        "csf": inside_csf - inside_gm,
        "grey_matter": inside_gm - inside_wm,
        "white_matter": inside_wm,
    }
    # ventricles replace white matter
    frac["csf"] = frac["csf"] + frac["white_matter"] * vent
    frac["white_matter"] = frac["white_matter"] * (1 - vent)
    for name in ("oedema", "necrosis", "enhancing", "non_enhancing"):
        frac[name] = np.zeros(shape, dtype=np.float32)

    if tumour:
        side = rng.choice([-1.0, 1.0])
        t_centre = np.array([side * rng.uniform(0.36, 0.44), rng.uniform(-0.28, 0.28),
                             rng.uniform(-0.05, 0.28)])
        t_r = rng.uniform(0.20, 0.26) * np.array([1.0, rng.uniform(0.9, 1.15), rng.uniform(0.9, 1.15)])
        r_t = _ellipsoid_radius(x, y, z, t_centre, t_r)
        lobes = 0.06 * np.sin(5 * np.arctan2(y - t_centre[1], x - t_centre[0]) + rng.uniform(0, 6.3))
        brain = frac["white_matter"] + frac["grey_matter"]
        oedema = _soft((r_t + 2 * lobes) / 1.9, 0.05) * brain
        solid = _soft(r_t, 0.04) * brain
        frac["oedema"] = oedema - solid
        if grade.upper() == "HGG":
            core = _soft(r_t / 0.55, 0.04) * brain
            frac["enhancing"] = solid - core
            frac["necrosis"] = core
        elif grade.upper() == "LGG":
            frac["non_enhancing"] = solid
        else:
            raise ValueError(f"grade must be 'HGG' or 'LGG', got {grade!r}")
        # tumour and oedema displace normal brain in proportion
        keep = np.where(brain > 0, (brain - oedema) / np.maximum(brain, 1e-12), 0.0)
        frac["white_matter"] = frac["white_matter"] * keep
        frac["grey_matter"] = frac["grey_matter"] * keep
    return frac


def phantom_labels(shape=(64, 64, 40), spacing=(3.0, 3.0, 3.0), seed: int = 0, tumour: bool = True,
                   grade: str = "HGG") -> np.ndarray:
    """The dominant tissue per voxel (values in :data:`TISSUES`), uint8, same layout as make_phantom."""
    frac = _fractions(tuple(int(n) for n in shape), spacing, seed, tumour, grade)
    names = list(TISSUES)
    stack = np.stack([frac[n] for n in names])
    return np.asarray([TISSUES[n] for n in names], dtype=np.uint8)[np.argmax(stack, axis=0)]


def make_phantom(shape=(64, 64, 40), spacing=(3.0, 3.0, 3.0), seed: int = 0, tumour: bool = True,
                 grade: str = "HGG") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Procedural brain-like phantom (numpy only, deterministic by seed).

    Returns ``({role: float32 volume (x, y, z)}, affine)``: one volume per role in
    :data:`ROLES`, in NIfTI voxel order, and a 4x4 RAS affine in the BraTS layout
    (voxel axes 0 and 1 run right->left and anterior->posterior, axis 2
    inferior->superior), centred on the world origin.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be three sizes >= 2, got {shape}")
    frac = _fractions(shape, spacing, seed, tumour, grade)
    x, y, z = _grid(shape, spacing)
    volumes: dict[str, np.ndarray] = {}
    for n, role in enumerate(ROLES):
        rng = np.random.default_rng([seed, 104729, n])
        table = CONTRAST[role]
        clean = sum(frac[name] * np.float32(table[name]) for name in table)
        # smooth multiplicative receive-coil bias, different per series
        c = rng.uniform(-1, 1, size=4)
        bias = 1 + _BIAS_AMPLITUDE * np.tanh(c[0] * x + c[1] * y + c[2] * z + 0.3 * c[3] * x * y)
        signal = clean * bias
        noise_r = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)
        noise_i = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(_NOISE_SIGMA)
        volumes[role] = np.sqrt((signal + noise_r) ** 2 + noise_i ** 2).astype(np.float32)
    affine = rotation_affine(spacing=spacing, shape=shape, flips=(-1, -1, 1))
    return volumes, affine
