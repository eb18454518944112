"""Seed 001's protocol: cross-modality guidance with dual attention, trained cumulatively.

```python
from training.protocols import load_config, RunOptions
from training.protocols import crossmodal

cfg = load_config("crossmodal", profile="small")          # configs/crossmodal.toml + crossmodal.small.toml
summary = crossmodal.run(cfg, data_dir=Path("/tmp/cohort-small"), out_dir=Path("/tmp/run-crossmodal"),
                         options=RunOptions(device="cpu", num_threads=1))
crossmodal.evaluate(Path("/tmp/run-crossmodal"))           # rebuild table + figures from saved predictions
```

Per split (stratified 4:1 hold-out repeated 5 times, or k-fold; patient level; a validation part
carved from the training patients):

1. **Secondary order.** The paper adds secondaries in descending order of their single-modality
   performance. ``stages.secondary_order = "prior"`` takes the documented prior (FLAIR, T2, T1);
   ``"measure"`` trains each secondary alone (the same branch, as a single-modality network) on
   the training part and ranks them by *validation* AUC; an explicit list is used as given.
2. **Stage 1** trains the primary (T1CE) branch and the classifier alone
   (``models.crossmodal.set_stage(model, "primary")``).
3. **Stage 2** adds the secondaries one at a time (``cumulative_schedule``), each sub-stage
   starting from the previous one's best-on-validation weights (the primary's weights carry over:
   ``set_stage`` never touches weights), a fresh optimizer over the trainable parameters.
4. Weighted cross-entropy with inverse-frequency class weights from the *training* part's grades.
5. Temperature fitted on the validation logits; the test part is scored once, after selection.
6. Every repeat's final model is exported (``training.export.export_model``: the checkpoint
   contract of ``models/``, with training-data description, split, config, metrics, temperature).

Why the stage rows: the paper's claim is that guided multi-modal learning beats the primary alone;
each stage's best model is also scored on the same test part, so the report shows T1CE alone,
+FLAIR, +FLAIR+T2 next to the final model without training anything extra.

Training goes through ``training.loop.fit`` and data through ``training.data`` (one cache, one
loop for every protocol). A repeat whose result file exists is not trained again (resumable at
repeat level; within a stage ``fit`` resumes from ``last.pt``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import ROLES
from models.crossmodal import (
    FAMILY,
    WeightedCrossEntropyLoss,
    class_weights_from_labels,
    cumulative_schedule,
    make_spec,
    set_stage,
)
from models.crossmodal.network import CrossModalityNet
from models.preprocess import output_shape
from training.calibration import TemperatureFit, apply_temperature, temperature_fit
from training.cases import Case, labelled, labels_array, with_roles
from training.data import Batch, CaseDataset, VolumeCache, make_loader
from training.datasets import DatasetError, read_dataset
from training.export import export_model, gate_stats
from training.loop import (
    FitResult,
    Predictions,
    StepOutput,
    auc_or_nan,
    fit,
    make_optimizer,
    make_scheduler,
    predict_loader,
    seed_everything,
)
from training.operating import heldout_metrics
from training.prepare import exclude_failed
from training.protocols import ConfigError, RunOptions, config_hash, parse_amp, with_preprocess
from training.reports import (
    RowResult,
    load_predictions,
    save_predictions,
    save_reliability_figure,
    save_roc_pr_figure,
    table1,
)
from training.reports import Comparison, compare_rows, comparison_table
from training.splits import SplitPlan, repeated_holdout, stratified_kfold

__all__ = ["NAME", "evaluate", "make_plan", "order_secondaries", "read_cases", "run"]

NAME = "crossmodal"
RESULT_NAME = "result.json"


# --------------------------------------------------------------------------- shared helpers (also used by mmdlm)


def read_cases(data_dir: Path, roles: Sequence[str], *, verify: str, require: str | None) -> list[Case]:
    """The dataset's cases that have every role (and, when ``require`` is a task, its label).

    Why filter rather than fail: a site's manifest may mix studies with and without contrast;
    this family can only learn from the complete ones, and the summary says how many were left out.
    """
    cases = read_dataset(data_dir, verify=verify)
    usable = with_roles(cases, roles)
    if require is not None:
        usable = labelled(usable, require)
    if len(usable) < 4:
        raise DatasetError(f"only {len(usable)} of {len(cases)} cases have {list(roles)}"
                           + (f" and a {require} label" if require else "") + ": too few to split",
                           path=data_dir)
    return usable


def make_plan(cases: Sequence[Case], strata: Sequence[Any], split_cfg: Mapping[str, Any],
              repeats_override: int | None) -> SplitPlan:
    """Patient-level stratified splits: 4:1 hold-out repeated, or k-fold, with a validation part."""
    scheme = str(split_cfg["scheme"])
    ids = [c.case_id for c in cases]
    patients = [c.patient_id for c in cases]
    val_fraction = float(split_cfg["val_fraction"])
    if scheme == "holdout":
        repeats = int(repeats_override or split_cfg["repeats"])
        return repeated_holdout(ids, list(strata), patients, test_fraction=float(split_cfg["test_fraction"]),
                                repeats=repeats, val_fraction=val_fraction, seed=int(split_cfg["seed"]))
    if scheme == "kfold":
        return stratified_kfold(ids, list(strata), patients, k=int(split_cfg["k"]), val_fraction=val_fraction,
                                seed=int(split_cfg["seed"]))
    raise ConfigError(f"split.scheme must be 'holdout' or 'kfold', got {scheme!r}")


def splits_to_run(plan: SplitPlan, repeats_override: int | None) -> list[Any]:
    """The splits to train: all of them, or the first ``--repeats`` (k-fold: the first folds)."""
    splits = list(plan)
    if repeats_override is not None:
        if repeats_override < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats_override}")
        splits = splits[:repeats_override]
    return splits


def pick(cases: Sequence[Case], index: np.ndarray) -> list[Case]:
    return [cases[int(i)] for i in index]


def resolve_amp(options: RunOptions, train_cfg: Mapping[str, Any]) -> torch.dtype | None:
    """The CLI's ``--amp`` wins over the config's ``train.amp``; autocast only makes sense on CUDA."""
    dtype = options.amp_dtype if options.amp_dtype is not None else parse_amp(str(train_cfg.get("amp", "none")))
    if dtype is not None and torch.device(options.device).type != "cuda":
        return None
    return dtype


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def finite(x: float) -> float | None:
    """NaN/inf -> None, for JSON files people read."""
    return float(x) if math.isfinite(x) else None


def caption_with_departures(base: str, departures: Sequence[str]) -> str:
    """Table caption: the aggregation sentence plus every departure from the paper, so a table
    copied elsewhere still says how it was made."""
    if not departures:
        return base
    return base + " Departures from the paper: " + "; ".join(departures) + "."


# --------------------------------------------------------------------------- the protocol


def prepare_specs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The one spec this protocol trains with, by name: what ``python -m training prepare crossmodal``
    prepares and ``run`` reads back."""
    return {NAME: with_preprocess(_spec(config), config)}


def _spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The volume spec at the configured spacing; its array shape must equal ``spec_for(hparams)``'s
    (``save_checkpoint`` checks it again), so the node prepares exactly what the network takes."""
    hp = dict(config["model"])
    spec = make_spec(hp["input_size"], config["data"]["spacing"])
    want = output_shape(FAMILY.spec_for(hp))  # type: ignore[misc]
    if output_shape(spec) != want:
        raise ConfigError(f"crossmodal: spec shape {output_shape(spec)} does not fit the network's {want}")
    return spec


def order_secondaries(value: Any, secondaries: Sequence[str]) -> list[str] | None:
    """Parse ``stages.secondary_order``: None for "measure", the prior, or an explicit order.

    An explicit order is a comma-separated string (``"T2,FLAIR,T1"``): the config system keeps one
    type per key, and a string is what the two keywords already are.
    """
    prior = [r for r in ("FLAIR", "T2", "T1") if r in secondaries]
    text = str(value).strip()
    if text == "prior":
        return prior
    if text == "measure":
        return None
    parts = [p.strip().upper() for p in text.split(",") if p.strip()]
    if sorted(parts) == sorted(secondaries) and len(set(parts)) == len(parts):
        return parts
    raise ConfigError(f"stages.secondary_order must be 'prior', 'measure' or a comma-separated order of "
                      f"{', '.join(secondaries)} (e.g. 'T2,FLAIR,T1'), got {value!r}")


class _Trainer:
    """What one split needs to train a stage: loaders, loss, optimiser settings, run options."""

    def __init__(self, config: Mapping[str, Any], options: RunOptions, cache: VolumeCache,
                 train: list[Case], val: list[Case], test: list[Case], run_key: str, seed: int) -> None:
        self.cfg = config
        self.tr = config["train"]
        self.options = options
        self.device = torch.device(options.device)
        self.amp = resolve_amp(options, self.tr)
        self.run_key = run_key
        data = config["data"]
        in_memory = bool(data["in_memory"])
        workers = int(data["num_workers"])
        ds = {name: CaseDataset(part, cache, tasks=("grade",), in_memory=in_memory, seed=seed)
              for name, part in (("train", train), ("val", val), ("test", test))}
        bs, ebs = int(self.tr["batch_size"]), int(self.tr["eval_batch_size"])
        self.train_loader = make_loader(ds["train"], batch_size=bs, shuffle=True, seed=seed, num_workers=workers,
                                        device=self.device, world_size=options.dist.world_size,
                                        rank=options.dist.rank)
        self.val_loader = make_loader(ds["val"], batch_size=ebs, shuffle=False, num_workers=workers,
                                      device=self.device) if val else None
        self.test_loader = make_loader(ds["test"], batch_size=ebs, shuffle=False, num_workers=workers,
                                       device=self.device)
        weights_kind = str(self.tr["class_weights"])
        y_train = labels_array(train, "grade")
        if weights_kind == "inverse_frequency":
            weights = class_weights_from_labels(torch.as_tensor(y_train))
        elif weights_kind == "none":
            weights = None
        else:
            raise ConfigError(f"train.class_weights must be 'inverse_frequency' or 'none', got {weights_kind!r}")
        self.class_weights = None if weights is None else [float(w) for w in weights]
        self.loss_fn = WeightedCrossEntropyLoss(weights, reduction=str(self.tr["loss_reduction"]))  # type: ignore[arg-type]

    def step(self, model: torch.nn.Module, batch: Batch) -> StepOutput:
        net: CrossModalityNet = getattr(model, "module", model)  # DDP wraps it
        y = batch["labels"]["grade"]
        out = model({r: batch[r] for r in net.active_roles})
        loss = self.loss_fn(out.logits, y)
        return StepOutput(loss, logits=out.logits, targets=y)

    def train_stage(self, model: CrossModalityNet, log_dir: Path, epochs: int, desc: str) -> FitResult:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, str(self.tr["optimizer"]), float(self.tr["lr"]), float(self.tr["weight_decay"]))
        sched = make_scheduler(opt, str(self.tr["scheduler"]), milestones=list(self.tr["milestones"]),
                               gamma=float(self.tr["gamma"]), epochs=epochs)
        select_on = str(self.tr["select_on"])
        patience = int(self.tr["patience"]) or None
        grad_clip = float(self.tr["grad_clip"]) or None
        return fit(model, self.step, self.train_loader, self.val_loader,
                   epochs=epochs, optimizer=opt, scheduler=sched, device=self.device, amp_dtype=self.amp,
                   log_dir=log_dir, resume=self.options.resume, select_on=select_on, grad_clip=grad_clip,
                   patience=patience, run_key=f"{self.run_key}:{log_dir.name}", dist=self.options.dist,
                   progress=self.options.progress, desc=desc)

    def predict(self, model: torch.nn.Module, part: str) -> Predictions:
        loader = self.val_loader if part == "val" else self.test_loader
        assert loader is not None
        return predict_loader(model, loader, FAMILY, device=self.device, amp_dtype=self.amp)


def _measure_order(config: Mapping[str, Any], trainer: _Trainer, secondaries: Sequence[str], prior: Sequence[str],
                   repeat_dir: Path) -> tuple[list[str], dict[str, float]]:
    """Rank the secondaries by single-modality validation AUC (the paper's ordering rule).

    Each is trained as the network's only active branch (``primary=role``, stage "primary"), i.e.
    the same backbone as in the guided model, for ``stages.measure_epochs``.
    """
    scores: dict[str, float] = {}
    for role in secondaries:
        hp = {**dict(config["model"]), "primary": role,
              "secondary_order": [r for r in ROLES if r != role]}
        model = FAMILY.build(hp)
        set_stage(model, "primary")
        res = trainer.train_stage(model, repeat_dir / f"measure-{role}", int(config["stages"]["measure_epochs"]),
                                  desc=f"{repeat_dir.name} single {role}")
        scores[role] = float(res.best_score) if select_is_auc(config) else _val_auc(trainer, model)
    ranked = sorted(secondaries, key=lambda r: (-(scores[r] if math.isfinite(scores[r]) else -1.0),
                                                list(prior).index(r)))
    return ranked, scores


def select_is_auc(config: Mapping[str, Any]) -> bool:
    return str(config["train"]["select_on"]) == "val_auc"


def _val_auc(trainer: _Trainer, model: torch.nn.Module) -> float:
    if trainer.val_loader is None:
        return float("nan")
    pred = trainer.predict(model, "val")
    y, p, _ = pred.labelled("grade")
    return auc_or_nan(y, p)


def _stage_label(active: Sequence[str], primary: str) -> str:
    return "+".join([primary, *active])


def _run_split(config: Mapping[str, Any], options: RunOptions, cache: VolumeCache, cases: Sequence[Case],
               split: Any, out_dir: Path, spec: Mapping[str, Any], run_key: str) -> dict[str, Any]:
    r = int(split.index)
    repeat_dir = out_dir / f"repeat{r}"
    result_path = repeat_dir / RESULT_NAME
    if options.resume and result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("run_key") == run_key:
            return done
    seed = int(config["protocol"]["seed"]) + r
    seed_everything(seed)
    train, val, test = pick(cases, split.train), pick(cases, split.val), pick(cases, split.test)
    if not val and str(config["train"]["select_on"]) != "last":
        raise ConfigError("crossmodal: selection on validation needs split.val_fraction > 0 "
                          "(or train.select_on = 'last'); the test part is never used for selection")
    trainer = _Trainer(config, options, cache, train, val, test, run_key, seed)
    stages_cfg = config["stages"]
    primary = str(FAMILY.default_hparams()["primary"])
    secondaries = [role for role in ROLES if role != primary]
    prior = [role for role in ("FLAIR", "T2", "T1") if role in secondaries]
    order = order_secondaries(stages_cfg["secondary_order"], secondaries)
    single_scores: dict[str, float] = {}
    if order is None:
        order, single_scores = _measure_order(config, trainer, secondaries, prior, repeat_dir)
        seed_everything(seed)
    hparams = {**dict(config["model"]), "secondary_order": list(order)}
    model = FAMILY.build(hparams)
    freeze_primary = bool(stages_cfg["freeze_primary"])
    stage_records: list[dict[str, Any]] = []
    stage_states: list[dict[str, torch.Tensor]] = []
    schedule = cumulative_schedule(model)
    for i, (stage, active) in enumerate(schedule):
        set_stage(model, stage, list(active) or None, freeze_primary=freeze_primary and stage == "all")
        label = _stage_label(active, primary)
        epochs = int(stages_cfg["epochs_primary"] if i == 0 else stages_cfg["epochs_per_secondary"])
        res = trainer.train_stage(model, repeat_dir / f"stage{i}-{label.replace('+', '_')}", epochs,
                                  desc=f"repeat {r} stage {label}")
        record: dict[str, Any] = {"stage": i, "roles": [primary, *active], "label": label, "epochs": epochs,
                                  "best_epoch": res.best_epoch, "best_val_score": finite(res.best_score)}
        if bool(config["protocol"]["stage_rows"]) and i < len(schedule) - 1:
            test_pred = trainer.predict(model, "test")
            y, p, _ = test_pred.labelled("grade")
            record["test"] = {"y": y.tolist(), "p": p.tolist(), "case_ids": list(test_pred.case_ids)}
        stage_records.append(record)
        stage_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    final_kind = str(stages_cfg["final"])
    if final_kind == "last":
        final_index = len(schedule) - 1
    elif final_kind == "best_val":
        scores = [rec["best_val_score"] if rec["best_val_score"] is not None else -math.inf for rec in stage_records]
        final_index = int(np.argmax(scores))  # first best: fewer modalities on ties
    else:
        raise ConfigError(f"stages.final must be 'last' or 'best_val', got {final_kind!r}")
    stage, active = schedule[final_index]
    set_stage(model, stage, list(active) or None)
    model.load_state_dict(stage_states[final_index])

    # calibration on validation, then the test part once
    val_pred = trainer.predict(model, "val") if val else None
    calib: TemperatureFit | None = None
    if val_pred is not None:
        y_val, _, z_val = val_pred.labelled("grade")
        calib = temperature_fit(z_val, y_val)
    test_pred = trainer.predict(model, "test")
    y_test, p_raw, z_test = test_pred.labelled("grade")
    temperature = calib.temperature if calib is not None else 1.0
    p_test = apply_temperature(z_test, temperature)[:, 1]
    y_val = p_val = np.zeros(0)
    if val_pred is not None:
        y_val, _, z_val = val_pred.labelled("grade")
        p_val = apply_temperature(z_val, temperature)[:, 1] if len(y_val) else np.zeros(0)
    # The node thresholds the calibrated P(HGG): threshold chosen on validation (Youden's J), test scored at it.
    val_metrics, test_metrics, threshold = heldout_metrics(y_val, p_val, y_test, p_test, seed=seed)
    ckpt_dir = out_dir / "checkpoints"
    ckpt = ckpt_dir / f"{NAME}-r{r}.pt"
    val_auc = val_metrics.get("auc") if val_metrics else None
    sha = None
    if options.dist.is_main:
        sha = export_model(
            ckpt, model, NAME, hparams, spec, train_cases=train, val_cases=val, split=split.to_dict(),
            config=config, metrics={"val": val_metrics, "test": test_metrics,
                                    "stages": [{k: v for k, v in s.items() if k != "test"} for s in stage_records]},
            calibration=calib, protocol=NAME, row="guided", repeat=r, index=out_dir / "checkpoints.json",
            val_score=val_auc if isinstance(val_auc, float) and math.isfinite(val_auc) else None,
            extra={"secondary_order": list(order), "single_modality_val_auc": single_scores,
                   "final_stage": stage_records[final_index]["label"], "class_weights": trainer.class_weights},
            gate=gate_stats(model, FAMILY, train, val, cache, device=trainer.device,
                            batch_size=int(config["train"]["eval_batch_size"])),
            # no validation labels: nothing chose a threshold, and the node labels at 0.5
            thresholds={"grade": threshold} if len(y_val) else None,
        )
    result = {
        "run_key": run_key,
        "repeat": r,
        "secondary_order": list(order),
        "single_modality_val_auc": {k: finite(v) for k, v in single_scores.items()},
        "class_weights": trainer.class_weights,
        "stages": stage_records,
        "final_stage": stage_records[final_index]["label"],
        "temperature": temperature,
        "calibration": calib.to_dict() if calib is not None else None,
        "threshold": threshold,
        "val": val_metrics,
        "test": test_metrics,
        "test_pred": {"y": y_test.tolist(), "p": p_test.tolist(), "p_uncalibrated": p_raw.tolist(),
                      "case_ids": list(test_pred.case_ids)},
        "checkpoint": str(ckpt) if sha else None,
        "sha256": sha,
        "n": {"train": len(train), "val": len(val), "test": len(test)},
    }
    write_json(result_path, result)
    return result


def _rows(config: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> list[RowResult]:
    """Table rows: each earlier cumulative stage (when recorded), then the final guided model."""
    rows: list[RowResult] = []
    proto = config["protocol"]
    if bool(proto["stage_rows"]):
        n_stages = min(len([s for s in res["stages"] if "test" in s]) for res in results)
        for i in range(n_stages):
            labels = {res["stages"][i]["label"] for res in results}
            label = labels.pop() if len(labels) == 1 else f"stage {i}"
            added = label.split("+")[1:]
            name = "Primary only (stage 1)" if i == 0 else f"Stage 2 with +{'+'.join(added)} only"
            rows.append(RowResult(
                name, label,
                tuple((np.asarray(res["stages"][i]["test"]["y"]), np.asarray(res["stages"][i]["test"]["p"]))
                      for res in results),
                case_ids=tuple(tuple(res["stages"][i]["test"]["case_ids"]) for res in results)))
    rows.append(RowResult(
        str(proto["row_name"]), str(proto["row_data"]),
        tuple((np.asarray(res["test_pred"]["y"]), np.asarray(res["test_pred"]["p"])) for res in results),
        case_ids=tuple(tuple(res["test_pred"]["case_ids"]) for res in results)))
    return rows


def _comparisons(rows: Sequence[RowResult]) -> list[Comparison]:
    """The ablation of the cumulative stages, paired on each repeat's test part: every stage row
    against the one before it (what adding that secondary changed), the final guided model against
    the last stage row, and the final model against the primary alone (the paper's claim)."""
    if len(rows) < 2:
        return []
    pairs = [(rows[i], rows[i - 1]) for i in range(1, len(rows))]
    if len(rows) > 2:
        pairs.append((rows[-1], rows[0]))
    return [compare_rows(a, b) for a, b in pairs]


def _write_report(rows: Sequence[RowResult], out_dir: Path, caption: str, title: str) -> dict[str, str]:
    """Table 1 (Markdown + CSV), paired comparisons (Markdown, CSV, JSON), ROC/PR figure, reliability
    diagram and raw predictions."""
    rep = out_dir / "report"
    md, csv_path = table1(rows, caption=caption).write(rep, "table1")
    files = {
        "markdown": str(md),
        "csv": str(csv_path),
        "roc_pr": str(save_roc_pr_figure(rows, rep / "table1_roc_pr.png", title=title)),
        "reliability": str(save_reliability_figure(rows, rep / "table1_reliability.png")),
        "predictions": str(save_predictions(rows, rep / "table1_predictions.json")),
    }
    comps = _comparisons(rows)
    if comps:
        cmd, ccsv = comparison_table(comps).write(rep, "table1_comparisons")
        cjson = rep / "table1_comparisons.json"
        write_json(cjson, [c.as_dict() for c in comps])
        files.update(comparisons_markdown=str(cmd), comparisons_csv=str(ccsv), comparisons_json=str(cjson))
    return files


def _comparison_summary(files: Mapping[str, str]) -> dict[str, Any]:
    """The comparison table's Markdown (what the CLI prints) and numbers, for the summary."""
    if "comparisons_markdown" not in files:
        return {}
    return {"comparisons_markdown": Path(files["comparisons_markdown"]).read_text(encoding="utf-8"),
            "comparisons": json.loads(Path(files["comparisons_json"]).read_text(encoding="utf-8"))}


def run(config: Mapping[str, Any], *, data_dir: Path, out_dir: Path, options: RunOptions) -> dict[str, Any]:
    """Train and evaluate seed 001's protocol on every split; returns a JSON-able summary.

    Writes into ``out_dir``: ``run.json`` (protocol, resolved config, its hash), ``splits.json``, ``repeat<r>/`` (per-stage logs,
    ``last.pt`` for resuming, ``result.json``), ``checkpoints/crossmodal-r<r>.pt`` (+
    ``checkpoints.json``), ``report/table1.{md,csv}``, ``table1_roc_pr.png``,
    ``table1_reliability.png``, ``table1_predictions.json`` and ``summary.json``.
    """
    t0 = time.perf_counter()
    if options.num_threads:
        torch.set_num_threads(int(options.num_threads))
    if options.rows:
        unknown = [r for r in options.rows if r not in ("guided",)]
        if unknown:
            raise ConfigError(f"crossmodal has one row ('guided', plus its stage rows); got {list(options.rows)}")
    config = copy.deepcopy(dict(config))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = config_hash(config)
    # run.json: what the CLI's `evaluate` and `export` read to find the protocol of a run folder
    write_json(out_dir / "run.json", {"protocol": NAME, "config": config, "config_hash": run_key,
                                      "data_dir": str(data_dir)})
    spec = prepare_specs(config)[NAME]
    cases = read_cases(Path(data_dir), ROLES, verify=str(config["data"]["verify"]), require="grade")
    # prepared once per case and spec (reused from `python -m training prepare`); failures excluded, listed
    cases, _ = exclude_failed(cases, {NAME: spec}, Path(config["data"]["cache_dir"] or out_dir / "cache"),
                              record=out_dir / "prepare.json", progress=options.progress)
    plan = make_plan(cases, labels_array(cases, "grade").tolist(), config["split"], options.repeats)
    plan.save(out_dir / "splits.json")
    cache_dir = Path(config["data"]["cache_dir"] or out_dir / "cache")
    cache = VolumeCache(spec, cache_dir)
    cache.warm(cases, progress=options.progress)
    results = [
        _run_split(config, options, cache, cases, split, out_dir, spec, run_key)
        for split in splits_to_run(plan, options.repeats)
    ]
    rows = _rows(config, results)
    departures = list(config["protocol"]["departures"])
    caption = caption_with_departures(table1(rows).caption, departures)
    files = _write_report(rows, out_dir, caption, "Cross-modality guidance (seed 001): test parts")
    table_md = Path(files["markdown"]).read_text(encoding="utf-8")
    summary = {
        "protocol": NAME,
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "n_cases": len(cases),
        "splits": {"scheme": plan.scheme, "run": len(results), "notes": list(plan.notes)},
        "secondary_orders": [res["secondary_order"] for res in results],
        "final_stages": [res["final_stage"] for res in results],
        "temperatures": [res["temperature"] for res in results],
        "checkpoints": [res["checkpoint"] for res in results],
        "report": files,
        "caption": caption,
        "table_markdown": table_md,
        **_comparison_summary(files),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def evaluate(run_dir: Path) -> dict[str, Any]:
    """Rebuild the table and figures of a finished run from its saved predictions (no training)."""
    run_dir = Path(run_dir)
    pred_path = run_dir / "report" / "table1_predictions.json"
    if not pred_path.exists():
        raise FileNotFoundError(f"{pred_path}: no saved predictions (has this run finished?)")
    rows = load_predictions(pred_path)
    summary_path = run_dir / "summary.json"
    caption = json.loads(summary_path.read_text()).get("caption") if summary_path.exists() else None
    files = _write_report(rows, run_dir, caption or table1(rows).caption,
                          "Cross-modality guidance (seed 001): test parts")
    return {"protocol": NAME, "report": files,
            "table_markdown": Path(files["markdown"]).read_text(encoding="utf-8"), **_comparison_summary(files)}
