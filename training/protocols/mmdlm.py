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
validation part carved from each fold's training patients):

1. **Slice ResNets** (the public ``train_resnet.py``): one ResNet per sequence (T1CE, T2, FLAIR),
   each trained on single slices with a temporary 3-logit head (grade, IDH, 1p/19q) and the
   case's labels, masked BCE (``models.mmdlm.MMDLMLoss``: missing labels and the 1p/19q rule).
   ``stage1.slices = "tumour"`` trains on the bag slices that hold tumour (from the segmentation,
   when a case has one), as the public code trained on its tumour range; the *bags* stay the brain
   range (the spec), because serving has no segmentation. Selected on slice-level validation AUC.
   The head is dropped: ``models/mmdlm`` has one multitask extractor per sequence, not one per
   task (docs/mmdlm.md says why).
2. **Feature extraction** (``extract_feature.py``): ``MMDLM.extract_features`` with the trained
   ResNets, once per case, for train, validation and test.
3. **MIL heads** (``train_attention.py``): gated attention, projections, concatenation fusion and
   the three heads (``MMDLM.forward_features``) trained on the features with masked BCE plus the
   public code's explicit L2 penalty; selected on the mean validation AUC over the tasks, NEVER on
   the test fold (the public code did; docs/mmdlm.md).

Then the assembled network is evaluated end to end through ``FAMILY.predict`` (the node's path),
temperatures are fitted per task on validation and stored in the checkpoint's ``extra``
(``extra["temperatures"] = {task: T}``; the checkpoint's single ``temperature`` field stays None
because one number cannot calibrate three tasks), and each fold's model is exported.

1p/19q is reported two ways: on the cases its loss counts (known label, IDH not wildtype under
the default rule: the public code's masked evaluation) and on every case with a 1p/19q label.
"""
from __future__ import annotations

import copy
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
from models.mmdlm.network import MMDLM_ROLES, MMDLM_TASKS
from models.preprocess import PreprocessError, apply_spec, is_clinical
from training.calibration import apply_temperature, temperature_fit
from training.cases import Case, labels_array
from training.data import Batch, CaseDataset, VolumeCache, make_loader, to_device
from training.export import export_model, gate_stats
from training.loop import StepOutput, fit, make_optimizer, predict_loader, seed_everything
from training.metrics import binary_metrics
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
from training.splits import joint_strata

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
    and loader serve them unchanged.
    """

    def __init__(self, cases: Sequence[Case], cache: VolumeCache, role: str,
                 positions: Sequence[np.ndarray], targets: Mapping[str, torch.Tensor], in_memory: bool) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.role = role
        self.index: list[tuple[int, int]] = [(i, int(p)) for i, pos in enumerate(positions) for p in pos]
        self.targets = {t: v.tolist() for t, v in targets.items()}
        self.in_memory = in_memory
        self._mem: dict[int, np.ndarray] = {}

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
        return {"x": x, "labels": {t: int(self.targets[t][i]) for t in TASKS}, "case_id": self.cases[i].case_id}


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
        for role in ROLES:
            pos_tr, fb_tr = self._positions(self.train)
            pos_va, fb_va = self._positions(self.val)
            t_tr, t_va = _masked(self.loss, _targets(self.train)), _masked(self.loss, _targets(self.val))
            ds_tr = SliceDataset(self.train, self.cache, role, pos_tr, t_tr, self.in_memory)
            ds_va = SliceDataset(self.val, self.cache, role, pos_va, t_va, self.in_memory)
            tl = make_loader(ds_tr, batch_size=int(s1["batch_size"]), shuffle=True, seed=self.seed,  # type: ignore[arg-type]
                             num_workers=self.workers, device=self.device, world_size=self.options.dist.world_size,
                             rank=self.options.dist.rank)
            vl = make_loader(ds_va, batch_size=int(s1["eval_batch_size"]), shuffle=False,  # type: ignore[arg-type]
                             num_workers=self.workers, device=self.device)
            clf = SliceClassifier(model.extractors[role], model.feature_dim)
            loss = self.loss

            def step(m: nn.Module, batch: Batch) -> StepOutput:
                logits = m(batch["x"])
                total, _ = loss(logits, batch["labels"])
                return StepOutput(total, logits=logits, targets=batch["labels"])

            opt = make_optimizer(clf.parameters(), str(s1["optimizer"]), float(s1["lr"]), float(s1["weight_decay"]))
            res = fit(clf, step, tl, vl, epochs=int(s1["epochs"]), optimizer=opt, device=self.device,
                      amp_dtype=self.amp, log_dir=self.dir / f"stage1-{role}", resume=self.options.resume,
                      select_on=str(s1["select_on"]), patience=int(s1["patience"]) or None,
                      run_key=f"{self.run_key}:stage1-{role}", dist=self.options.dist,
                      progress=self.options.progress, desc=f"mmdlm {self.dir.name} stage 1 {role}")
            record[role] = {"best_epoch": res.best_epoch, "best_val_slice_auc": finite(res.best_score),
                            "train_slices": len(ds_tr), "val_slices": len(ds_va),
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
        tl = make_loader(FeatureDataset(self.train, feats, masks), batch_size=int(s3["batch_size"]),  # type: ignore[arg-type]
                         shuffle=True, seed=self.seed, device=self.device,
                         world_size=self.options.dist.world_size, rank=self.options.dist.rank)
        vl = make_loader(FeatureDataset(self.val, feats, masks), batch_size=max(1, int(s3["batch_size"])),  # type: ignore[arg-type]
                         shuffle=False, device=self.device)
        loss, l2 = self.loss, float(s3["l2"])

        def step(m: nn.Module, batch: Batch) -> StepOutput:
            out = m(batch)
            total, parts = loss(out.logits, batch["labels"])
            if l2 > 0:
                total = total + l2_penalty(params, l2)
            return StepOutput(total, logits=out.logits, targets=_masked(loss, batch["labels"]),
                              scalars={f"bce_{t}": v.detach() for t, v in parts.items()})

        opt = make_optimizer(params, str(s3["optimizer"]), float(s3["lr"]), float(s3["weight_decay"]))
        res = fit(head, step, tl, vl, epochs=int(s3["epochs"]), optimizer=opt, device=self.device,
                  amp_dtype=self.amp, log_dir=self.dir / "stage3-mil", resume=self.options.resume,
                  select_on=str(s3["select_on"]), patience=int(s3["patience"]) or None,
                  run_key=f"{self.run_key}:stage3", dist=self.options.dist, progress=self.options.progress,
                  desc=f"mmdlm {self.dir.name} stage 3 MIL")
        model.extractors.requires_grad_(True)
        best = res.history[res.best_epoch - 1] if res.history and res.best_epoch >= 1 else {}
        return {"best_epoch": res.best_epoch, "best_val_score": finite(res.best_score),
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
    test_out: dict[str, Any] = {"case_ids": list(test_pred.case_ids)}
    for t in TASKS:
        keep = val_keep[t]
        z, y = val_pred.logits[t][keep], val_pred.labels[t][keep]
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            fit_t = temperature_fit(z, y) if len(y) else None
        temperatures[t] = float(fit_t.temperature) if fit_t is not None else 1.0
        calibration[t] = fit_t.to_dict() if fit_t is not None else {"note": "no validation case counts for this task"}
        val_metrics[t] = binary_metrics(y, apply_temperature(z, temperatures[t])[:, 1]).as_dict() if len(y) else {}
        p_all = apply_temperature(test_pred.logits[t], temperatures[t])[:, 1]
        y_all = test_pred.labels[t]
        test_out[t] = {"y": y_all.tolist(), "p": p_all.tolist(), "counted": test_keep[t].tolist()}
        kt = test_keep[t]
        test_metrics[t] = binary_metrics(y_all[kt], p_all[kt]).as_dict() if kt.any() else {}
    known = test_pred.labels["1p19q"] >= 0
    test_metrics["1p19q_all"] = (binary_metrics(test_pred.labels["1p19q"][known],
                                                np.asarray(test_out["1p19q"]["p"])[known]).as_dict()
                                 if known.any() else {})
    val_aucs = [val_metrics[t].get("auc", math.nan) for t in TASKS if val_metrics[t]]
    val_score = float(np.nanmean(val_aucs)) if any(math.isfinite(a) for a in val_aucs) else None
    ckpt = out_dir / "checkpoints" / f"{NAME}-r{r}.pt"
    sha = None
    if options.dist.is_main:
        sha = export_model(
            ckpt, model, NAME, hparams, spec, train_cases=train, val_cases=val, split=split.to_dict(), config=config,
            metrics={"val": val_metrics, "test": test_metrics, "calibration": calibration,
                     "stage1": s1, "stage3": s3},
            calibration=None, protocol=NAME, row="multitask", repeat=r, index=out_dir / "checkpoints.json",
            val_score=val_score,
            extra={"temperatures": temperatures, "one_p19q_rule": str(config["loss"]["one_p19q_rule"]),
                   "temperature_note": "per task, fitted on validation logits; apply p = sigmoid(logit / T[task]); "
                                       "the single 'temperature' field is None because one number cannot "
                                       "calibrate three tasks"},
            description=str(config["protocol"].get("data_description", "")) or None,
            gate=gate_stats(model, FAMILY, train, val, cache, device=work.device),
        )
    result = {
        "run_key": run_key, "fold": r, "stage1": s1, "stage3": s3,
        "seconds": {"stage1": round(t1 - t0, 1), "stage2": round(t2 - t1, 1), "stage3": round(t3 - t2, 1)},
        "temperatures": temperatures, "calibration": calibration, "val": val_metrics, "test": test_metrics,
        "test_pred": test_out, "checkpoint": str(ckpt) if sha else None, "sha256": sha,
        "n": {"train": len(train), "val": len(val), "test": len(test)},
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
        mt_rows.append(MultiTaskRow(f"{model_name}, 1p/19q {'on all labelled cases' if other_key == '1p19q_all' else 'on IDH-not-wildtype cases'}",
                                    data, {"1p19q": by_key[other_key].repeats}))
    base = multitask_table(mt_rows).caption
    rule_note = ("1p/19q in the first row: cases whose 1p/19q loss counts (label known, IDH not wildtype); "
                 "second row: every case with a 1p/19q label." if main_key == "1p19q" else
                 "1p/19q in the first row: every case with a 1p/19q label; second row: IDH-not-wildtype cases.")
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
        key = f"{c.case_id}|{c.seg}"
        if key not in known:
            t = tumour_slices(c, spec)
            known[key] = None if t is None else t.astype(int).tolist()
            changed = True
        v = known[key]
        out[c.case_id] = None if v is None else np.asarray(v, dtype=bool)
    if changed:
        write_json(store, known)
    return out


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
    strata_kind = str(config["split"]["strata"])
    if strata_kind == "joint":
        strata = joint_strata(*[[c.labels.get(t) for c in cases] for t in TASKS])
    elif strata_kind == "grade":
        strata = [c.labels.get("grade") for c in cases]
    else:
        raise ConfigError(f"split.strata must be 'joint' or 'grade', got {strata_kind!r}")
    plan = make_plan(cases, strata, config["split"], options.repeats)
    plan.save(out_dir / "splits.json")
    cache = VolumeCache(spec, Path(config["data"]["cache_dir"] or out_dir / "cache"))
    cache.warm(cases, progress=options.progress)
    tumour = _tumour_map(cases, spec, cache, str(config["stage1"]["slices"]), options.progress)
    results = [_run_split(config, options, cache, spec, cases, split, out_dir, run_key, tumour)
               for split in splits_to_run(plan, options.repeats)]
    rows = _task_rows(config, results)
    departures = list(config["protocol"]["departures"])
    files = _write_report(rows, out_dir, departures, eval_mode)
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
    return {"protocol": NAME, "report": files,
            "table_markdown": Path(files["markdown"]).read_text(encoding="utf-8")}
