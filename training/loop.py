"""The generic supervised training loop every protocol uses, and batched prediction for evaluation.

Stable API (other protocols build on it; keep it small):

```python
from training.loop import (seed_everything, StepOutput, fit, FitResult, predict_loader, Predictions,
                           DistInfo, init_distributed, make_scheduler, make_optimizer)

seed_everything(0)
def step(model, batch) -> StepOutput:             # batch already on the device (training.data.to_device)
    out = model(x_from(batch))
    loss = F.cross_entropy(out.logits, batch["labels"]["grade"])
    return StepOutput(loss, logits=out.logits, targets=batch["labels"]["grade"], scalars={"ce": loss})

res = fit(model, step, train_loader, val_loader, epochs=100, optimizer=opt, scheduler=sched,
          device="cuda", amp_dtype=torch.bfloat16, log_dir=run / "template-r0", resume=True,
          select_on="val_auc")                    # best epoch on VALIDATION; model holds its weights after
res.best_epoch, res.best_score, res.history       # history = the rows of log_dir/log.csv
pred = predict_loader(res.model, test_loader, family, device="cuda")   # through family.predict (serve path)
pred.case_ids, pred.labels["grade"], pred.probabilities["grade"], pred.logits["grade"]
```

``StepOutput.logits``/``targets`` may be one tensor or a mapping task -> tensor (multi-task);
logits (B,) are one sigmoid logit, (B, 2) softmax logits; targets use -1 for a missing label.
``select_on``: ``"val_auc"`` (max, ties broken by lower validation loss; mean over tasks when
several), ``"val_loss"`` (min), ``"val_<scalar>"`` (min of a scalar the step logs, e.g.
``"val_classification"``: the task loss without an auxiliary term) or ``"last"``. Never a test metric: the loop never sees test data.

Resumability: after every epoch ``log_dir/last.pt`` holds model, optimizer, scheduler, AMP scaler,
epoch, history, the best weights so far and every RNG state; ``resume=True`` continues from it
(a finished run returns at once; a larger ``epochs`` continues it). ``run_key`` (e.g. a hash of the config) guards against resuming
a different configuration into the same folder. ``log_dir/log.csv`` is the per-epoch log.

Mixed precision: ``amp_dtype`` bf16 or fp16 runs forward/loss under ``torch.autocast``; fp16 adds a
``GradScaler``. Multi-GPU: launch with ``torchrun --nproc_per_node=N python -m training ...``; the CLI
calls :func:`init_distributed` with the environment, ``fit`` wraps the model in
``DistributedDataParallel`` and only rank 0 writes logs and checkpoints. That path cannot be
exercised on this project's CPU-only test machine; only the single-process path is tested.
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.base import ModelFamily
from training.data import Batch, to_device

__all__ = [
    "DistInfo",
    "EpochProgress",
    "FitResult",
    "Predictions",
    "ResumeError",
    "StepFn",
    "StepOutput",
    "auc_or_nan",
    "fit",
    "init_distributed",
    "make_optimizer",
    "make_scheduler",
    "predict_loader",
    "seed_everything",
]


class ResumeError(RuntimeError):
    """``last.pt`` belongs to another configuration (``run_key`` differs) or cannot be read."""


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA). ``deterministic`` also asks cuDNN and torch
    for deterministic kernels (slower; some 3D ops then raise where no deterministic one exists)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (world_size 1 = plain single process)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(env: Mapping[str, str], *, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in ``env``).

    Takes the environment as an argument (the CLI passes ``os.environ``): settings are read at the
    edge, never deep inside a module. NCCL on CUDA, gloo otherwise. Untested here (no GPUs).
    """
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", "0"))
    import torch.distributed as dist

    if not dist.is_initialized():
        be = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=be)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(world, rank, local)


@dataclass
class StepOutput:
    """What a step function returns: the loss to minimise, and (for validation metrics) the
    logits and targets of the batch, plus any scalars worth logging (means per epoch)."""

    loss: torch.Tensor
    logits: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    targets: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    scalars: Mapping[str, torch.Tensor | float] = field(default_factory=dict)


StepFn = Callable[[nn.Module, Batch], StepOutput]


@dataclass
class FitResult:
    """The trained model (holding the best validation epoch's weights unless ``select_on="last"``),
    which epoch that was and its score, and the per-epoch history."""

    model: nn.Module
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    log_dir: Path
    resumed_from: int = 0  # epochs already done when this call started


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam`` (the paper's), ``adamw`` or ``sgd`` (momentum 0.9)."""
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, *, milestones: Sequence[int] = (), gamma: float = 0.1,
                   epochs: int = 1) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``multistep`` (the paper's: x gamma at each milestone epoch), ``cosine`` or ``none``; stepped per epoch."""
    name = name.lower()
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[int(m) for m in milestones], gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(epochs)))
    if name in ("none", ""):
        return None
    raise ValueError(f"unknown scheduler {name!r}: use multistep, cosine or none")


def _positive_scores(logits: torch.Tensor) -> torch.Tensor:
    """P(class 1) ranking scores from (B,) sigmoid logits or (B, 2) softmax logits."""
    z = logits.detach().float()
    if z.ndim == 1:
        return z
    if z.ndim == 2 and z.shape[1] == 2:
        return z[:, 1] - z[:, 0]
    raise ValueError(f"val AUC needs (B,) or (B, 2) logits, got {tuple(z.shape)}")


def auc_or_nan(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of the labelled cases (y >= 0); NaN when fewer than two classes are present."""
    from sklearn.metrics import roc_auc_score

    keep = y >= 0
    y, score = y[keep], score[keep]
    if y.size == 0 or len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _as_task_map(x: torch.Tensor | Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if x is None:
        return {}
    if isinstance(x, torch.Tensor):
        return {"_": x}
    return dict(x)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _write_csv(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    names: list[str] = []
    for row in history:
        for k in row:
            if k not in names:
                names.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _score(row: Mapping[str, float], select_on: str) -> tuple[float, float]:
    """Comparable key, higher is better: (primary, tie-break)."""
    loss = row.get("val_loss", float("nan"))
    if select_on == "val_auc":
        auc = row.get("val_auc", float("nan"))
        return (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)
    if select_on == "val_loss":
        return (-loss if math.isfinite(loss) else -math.inf, 0.0)
    if select_on == "last":
        return (float(row["epoch"]), 0.0)
    if select_on not in row:  # "val_<scalar>": minimised; must be logged by the step
        logged = sorted(k for k in row if k.startswith("val_"))
        raise ValueError(f"select_on={select_on!r}: the validation step logs no such value (logged: {logged})")
    v = float(row[select_on])
    return (-v if math.isfinite(v) else -math.inf, -loss if math.isfinite(loss) else -math.inf)


def _valid_select_on(select_on: str) -> bool:
    return select_on in ("val_auc", "val_loss", "last") or (select_on.startswith("val_") and len(select_on) > 4)


def _run_epoch(
    model: nn.Module,
    step_fn: StepFn,
    loader: DataLoader,
    *,
    train: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """One pass; returns the mean loss/scalars and (when logits were given) the AUC per task."""
    model.train(train)
    sums: dict[str, float] = {}
    n_seen = 0
    logits_all: dict[str, list[torch.Tensor]] = {}
    targets_all: dict[str, list[torch.Tensor]] = {}
    grad_ctx = contextlib.nullcontext() if train else torch.no_grad()
    with grad_ctx:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            batch = to_device(batch, device)
            bsz = len(batch.get("case_id", [])) or 1
            with _autocast(device, amp_dtype):
                out = step_fn(model, batch)
            if train:
                assert optimizer is not None
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(out.loss).backward()
                    if grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    out.loss.backward()
                    if grad_clip:
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
            vals = {"loss": out.loss, **dict(out.scalars)}
            for k, v in vals.items():
                fv = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
                sums[k] = sums.get(k, 0.0) + fv * bsz
            n_seen += bsz
            for t, z in _as_task_map(out.logits).items():
                logits_all.setdefault(t, []).append(_positive_scores(z).cpu())
            for t, y in _as_task_map(out.targets).items():
                targets_all.setdefault(t, []).append(y.detach().long().cpu())
    row = {k: v / max(n_seen, 1) for k, v in sums.items()}
    aucs = []
    for t in logits_all:
        if t not in targets_all:
            continue
        a = auc_or_nan(torch.cat(targets_all[t]).numpy(), torch.cat(logits_all[t]).numpy())
        if t != "_":
            row[f"auc_{t}"] = a
        aucs.append(a)
    if aucs:
        finite = [a for a in aucs if math.isfinite(a)]
        row["auc"] = float(np.mean(finite)) if finite else float("nan")
    row["n"] = float(n_seen)
    return row


class EpochProgress:
    """One model's training progress on stderr: a tqdm bar on a terminal, plain lines elsewhere.

    Why two forms: a bar redrawn with carriage returns is what a person at a terminal wants, but in a
    log file or CI output every redraw becomes noise (or, buffered, nothing at all until the end). So
    when the stream is not a terminal each epoch is one self-contained, flushed line that names the
    model, the epoch, the training loss and the validation loss/AUC::

        fs r0: epoch 3/18 train loss 0.6123 val loss 0.5981 val AUC 0.712 best (4.1 s, 12 s in all)

    ``stream`` defaults to ``sys.stderr`` as it is when the reporter is made (so pytest's capture and
    a redirected stderr are honoured); ``bar`` None = a bar exactly when ``stream`` is a terminal.
    """

    def __init__(self, desc: str, total: int, *, initial: int = 0, stream: Any = None, bar: bool | None = None) -> None:
        self.desc, self.total = desc, int(total)
        self.stream = sys.stderr if stream is None else stream
        self.as_bar = _is_sized_terminal(self.stream) if bar is None else bool(bar)
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if self.as_bar:
            self._bar = tqdm(total=self.total, initial=initial, desc=desc, unit="epoch", file=self.stream,
                             dynamic_ncols=True, leave=True)
        elif initial:
            self._line(f"resuming at epoch {initial + 1}/{self.total}" if initial < self.total
                       else f"already trained ({initial}/{self.total} epochs)")

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.desc}: {text}\n")
        self.stream.flush()

    def epoch(self, row: Mapping[str, float], *, best: bool) -> None:
        """Report one finished epoch (a row of the history)."""
        if self._bar is not None:
            post = {"loss": _fmt(row.get("train_loss"), 4)}
            if "val_loss" in row:
                post["val_loss"] = _fmt(row.get("val_loss"), 4)
            if "val_auc" in row:
                post["val_auc"] = _fmt(row.get("val_auc"), 3)
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)
            return
        parts = [f"epoch {int(row['epoch'])}/{self.total}", f"train loss {_fmt(row.get('train_loss'), 4)}"]
        if "val_loss" in row:
            parts.append(f"val loss {_fmt(row.get('val_loss'), 4)}")
        if "val_auc" in row:
            parts.append(f"val AUC {_fmt(row.get('val_auc'), 3)}")
        if best:
            parts.append("best")
        parts.append(f"({row.get('time_s', float('nan')):.1f} s, {time.perf_counter() - self.t0:.0f} s in all)")
        self._line(" ".join(parts))

    def close(self, note: str = "") -> None:
        """End the bar; in line form, say how it ended (``note``: e.g. the best epoch) when there is news."""
        if self._bar is not None:
            self._bar.close()
        elif note:
            self._line(note)


def _is_sized_terminal(stream: Any) -> bool:
    """A terminal a bar can be drawn on: one that says it is a tty and has columns (a pseudo-terminal
    that was never given a size, as some CI runners allocate, reports 0 and tqdm then draws nothing)."""
    try:
        return bool(stream.isatty()) and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def _fmt(value: float | None, digits: int) -> str:
    """A metric for people: ``n/a`` for a missing or non-finite one (e.g. AUC of a one-class validation part)."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _ending(history: Sequence[Mapping[str, float]], epochs: int, best_epoch: int, select_on: str) -> str:
    """The closing progress line: how many epochs ran, and which one the model keeps."""
    head = f"stopped early after {len(history)}/{epochs} epochs" if len(history) < epochs else f"{epochs} epochs"
    if select_on == "last" or not 0 <= best_epoch < len(history):
        return f"{head}, keeping the last"
    row = history[best_epoch]
    auc = f", val AUC {_fmt(row.get('val_auc'), 3)}" if "val_auc" in row else ""
    return f"{head}, keeping epoch {best_epoch + 1} (best {select_on}{auc})"


def fit(
    model: nn.Module,
    step_fn: StepFn,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    log_dir: str | os.PathLike[str],
    resume: bool = True,
    select_on: str = "val_auc",
    grad_clip: float | None = None,
    patience: int | None = None,
    run_key: str = "",
    dist: DistInfo | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` for ``epochs`` with ``step_fn``; see the module docstring.

    ``patience``: stop after that many epochs without a better validation score (None: never).
    ``progress``: per-epoch progress of this model on stderr (:class:`EpochProgress`: a tqdm bar on a
    terminal, one line per epoch otherwise); ``None`` (default) shows the bar on a terminal and
    nothing otherwise, ``True`` shows the lines in logs too, ``False`` nothing. Only rank 0 reports.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not _valid_select_on(select_on):
        raise ValueError(f"select_on must be val_auc, val_loss, val_<scalar> or last, got {select_on!r}")
    if select_on != "last" and val_loader is None:
        raise ValueError(f"select_on={select_on!r} needs a validation loader (model selection never uses test data)")
    dev = torch.device(device)
    dist = dist or DistInfo()
    show = sys.stderr.isatty() if progress is None else progress
    show = show and dist.is_main
    log = Path(log_dir)
    if dist.is_main:
        log.mkdir(parents=True, exist_ok=True)
    last_path = log / "last.pt"
    model.to(dev)
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype == torch.float16 else None
    net: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    history: list[dict[str, float]] = []
    start = 0
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch, best_state = -1, None
    finished = False
    if resume and last_path.exists():
        try:
            st = torch.load(last_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
            raise ResumeError(f"{last_path}: cannot be read to resume ({type(exc).__name__}: {exc}); "
                              "delete it or run with resume off") from exc
        if st.get("run_key", "") != run_key:
            raise ResumeError(f"{last_path} belongs to another configuration (run key {st.get('run_key')!r} != "
                              f"{run_key!r}): use a new output folder or run with resume off")
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        if scheduler is not None and st.get("scheduler") is not None:
            scheduler.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler") is not None:
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        history = list(st["history"])
        start = int(st["epoch"])
        best_key = tuple(st["best_key"])  # type: ignore[assignment]
        best_epoch = int(st["best_epoch"])
        best_state = st["best_state"]
        # done = reached the epochs asked for, or stopped early; asking for more epochs continues
        finished = bool(st.get("stopped_early", False)) or start >= epochs
    resumed_from = start

    def save_last(epoch_done: int, stopped_early: bool) -> None:
        if not dist.is_main:
            return
        state = {
            "run_key": run_key,
            "epoch": epoch_done,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": _rng_state(),
            "history": history,
            "best_key": list(best_key),
            "best_epoch": best_epoch,
            "best_state": best_state,
            "stopped_early": stopped_early,
        }
        tmp = last_path.with_name(".last.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, last_path)

    reporter = EpochProgress(desc, epochs, initial=start) if show and (not finished or start) else None
    since_best = 0 if best_epoch < 0 else max(0, start - best_epoch - 1)
    for epoch in ([] if finished else range(start, epochs)):
        _set_epoch(train_loader, epoch)
        t0 = time.perf_counter()
        tr = _run_epoch(net, step_fn, train_loader, train=True, device=dev, amp_dtype=amp_dtype, optimizer=optimizer,
                        scaler=scaler, grad_clip=grad_clip, desc=f"epoch {epoch + 1}", progress=False)
        t_train = time.perf_counter() - t0
        row: dict[str, float] = {"epoch": float(epoch + 1), "lr": float(optimizer.param_groups[0]["lr"])}
        row.update({f"train_{k}": v for k, v in tr.items() if k != "n"})
        if val_loader is not None:
            va = _run_epoch(net, step_fn, val_loader, train=False, device=dev, amp_dtype=amp_dtype, optimizer=None,
                            scaler=None, grad_clip=None, desc="val", progress=False)
            row.update({f"val_{k}": v for k, v in va.items() if k != "n"})
        row["time_s"] = time.perf_counter() - t0
        row["samples_per_s"] = tr["n"] / t_train if t_train > 0 else float("nan")
        if scheduler is not None:
            scheduler.step()
        history.append(row)
        key = _score(row, select_on)
        if key > best_key or best_state is None:
            best_key, best_epoch = key, epoch
            best_state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        stop = patience is not None and since_best >= patience
        save_last(epoch + 1, stop)
        if dist.is_main:
            _write_csv(log / "log.csv", history)
        if reporter is not None:
            reporter.epoch(row, best=since_best == 0 and select_on != "last")
        if stop:
            break
    if reporter is not None:
        reporter.close(_ending(history, epochs, best_epoch, select_on) if len(history) > resumed_from else "")
    if epochs == 0 and dist.is_main and not last_path.exists():
        save_last(0, False)
    if best_state is not None and select_on != "last":
        model.load_state_dict(best_state)
    score = (best_key[0] if select_on == "val_auc" else float(len(history)) if select_on == "last"
             else -best_key[0])
    return FitResult(model=model, best_epoch=best_epoch + 1, best_score=float(score), history=history, log_dir=log,
                     resumed_from=resumed_from)


@dataclass
class Predictions:
    """Per-case outputs of :func:`predict_loader`, in loader order.

    ``probabilities[task]`` (N, C) float64 from ``family.predict``; ``logits[task]`` their log
    (log-probabilities differ from the logits by a per-case constant, which softmax ignores at any
    temperature, so temperature scaling fitted on them is the same); ``labels[task]`` (N,) int64,
    -1 where missing.
    """

    case_ids: list[str]
    labels: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]

    def positive(self, task: str = "grade") -> np.ndarray:
        """P(class 1) per case."""
        return self.probabilities[task][:, 1]

    def labelled(self, task: str = "grade") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, P(class 1), logits) of the cases that have a ``task`` label."""
        keep = self.labels[task] >= 0
        return self.labels[task][keep], self.positive(task)[keep], self.logits[task][keep]


def predict_loader(
    model: nn.Module,
    loader: DataLoader,
    family: ModelFamily,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> Predictions:
    """Run ``family.predict`` (the node's own inference path, explanations off) over a loader.

    Evaluation goes through the same function the node serves with, so a reported metric is the
    metric of what the node would compute on those volumes.
    """
    roles = list(family.input_roles)
    takes_saliency = "saliency" in inspect.signature(family.predict).parameters
    ids: list[str] = []
    probs: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        inputs: dict[str, torch.Tensor] = {r: batch[r] for r in roles}
        if "slice_mask" in batch:
            inputs["slice_mask"] = batch["slice_mask"]
        kw: dict[str, Any] = {"device": device, "autocast_dtype": amp_dtype}
        if takes_saliency:
            kw["saliency"] = False
        pred = family.predict(model, inputs, **kw)
        ids.extend(batch["case_id"])
        for t, p in pred.probabilities.items():
            probs.setdefault(t, []).append(p.detach().double().cpu().numpy())
        for t in family.tasks:
            y = batch["labels"].get(t)
            n = len(batch["case_id"])
            labels.setdefault(t, []).append(
                np.full(n, -1, dtype=np.int64) if y is None else y.detach().cpu().numpy().astype(np.int64))
    p_cat = {t: np.concatenate(v) for t, v in probs.items()}
    return Predictions(
        case_ids=ids,
        labels={t: np.concatenate(v) for t, v in labels.items()},
        probabilities=p_cat,
        logits={t: np.log(np.clip(p, 1e-45, 1.0)) for t, p in p_cat.items()},
    )

