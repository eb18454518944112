"""Seed 002's protocol: MMDLM's three stages (slice ResNets, feature extraction, gated-attention MIL).

```python
from training.protocols import load_config, RunOptions
from training.protocols import mmdlm

cfg = load_config("mmdlm", profile="small")                # configs/mmdlm.toml + mmdlm.small.toml
summary = mmdlm.run(cfg, data_dir=Path("/tmp/cohort-small"), out_dir=Path("/tmp/run-mmdlm"),
                    options=RunOptions(device="cpu", num_threads=1))
mmdlm.evaluate(Path("/tmp/run-mmdlm"))                      # rebuild tables + figures from saved predictions
```

Per split (5-fold CV stratified on grade x IDH x 1p/19q by default, patient level, with a
validation part carved from each fold's training patients). The training patients are split once
more (``stage_parts``): stage 1 trains on one part, stage 3 on the other, so the MIL head is fitted
on features of cases no extractor saw (``stage3.cases = "disjoint"``; docs/mmdlm.md says why).

1. **Slice ResNets** (the public ``train_resnet.py``): one ResNet per sequence (T1CE, T2, FLAIR),
   each trained on single slices of the stage-1 part with a temporary 3-logit head (grade, IDH,
   1p/19q) and the case's labels, masked BCE (``models.mmdlm.MMDLMLoss``: missing labels and the
   1p/19q rule), with the public code's crop, flips and rotation (``[stage1.augment]``).
   ``stage1.slices = "tumour"`` trains on the bag slices that hold tumour (from the segmentation,
   when a case has one), as the public code trained on its tumour range; the *bags* stay the brain
   range (the spec), because serving has no segmentation. Selected on slice-level validation AUC
   of the tasks with enough validation cases (``selection_tasks``; else validation loss).
   The head is dropped: ``models/mmdlm`` has one multitask extractor per sequence, not one per
   task (docs/mmdlm.md says why).
2. **Feature extraction** (``extract_feature.py``): ``MMDLM.extract_features`` with the trained
   ResNets, once per case, for train, validation and test.
3. **MIL heads** (``train_attention.py``): gated attention, projections, concatenation fusion and
   the three heads (``MMDLM.forward_features``) trained on the stage-3 part's features with masked
   BCE plus the public code's explicit L2 penalty; selected on the mean validation AUC over the
   selection tasks, NEVER on the test fold (the public code did; docs/mmdlm.md).

Then the assembled network is evaluated end to end through ``FAMILY.predict`` (the node's path),
temperatures are fitted per task on validation and stored in the checkpoint's ``extra``
(``extra["temperatures"] = {task: T}``; the checkpoint's single ``temperature`` field stays None
because one number cannot calibrate three tasks), an operating threshold per task is chosen on the
calibrated validation probabilities (``training.operating.heldout_metrics``, stored as the
checkpoint's ``thresholds``), test metrics are measured at it with a 95 % bootstrap CI of the AUC,
and each fold's model is exported. ``report/mmdlm_auc_ci.md`` lists the AUCs with their CIs.

Reproducible: the same config, data, code and thread count give the same predictions (the resume
key includes a fingerprint of the data; ``run.json`` records the provenance).

1p/19q is reported two ways: on the cases its loss counts (known label and IDH-mutant under the
default rule, the cases the node reports 1p/19q for) and on every case with a 1p/19q label.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from models.mmdlm import FAMILY, MMDLM, MMDLMLoss, l2_penalty
from models.mmdlm.augment import SliceAugment, apply_affine, item_rng
from models.mmdlm.network import MMDLM_ROLES, MMDLM_TASKS
from models.preprocess import PreprocessError, apply_spec, is_clinical
from training.calibration import apply_temperature, temperature_fit
from training.cases import Case, labels_array
from training.data import Batch, CaseDataset, VolumeCache, make_loader, preprocess_fingerprint, to_device
from training.export import export_model, gate_stats
from training.loop import StepOutput, fit, make_optimizer, predict_loader, seed_everything
from training.metrics import pooled_auc_ci
from training.prepare import exclude_failed
from training.protocols import ConfigError, RunOptions, config_hash, with_preprocess
from training.protocols.crossmodal import (
    caption_with_departures,
    finite,
    make_plan,
    pick,
    read_cases,
    resolve_amp,
    splits_to_run,
    write_json,
)
from training.reports import (
    MultiTaskRow,
    RowResult,
    load_predictions,
    multitask_table,
    save_predictions,
    save_reliability_figure,
    save_roc_pr_figure,
    table1,
)
from training.operating import heldout_metrics
from training.splits import joint_strata, repeated_holdout

__all__ = ["NAME", "evaluate", "run", "tumour_slices"]

NAME = "mmdlm"
RESULT_NAME = "result.json"
TASKS: tuple[str, ...] = tuple(MMDLM_TASKS)
ROLES: tuple[str, ...] = tuple(MMDLM_ROLES)
#: report rows (predictions JSON names) -> (task, which 1p/19q evaluation)
ROW_NAMES: dict[str, str] = {"grade": "grade", "idh": "IDH", "1p19q": "1p/19q", "1p19q_all": "1p/19q (all labelled)"}


# --------------------------------------------------------------------------- labels and masks


def _loss(config: Mapping[str, Any], train: Sequence[Case]) -> MMDLMLoss:
    """The masked multitask BCE; ``loss.pos_weight = "balanced"`` weights positives n_neg/n_pos
    over the training part's counted cases (the public code used none)."""
    lc = config["loss"]
    weights = [float(w) for w in lc["task_weights"]]
    if len(weights) != len(TASKS):
        raise ConfigError(f"loss.task_weights needs {len(TASKS)} numbers ({', '.join(TASKS)}), got {weights}")
    base = MMDLMLoss(TASKS, task_weights=dict(zip(TASKS, weights)), one_p19q_rule=str(lc["one_p19q_rule"]))
    kind = str(lc["pos_weight"])
    if kind == "none":
        return base
    if kind != "balanced":
        raise ConfigError(f"loss.pos_weight must be 'none' or 'balanced', got {kind!r}")
    targets = _targets(train)
    keep = base.effective_masks(targets)
    pos: dict[str, float] = {}
    for t in TASKS:
        y = targets[t][keep[t]]
        n1, n0 = int((y == 1).sum()), int((y == 0).sum())
        if n1 and n0:
            pos[t] = n0 / n1
    return MMDLMLoss(TASKS, task_weights=dict(zip(TASKS, weights)), pos_weight=pos,
                     one_p19q_rule=str(lc["one_p19q_rule"]))


def _targets(cases: Sequence[Case]) -> dict[str, torch.Tensor]:
    return {t: torch.as_tensor(labels_array(cases, t)) for t in TASKS}


def _masked(loss: MMDLMLoss, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets with every sample the loss does not count set to -1, so validation AUCs (and the
    loop's) are computed on exactly the samples the loss trains on."""
    keep = loss.effective_masks(targets)
    return {t: torch.where(keep[t], targets[t].long(), torch.full_like(targets[t].long(), -1)) for t in TASKS}


def selection_tasks(loss: MMDLMLoss, val: Sequence[Case], minimum: int) -> tuple[list[str], dict[str, list[int]]]:
    """The tasks whose validation AUC may choose an epoch, and the (negative, positive) case counts.

    Why: an AUC on a validation part with one or two cases of a class is mostly noise, and the best
    epoch of a noisy score is the luckiest one (winner's curse), so selection on it picks noise. A
    task counts only when the validation part holds at least ``minimum`` cases of each class among
    the cases its loss counts (1p/19q: IDH-mutant ones under the default rule); the others are left
    out of the selection score (and said so in the results). Counted per case, also for stage 1's
    slice-level AUC, because slices of one case are not independent.
    """
    targets = _masked(loss, _targets(val))
    counts = {t: [int((targets[t] == 0).sum()), int((targets[t] == 1).sum())] for t in TASKS}
    return [t for t in TASKS if min(counts[t]) >= minimum], counts


def stage_parts(config: Mapping[str, Any], train: Sequence[Case], seed: int) -> tuple[list[Case], list[Case]]:
    """(stage-1 cases, stage-3 cases) of one split's training patients.

    ``stage3.cases = "disjoint"`` (default): a stratified ``stage3.fraction`` of the training
    patients is kept out of stage 1, and stage 3 trains on their features only. Why: stage 1 fits
    its training slices almost perfectly (training slice AUC 1.0 within a few epochs), so features
    of those cases separate the classes far better than features of any new case will; a MIL head
    fitted on them learns to trust a signal that is absent at validation, test and serving time.
    Features of cases no extractor saw are distributed like the ones it will meet. Why not
    cross-fitting (K extractors, each case's features from the one that did not see it): the K
    extractors have unrelated feature spaces, so one head cannot be trained on their mixture and
    then served with one network; and it costs K stage-1 trainings. ``"same"``: the public code's
    way (stage 3 on the cases stage 1 trained on).
    """
    s3 = config["stage3"]
    mode = str(s3["cases"])
    if mode == "same":
        return list(train), list(train)
    if mode != "disjoint":
        raise ConfigError(f"stage3.cases must be 'disjoint' or 'same', got {mode!r}")
    fraction = float(s3["fraction"])
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"stage3.fraction must be in (0, 1), got {fraction}")
    if len({c.patient_id for c in train}) < 2:
        raise ConfigError("stage3.cases = 'disjoint' needs at least two training patients")
    strata = _strata(config, train)
    plan = repeated_holdout([c.case_id for c in train], strata, [c.patient_id for c in train],
                            test_fraction=fraction, repeats=1, val_fraction=0.0, seed=int(seed))
    part = next(iter(plan))
    return pick(train, part.train), pick(train, part.test)


def _strata(config: Mapping[str, Any], cases: Sequence[Case]) -> list[Any]:
    kind = str(config["split"]["strata"])
    if kind == "joint":
        return joint_strata(*[[c.labels.get(t) for c in cases] for t in TASKS])
    if kind == "grade":
        return [c.labels.get("grade") for c in cases]
    raise ConfigError(f"split.strata must be 'joint' or 'grade', got {kind!r}")


# --------------------------------------------------------------------------- stage 1: slices


def tumour_slices(case: Case, spec: Mapping[str, Any]) -> np.ndarray | None:
    """(S,) bool: which bag positions of ``case`` hold tumour, or None when it has no segmentation.

    Why this way: the bag's slices come out of ``apply_spec`` (resample, crop about the brain,
    brain-range selection); running the same spec with the segmentation in the T1CE slot puts the
    labels through exactly the same geometry (the brain mask still comes from T2/FLAIR, as the
    segmentation lies inside the brain), and a slice without tumour stays all-zero through the
    per-slice z-score. Training-time only: serving never needs it.
    """
    if case.seg is None:
        return None
    volumes: dict[str, Any] = {r: case.images[r] for r in ROLES if r != "T1CE"}
    volumes["T1CE"] = case.seg
    if is_clinical(spec):
        # The clinical chain registers every role onto a reference and extracts the brain on a
        # T1-weighted role: both must be real images, never the label map riding in the T1CE slot.
        # T2 is the reference here (the brain extraction of a skull-stripped BraTS-style case is its
        # non-zero voxels); a label map keeps its non-zero voxels through N4's multiplicative field.
        spec = copy.deepcopy(dict(spec))
        for t in spec["transforms"]:
            if t["name"] == "coregister":
                t["reference"] = "T2"
            elif t["name"] == "brain_extract":
                t["role"] = "T2"
    try:
        pre = apply_spec(spec, volumes)
    except PreprocessError:
        return None
    seg = pre.arrays["T1CE"]
    assert pre.slice_mask is not None
    return (np.abs(seg).reshape(seg.shape[0], -1).max(axis=1) > 1e-6) & pre.slice_mask


class SliceDataset(Dataset):
    """Single slices of one role, each with its case's labels (stage 1's training items).

    ``positions[i]`` lists the bag positions used for case i. Items look like ``CaseDataset``'s
    (``{"x": (1, H, W), "labels": {task: int}, "case_id": str}``) so ``training.data``'s collate
    and loader serve them unchanged, plus ``"item"`` (its index). ``augment`` (training only): the
    public code's crop, flips and rotation, applied by :meth:`augment_batch` in the training step, with
    each item's draw a function of (``seed``, epoch, item, ``stream``). Why in the step and not in
    ``__getitem__``: loader workers hold copies of the dataset made when they start (persistent
    workers keep them), so an epoch set in the main process would not reach them and every epoch
    would repeat the first one's draws; in the main process the epoch is always the one ``fit`` set,
    whatever the worker count, and a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, cases: Sequence[Case], cache: VolumeCache, role: str,
                 positions: Sequence[np.ndarray], targets: Mapping[str, torch.Tensor], in_memory: bool,
                 augment: SliceAugment | None = None, seed: int = 0, stream: int = 0) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.role = role
        self.index: list[tuple[int, int]] = [(i, int(p)) for i, pos in enumerate(positions) for p in pos]
        self.targets = {t: v.tolist() for t, v in targets.items()}
        self.in_memory = in_memory
        self._mem: dict[int, np.ndarray] = {}
        self.augment = augment
        self.seed, self.stream, self.epoch = int(seed), int(stream), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def augment_batch(self, x: torch.Tensor, items: Sequence[int]) -> torch.Tensor:
        """``x`` (B, 1, H, W) of ``items`` augmented with this epoch's draws (unchanged without ``augment``)."""
        if self.augment is None:
            return x
        h, w = int(x.shape[-2]), int(x.shape[-1])
        thetas = np.stack([self.augment.sample(item_rng(self.seed, self.epoch, int(k), (self.stream,)), h, w)
                           for k in items])
        return apply_affine(x, torch.from_numpy(thetas).to(x.device))

    def __len__(self) -> int:
        return len(self.index)

    def _stack(self, i: int) -> np.ndarray:
        arr = self._mem.get(i)
        if arr is None:
            arr = self.cache.get(self.cases[i]).arrays[self.role]
            if self.in_memory:
                self._mem[i] = arr
        return arr

    def __getitem__(self, k: int) -> Batch:
        i, pos = self.index[k]
        x = torch.from_numpy(np.array(self._stack(i)[pos], dtype=np.float32, copy=True))[None]
        return {"x": x, "item": k, "labels": {t: int(self.targets[t][i]) for t in TASKS},
                "case_id": self.cases[i].case_id}


class SliceClassifier(nn.Module):
    """One sequence's ResNet (shared with the MMDLM, trained in place) plus a temporary linear
    head with one logit per task: the public code's per-sequence slice classifier, multitask."""

    def __init__(self, extractor: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = nn.Linear(feature_dim, len(TASKS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.head(self.extractor(x))
        return {t: z[:, i] for i, t in enumerate(TASKS)}


class FeatureDataset(Dataset):
    """Stage 3's items: a case's extracted features per role, its slice mask and labels."""

    def __init__(self, cases: Sequence[Case], features: Mapping[str, Mapping[str, torch.Tensor]],
                 masks: Mapping[str, torch.Tensor]) -> None:
        self.cases = list(cases)
        self.features = features
        self.masks = masks

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> Batch:
        c = self.cases[i]
        item: Batch = {f"feat_{r}": self.features[c.case_id][r] for r in ROLES}
        item["slice_mask"] = self.masks[c.case_id]
        item["labels"] = {t: (-1 if c.labels.get(t) is None else int(c.labels[t])) for t in TASKS}
        item["case_id"] = c.case_id
        return item


class FeatureHead(nn.Module):
    """Stage 3's trainable view of the MMDLM: ``forward_features`` on precomputed features.

    Holds the whole network (so ``fit``'s best-epoch weights are the MMDLM's own state dict); the
    extractors are frozen while it trains and never run.
    """

    def __init__(self, net: MMDLM) -> None:
        super().__init__()
        self.net = net

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.net.named_parameters() if not name.startswith("extractors.")]

    def forward(self, batch: Batch) -> Any:
        return self.net.forward_features({r: batch[f"feat_{r}"] for r in ROLES}, batch["slice_mask"])


# --------------------------------------------------------------------------- one split


class _Split:
    """Everything one fold/repeat trains on; see the module docstring for the stages."""

    def __init__(self, config: Mapping[str, Any], options: RunOptions, cache: VolumeCache, spec: Mapping[str, Any],
                 train: list[Case], val: list[Case], test: list[Case], seed: int, run_dir: Path, run_key: str,
                 tumour: Mapping[str, np.ndarray | None]) -> None:
        self.cfg, self.options, self.cache, self.spec = config, options, cache, spec
        self.train, self.val, self.test = train, val, test
        self.seed, self.dir, self.run_key, self.tumour = seed, run_dir, run_key, tumour
        self.device = torch.device(options.device)
        self.amp = resolve_amp(options, config["train"])
        self.loss = _loss(config, train)
        self.in_memory = bool(config["data"]["in_memory"])
        self.workers = int(config["data"]["num_workers"])
        # stage 1 trains the extractors on s1; stage 3 the MIL head on features of s3 (stage_parts)
        self.s1, self.s3 = stage_parts(config, train, seed)
        minimum = int(config["selection"]["min_per_class"])
        if minimum < 1:
            raise ConfigError(f"selection.min_per_class must be >= 1, got {minimum}")
        self.select_tasks, self.val_counts = selection_tasks(self.loss, val, minimum)
        try:
            self.augment = SliceAugment.from_config(config["stage1"]["augment"])
        except ValueError as exc:
            raise ConfigError(f"stage1.augment: {exc}") from exc

    def _select_on(self, configured: str) -> str:
        """``val_auc`` over the tasks with enough validation cases; validation loss when none has."""
        if configured == "val_auc" and not self.select_tasks:
            return "val_loss"
        return configured

    def _for_selection(self, m: nn.Module, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In validation, only the selection tasks feed the loop's AUC (its mean is the selection score)."""
        if m.training or not self.select_tasks:
            return dict(values)
        return {t: values[t] for t in self.select_tasks}

    def selection_record(self) -> dict[str, Any]:
        minimum = int(self.cfg["selection"]["min_per_class"])
        return {"min_per_class": minimum, "tasks": list(self.select_tasks),
                "skipped": {t: c for t, c in self.val_counts.items() if t not in self.select_tasks},
                "val_counts": {t: {"negative": c[0], "positive": c[1]} for t, c in self.val_counts.items()},
                "rule": ("mean validation AUC over the listed tasks" if self.select_tasks
                         else "validation loss (no task has enough validation cases of each class)")}

    # -- stage 1
    def _positions(self, cases: Sequence[Case]) -> tuple[list[np.ndarray], int]:
        mode = str(self.cfg["stage1"]["slices"])
        out: list[np.ndarray] = []
        fallback = 0
        for c in cases:
            real = np.flatnonzero(self.cache.get(c).slice_mask)
            if mode == "tumour":
                t = self.tumour.get(c.case_id)
                pos = np.flatnonzero(t) if t is not None else np.array([], dtype=np.int64)
                if pos.size == 0:
                    fallback += 1
                    pos = real
            elif mode == "bag":
                pos = real
            else:
                raise ConfigError(f"stage1.slices must be 'tumour' or 'bag', got {mode!r}")
            out.append(pos)
        return out, fallback

    def stage1(self, model: MMDLM) -> dict[str, Any]:
        s1 = self.cfg["stage1"]
        record: dict[str, Any] = {}
        for stream, role in enumerate(ROLES):
            pos_tr, fb_tr = self._positions(self.s1)
            pos_va, fb_va = self._positions(self.val)
            t_tr, t_va = _masked(self.loss, _targets(self.s1)), _masked(self.loss, _targets(self.val))
            ds_tr = SliceDataset(self.s1, self.cache, role, pos_tr, t_tr, self.in_memory, augment=self.augment,
                                 seed=self.seed, stream=stream)
            ds_va = SliceDataset(self.val, self.cache, role, pos_va, t_va, self.in_memory)
            tl = make_loader(ds_tr, batch_size=int(s1["batch_size"]), shuffle=True, seed=self.seed,  # type: ignore[arg-type]
                             num_workers=self.workers, device=self.device, world_size=self.options.dist.world_size,
                             rank=self.options.dist.rank)
            vl = make_loader(ds_va, batch_size=int(s1["eval_batch_size"]), shuffle=False,  # type: ignore[arg-type]
                             num_workers=self.workers, device=self.device)
            clf = SliceClassifier(model.extractors[role], model.feature_dim)
            loss, pick_tasks = self.loss, self._for_selection

            def step(m: nn.Module, batch: Batch, ds: SliceDataset = ds_tr) -> StepOutput:
                x = ds.augment_batch(batch["x"], batch["item"]) if m.training else batch["x"]
                logits = m(x)
                total, _ = loss(logits, batch["labels"])
                return StepOutput(total, logits=pick_tasks(m, logits), targets=pick_tasks(m, batch["labels"]))

            opt = make_optimizer(clf.parameters(), str(s1["optimizer"]), float(s1["lr"]), float(s1["weight_decay"]))
            res = fit(clf, step, tl, vl, epochs=int(s1["epochs"]), optimizer=opt, device=self.device,
                      amp_dtype=self.amp, log_dir=self.dir / f"stage1-{role}", resume=self.options.resume,
                      select_on=self._select_on(str(s1["select_on"])), patience=int(s1["patience"]) or None,
                      run_key=f"{self.run_key}:stage1-{role}", dist=self.options.dist,
                      progress=self.options.progress, desc=f"mmdlm {self.dir.name} stage 1 {role}")
            last = res.history[-1] if res.history else {}
            record[role] = {"best_epoch": res.best_epoch, "best_val_slice_auc": finite(res.best_score)
                            if self._select_on(str(s1["select_on"])) == "val_auc" else None,
                            "last_train_slice_auc": finite(float(last.get("train_auc", math.nan))),
                            "train_cases": len(self.s1), "train_slices": len(ds_tr), "val_slices": len(ds_va),
                            "cases_without_tumour_slices": fb_tr + fb_va}
        return record

    # -- stage 2
    def extract(self, model: MMDLM) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        model.eval().to(self.device)
        feats: dict[str, dict[str, torch.Tensor]] = {}
        masks: dict[str, torch.Tensor] = {}
        cases = [*self.train, *self.val, *self.test]
        ds = CaseDataset(cases, self.cache, tasks=TASKS, in_memory=False)
        loader = make_loader(ds, batch_size=4, shuffle=False, num_workers=self.workers, device=self.device)
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, self.device)
                out = model.extract_features({r: batch[r] for r in ROLES}, batch["slice_mask"])
                for b, cid in enumerate(batch["case_id"]):
                    feats[cid] = {r: out[r][b].float().cpu() for r in ROLES}
                    masks[cid] = batch["slice_mask"][b].cpu()
        return feats, masks

    # -- stage 3
    def stage3(self, model: MMDLM, feats: Mapping[str, Mapping[str, torch.Tensor]],
               masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        s3 = self.cfg["stage3"]
        head = FeatureHead(model)
        model.extractors.requires_grad_(False)
        params = head.head_parameters()
        tl = make_loader(FeatureDataset(self.s3, feats, masks), batch_size=int(s3["batch_size"]),  # type: ignore[arg-type]
                         shuffle=True, seed=self.seed, device=self.device,
                         world_size=self.options.dist.world_size, rank=self.options.dist.rank)
        vl = make_loader(FeatureDataset(self.val, feats, masks), batch_size=max(1, int(s3["batch_size"])),  # type: ignore[arg-type]
                         shuffle=False, device=self.device)
        loss, l2, pick_tasks = self.loss, float(s3["l2"]), self._for_selection

        def step(m: nn.Module, batch: Batch) -> StepOutput:
            out = m(batch)
            total, parts = loss(out.logits, batch["labels"])
            if l2 > 0:
                total = total + l2_penalty(params, l2)
            return StepOutput(total, logits=pick_tasks(m, out.logits),
                              targets=pick_tasks(m, _masked(loss, batch["labels"])),
                              scalars={f"bce_{t}": v.detach() for t, v in parts.items()})

        opt = make_optimizer(params, str(s3["optimizer"]), float(s3["lr"]), float(s3["weight_decay"]))
        res = fit(head, step, tl, vl, epochs=int(s3["epochs"]), optimizer=opt, device=self.device,
                  amp_dtype=self.amp, log_dir=self.dir / "stage3-mil", resume=self.options.resume,
                  select_on=self._select_on(str(s3["select_on"])), patience=int(s3["patience"]) or None,
                  run_key=f"{self.run_key}:stage3", dist=self.options.dist, progress=self.options.progress,
                  desc=f"mmdlm {self.dir.name} stage 3 MIL")
        model.extractors.requires_grad_(True)
        best = res.history[res.best_epoch - 1] if res.history and res.best_epoch >= 1 else {}
        return {"best_epoch": res.best_epoch, "best_val_score": finite(res.best_score),
                "select_on": self._select_on(str(s3["select_on"])), "train_cases": len(self.s3),
                "best_val_auc": {t: finite(float(best.get(f"val_auc_{t}", math.nan))) for t in TASKS}}

    # -- evaluation through the serving path
    def predict(self, model: MMDLM, cases: Sequence[Case]) -> Any:
        ds = CaseDataset(cases, self.cache, tasks=TASKS, in_memory=False)
        loader = make_loader(ds, batch_size=4, shuffle=False, num_workers=self.workers, device=self.device)
        return predict_loader(model, loader, FAMILY, device=self.device, amp_dtype=self.amp)


def _rule_mask(loss: MMDLMLoss, labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = loss.effective_masks({t: torch.as_tensor(labels[t]) for t in TASKS})
    return {t: keep[t].numpy() for t in TASKS}


def _run_split(config: Mapping[str, Any], options: RunOptions, cache: VolumeCache, spec: Mapping[str, Any],
               cases: Sequence[Case], split: Any, out_dir: Path, run_key: str,
               tumour: Mapping[str, np.ndarray | None]) -> dict[str, Any]:
    r = int(split.index)
    split_dir = out_dir / f"fold{r}"
    result_path = split_dir / RESULT_NAME
    if options.resume and result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("run_key") == run_key:
            return done
    seed = int(config["protocol"]["seed"]) + r
    seed_everything(seed)
    train, val, test = pick(cases, split.train), pick(cases, split.val), pick(cases, split.test)
    if not val:
        raise ConfigError("mmdlm: selection on validation needs split.val_fraction > 0; the test part is never "
                          "used for selection")
    work = _Split(config, options, cache, spec, train, val, test, seed, split_dir, run_key, tumour)
    hparams = dict(config["model"])
    model: MMDLM = FAMILY.build(hparams)  # type: ignore[assignment]
    t0 = time.perf_counter()
    s1 = work.stage1(model)
    t1 = time.perf_counter()
    feats, masks = work.extract(model)
    t2 = time.perf_counter()
    s3 = work.stage3(model, feats, masks)
    t3 = time.perf_counter()

    val_pred, test_pred = work.predict(model, val), work.predict(model, test)
    val_keep = _rule_mask(work.loss, val_pred.labels)
    test_keep = _rule_mask(work.loss, test_pred.labels)
    temperatures: dict[str, float] = {}
    calibration: dict[str, Any] = {}
    val_metrics: dict[str, Any] = {}
    test_metrics: dict[str, Any] = {}
    thresholds: dict[str, float] = {}
    test_out: dict[str, Any] = {"case_ids": list(test_pred.case_ids)}
    n_boot = int(config["protocol"]["n_boot"])
    val_cal: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t in TASKS:
        keep = val_keep[t]
        z, y = val_pred.logits[t][keep], val_pred.labels[t][keep]
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            fit_t = temperature_fit(z, y) if len(y) else None
        temperatures[t] = float(fit_t.temperature) if fit_t is not None else 1.0
        calibration[t] = fit_t.to_dict() if fit_t is not None else {"note": "no validation case counts for this task"}
        # the node thresholds the CALIBRATED P(positive): the operating threshold (Youden's J) is chosen
        # on those validation probabilities, and every test metric is measured at it (training.operating)
        p_val = apply_temperature(z, temperatures[t])[:, 1] if len(y) else np.zeros(0)
        val_cal[t] = (y, p_val)
        p_all = apply_temperature(test_pred.logits[t], temperatures[t])[:, 1]
        y_all = test_pred.labels[t]
        test_out[t] = {"y": y_all.tolist(), "p": p_all.tolist(), "counted": test_keep[t].tolist()}
        kt = test_keep[t]
        val_metrics[t], test_metrics[t], thr = heldout_metrics(y, p_val, y_all[kt], p_all[kt], n_boot=n_boot,
                                                               seed=seed)
        if len(np.unique(y)) == 2:  # validation could choose; else the node labels at 0.5
            thresholds[t] = float(thr)
    known = test_pred.labels["1p19q"] >= 0
    # every labelled 1p/19q test case, at the threshold chosen for 1p/19q (on the cases its loss counts)
    _, test_metrics["1p19q_all"], _ = heldout_metrics(*val_cal["1p19q"], test_pred.labels["1p19q"][known],
                                                      np.asarray(test_out["1p19q"]["p"])[known], n_boot=n_boot,
                                                      seed=seed)
    val_aucs = [val_metrics[t].get("auc") for t in work.select_tasks or TASKS]
    val_aucs = [a for a in val_aucs if a is not None and math.isfinite(a)]
    val_score = float(np.mean(val_aucs)) if val_aucs else None
    ckpt = out_dir / "checkpoints" / f"{NAME}-r{r}.pt"
    sha = None
    if options.dist.is_main:
        sha = export_model(
            ckpt, model, NAME, hparams, spec, train_cases=train, val_cases=val, split=split.to_dict(), config=config,
            metrics={"val": val_metrics, "test": test_metrics, "calibration": calibration,
                     "stage1": s1, "stage3": s3, "selection": work.selection_record()},
            calibration=None, protocol=NAME, row="multitask", repeat=r, index=out_dir / "checkpoints.json",
            val_score=val_score, thresholds=thresholds or None,
            extra={"temperatures": temperatures, "one_p19q_rule": str(config["loss"]["one_p19q_rule"]),
                   "temperature_note": "per task, fitted on validation logits; apply p = sigmoid(logit / T[task]); "
                                       "the single 'temperature' field is None because one number cannot "
                                       "calibrate three tasks"},
            description=str(config["protocol"].get("data_description", "")) or None,
            gate=gate_stats(model, FAMILY, train, val, cache, device=work.device),
        )
    result = {
        "run_key": run_key, "fold": r, "threads": torch.get_num_threads(), "stage1": s1, "stage3": s3,
        "thresholds": thresholds,
        "selection": work.selection_record(),
        "parts": {"stage1_ids": [c.case_id for c in work.s1], "stage3_ids": [c.case_id for c in work.s3],
                  "val_ids": [c.case_id for c in val], "test_ids": [c.case_id for c in test]},
        "seconds": {"stage1": round(t1 - t0, 1), "stage2": round(t2 - t1, 1), "stage3": round(t3 - t2, 1)},
        "temperatures": temperatures, "calibration": calibration, "val": val_metrics, "test": test_metrics,
        "test_pred": test_out, "checkpoint": str(ckpt) if sha else None, "sha256": sha,
        "n": {"train": len(train), "stage1": len(work.s1), "stage3": len(work.s3), "val": len(val),
              "test": len(test)},
    }
    write_json(result_path, result)
    return result


# --------------------------------------------------------------------------- reports


def _task_rows(config: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> list[RowResult]:
    """One binary row per task (missing / not-counted cases dropped per fold) for tables and figures."""
    name = str(config["protocol"]["row_name"]) if config else "MMDLM"
    data = str(config["protocol"]["row_data"]) if config else "T1CE+T2+FLAIR"
    rows: list[RowResult] = []
    for key, title in ROW_NAMES.items():
        task = "1p19q" if key == "1p19q_all" else key
        reps: list[tuple[np.ndarray, np.ndarray]] = []
        ids: list[tuple[str, ...]] = []
        for res in results:
            tp = res["test_pred"]
            y = np.asarray(tp[task]["y"])
            p = np.asarray(tp[task]["p"], dtype=np.float64)
            keep = (y >= 0) if key == "1p19q_all" else np.asarray(tp[task]["counted"], dtype=bool)
            if keep.any():
                reps.append((y[keep], p[keep]))
                ids.append(tuple(np.asarray(tp["case_ids"])[keep].tolist()))
        if reps:
            rows.append(RowResult(f"{name} {title}", data, tuple(reps), case_ids=tuple(ids)))
    return rows


def _write_report(rows: Sequence[RowResult], out_dir: Path, caption_extra: Sequence[str],
                  main_1p19q: str) -> dict[str, str]:
    """The multi-task AUC table (grade, IDH, 1p/19q), a full-metric table per task, ROC/PR figures
    per task, a reliability figure and the raw predictions."""
    rep = out_dir / "report"
    by_key: dict[str, RowResult] = {}
    for row in rows:
        for key, title in ROW_NAMES.items():
            if row.name.endswith(f" {title}") and not (key == "1p19q" and row.name.endswith("(all labelled)")):
                by_key.setdefault(key, row)
    model_name = rows[0].name.rsplit(" ", 1)[0] if rows else "MMDLM"
    for title in ROW_NAMES.values():
        if rows and rows[0].name.endswith(f" {title}"):
            model_name = rows[0].name[: -len(title) - 1]
            break
    data = rows[0].data if rows else ""
    main_key = "1p19q" if main_1p19q == "rule" else "1p19q_all"
    other_key = "1p19q_all" if main_key == "1p19q" else "1p19q"
    mt_rows = [MultiTaskRow(model_name, data, {t: by_key[k].repeats for t, k in
                                               (("grade", "grade"), ("idh", "idh"), ("1p19q", main_key))
                                               if k in by_key})]
    if other_key in by_key:
        mt_rows.append(MultiTaskRow(f"{model_name}, 1p/19q {'on all labelled cases' if other_key == '1p19q_all' else 'on the cases its loss counts'}",
                                    data, {"1p19q": by_key[other_key].repeats}))
    base = multitask_table(mt_rows).caption
    rule_note = ("1p/19q in the first row: cases whose 1p/19q loss counts (label known; IDH-mutant under the "
                 "default loss.one_p19q_rule); "
                 "second row: every case with a 1p/19q label." if main_key == "1p19q" else
                 "1p/19q in the first row: every case with a 1p/19q label; second row: the cases its loss counts.")
    caption = caption_with_departures(f"{base} {rule_note}", caption_extra)
    md, csv_path = multitask_table(mt_rows, caption=caption).write(rep, "mmdlm")
    md_t, csv_t = table1(rows, caption=caption_with_departures(table1(rows).caption, caption_extra)).write(
        rep, "mmdlm_tasks")
    files = {"markdown": str(md), "csv": str(csv_path), "tasks_markdown": str(md_t), "tasks_csv": str(csv_t)}
    for key, row in by_key.items():
        files[f"roc_pr_{key}"] = str(save_roc_pr_figure([row], rep / f"mmdlm_{key}_roc_pr.png",
                                                        title=f"MMDLM (seed 002): {ROW_NAMES[key]}, test folds"))
    files["reliability"] = str(save_reliability_figure(rows, rep / "mmdlm_reliability.png"))
    files["predictions"] = str(save_predictions(rows, rep / "mmdlm_predictions.json"))
    return files


def _fmt_ci(m: Mapping[str, Any]) -> str:
    auc, ci = m.get("auc"), m.get("auc_ci") or [None, None]
    if auc is None or not math.isfinite(float(auc)):
        return "n/a"
    lo, hi = ci
    inner = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{float(auc):.3f}{inner}"


def auc_ci_table(results: Sequence[Mapping[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per fold and task: test AUC with its 95 % bootstrap CI (``training.operating.heldout_metrics``)
    and the case counts; then the mean over folds with the pooled 95 % CI (``pooled_auc_ci``: the
    same stratified bootstrap over each fold's test cases). Also which tasks chose the epoch.

    Why beside the mean ± std table: with 3-10 cases of a class per test fold a per-fold AUC can
    swing by 0.2 on one case; the interval says how much a number can be read.
    """
    keys = ("grade", "idh", "1p19q", "1p19q_all")
    titles = {"grade": "Grade", "idh": "IDH", "1p19q": "1p/19q (IDH-mutant)", "1p19q_all": "1p/19q (all labelled)"}
    lines = ["| Fold | " + " | ".join(f"{titles[k]} AUC [95 % CI] (neg/pos)" for k in keys) + " | Selected on |",
             "|---|" + "---:|" * len(keys) + "---|"]
    numbers: dict[str, Any] = {"folds": [], "pooled": {}}
    for res in results:
        cells, fold_nums = [], {}
        for k in keys:
            m = res.get("test", {}).get(k) or {}
            n_pos = int(m.get("n_positive", 0) or 0)
            n_neg = int(m.get("n_negative", 0) or 0)
            cells.append(f"{_fmt_ci(m)} ({n_neg}/{n_pos})")
            fold_nums[k] = {"auc": m.get("auc"), "auc_ci": m.get("auc_ci"), "n_negative": n_neg, "n_positive": n_pos}
        sel = res.get("selection") or {}
        chosen = ", ".join(sel.get("tasks", [])) or "validation loss"
        lines.append(f"| {res['fold']} | " + " | ".join(cells) + f" | {chosen} |")
        numbers["folds"].append({"fold": res["fold"], **fold_nums, "selected_on": sel.get("tasks", [])})
    pooled_cells = []
    for k in keys:
        task = "1p19q" if k == "1p19q_all" else k
        reps, ids = [], []
        for res in results:
            tp = res["test_pred"]
            y = np.asarray(tp[task]["y"])
            keep = (y >= 0) if k == "1p19q_all" else np.asarray(tp[task]["counted"], dtype=bool)
            if keep.any():
                reps.append((tuple(np.asarray(tp["case_ids"])[keep].tolist()), y[keep],
                             np.asarray(tp[task]["p"], dtype=np.float64)[keep]))
                ids.append(int(res["fold"]))
        if not reps:
            pooled_cells.append("n/a")
            numbers["pooled"][k] = None
            continue
        pooled = pooled_auc_ci(reps, repeat_ids=ids, n_boot=n_boot, seed=seed)
        est = pooled.estimate
        left_out = "" if len(pooled.repeats) == len(ids) else \
            f" (folds {', '.join(str(f) for f in pooled.repeats)})"
        pooled_cells.append("n/a" if not math.isfinite(est) else
                            f"{est:.3f} [{pooled.low:.2f}, {pooled.high:.2f}]{left_out}")
        numbers["pooled"][k] = {"auc": finite(est), "low": finite(pooled.low), "high": finite(pooled.high),
                                "folds": list(pooled.repeats), "notes": list(pooled.notes)}
    lines.append("| mean over folds [pooled 95 % CI] | " + " | ".join(pooled_cells) + " | |")
    caption = ("Test AUC per fold at the model chosen on validation, with the 95 % stratified bootstrap CI over "
               f"that fold's test cases ({n_boot} resamples); (neg/pos) = test cases of each class. Last row: mean of "
               "the per-fold AUCs with a 95 % CI from resampling every fold's test cases together; a fold with fewer "
               "than two test cases of a class cannot be resampled and is left out (the folds used are then "
               "named). 1p/19q first on IDH-mutant cases (the cases its loss counts), then on every labelled case. "
               "'Selected on': the tasks whose validation AUC chose the epoch (>= selection.min_per_class "
               "validation cases of each class).")
    return {"markdown": "\n".join(lines) + "\n\n" + caption + "\n", "numbers": numbers}


# --------------------------------------------------------------------------- entry points


def _tumour_map(cases: Sequence[Case], spec: Mapping[str, Any], cache: VolumeCache, mode: str,
                progress: bool) -> dict[str, np.ndarray | None]:
    """Bag positions holding tumour per case (stage 1's "tumour" slices), computed once per spec
    and kept next to the cache (keyed by case id and segmentation path)."""
    if mode != "tumour":
        return {}
    store = cache.dir / "tumour_slices.json"
    known: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    out: dict[str, np.ndarray | None] = {}
    from tqdm import tqdm

    changed = False
    for c in tqdm(cases, desc="tumour slices", disable=None if progress else True, leave=False):
        # the segmentation file's identity (size, mtime), not only its path: a cohort regenerated in
        # place must not reuse the tumour slices of the previous one
        key = f"{c.case_id}|{_file_stamp(c.seg)}"
        if key not in known:
            t = tumour_slices(c, spec)
            known[key] = None if t is None else t.astype(int).tolist()
            changed = True
        v = known[key]
        out[c.case_id] = None if v is None else np.asarray(v, dtype=bool)
    if changed:
        write_json(store, known)
    return out


def _file_stamp(path: Path | None) -> str:
    """Path, size and modification time of a file ("-" for none): its identity for caches and keys."""
    if path is None:
        return "-"
    try:
        st = Path(path).stat()
    except OSError:
        return f"{path}:missing"
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def data_fingerprint(cases: Sequence[Case]) -> str:
    """16 hex digits over the cases a run trains on: ids, patients, labels and the identity of every
    input file (path, size, mtime).

    Why in the resume key: a rerun into an existing run folder returns the finished folds as they
    are; after the cohort was regenerated (new labels, new images) it would mix folds of two
    cohorts and look like a non-reproducible run. With the data in the key it refuses instead.
    """
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.case_id):
        labels = ",".join(f"{t}={c.labels.get(t)}" for t in TASKS)
        files = "|".join(_file_stamp(c.images.get(r)) for r in ROLES)
        h.update(f"{c.case_id}|{c.patient_id}|{labels}|{files}|{_file_stamp(c.seg)}\n".encode())
    return h.hexdigest()[:16]


#: the code whose change can change a run's numbers (besides models/preprocess, fingerprinted by training.data)
_CODE_FILES: tuple[str, ...] = (
    "training/protocols/mmdlm.py", "models/mmdlm/network.py", "models/mmdlm/loss.py", "models/mmdlm/family.py",
    "models/mmdlm/augment.py", "models/resnet2d.py", "training/loop.py", "training/data.py", "training/splits.py",
    "training/calibration.py", "training/operating.py",
)


def provenance(cases: Sequence[Case], options: RunOptions) -> dict[str, Any]:
    """What decides a run's numbers besides its config: data, code, library versions, threads.

    Why: "the same command gave different numbers" is only a finding when these are equal; a
    reader compares two runs' ``provenance`` first. CPU results depend on the thread count (float
    sums in another order): 1 and 2 threads differ in the 4th decimal after a few epochs, and
    selection can then pick another epoch.
    """
    root = Path(__file__).resolve().parents[2]
    code = hashlib.sha256()
    for rel in _CODE_FILES:
        f = root / rel
        code.update(rel.encode() + b"\0" + (f.read_bytes() if f.exists() else b"-"))
    return {"data": data_fingerprint(cases), "training_code": code.hexdigest()[:16],
            "preprocess_code": preprocess_fingerprint(), "torch": torch.__version__, "numpy": np.__version__,
            "threads": torch.get_num_threads(), "device": str(options.device),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def prepare_specs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The one (slice) spec this protocol trains with, by name: what ``python -m training prepare
    mmdlm`` prepares and ``run`` reads back."""
    try:
        return {NAME: with_preprocess(FAMILY.spec_for(dict(config["model"])), config)}  # type: ignore[misc]
    except ValueError as exc:
        raise ConfigError(f"mmdlm: model hyper-parameters do not give a spec: {exc}") from exc


def run(config: Mapping[str, Any], *, data_dir: Path, out_dir: Path, options: RunOptions) -> dict[str, Any]:
    """Train and evaluate MMDLM's three stages on every fold; returns a JSON-able summary.

    Writes into ``out_dir``: ``run.json`` (protocol, resolved config, its hash), ``splits.json``, ``fold<r>/`` (per-stage logs and
    ``last.pt``, ``result.json``), ``checkpoints/mmdlm-r<r>.pt`` (+ ``checkpoints.json``),
    ``report/mmdlm.{md,csv}`` (grade, IDH, 1p/19q AUC), ``mmdlm_tasks.{md,csv}`` (all metrics),
    ``mmdlm_<task>_roc_pr.png``, ``mmdlm_reliability.png``, ``mmdlm_predictions.json``, ``summary.json``.
    """
    t0 = time.perf_counter()
    if options.num_threads:
        torch.set_num_threads(int(options.num_threads))
    if options.rows:
        unknown = [r for r in options.rows if r != "multitask"]
        if unknown:
            raise ConfigError(f"mmdlm has one row ('multitask'); got {list(options.rows)}")
    config = copy.deepcopy(dict(config))
    eval_mode = str(config["protocol"]["one_p19q_eval"])
    if eval_mode not in ("rule", "labelled"):
        raise ConfigError(f"protocol.one_p19q_eval must be 'rule' or 'labelled', got {eval_mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = config_hash(config)
    # run.json: what the CLI's `evaluate` and `export` read to find the protocol of a run folder
    write_json(out_dir / "run.json", {"protocol": NAME, "config": config, "config_hash": run_key,
                                      "data_dir": str(data_dir)})
    spec = prepare_specs(config)[NAME]
    cases = read_cases(Path(data_dir), ROLES, verify=str(config["data"]["verify"]), require=None)
    cases = [c for c in cases if any(c.labels.get(t) is not None for t in TASKS)]
    # prepared once per case and spec (reused from `python -m training prepare`); failures excluded, listed
    cases, _ = exclude_failed(cases, {NAME: spec}, Path(config["data"]["cache_dir"] or out_dir / "cache"),
                              record=out_dir / "prepare.json", progress=options.progress)
    prov = provenance(cases, options)
    run_key = config_hash({"config": run_key, "data": prov["data"]})
    write_json(out_dir / "run.json", {"protocol": NAME, "config": config, "config_hash": config_hash(config),
                                      "run_key": run_key, "data_dir": str(data_dir), "provenance": prov})
    plan = make_plan(cases, _strata(config, cases), config["split"], options.repeats)
    plan.save(out_dir / "splits.json")
    cache = VolumeCache(spec, Path(config["data"]["cache_dir"] or out_dir / "cache"))
    cache.warm(cases, progress=options.progress)
    tumour = _tumour_map(cases, spec, cache, str(config["stage1"]["slices"]), options.progress)
    results = [_run_split(config, options, cache, spec, cases, split, out_dir, run_key, tumour)
               for split in splits_to_run(plan, options.repeats)]
    rows = _task_rows(config, results)
    departures = list(config["protocol"]["departures"])
    files = _write_report(rows, out_dir, departures, eval_mode)
    ci = auc_ci_table(results, n_boot=int(config["protocol"]["n_boot"]), seed=int(config["protocol"]["seed"]))
    ci_path = out_dir / "report" / "mmdlm_auc_ci.md"
    ci_path.write_text(ci["markdown"], encoding="utf-8")
    files["auc_ci_markdown"] = str(ci_path)
    summary = {
        "protocol": NAME,
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "n_cases": len(cases),
        "splits": {"scheme": plan.scheme, "run": len(results), "notes": list(plan.notes)},
        "temperatures": [res["temperatures"] for res in results],
        "checkpoints": [res["checkpoint"] for res in results],
        "stage_seconds": [res["seconds"] for res in results],
        "report": files,
        "departures": departures,
        "one_p19q_eval": eval_mode,
        "table_markdown": Path(files["markdown"]).read_text(encoding="utf-8"),
        "tasks_markdown": Path(files["tasks_markdown"]).read_text(encoding="utf-8"),
        "auc_ci": ci["numbers"],
        "auc_ci_markdown": ci["markdown"],
        "selection": [res.get("selection") for res in results],
        "provenance": prov,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def evaluate(run_dir: Path) -> dict[str, Any]:
    """Rebuild the tables and figures of a finished run from its saved predictions (no training)."""
    run_dir = Path(run_dir)
    pred_path = run_dir / "report" / "mmdlm_predictions.json"
    if not pred_path.exists():
        raise FileNotFoundError(f"{pred_path}: no saved predictions (has this run finished?)")
    rows = load_predictions(pred_path)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    files = _write_report(rows, run_dir, summary.get("departures", []), summary.get("one_p19q_eval", "rule"))
    results = [json.loads(f.read_text()) for f in sorted(run_dir.glob("fold*/" + RESULT_NAME),
                                                         key=lambda f: int(f.parent.name[4:]))]
    out = {"protocol": NAME, "report": files, "table_markdown": Path(files["markdown"]).read_text(encoding="utf-8")}
    if results and all("test_pred" in r for r in results):
        run_json = run_dir / "run.json"
        cfg = json.loads(run_json.read_text()).get("config", {}) if run_json.exists() else {}
        proto = cfg.get("protocol", {})
        ci = auc_ci_table(results, n_boot=int(proto.get("n_boot", 2000)), seed=int(proto.get("seed", 0)))
        ci_path = run_dir / "report" / "mmdlm_auc_ci.md"
        ci_path.write_text(ci["markdown"], encoding="utf-8")
        files["auc_ci_markdown"] = str(ci_path)
        out["auc_ci_markdown"] = ci["markdown"]
    return out
