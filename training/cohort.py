"""A synthetic BraTS-like glioma cohort, deterministic by seed, written in the BraTS2020 layout.

Why it exists: BraTS cannot be downloaded here, and the papers' claims are
about a specific situation: grade shows STRONGLY on contrast-enhanced T1
(enhancing rim, necrosis) and only WEAKLY on non-enhanced sequences (oedema
extent, T2/FLAIR heterogeneity). This cohort builds exactly that, with every
effect size an explicit, recorded parameter (:mod:`training.cohort_params`),
so a model ranking measured on it can be traced to what the images contain.

Pieces: brain anatomy from nilearn's MNI152 2009 template (GM/WM maps, CSF as
the rest of the brain mask) moved and warped per case
(:mod:`training.cohort_anatomy`); a tumour with oedema, necrosis and
enhancement drawn from grade-, IDH- and 1p/19q-dependent distributions
(:mod:`training.cohort_tumour`); per-sequence contrasts and a scanner model
per site (:mod:`training.cohort_mri`).

Output (``out_dir``)::

    BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz
    ...
    name_mapping.csv   the real BraTS2020 header; Grade HGG/LGG
    labels.csv         case_id, grade, idh, 1p19q (BraTS has no molecular labels)
    truth.csv          every latent per-case parameter (size, oedema ratio, rim, site...)
    cohort.json        profile, shape, spacing, seed, counts, all parameters, sites

Every file is a pure function of (profile/shape/spacing, n_cases, seed,
hgg_fraction, params): the same call writes byte-identical files (gzip with
mtime 0; no time stamps in cohort.json), whatever the number of workers.
:func:`training.datasets.read_brats2020` reads the folder (labels.csv included).
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import numpy.typing as npt

from .cases import TASKS, Case
from .cohort_anatomy import Grid, load_anatomy, draw_pose, sample_brain
from .cohort_mri import ROLES, Site, acquire, clean_signal, compose, draw_jitter, draw_sites, segmentation
from .cohort_params import CohortParams, GradeParams
from .cohort_tumour import Biology, draw_biology, render_tumour, tumour_box

__all__ = ["PROFILES", "CohortProfile", "CohortSummary", "CohortParams", "GradeParams", "generate_cohort", "CasePlan",
           "plan_cohort",
           "BRATS2020_HGG_FRACTION", "measure_effects", "EffectReport"]

#: BraTS2020 training: 293 HGG / 76 LGG
BRATS2020_HGG_FRACTION: float = 293 / 369
#: bump when the generator changes what a given seed produces
GENERATOR_VERSION = 2
FORMAT = "training.cohort/1"


@dataclass(frozen=True)
class CohortProfile:
    """Size and grid of a cohort."""

    n_cases: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    why: str


PROFILES: dict[str, CohortProfile] = {
    # 64x64x48 at 3x3x3.25 mm: a 192x192x156 mm field of view (the whole brain, as
    # BraTS's 240x240x155 mm crops it), 100 cases (79 HGG / 21 LGG at BraTS's
    # balance): 3D CNNs train on it on 2 CPU cores in minutes.
    "small": CohortProfile(100, (64, 64, 48), (3.0, 3.0, 3.25), "CPU: trains on 2 cores in minutes"),
    # BraTS2020 training itself: 369 cases of 240x240x155 at 1 mm.
    "full": CohortProfile(369, (240, 240, 155), (1.0, 1.0, 1.0), "GPU: BraTS2020 size and resolution"),
}

NAME_MAPPING_HEADER = ("Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                       "BraTS_2019_subject_ID", "BraTS_2020_subject_ID")
_OUR_FILES = ("name_mapping.csv", "labels.csv", "truth.csv", "cohort.json")


@dataclass(frozen=True)
class CohortSummary:
    """What was generated: counts per class, the grid, every parameter; also ``cohort.json``."""

    out_dir: Path
    profile: str
    seed: int
    n_cases: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    hgg_fraction: float
    counts: dict[str, dict[str, int]]
    params: dict[str, Any]
    sites: list[dict[str, Any]]
    seconds: float = 0.0
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``cohort.json`` content (no timing or worker count: those are not part of the data)."""
        return {
            "format": FORMAT,
            "generator_version": GENERATOR_VERSION,
            "layout": "BraTS2020 training (BraTS20_Training_NNN/..._{t1,t1ce,t2,flair,seg}.nii.gz)",
            "profile": self.profile,
            "seed": self.seed,
            "n_cases": self.n_cases,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "hgg_fraction": self.hgg_fraction,
            "counts": self.counts,
            "label_coding": {t: list(v) for t, v in TASKS.items()},
            "seg_labels": {"1": "necrosis / non-enhancing tumour core", "2": "peritumoural oedema",
                           "4": "enhancing tumour"},
            "params": self.params,
            "sites": self.sites,
            **self.extra,
        }


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class CasePlan:
    """The labels of one case, fixed before any image is drawn (``*_label``: what labels.csv says)."""

    index: int
    case_id: str
    grade: str
    idh: int
    codel: int
    site: int
    idh_label: int | None
    codel_label: int | None


@dataclass(frozen=True)
class _Context:
    out_dir: Path
    grid: Grid
    params: CohortParams
    seed: int
    sites: tuple[Site, ...]
    compresslevel: int


def _case_id(i: int, n: int) -> str:
    return f"BraTS20_Training_{i + 1:0{max(3, len(str(n)))}d}"


def plan_cohort(n: int, seed: int = 0, hgg_fraction: float = BRATS2020_HGG_FRACTION,
                p: CohortParams | None = None) -> list[CasePlan]:
    """Labels of every case, drawn up front from the cohort's own stream.

    The grade count is exact (a shuffled list, not n coin flips), so a cohort
    has BraTS's balance, not roughly it; IDH is drawn given grade and 1p/19q
    given IDH (never codeleted when wildtype). Cheap: no image is made, so
    label statistics can be checked on thousands of cases.
    """
    p = CohortParams() if p is None else p
    rng = np.random.default_rng([seed, 20201])
    n_hgg = int(round(n * hgg_fraction))
    if n >= 2 and 0.0 < hgg_fraction < 1.0:
        n_hgg = min(max(n_hgg, 1), n - 1)  # both classes present whenever the fraction says so
    grades = np.array(["HGG"] * n_hgg + ["LGG"] * (n - n_hgg))
    rng.shuffle(grades)
    plans = []
    for i, grade in enumerate(grades):
        g: GradeParams = p.grade(str(grade))
        idh = int(rng.random() < g.p_idh_mutant)
        codel = int(idh == 1 and rng.random() < g.p_codeleted_given_idh_mutant)
        site = int(rng.integers(p.n_sites))
        miss_i, miss_c = rng.random(2) < p.p_missing_molecular
        plans.append(CasePlan(index=i, case_id=_case_id(i, n), grade=str(grade), idh=idh, codel=codel, site=site,
                           idh_label=None if miss_i else idh, codel_label=None if (miss_c or miss_i) else codel))
    return plans


# --------------------------------------------------------------------------- one case
_WORLD_CACHE: dict[tuple[Any, ...], npt.NDArray[np.float32]] = {}


def _world(grid: Grid) -> npt.NDArray[np.float32]:
    key = (grid.shape, grid.spacing, grid.affine.tobytes())
    if key not in _WORLD_CACHE:
        _WORLD_CACHE.clear()
        _WORLD_CACHE[key] = grid.world()
    return _WORLD_CACHE[key]


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, compresslevel: int) -> None:
    """Deterministic .nii.gz (gzip mtime 0, no file name in the gzip header), written atomically."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    # sform code 4 ("MNI152"): the cohort's world IS the template's (its anatomy is the MNI152
    # template, moved per case), so the clinical atlas step only resamples it (models.clinical)
    img.set_sform(affine, code=4)
    raw = img.to_bytes()
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(gzip.compress(raw, compresslevel=compresslevel, mtime=0))
    tmp.replace(path)


def _render_case(plan: CasePlan, ctx: _Context) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Volumes per role (int16), seg (uint8) and the truth row of one case; pure function of its inputs."""
    p, grid = ctx.params, ctx.grid
    rng = np.random.default_rng([ctx.seed, 7, plan.index])
    anat = load_anatomy(grid.spacing)
    bio: Biology = draw_biology(rng, plan.grade, plan.idh, plan.codel, p, anat)
    pose = draw_pose(rng, p.brain_scale_sd, p.rotation_sd_deg, p.translation_sd_mm)
    centre = pose.to_subject(np.asarray(bio.centre_mni), anat.brain_centre)
    reach = bio.core_radius_mm * bio.edema_ratio
    mass = min(p.mass_effect * min(bio.core_radius_mm / 25.0, 1.4), 0.8)
    world = _world(grid)
    gm, wm, csf, mask = sample_brain(anat, grid, world, pose, rng, warp_amplitude_mm=p.warp_amplitude_mm,
                                     warp_feature_mm=p.warp_feature_mm, mass_centre=centre,
                                     mass_strength=mass, mass_length_mm=reach)
    centre_vox = np.linalg.solve(grid.affine, np.append(centre, 1.0))[:3]
    box = tumour_box(centre_vox, bio, grid.spacing, grid.shape)
    tm = render_tumour(bio, centre, world[(slice(None), *box)], box, grid.spacing, rng, p)
    tissues = compose(gm, wm, csf, mask, tm)
    seg = segmentation(tissues)
    jitter = draw_jitter(rng, p)
    site = ctx.sites[plan.site]
    vols = {}
    for role in ROLES:
        sig = clean_signal(role, tissues, tm, bio, p, jitter[role])
        vols[role] = acquire(sig, role, site, grid, mask, rng, p)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    row: dict[str, Any] = {"case_id": plan.case_id, "site": plan.site, **bio.to_row()}
    row.update({
        "brain_ml": round(float(mask.sum()) * voxel_ml, 2),
        "ncr_net_ml": round(float((seg == 1).sum()) * voxel_ml, 3),
        "edema_ml": round(float((seg == 2).sum()) * voxel_ml, 3),
        "enhancing_ml": round(float((seg == 4).sum()) * voxel_ml, 3),
        "mass_effect": round(mass, 4),
        "brain_scale": " ".join(f"{v:.3f}" for v in pose.scale),
    })
    return vols, seg, row


def _make_case(plan: CasePlan, ctx: _Context) -> dict[str, Any]:
    vols, seg, row = _render_case(plan, ctx)
    folder = ctx.out_dir / plan.case_id
    folder.mkdir(parents=True, exist_ok=True)
    for role, suffix in (("T1", "t1"), ("T1CE", "t1ce"), ("T2", "t2"), ("FLAIR", "flair")):
        _write_nifti(folder / f"{plan.case_id}_{suffix}.nii.gz", vols[role], ctx.grid.affine, ctx.compresslevel)
    _write_nifti(folder / f"{plan.case_id}_seg.nii.gz", seg, ctx.grid.affine, ctx.compresslevel)
    return row


_CTX: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx
    load_anatomy(ctx.grid.spacing)


def _make_case_in_worker(plan: CasePlan) -> dict[str, Any]:
    assert _CTX is not None
    return _make_case(plan, _CTX)


# --------------------------------------------------------------------------- the cohort
def _clear(out: Path, overwrite: bool) -> None:
    """Refuse to mix cohorts; with ``overwrite`` remove only what a previous generation wrote."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    ours = [e for e in entries if (e.is_dir() and e.name.startswith("BraTS20_Training_")) or e.name in _OUR_FILES]
    foreign = [e.name for e in entries if e not in ours]
    if not overwrite:
        raise FileExistsError(f"{out} is not empty ({len(entries)} entries); pass overwrite=True to replace "
                              f"a previous cohort")
    if foreign:
        raise FileExistsError(f"{out} holds files that are not a cohort's ({', '.join(sorted(foreign)[:5])}); "
                              f"refusing to overwrite")
    for e in ours:
        shutil.rmtree(e) if e.is_dir() else e.unlink()


def _counts(plans: Sequence[CasePlan]) -> dict[str, dict[str, int]]:
    def cnt(values: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            out[v] = out.get(v, 0) + 1
        return dict(sorted(out.items()))
    word_idh = {None: "missing", 0: "wildtype", 1: "mutant"}
    word_cod = {None: "missing", 0: "intact", 1: "codeleted"}
    return {
        "grade": cnt([pl.grade for pl in plans]),
        "idh": cnt([word_idh[pl.idh] for pl in plans]),
        "1p19q": cnt([word_cod[pl.codel] for pl in plans]),
        "grade_idh_1p19q": cnt([f"{pl.grade}/{word_idh[pl.idh]}/{word_cod[pl.codel]}" for pl in plans]),
        "labels_withheld": {"idh": sum(pl.idh_label is None for pl in plans),
                            "1p19q": sum(pl.codel_label is None for pl in plans)},
        "site": cnt([f"{pl.site}" for pl in plans]),
    }


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def generate_cohort(out_dir: str | os.PathLike[str], *, profile: str = "small", n_cases: int | None = None,
                    seed: int = 0, hgg_fraction: float | None = None,
                    shape: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                    params: CohortParams | Mapping[str, Any] | None = None, workers: int | None = None,
                    overwrite: bool = False, progress: bool = False, compresslevel: int = 4) -> CohortSummary:
    """Generate a synthetic BraTS-like cohort in ``out_dir`` (BraTS2020 layout) and return its summary.

    ``profile`` ("small" or "full", :data:`PROFILES`) sets the defaults that
    ``n_cases``, ``shape`` and ``spacing`` override. ``hgg_fraction`` defaults
    to BraTS2020's 293/369; the HGG count is exactly ``round(n * fraction)``
    (at least one of each class when 0 < fraction < 1 and n >= 2). ``params``
    is a :class:`CohortParams` or a mapping of dotted overrides
    (``{"hgg.edema_ratio_mean": 1.4}``). ``workers`` defaults to the CPU count
    (at most 8); results do not depend on it. A non-empty ``out_dir`` is an
    error unless ``overwrite`` (which removes only a previous cohort's files).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    prof = PROFILES[profile]
    n = int(prof.n_cases if n_cases is None else n_cases)
    if n < 1:
        raise ValueError("n_cases must be >= 1")
    shp = tuple(int(v) for v in (prof.shape if shape is None else shape))
    spc = tuple(float(v) for v in (prof.spacing if spacing is None else spacing))
    if len(shp) != 3 or min(shp) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shp}")
    if len(spc) != 3 or min(spc) <= 0:
        raise ValueError(f"spacing must be 3 positive sizes (mm), got {spc}")
    frac = BRATS2020_HGG_FRACTION if hgg_fraction is None else float(hgg_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"hgg_fraction must be in [0, 1], got {frac}")
    if params is None:
        prm = CohortParams()
    elif isinstance(params, CohortParams):
        prm = params
    else:
        prm = CohortParams().with_overrides(params)
    prm.validate()
    nworkers = int(workers) if workers is not None else min(os.cpu_count() or 1, 8)
    nworkers = max(1, min(nworkers, n))
    out = Path(out_dir)
    _clear(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    anat = load_anatomy(spc)  # type: ignore[arg-type]
    grid = Grid.around(anat.brain_centre, shp, spc)  # type: ignore[arg-type]
    sites = tuple(draw_sites(seed, prm))
    plans = plan_cohort(n, seed, frac, prm)
    ctx = _Context(out_dir=out, grid=grid, params=prm.effective(), seed=int(seed), sites=sites,
                   compresslevel=int(compresslevel))
    rows = list(_run(plans, ctx, nworkers, progress))

    _write_csv(out / "name_mapping.csv", NAME_MAPPING_HEADER,
               [[pl.grade, "NA", "NA", "NA", "NA", pl.case_id] for pl in plans])
    words = {"idh": {None: "", 0: "wildtype", 1: "mutant"}, "1p19q": {None: "", 0: "intact", 1: "codeleted"}}
    _write_csv(out / "labels.csv", ("case_id", "grade", "idh", "1p19q"),
               [[pl.case_id, pl.grade, words["idh"][pl.idh_label], words["1p19q"][pl.codel_label]] for pl in plans])
    truth_cols = list(rows[0])
    _write_csv(out / "truth.csv", truth_cols, [[r[c] for c in truth_cols] for r in rows])
    summary = CohortSummary(
        out_dir=out, profile=profile, seed=int(seed), n_cases=n, shape=shp, spacing=spc,  # type: ignore[arg-type]
        hgg_fraction=frac, counts=_counts(plans), params=prm.to_dict(),
        sites=[s.to_dict() for s in sites], seconds=time.perf_counter() - t0, workers=nworkers,
        extra={"affine": [[round(float(v), 6) for v in r] for r in grid.affine],
               "template": _template_note(), "effective_params": prm.effective().to_dict()})
    tmp = out / "cohort.json.part"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out / "cohort.json")
    return summary


def _template_note() -> str:
    try:
        import nilearn
        version = nilearn.__version__
    except Exception:  # pragma: no cover
        version = "unknown"
    return f"MNI152 2009 GM/WM/brain mask from nilearn {version} (1 mm)"


def _run(plans: Sequence[CasePlan], ctx: _Context, workers: int, progress: bool) -> Iterator[dict[str, Any]]:
    """Render and write every case, in order; in parallel processes when ``workers`` > 1.

    Workers are forked where the platform allows (they inherit the loaded
    template; nothing is pickled but the plan), else spawned with an
    initialiser that loads it.
    """
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(plans), desc="cohort", unit="case")
        except ImportError:  # pragma: no cover
            bar = None
    try:
        if workers <= 1:
            for pl in plans:
                yield _make_case(pl, ctx)
                if bar is not None:
                    bar.update()
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                                 initializer=_init_worker, initargs=(ctx,)) as pool:
            for row in pool.map(_make_case_in_worker, plans, chunksize=1):
                yield row
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class EffectReport:
    """Per-case image features and how strongly each separates HGG from LGG.

    ``cohen_d[f]`` is (mean HGG - mean LGG) / pooled s.d.; ``feature_auc[f]``
    is P(feature of an HGG case > that of an LGG case) (0.5 = no signal, below
    0.5 = lower in HGG); ``auc`` holds
    cross-validated logistic-regression AUCs of the non-enhanced features
    ("NE"), the T1CE features ("T1CE") and all ("FS"), when computed.
    """

    features: dict[str, npt.NDArray[np.float64]]
    grade: npt.NDArray[np.int64]
    cohen_d: dict[str, float]
    feature_auc: dict[str, float]
    auc: dict[str, float]

    def table(self) -> str:
        """A Markdown table of the features: HGG and LGG means, Cohen's d, single-feature AUC."""
        lines = ["| feature | sequences | HGG mean | LGG mean | Cohen's d | AUC |", "|---|---|---|---|---|---|"]
        for k, v in self.features.items():
            seq = "T1CE" if k in self.CE_FEATURES else "seg labels" if k in self.SEG_FEATURES else "non-enhanced"
            lines.append(f"| {k} | {seq} | {v[self.grade == 1].mean():.3f} | {v[self.grade == 0].mean():.3f} | "
                         f"{self.cohen_d[k]:+.2f} | {self.feature_auc[k]:.3f} |")
        return "\n".join(lines)

    #: which features a model without contrast could see
    NE_FEATURES: ClassVar[tuple[str, ...]] = ("flair_abnormal_ml", "t2_tumour_cv", "flair_tumour_cv", "t1_tumour_mean",
                                    "t2_core_minus_edema", "flair_core_minus_edema")
    #: from the segmentation, not the images: the generator's oedema extent as drawn
    SEG_FEATURES: ClassVar[tuple[str, ...]] = ("edema_to_core_seg",)
    CE_FEATURES: ClassVar[tuple[str, ...]] = ("t1ce_enhancing_fraction", "t1ce_tumour_cv", "t1ce_tumour_p99")


def _case_features(case: Case) -> dict[str, float]:
    vol = {r: np.asarray(nib.load(str(p)).dataobj, dtype=np.float64) for r, p in case.images.items()}
    if case.seg is None:
        raise ValueError(f"{case.case_id}: no segmentation; effects are measured inside the tumour")
    seg = np.asarray(nib.load(str(case.seg)).dataobj)
    brain = np.zeros(seg.shape, bool)
    for v in vol.values():
        brain |= v > 0
    normal = brain & (seg == 0)
    tum = seg > 0
    core = (seg == 1) | (seg == 4)
    edema = seg == 2
    n = {r: v / max(float(np.median(v[normal])), 1e-6) for r, v in vol.items()}
    voxel_ml = float(np.prod(nib.load(str(case.seg)).header.get_zooms()[:3])) / 1000.0

    def cv(a: np.ndarray) -> float:
        return float(a.std() / max(a.mean(), 1e-6)) if a.size else 0.0

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else 0.0

    f = {
        "t1ce_enhancing_fraction": float((n["T1CE"][tum] > np.percentile(n["T1CE"][normal], 99.5)).mean())
        if tum.any() else 0.0,
        "t1ce_tumour_cv": cv(n["T1CE"][tum]),
        "t1ce_tumour_p99": float(np.percentile(n["T1CE"][tum], 99)) if tum.any() else 0.0,
        "flair_abnormal_ml": float((n["FLAIR"][brain] > np.percentile(n["FLAIR"][normal], 99.5)).sum()) * voxel_ml,
        "t2_tumour_cv": cv(n["T2"][tum]),
        "flair_tumour_cv": cv(n["FLAIR"][tum]),
        "t1_tumour_mean": mean(n["T1"][tum]),
        "t2_core_minus_edema": mean(n["T2"][core]) - mean(n["T2"][edema]),
        "flair_core_minus_edema": mean(n["FLAIR"][core]) - mean(n["FLAIR"][edema]),
        "edema_to_core_seg": float(edema.sum()) / max(float(core.sum()), 1.0),
    }
    return f


def measure_effects(cases_or_root: Sequence[Case] | str | os.PathLike[str], *, auc: bool = True,
                    folds: int = 5, seed: int = 0) -> EffectReport:
    """Measure, from the written images, how strongly each sequence separates HGG from LGG.

    Why: the cohort promises "strong on T1CE, weak without contrast"; this
    checks the promise on the files a model will read, not on the
    generator's parameters. Features are simple (enhancing fraction above the
    normal brain's 99.5th percentile, coefficients of variation, FLAIR
    abnormal volume, core-vs-oedema contrasts), so they bound from below
    what a network can find.
    """
    if isinstance(cases_or_root, (str, os.PathLike)):
        from .datasets import read_brats2020
        cases = read_brats2020(cases_or_root, verify="none")
    else:
        cases = list(cases_or_root)
    rows = [_case_features(c) for c in cases]
    names = list(rows[0])
    feats = {k: np.array([r[k] for r in rows], dtype=float) for k in names}
    if any(c.labels["grade"] is None for c in cases):
        raise ValueError("every case needs a grade label to measure grade effects")
    y = np.array([c.labels["grade"] for c in cases], dtype=np.int64)
    d: dict[str, float] = {}
    for k, v in feats.items():
        a, b = v[y == 1], v[y == 0]
        if len(a) < 2 or len(b) < 2:
            d[k] = float("nan")
            continue
        pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        d[k] = float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")
    fauc: dict[str, float] = {}
    for k, v in feats.items():
        a, b = v[y == 1], v[y == 0]
        fauc[k] = float(((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
                        if len(a) and len(b) else float("nan"))
    aucs: dict[str, float] = {}
    if auc and min((y == 1).sum(), (y == 0).sum()) >= folds:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        groups = {"NE": EffectReport.NE_FEATURES, "T1CE": EffectReport.CE_FEATURES,
                  "FS": EffectReport.NE_FEATURES + EffectReport.CE_FEATURES}
        for gname, cols in groups.items():
            x = np.column_stack([feats[c] for c in cols])
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            prob = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
            aucs[gname] = float(roc_auc_score(y, prob))
    return EffectReport(features=feats, grade=y, cohen_d=d, feature_auc=fauc, auc=aucs)
