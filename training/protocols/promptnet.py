"""Seed 000's protocol: the template / FS 3D CNN, then PromptNet on non-enhanced MRI (Table 1, Table 2).

Per repeat of a stratified, patient-level 4:1 train/test split (five repeats), with a validation
part carved from the training patients (model selection and temperature scaling; never test):

1. **Stage 1** trains the template (``fs3dcnn``) on all four sequences. It is Table 1's
   "3D CNN FS-MRI" row, and, frozen, the teacher of stage 2.
2. **Stage 2** trains PromptNet (``promptnet``) on T1, T2, FLAIR in the requested Table-2 modes:
   ``none`` (the NE-only baseline: same encoder, plain CE, no prompt), ``fixed`` (CE + l_prompt
   with c = 1) and ``adaptive`` (CE + w_adaptive * l_prompt). The template sees the same
   samples' four sequences, live, every step (``models.promptnet.PromptNetCriterion``), so any
   augmentation applies to teacher and student alike.

Each trained model is evaluated on the repeat's test part through ``family.predict`` (the node's
inference path), calibrated by a temperature fitted on the validation part, and exported with
``training.export.export_model`` (training data, split, config, metrics, temperature). The run
folder holds ``run.json`` (resolved config), ``splits.json``, ``results/<row>-r<k>.json`` (per
row and repeat: test and validation predictions, metrics, timing), ``logs/<row>-r<k>/log.csv``
(per epoch) and ``last.pt`` (resume state), ``checkpoints/*.pt`` + ``checkpoints.json``, and
``report/`` (Table 1 Markdown/CSV, ROC/PR figure, reliability diagrams, predictions JSON).
Rerunning the same command resumes: finished rows are read back, a half-trained one continues
from its ``last.pt``.

The two inputs of stage 2 are prepared with two specs (the template's four roles, PromptNet's
three), each the family's ``spec_for(hparams)``; the node serves PromptNet with exactly the
three-role spec it was trained with. ``data.spacing`` replaces the spec's resample spacing (the
families' default is 1 mm, BraTS's grid; the small synthetic profile is 3 mm): the network only
constrains the array shape, which stays ``model.input_shape``.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from models.base import ModelFamily
from models.checkpoint import load_checkpoint
from models.fs3dcnn import FAMILY as FS3D
from models.fs3dcnn.loss import fs3dcnn_loss
from models.promptnet import FAMILY as PROMPTNET
from models.promptnet import PromptNetCriterion, loss_config
from training.calibration import apply_temperature, expected_calibration_error, temperature_fit
from training.cases import Case, labels_array, with_roles
from training.data import Batch, CaseDataset, VolumeCache, make_loader, random_flip
from training.datasets import DatasetError, read_dataset
from training.export import INDEX_NAME, export_model, gate_stats
from training.loop import (
    StepFn,
    StepOutput,
    fit,
    make_optimizer,
    make_scheduler,
    predict_loader,
    seed_everything,
)
from training.metrics import summary_dict
from training.operating import heldout_metrics
from training.prepare import exclude_failed
from training.protocols import ConfigError, RunOptions, config_hash, parse_amp, with_preprocess
from training.reports import RowResult, save_predictions, save_reliability_figure, save_roc_pr_figure, table1
from training.reports import Comparison, ablation_row, ablation_table, comparison_table
from training.metrics import pair_predictions, paired_auc_difference
from training.splits import SplitPlan, repeated_holdout, stratified_kfold

NAME = "promptnet"
ROW_ORDER: tuple[str, ...] = ("fs", "none", "fixed", "adaptive")
#: row -> (Table 1 "Type", "Data", family)
ROWS: dict[str, tuple[str, str, str]] = {
    "fs": ("3D CNN", "FS-MRI", "fs3dcnn"),
    "none": ("NE-only baseline", "NE-MRI", "promptnet"),
    "fixed": ("PromptNet (fixed weight)", "NE-MRI", "promptnet"),
    "adaptive": ("Adaptive PromptNet", "NE-MRI", "promptnet"),
}
FULL_PREFIX = "full/"


# --------------------------------------------------------------------------- config helpers

def train_settings(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """``[train]`` overlaid with ``[template]`` (stage 1) or ``[student]`` (stage 2)."""
    base = dict(config["train"])
    over = dict(config.get(stage, {}) or {})
    unknown = sorted(set(over) - set(base))
    if unknown:
        raise ConfigError(f"[{stage}]: unknown key(s) {unknown}; it overrides [train] keys: {sorted(base)}")
    base.update(over)
    if int(base["epochs"]) < 0 or int(base["batch_size"]) < 1:
        raise ConfigError(f"[{stage}]: epochs must be >= 0 and batch_size >= 1, got {base['epochs']}, {base['batch_size']}")
    if base["select_on"] not in ("val_auc", "val_loss", "val_classification", "last"):
        raise ConfigError(f"[{stage}]: select_on must be val_auc, val_loss, val_classification (the CE without "
                          f"the prompt term) or last, got {base['select_on']!r}")
    return base


def model_hparams(config: Mapping[str, Any], family: str, mode: str | None = None) -> dict[str, Any]:
    """The family hparams of a row: shared ``[model]`` + (PromptNet) ``[promptnet]`` + mode + class weights."""
    hp: dict[str, Any] = dict(copy.deepcopy(config["model"]))
    cw = list(config["train"]["class_weights"]) or None
    hp["class_weights"] = cw
    if family == "promptnet":
        hp.update(copy.deepcopy(config["promptnet"]))
        hp["prompt_mode"] = mode or "adaptive"
    fam = FS3D if family == "fs3dcnn" else PROMPTNET
    try:
        fam.build(hp)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{family} hparams from the config do not build a network: {exc}") from exc
    return hp


def spec_with_spacing(family: ModelFamily, hparams: Mapping[str, Any], spacing: Sequence[float]) -> dict[str, Any]:
    """``family.spec_for(hparams)`` with the resample spacing replaced (the shape stays the network's)."""
    assert family.spec_for is not None
    spec = copy.deepcopy(family.spec_for(hparams))
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ConfigError(f"data.spacing must be three positive numbers, got {spacing}")
    for t in spec["transforms"]:
        if t["name"] == "resample":
            t["spacing"] = sp
    return spec


def prepare_specs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The two specs this protocol trains with (the template's four roles, PromptNet's three), by
    family name: what ``python -m training prepare promptnet`` prepares and ``run`` reads back."""
    spacing = config["data"]["spacing"]
    return {"fs3dcnn": with_preprocess(spec_with_spacing(FS3D, model_hparams(config, "fs3dcnn"), spacing), config),
            "promptnet": with_preprocess(spec_with_spacing(PROMPTNET, model_hparams(config, "promptnet", "none"),
                                                           spacing), config)}


def cache_root(config: Mapping[str, Any], out: Path) -> Path:
    """``data.cache_dir``, or ``<run>/cache`` when it is empty."""
    return Path(config["data"]["cache_dir"]) if config["data"]["cache_dir"] else out / "cache"


# --------------------------------------------------------------------------- data

class PairedDataset(Dataset):
    """Stage 2 items: PromptNet's roles from its own cache, and the same case's four sequences
    (keys ``full/<role>``) from the template's cache; one augmentation stream for both."""

    def __init__(self, ne: CaseDataset, full: CaseDataset) -> None:
        if [c.case_id for c in ne.cases] != [c.case_id for c in full.cases]:
            raise ValueError("paired datasets must list the same cases in the same order")
        self.ne, self.full = ne, full

    def __len__(self) -> int:
        return len(self.ne)

    def set_epoch(self, epoch: int) -> None:
        self.ne.set_epoch(epoch)
        self.full.set_epoch(epoch)

    def __getitem__(self, index: int) -> Batch:
        item = self.ne[index]
        full = self.full[index]
        for r in FS3D.input_roles:
            item[FULL_PREFIX + r] = full[r]
        return item


def _stack(batch: Batch, roles: Sequence[str], prefix: str = "") -> torch.Tensor:
    return torch.stack([batch[prefix + r] for r in roles], dim=1).float()


def _fs_step(class_weights: Sequence[float] | None) -> StepFn:
    """Stage 1: cross-entropy of the template on the four stacked sequences."""
    def step(model: nn.Module, batch: Batch) -> StepOutput:
        y = batch["labels"]["grade"]
        out = model(_stack(batch, FS3D.input_roles))
        loss = fs3dcnn_loss(out.logits, y, class_weights=class_weights)
        # "classification" as PromptNet's step logs it, so select_on="val_classification" means one thing
        return StepOutput(loss, logits=out.logits, targets=y, scalars={"classification": loss.detach()})
    return step


def _student_step(criterion: PromptNetCriterion) -> StepFn:
    """Stage 2: the Table-2 row's loss; the frozen template reads the same cases' four sequences."""
    def step(model: nn.Module, batch: Batch) -> StepOutput:
        y = batch["labels"]["grade"]
        out = model(_stack(batch, PROMPTNET.input_roles))
        full = _stack(batch, FS3D.input_roles, FULL_PREFIX) if criterion.config.mode != "none" else None
        total, parts = criterion(out, full, y)
        scalars = {k: parts[k] for k in ("classification", "prompt_l1", "prompt", "weight")}
        return StepOutput(total, logits=out.logits, targets=y, scalars=scalars)
    return step


# --------------------------------------------------------------------------- evaluation

def _ece(y: np.ndarray, logits: np.ndarray, temperature: float) -> float | None:
    if len(y) == 0:
        return None
    return float(expected_calibration_error(y, apply_temperature(logits, temperature)))


def _result_path(out: Path, row: str, repeat: int) -> Path:
    return out / "results" / f"{row}-r{repeat}.json"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


# --------------------------------------------------------------------------- the protocol

class _Context:
    """Everything one run shares across rows and repeats."""

    def __init__(self, config: Mapping[str, Any], cases: list[Case], plan: SplitPlan, out: Path, options: RunOptions) -> None:
        self.config = config
        self.cases = cases
        self.plan = plan
        self.out = out
        self.options = options
        self.device = torch.device(options.device)
        amp_cfg = parse_amp(config["train"]["amp"])
        self.amp = options.amp_dtype if options.amp_dtype is not None else amp_cfg
        data = config["data"]
        root = cache_root(config, out)
        self.fs_hp = model_hparams(config, "fs3dcnn")
        specs = prepare_specs(config)
        self.fs_spec, self.ne_spec = specs["fs3dcnn"], specs["promptnet"]
        self.fs_cache = VolumeCache(self.fs_spec, root)
        self.ne_cache = VolumeCache(self.ne_spec, root)
        self.flip = random_flip(tuple(int(a) for a in data["flip_axes"])) if data["flip_axes"] else None
        self.seed = int(config["protocol"]["seed"])

    def dataset(self, idx: np.ndarray, *, paired: bool, train: bool) -> Dataset:
        cases = [self.cases[i] for i in idx]
        kw = dict(tasks=("grade",), in_memory=bool(self.config["data"]["in_memory"]), seed=self.seed,
                  augment=self.flip if train else None)
        full = CaseDataset(cases, self.fs_cache, **kw)  # type: ignore[arg-type]
        if not paired:
            return full
        return PairedDataset(CaseDataset(cases, self.ne_cache, **kw), full)  # type: ignore[arg-type]

    def loader(self, ds: Dataset, *, batch_size: int, shuffle: bool, seed: int) -> Any:
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,  # type: ignore[arg-type]
                           num_workers=int(self.config["data"]["num_workers"]), device=self.device,
                           world_size=self.options.dist.world_size if shuffle else 1,
                           rank=self.options.dist.rank if shuffle else 0)


def _train_row(ctx: _Context, row: str, repeat: int, template_ckpt: Path | None) -> dict[str, Any]:
    """Train, evaluate, calibrate and export one row of one repeat; returns its result record."""
    split = ctx.plan[repeat]
    family_name = ROWS[row][2]
    family = FS3D if family_name == "fs3dcnn" else PROMPTNET
    stage = "template" if row == "fs" else "student"
    ts = train_settings(ctx.config, stage)
    hp = ctx.fs_hp if row == "fs" else model_hparams(ctx.config, "promptnet", row)
    spec = ctx.fs_spec if row == "fs" else ctx.ne_spec
    seed = ctx.seed * 1000 + repeat * 10 + ROW_ORDER.index(row)
    seed_everything(seed)
    model = family.build(hp)
    paired = row != "fs"
    train_ds = ctx.dataset(split.train, paired=paired, train=True)
    val_ds = ctx.dataset(split.val, paired=paired, train=False) if len(split.val) else None
    bs, ebs = int(ts["batch_size"]), int(ts["eval_batch_size"])
    train_loader = ctx.loader(train_ds, batch_size=bs, shuffle=True, seed=seed)
    val_loader = ctx.loader(val_ds, batch_size=ebs, shuffle=False, seed=seed) if val_ds is not None else None
    if row == "fs":
        step = _fs_step(hp["class_weights"])
    else:
        assert template_ckpt is not None
        template = load_checkpoint(template_ckpt, map_location=ctx.device).model
        criterion = PromptNetCriterion(template, loss_config(hp)).to(ctx.device)  # type: ignore[arg-type]
        step = _student_step(criterion)
    opt = make_optimizer(model.parameters(), ts["optimizer"], float(ts["lr"]), float(ts["weight_decay"]))
    sched = make_scheduler(opt, ts["scheduler"], milestones=ts["milestones"], gamma=float(ts["gamma"]),
                           epochs=int(ts["epochs"]))
    select_on = ts["select_on"] if val_loader is not None else "last"
    log_dir = ctx.out / "logs" / f"{row}-r{repeat}"
    run_key = config_hash({"config": ctx.config, "row": row, "repeat": repeat, "split": split.to_dict()})
    t0 = time.perf_counter()
    res = fit(model, step, train_loader, val_loader, epochs=int(ts["epochs"]), optimizer=opt, scheduler=sched,
              device=ctx.device, amp_dtype=ctx.amp, log_dir=log_dir, resume=ctx.options.resume,
              select_on=select_on, grad_clip=float(ts["grad_clip"]) or None,
              patience=int(ts["patience"]) or None, run_key=run_key, dist=ctx.options.dist,
              progress=ctx.options.progress, desc=f"{row} r{repeat}")
    train_s = time.perf_counter() - t0
    model = res.model

    # Evaluation through the node's inference path, on the student's own spec (no full volumes).
    def eval_loader(idx: np.ndarray) -> Any:
        ds = CaseDataset([ctx.cases[i] for i in idx], ctx.fs_cache if row == "fs" else ctx.ne_cache,
                         tasks=("grade",), in_memory=False)
        return make_loader(ds, batch_size=ebs, shuffle=False, device=ctx.device)

    test_pred = predict_loader(model, eval_loader(split.test), family, device=ctx.device, amp_dtype=ctx.amp)
    y_t, p_t, z_t = test_pred.labelled("grade")
    if len(split.val):
        val_pred = predict_loader(model, eval_loader(split.val), family, device=ctx.device, amp_dtype=ctx.amp)
        y_v, p_v, z_v = val_pred.labelled("grade")
        cal = temperature_fit(z_v, y_v)
    else:
        y_v = p_v = z_v = np.zeros(0)
        cal = None
    temp = 1.0 if cal is None else float(cal.temperature)
    # The node thresholds the CALIBRATED P(HGG): the threshold is chosen (Youden's J) and every
    # threshold-dependent metric measured on those, the threshold on validation only.
    pc_v = apply_temperature(z_v, temp)[:, 1] if len(y_v) else np.zeros(0)
    pc_t = apply_temperature(z_t, temp)[:, 1] if len(y_t) else np.zeros(0)
    val_m, test_m, threshold = heldout_metrics(y_v, pc_v, y_t, pc_t, seed=seed)
    history = res.history
    epoch_times = [h["time_s"] for h in history]
    record: dict[str, Any] = {
        "row": row, "repeat": repeat, "family": family_name, "type": ROWS[row][0], "data": ROWS[row][1],
        "hparams": hp, "best_epoch": res.best_epoch, "select_on": select_on, "val_score": res.best_score,
        "epochs_run": len(history), "train_seconds": train_s,
        "epoch_seconds_mean": float(np.mean(epoch_times)) if epoch_times else None,
        "samples_per_s_mean": float(np.mean([h["samples_per_s"] for h in history])) if history else None,
        "val": {"case_ids": [c for c, y in zip(val_pred.case_ids, val_pred.labels["grade"]) if y >= 0]
                if len(split.val) else [], "y": y_v, "p": p_v, "logits": z_v, "metrics": val_m,
                "p_calibrated": pc_v},
        "test": {"case_ids": [c for c, y in zip(test_pred.case_ids, test_pred.labels["grade"]) if y >= 0],
                 "y": y_t, "p": p_t, "logits": z_t, "metrics": test_m,
                 "p_calibrated": pc_t,
                 "ece": _ece(y_t, z_t, 1.0), "ece_calibrated": _ece(y_t, z_t, temp)},
        "calibration": None if cal is None else cal.to_dict(),
        "threshold": threshold,
    }
    ckpt = ctx.out / "checkpoints" / f"{family_name}-{row}-r{repeat}.pt"
    if ctx.options.dist.is_main:
        train_cases, val_cases = [ctx.cases[i] for i in split.train], [ctx.cases[i] for i in split.val]
        sha = export_model(
            ckpt, model, family_name, hp, spec,
            train_cases=train_cases, val_cases=val_cases,
            split={"scheme": ctx.plan.scheme, "index": split.index, "seed": ctx.plan.seed,
                   "test_case_ids": list(split.test_ids)},
            config=ctx.config,
            metrics={"val": val_m, "test": test_m, "best_epoch": res.best_epoch, "select_on": select_on},
            calibration=cal, protocol=NAME, row=row, repeat=repeat, index=ctx.out / INDEX_NAME,
            # copy_checkpoints takes the repeat with the HIGHEST val_score: a loss criterion goes in negated
            val_score=(None if not np.isfinite(res.best_score)
                       else res.best_score if select_on in ("val_auc", "last") else -res.best_score),
            extra={"table1_type": ROWS[row][0], "table1_data": ROWS[row][1],
                   **({"template_checkpoint": str(template_ckpt)} if template_ckpt else {})},
            description=str(ctx.config["protocol"].get("data_description", "")) or None,
            # the node's gate: ranges and feature statistics on this row's own spec (threshold on validation)
            gate=gate_stats(model, family, train_cases, val_cases, ctx.fs_cache if row == "fs" else ctx.ne_cache,
                            device=ctx.device, batch_size=ebs),
            # no validation labels: nothing chose a threshold, and the node labels at 0.5
            thresholds={"grade": threshold} if len(y_v) else None,
        )
        record["checkpoint"] = str(ckpt)
        record["sha256"] = sha
        _write_json(_result_path(ctx.out, row, repeat), record)
    return record


def _load_cases(data_dir: Path, config: Mapping[str, Any]) -> list[Case]:
    cases = read_dataset(data_dir, verify=config["data"]["verify"])
    usable = [c for c in with_roles(cases, FS3D.input_roles) if c.labels.get("grade") is not None]
    if len(usable) < 10:
        raise DatasetError(f"only {len(usable)} case(s) have all four sequences and a grade label; the PromptNet "
                           f"protocol needs at least 10 (of {len(cases)} read)", path=data_dir)
    y = labels_array(usable, "grade")
    if len(set(y.tolist())) < 2:
        raise DatasetError("all graded cases have the same grade; nothing to learn", path=data_dir)
    return usable


def _make_plan(cases: list[Case], config: Mapping[str, Any], repeats: int) -> SplitPlan:
    sp = config["split"]
    ids = [c.case_id for c in cases]
    y = labels_array(cases, "grade").tolist()
    pids = [c.patient_id for c in cases]
    if int(sp["kfold"]) > 0:
        return stratified_kfold(ids, y, pids, k=int(sp["kfold"]), val_fraction=float(sp["val_fraction"]),
                                seed=int(sp["seed"]))
    return repeated_holdout(ids, y, pids, test_fraction=float(sp["test_fraction"]), repeats=repeats,
                            val_fraction=float(sp["val_fraction"]), seed=int(sp["seed"]))


def _caption(config: Mapping[str, Any], n_repeats: int, scheme: str) -> str:
    deps = list(config["protocol"]["departures"])
    what = "folds" if scheme == "kfold" else "repeats of a stratified 4:1 patient-level split"
    text = (f"Mean ± sample standard deviation (ddof=1) over {n_repeats} {what}; threshold 0.5 on P(HGG); "
            "PRC = average precision; FS-MRI: T1, T1CE, T2, FLAIR; NE-MRI: T1, T2, FLAIR. "
            "Checkpoints selected on validation data only.")
    if deps:
        text += " Departures from the paper: " + "; ".join(deps) + "."
    return text


#: Table 1's paired comparisons (A − B): each NE row and the FS row against the NE-only baseline,
#: adaptive against fixed, FS against adaptive.
TABLE1_COMPARISONS: tuple[tuple[str, str], ...] = (
    ("fixed", "none"), ("adaptive", "none"), ("fs", "none"), ("adaptive", "fixed"), ("fs", "adaptive"))
#: Table 2 (seed 000's ablation of the prompt loss): row -> setting, then its paired differences.
TABLE2_SETTINGS: dict[str, str] = {"none": "Without prompt loss", "fixed": "Fixed prompt weight",
                                   "adaptive": "Adaptive prompt weight"}
TABLE2_COMPARISONS: tuple[tuple[str, str], ...] = (("fixed", "none"), ("adaptive", "none"), ("adaptive", "fixed"))


def _label(row: str) -> str:
    return f"{ROWS[row][0]} ({ROWS[row][1]})" if row == "fs" else ROWS[row][0]


def _compare(recs: Mapping[str, list[dict[str, Any]]], a: str, b: str) -> Comparison | None:
    """A − B on the repeats both rows finished, case by case on each repeat's (shared) test part."""
    by_a, by_b = {d["repeat"]: d for d in recs.get(a, [])}, {d["repeat"]: d for d in recs.get(b, [])}
    common = sorted(set(by_a) & set(by_b))
    if not common:
        return None
    pairs = [pair_predictions(by_a[k]["test"]["case_ids"], by_a[k]["test"]["y"], by_a[k]["test"]["p"],
                              by_b[k]["test"]["case_ids"], by_b[k]["test"]["y"], by_b[k]["test"]["p"], repeat=k)
             for k in common]
    return Comparison(_label(a), _label(b), paired_auc_difference(pairs))


def _write_comparisons(recs: Mapping[str, list[dict[str, Any]]], order: Sequence[str],
                       result_rows: Sequence[RowResult], rep_dir: Path) -> dict[str, Any]:
    """report/table1_comparisons.{md,csv} and report/table2.{md,csv}; their numbers for summary.json.

    Why here and not in the Table 1 cell: mean ± std per row cannot show a 0.02-0.03 AUC effect,
    the paired difference on the same test cases can (docs/training-metrics.md, "Paired comparisons").
    """
    out: dict[str, Any] = {"comparisons": {}, "files": {}}
    t1 = [c for c in (_compare(recs, a, b) for a, b in TABLE1_COMPARISONS if a in order and b in order) if c]
    if t1:
        table = comparison_table(t1)
        md, cs = table.write(rep_dir, "table1_comparisons")
        out["comparisons"]["table1"] = [c.as_dict() for c in t1]
        out["comparisons_markdown"] = table.to_markdown()
        out["files"].update(comparisons_markdown=str(md), comparisons_csv=str(cs))
    settings = [r for r in TABLE2_SETTINGS if r in order]
    if settings:
        rows = {r: rr for r, rr in zip(order, result_rows)}
        abl = [ablation_row(TABLE2_SETTINGS[r], rows[r], repeat_ids=[d["repeat"] for d in
                                                                   sorted(recs[r], key=lambda d: d["repeat"])])
               for r in settings]
        t2 = [c for c in (_compare(recs, a, b) for a, b in TABLE2_COMPARISONS if a in order and b in order) if c]
        table = ablation_table(abl, t2)
        md, cs = table.write(rep_dir, "table2")
        out["comparisons"]["table2"] = {
            "rows": [{"setting": r.setting, "name": r.name, "auc_mean": r.auc.mean, "auc_std": r.auc.std,
                      "pooled": r.pooled.as_dict()} for r in abl],
            "differences": [c.as_dict() for c in t2]}
        out["table2_markdown"] = table.to_markdown()
        out["files"].update(table2_markdown=str(md), table2_csv=str(cs))
    return out


def write_results(out: Path, config: Mapping[str, Any], rows: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the report (Table 1 MD/CSV, ROC/PR figure, reliability diagrams, predictions JSON) from
    ``results/*.json``; rows with no finished repeat are left out. Returns the summary."""
    recs: dict[str, list[dict[str, Any]]] = {}
    for p in sorted((out / "results").glob("*-r*.json")):
        rec = json.loads(p.read_text())
        recs.setdefault(rec["row"], []).append(rec)
    order = [r for r in ROW_ORDER if r in recs and (rows is None or r in rows)]
    if not order:
        raise FileNotFoundError(f"{out}: no finished results (results/*.json) to report")
    result_rows, cal_rows = [], []
    per_repeat: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for r in order:
        rr = sorted(recs[r], key=lambda d: d["repeat"])
        reps = tuple((np.asarray(d["test"]["y"], dtype=np.int64), np.asarray(d["test"]["p"], dtype=np.float64)) for d in rr)
        ids = tuple(tuple(d["test"]["case_ids"]) for d in rr)
        result_rows.append(RowResult(ROWS[r][0], ROWS[r][1], reps, ids))
        cal_rows.append(RowResult(ROWS[r][0] + " (calibrated)", ROWS[r][1], tuple(
            (np.asarray(d["test"]["y"], dtype=np.int64), np.asarray(d["test"]["p_calibrated"], dtype=np.float64)) for d in rr)))
        per_repeat[r] = [{"repeat": d["repeat"], "test_auc": d["test"]["metrics"].get("auc"),
                          "val_auc": d["val"]["metrics"].get("auc") if d["val"]["metrics"] else None,
                          "best_epoch": d["best_epoch"], "epochs_run": d["epochs_run"],
                          "temperature": (d["calibration"] or {}).get("temperature"),
                          "ece": d["test"]["ece"], "ece_calibrated": d["test"]["ece_calibrated"]} for d in rr]
        timing[r] = {"train_seconds": [d["train_seconds"] for d in rr],
                     "epoch_seconds_mean": float(np.mean([d["epoch_seconds_mean"] or 0 for d in rr])),
                     "samples_per_s_mean": float(np.mean([d["samples_per_s_mean"] or 0 for d in rr]))}
    n_rep = max(len(r.repeats) for r in result_rows)
    rep_dir = out / "report"
    rep_dir.mkdir(parents=True, exist_ok=True)
    scheme = "kfold" if int(config["split"]["kfold"]) > 0 else "holdout"
    stats = _write_comparisons(recs, order, result_rows, rep_dir)
    caption = _caption(config, n_rep, scheme)
    if stats["files"]:
        caption += " Paired differences with 95 % CIs: " + " and ".join(
            Path(f).name for k, f in stats["files"].items() if k.endswith("markdown")) + "."
    table = table1(result_rows, caption=caption)
    md, cs = table.write(rep_dir, "table1")
    fig = save_roc_pr_figure(result_rows, rep_dir / "table1_roc_pr.png", title="Seed 000 protocol: test ROC and PR")
    rel = save_reliability_figure(result_rows, rep_dir / "table1_reliability.png")
    rel_cal = save_reliability_figure(cal_rows, rep_dir / "table1_reliability_calibrated.png",
                                      title="Reliability after temperature scaling (fitted on validation)")
    preds = save_predictions(result_rows, rep_dir / "table1_predictions.json")
    summary = {
        "table_markdown": table.to_markdown(),
        **{k: v for k, v in stats.items() if k != "files"},
        "summary": {ROWS[r][0]: summary_dict(rr.summary()) for r, rr in zip(order, result_rows)},
        "per_repeat": per_repeat,
        "timing": timing,
        "files": {**{k: str(v) for k, v in {"markdown": md, "csv": cs, "roc_pr": fig, "reliability": rel,
                                            "reliability_calibrated": rel_cal, "predictions": preds}.items()},
                  **stats["files"]},
    }
    _write_json(rep_dir / "summary.json", summary)
    return summary


def run(config: Mapping[str, Any], *, data_dir: str | Path, out_dir: str | Path, options: RunOptions | None = None) -> dict[str, Any]:
    """Run the seed-000 protocol; returns the report summary (also in ``<out>/report/summary.json``)."""
    options = options or RunOptions()
    out = Path(out_dir)
    t_start = time.perf_counter()
    rows = list(options.rows) if options.rows else list(config["protocol"]["rows"])
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise ConfigError(f"unknown row(s) {bad or rows}; rows are {list(ROW_ORDER)}")
    rows = [r for r in ROW_ORDER if r in rows]
    repeats = int(options.repeats if options.repeats is not None else config["split"]["repeats"])
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if options.num_threads:
        torch.set_num_threads(int(options.num_threads))
    cases = _load_cases(Path(data_dir), config)
    # prepared once per case and spec (reused from `python -m training prepare`); failures excluded, listed
    cases, _ = exclude_failed(cases, prepare_specs(config), cache_root(config, out),
                              record=out / "prepare.json" if options.dist.is_main else None,
                              progress=options.progress)
    plan = _make_plan(cases, config, repeats)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    chash = config_hash(config)
    if run_file.exists() and options.resume:
        prev = json.loads(run_file.read_text())
        if prev.get("config_hash") != chash:
            raise ConfigError(f"{out} holds a run with another config (hash {prev.get('config_hash')} != {chash}); "
                              "use a new --out or turn resume off")
    split_file = out / "splits.json"
    if split_file.exists() and options.resume:
        saved = SplitPlan.load(split_file)
        if saved != plan:
            raise ConfigError(f"{split_file}: the saved splits differ from the ones this data and config give "
                              "(the dataset changed?); use a new --out or turn resume off")
    if options.dist.is_main:
        plan.save(split_file)
        _write_json(run_file, {"protocol": NAME, "config": config, "config_hash": chash, "data_dir": str(data_dir),
                               "n_cases": len(cases), "rows": rows, "repeats": len(plan),
                               "device": options.device, "amp": str(options.amp_dtype),
                               "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    ctx = _Context(config, cases, plan, out, options)
    ctx.fs_cache.warm(cases, progress=options.progress)
    ctx.ne_cache.warm(cases, progress=options.progress)
    need_template = any(r != "fs" for r in rows)
    for k in range(len(plan)):
        template_ckpt: Path | None = None
        for row in (["fs"] if ("fs" in rows or need_template) else []) + [r for r in rows if r != "fs"]:
            rp = _result_path(out, row, k)
            if options.resume and rp.exists():
                rec = json.loads(rp.read_text())
            else:
                rec = _train_row(ctx, row, k, template_ckpt)
            if row == "fs":
                template_ckpt = Path(rec["checkpoint"])
    summary = write_results(out, config, rows)
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["departures"] = list(config["protocol"]["departures"])
    _write_json(out / "report" / "summary.json", summary)
    return summary


def evaluate(run_dir: str | Path) -> dict[str, Any]:
    """Rebuild the report from a run's saved per-repeat predictions (no training)."""
    out = Path(run_dir)
    info = json.loads((out / "run.json").read_text())
    return write_results(out, info["config"], info.get("rows"))
