"""Real but tiny checkpoints, made with the training module, for tests that run models end to end.

Why real: a hand-made state dict would test the node against a checkpoint no
training run can produce. These come from the same path a site's models do:
a synthetic BraTS-layout cohort (``training.cohort``), the family's own spec
(``spec_for``) with a coarse spacing, a few optimiser steps on the family's
network, a temperature fitted with ``training.calibration`` and the export of
``training.export`` (which validates by loading the file back), with the gate's statistics
(``extra["gate"]``: measurement ranges over the training cases, feature statistics with the
threshold on :data:`VAL_CASES` held-out validation cases) as the protocols record them. Why tiny: the
whole set builds in seconds on two cores and inference on CPU takes well under
a second, so end-to-end tests (convert -> prepare -> infer -> report -> PACS)
can run on every commit. The models learn next to nothing; do not read their
probabilities.

Use from pytest (one build per test session, whichever module asks first)::

    from checkpoints import tiny_checkpoints

    @pytest.fixture(scope="session")
    def ckpt_dir(tmp_path_factory):
        return tiny_checkpoints(tmp_path_factory)

and from a script (a directory: reused when it already holds this recipe's set)::

    python tests/checkpoints.py /tmp/tiny-ckpts [promptnet fs3dcnn mmdlm]

Geometry: every spec resamples to :data:`SPACING_MM` (6 mm) and crops a
:data:`FIELD_OF_VIEW_MM` (192 x 192 x 192 mm) window, i.e. 32 voxels per side;
MMDLM bags :data:`MMDLM_SLICES` axial slices of 32 x 32. Any adult-head-sized
study (e.g. ``dicomnode.synth.make_phantom``'s) fits.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # as a script: python tests/checkpoints.py
    sys.path.insert(0, str(REPO))

from models.families import get_family  # noqa: E402
from models.gate import case_measurements  # noqa: E402
from models.preprocess import apply_spec, clinical_variant, to_batch  # noqa: E402
from models.registry import CheckpointRegistry  # noqa: E402

FAMILIES: tuple[str, ...] = ("promptnet", "fs3dcnn", "mmdlm")
SPACING_MM: float = 6.0
FIELD_OF_VIEW_MM: float = 192.0
VOXELS: int = int(FIELD_OF_VIEW_MM / SPACING_MM)  # 32 per side
MMDLM_SLICES: int = 12
COHORT_CASES: int = 12
VAL_CASES: int = 4  # the last cases of the cohort: not trained on; the gate's feature threshold comes from them
TRAIN_STEPS: int = 4
FALLBACK_TEMPERATURE: float = 1.5
RECIPE_VERSION: int = 2  # bump when anything below changes what a checkpoint holds
_STAMP = "tiny-checkpoints.json"

_VOLUME_HPARAMS: dict[str, Any] = {
    "input_shape": [VOXELS] * 3, "widths": [4, 4, 8], "stem_width": 4, "fc_hidden": [8, 8], "dropout": 0.0,
}
_MMDLM_HPARAMS: dict[str, Any] = {
    "resnet_layers": [1, 1, 1, 1], "resnet_widths": [4, 4, 8, 8], "mil_hidden_dim": 8, "mil_attention_dim": 8,
    "projection_dim": 4, "fusion_dim": 4, "dropout": 0.0, "attention_dropout": 0.0,
    "slice_size": [VOXELS, VOXELS], "slice_count": MMDLM_SLICES, "spacing_mm": [SPACING_MM] * 3,
    "field_of_view_mm": [FIELD_OF_VIEW_MM] * 3,
}

# one build per process and recipe: (families, output root) -> directory
_BUILT: dict[tuple[tuple[str, ...], str], Path] = {}


def hparams_for(family: str) -> dict[str, Any]:
    """The tiny hyper-parameters of a family (a copy)."""
    if family == "mmdlm":
        return copy.deepcopy(_MMDLM_HPARAMS)
    if family in ("fs3dcnn", "promptnet"):
        return copy.deepcopy(_VOLUME_HPARAMS)
    raise ValueError(f"no tiny recipe for family {family!r}; known: {', '.join(FAMILIES)}")


def spec_for(family: str, *, clinical: bool = False) -> dict[str, Any]:
    """The family's own spec for the tiny hparams, resampled at :data:`SPACING_MM`.

    ``clinical``: its clinical variant (bias field, co-registration, brain
    extraction, MNI152 grid at the same spacing), for tests that send native
    whole heads and want them prepared the way a site's models would.
    """
    fam = get_family(family)
    assert fam.spec_for is not None
    spec = copy.deepcopy(fam.spec_for(hparams_for(family)))
    for t in spec["transforms"]:
        if t["name"] == "resample":
            t["spacing"] = [SPACING_MM] * 3
    return clinical_variant(spec) if clinical else spec


def _cohort(out: Path, seed: int) -> list[Any]:
    from training.cohort import generate_cohort
    from training.datasets import read_dataset

    if not (out / "cohort.json").exists():
        generate_cohort(out, n_cases=COHORT_CASES, hgg_fraction=0.5, seed=seed, shape=(24, 24, 20),
                        spacing=(8.0, 8.0, 8.0), workers=1, overwrite=True)
    return list(read_dataset(out))


def _logits(family: str, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw logits per task: (N, 2) for the 3D families' softmax heads, (N,) for MMDLM's sigmoid heads."""
    fam = get_family(family)
    if family == "mmdlm":
        out = model({r: batch[r] for r in fam.input_roles}, batch["slice_mask"])
        return dict(out.logits)
    x = torch.stack([batch[r] for r in fam.input_roles], dim=1)
    return {"grade": model(x).logits}


def _train_and_export(family: str, all_cases: Sequence[Any], out_file: Path, seed: int,
                      spec: Mapping[str, Any] | None = None) -> str:
    """Train a few steps and export; ``spec`` (default :func:`spec_for`) must fit the tiny hparams
    (e.g. ``models.preprocess.clinical_volume_spec(roles, [VOXELS] * 3, spacing=[SPACING_MM] * 3)``)."""
    from training.calibration import TemperatureFit, temperature_fit
    from training.cases import labels_array
    from training.export import export_model, gate_record

    torch.manual_seed(seed)
    fam = get_family(family)
    hp = hparams_for(family)
    spec = spec_for(family) if spec is None else copy.deepcopy(dict(spec))
    model = fam.build(hp)
    cases, val_cases = list(all_cases[:-VAL_CASES]), list(all_cases[-VAL_CASES:])
    prepared = [apply_spec(spec, {r: c.images[r] for r in fam.input_roles}) for c in cases]
    batch = to_batch(prepared, fam.input_roles)
    val_batch = to_batch([apply_spec(spec, {r: c.images[r] for r in fam.input_roles}) for c in val_cases],
                         fam.input_roles)
    labels = {t: torch.from_numpy(labels_array(cases, t, missing=-1)) for t in fam.tasks}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        optimiser.zero_grad()
        loss = torch.zeros(())
        for task, z in _logits(family, model, batch).items():
            y = labels[task]
            keep = y >= 0
            if not keep.any():
                continue
            if z.dim() == 1:
                loss = loss + F.binary_cross_entropy_with_logits(z[keep], y[keep].float())
            else:
                loss = loss + F.cross_entropy(z[keep], y[keep])
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = {t: z.float().numpy() for t, z in _logits(family, model, batch).items()}
    # Temperatures are fitted on the training cases (4 validation cases cannot identify one; they
    # only set the gate's feature threshold). When the fit cannot identify T (typical after four steps: separated or hopeless
    # logits) it is set to FALLBACK_TEMPERATURE instead of 1.0, so tests exercise calibration.
    fits: dict[str, TemperatureFit] = {}
    for task, z in logits.items():
        y = labels[task].numpy()
        keep = y >= 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = temperature_fit(z[keep], y[keep], bounds=(0.05, 20.0))
        if fit.note or not math.isfinite(fit.temperature):
            fit = dataclasses.replace(fit, temperature=FALLBACK_TEMPERATURE,
                                      note=f"{fit.note} tests.checkpoints: set to {FALLBACK_TEMPERATURE}",
                                      fitted_on="training (tiny test checkpoint)")
        else:
            fit = dataclasses.replace(fit, fitted_on="training (tiny test checkpoint)")
        fits[task] = fit
    metrics = {"note": "tiny test checkpoint: trained a few steps on a synthetic cohort; metrics not meaningful",
               "train_steps": TRAIN_STEPS}
    assert fam.features is not None
    gate = gate_record([case_measurements(p.meta) for p in prepared],
                       fam.features(model, batch).numpy(), fam.features(model, val_batch).numpy())
    common: dict[str, Any] = {"train_cases": cases, "val_cases": val_cases, "metrics": metrics,
                              "protocol": "tests.checkpoints", "row": family, "gate": gate}
    if family == "mmdlm":
        temps = {t: float(f.temperature) for t, f in fits.items()}
        return export_model(out_file, model, family, hp, spec, **common,
                            extra={"temperatures": temps, "recipe": RECIPE_VERSION})
    return export_model(out_file, model, family, hp, spec, **common, calibration=fits["grade"],
                        extra={"recipe": RECIPE_VERSION})


def _stamp(families: Sequence[str], seed: int, clinical: bool = False) -> dict[str, Any]:
    return {"recipe": RECIPE_VERSION, "families": sorted(families), "seed": seed, "clinical": clinical}


def build_checkpoints(out_dir: Path, families: Sequence[str] = FAMILIES, *, seed: int = 0,
                      clinical: bool = False) -> Path:
    """Build (or reuse) the tiny checkpoints of ``families`` in ``out_dir/checkpoints``; returns that folder.

    Reused when ``out_dir`` already holds this recipe's set for these families
    and every file still validates (the registry lists them all).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    stamp_file = out_dir / _STAMP
    want = _stamp(families, seed, clinical)
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == want:
        reg = CheckpointRegistry(ckpt_dir)
        if not reg.invalid and sorted(c.family for c in reg.checkpoints) == sorted(families):
            return ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for old in ckpt_dir.glob("*.pt"):
        old.unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost; two cores are shared in CI
    try:
        cases = _cohort(out_dir / "cohort", seed)
        for family in families:
            _train_and_export(family, cases, ckpt_dir / f"{family}-tiny.pt", seed,
                              spec=spec_for(family, clinical=clinical))
    finally:
        torch.set_num_threads(threads)
    (ckpt_dir / "checkpoints.json").unlink(missing_ok=True)  # export's index; not a checkpoint
    stamp_file.write_text(json.dumps(want))
    return ckpt_dir


def tiny_checkpoints(where: pytest.TempPathFactory | Path | str, families: Sequence[str] = FAMILIES, *,
                     seed: int = 0, clinical: bool = False) -> Path:
    """A directory holding one tiny, valid checkpoint per family (``<family>-tiny.pt``), built once per process.

    ``where``: pytest's ``tmp_path_factory`` (a fresh temporary folder, shared
    by every caller in the session) or a directory (scripts; reused across
    runs). Returns the checkpoint folder, ready for ``CheckpointRegistry``.
    """
    fams = tuple(families)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise ValueError(f"no tiny recipe for {unknown}; known: {', '.join(FAMILIES)}")
    root = "tmp_path_factory" if isinstance(where, pytest.TempPathFactory) else str(Path(where).resolve())
    key = (tuple(sorted(fams)), f"{root}:{seed}:{'clinical' if clinical else 'brats'}")
    if key in _BUILT and _BUILT[key].is_dir():
        return _BUILT[key]
    out = where.mktemp("tiny-checkpoints") if isinstance(where, pytest.TempPathFactory) else Path(where)
    _BUILT[key] = build_checkpoints(out, fams, seed=seed, clinical=clinical)
    return _BUILT[key]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tiny-checkpoints")
    t0 = time.perf_counter()
    folder = tiny_checkpoints(target, tuple(sys.argv[2:]) or FAMILIES)
    print(f"{folder} ({time.perf_counter() - t0:.1f} s)")
    for path in sorted(folder.glob("*.pt")):
        print(f"  {path.name}  {path.stat().st_size / 1024:.0f} KiB")
