"""Results tables (Markdown, CSV) and figures (ROC/PR, reliability) from per-repeat predictions.

Why this module exists: every protocol ends the same way, with test-set
predictions per repeat (or fold) for each compared model, and every result
must be shown the same way as seed 000's Table 1 and Fig. 2 so that our
numbers can be read next to the paper's. Reports are computed from the raw
predictions (never from numbers a protocol pre-aggregated), and those
predictions can be saved as JSON and re-rendered later without re-training.

Input: one :class:`RowResult` per table row, holding (y_true, p_positive)
arrays per repeat. Table cells are mean ± sample std (ddof=1) over repeats at
threshold 0.5 (see :mod:`training.metrics`). Figures use matplotlib's object
API on the Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.calibration import DEFAULT_BINS, Mode, reliability_data, save_reliability_diagram
from training.metrics import (
    MeanStd,
    PairedDifference,
    PairedRepeat,
    PooledAUC,
    Scheme,
    aggregate,
    binary_metrics,
    check_binary,
    drop_missing,
    mean_curve,
    mean_std,
    pair_predictions,
    paired_auc_difference,
    pooled_auc_ci,
    smallest_detectable_difference,
)

PREDICTIONS_FORMAT = "training.predictions/1"

# Seed 000's Table 1 columns, then specificity and F1 as extra columns.
TABLE1_COLUMNS: tuple[str, ...] = (
    "Type", "Data", "AUC", "PRC", "Accuracy", "Precision", "Sensitivity", "Specificity", "F1",
)
_METRIC_OF_COLUMN: dict[str, str] = {
    "AUC": "auc",
    "PRC": "prc",
    "Accuracy": "accuracy",
    "Precision": "precision",
    "Sensitivity": "sensitivity",
    "Specificity": "specificity",
    "F1": "f1",
}
# Display names of the tasks of models.base.TASKS, in the order MMDLM reports them.
TASK_TITLES: dict[str, str] = {"grade": "Grade", "idh": "IDH", "1p19q": "1p/19q"}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, eq=False)
class RowResult:
    """One compared model: its table labels and its test predictions per repeat.

    ``name`` is the Type column ("Adaptive PromptNet"), ``data`` the Data
    column ("NE-MRI"); ``repeats[r]`` is ``(y_true, p_positive)`` of repeat
    r's test part; ``case_ids[r]`` (optional) names those cases, so a saved
    prediction file can be traced back to patients.
    """

    name: str
    data: str
    repeats: tuple[tuple[np.ndarray, np.ndarray], ...]
    case_ids: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a result row needs a name")
        if not self.repeats:
            raise ValueError(f"row {self.name!r} has no repeats")
        checked = tuple(check_binary(y, p) for y, p in self.repeats)
        object.__setattr__(self, "repeats", checked)
        if self.case_ids is not None:
            ids = tuple(tuple(str(c) for c in r) for r in self.case_ids)
            if len(ids) != len(checked) or any(len(i) != len(y) for i, (y, _) in zip(ids, checked)):
                raise ValueError(f"row {self.name!r}: case_ids must match the repeats in number and length")
            object.__setattr__(self, "case_ids", ids)

    @property
    def label(self) -> str:
        """The legend label of the row in figures."""
        return f"{self.name} ({self.data})" if self.data else self.name

    def summary(self, threshold: float = 0.5) -> dict[str, MeanStd]:
        """Each metric's mean ± std over the repeats."""
        return aggregate([binary_metrics(y, p, threshold) for y, p in self.repeats])

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All repeats' predictions concatenated (for a pooled reliability diagram)."""
        return (
            np.concatenate([y for y, _ in self.repeats]),
            np.concatenate([p for _, p in self.repeats]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data": self.data,
            "repeats": [{"y_true": y.tolist(), "p": p.tolist()} for y, p in self.repeats],
            "case_ids": None if self.case_ids is None else [list(c) for c in self.case_ids],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RowResult:
        try:
            return cls(
                name=str(d["name"]),
                data=str(d["data"]),
                repeats=tuple((np.asarray(r["y_true"]), np.asarray(r["p"], dtype=np.float64)) for r in d["repeats"]),
                case_ids=None if d.get("case_ids") is None else tuple(tuple(c) for c in d["case_ids"]),
            )
        except KeyError as exc:
            raise ValueError(f"result row is missing the field {exc.args[0]!r}") from None


def save_predictions(rows: Sequence[RowResult], path: str | Path) -> Path:
    """Write every row's per-repeat predictions as JSON, the raw material of every report."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"format": PREDICTIONS_FORMAT, "rows": [r.to_dict() for r in rows]}) + "\n", encoding="utf-8"
    )
    return out


def load_predictions(path: str | Path) -> list[RowResult]:
    """Read predictions saved with :func:`save_predictions`."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read predictions {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != PREDICTIONS_FORMAT:
        raise ValueError(f"{p} is not a predictions file (format {PREDICTIONS_FORMAT!r})")
    return [RowResult.from_dict(r) for r in data["rows"]]


# --------------------------------------------------------------------------- tables


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class ResultsTable:
    """A rendered table: formatted cells for people, the numbers behind them for machines.

    ``cells[i]`` are row i's strings in ``columns`` order; ``numbers[i]`` maps
    each metric column to its :class:`MeanStd`.
    """

    columns: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]
    numbers: tuple[Mapping[str, MeanStd], ...]
    caption: str = ""
    metric_columns: tuple[str, ...] = field(default=())

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table with its caption underneath."""
        lines = [
            "| " + " | ".join(_md_cell(c) for c in self.columns) + " |",
            "|" + "|".join("---" if c not in self.metric_columns else "---:" for c in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in self.cells]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV text: the formatted columns, then ``<metric>_mean``, ``_std``, ``_n`` per metric column."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        extra = [f"{c}_{part}" for c in self.metric_columns for part in ("mean", "std", "n")]
        w.writerow(list(self.columns) + extra)
        for row, nums in zip(self.cells, self.numbers):
            values: list[str] = []
            for c in self.metric_columns:
                ms = nums[c]
                values += [_num(ms.mean), _num(ms.std), str(ms.n)]
            w.writerow(list(row) + values)
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.csv`` (UTF-8, for the "±"); returns both paths."""
        return write_md_csv(self.to_markdown(), self.to_csv(), out_dir, stem)


def write_md_csv(markdown: str, csv_text: str, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Every table of a report is written the same way: ``<stem>.md`` and ``<stem>.csv`` in UTF-8."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    md, cs = d / f"{stem}.md", d / f"{stem}.csv"
    md.write_text(markdown, encoding="utf-8")
    cs.write_text(csv_text, encoding="utf-8")
    return md, cs


def _num(x: float) -> str:
    return "" if math.isnan(x) else repr(float(x))


def _repeat_words(counts: set[int]) -> str:
    if len(counts) == 1:
        n = next(iter(counts))
        return f"{n} repeat{'s' if n != 1 else ''}"
    return f"{min(counts)}-{max(counts)} repeats"


def table1(rows: Sequence[RowResult], *, threshold: float = 0.5, digits: int = 4, caption: str | None = None) -> ResultsTable:
    """Seed 000's Table 1 (Type, Data, AUC, PRC, Accuracy, Precision, Sensitivity) plus Specificity and F1."""
    if not rows:
        raise ValueError("no rows for the table")
    metric_cols = TABLE1_COLUMNS[2:]
    cells: list[tuple[str, ...]] = []
    numbers: list[dict[str, MeanStd]] = []
    for row in rows:
        s = row.summary(threshold)
        nums = {c: s[_METRIC_OF_COLUMN[c]] for c in metric_cols}
        numbers.append(nums)
        cells.append((row.name, row.data) + tuple(nums[c].format(digits) for c in metric_cols))
    if caption is None:
        undefined = sorted({c for nums in numbers for c, ms in nums.items() if ms.n_undefined})
        caption = (
            f"Mean ± sample standard deviation (ddof=1) over {_repeat_words({len(r.repeats) for r in rows})}; "
            f"threshold {threshold:g} on P(positive); PRC = average precision. "
            "FS-MRI: all four sequences; NE-MRI: T1, T2, FLAIR (no contrast)."
        )
        if undefined:
            caption += f" Some repeats left out where undefined (one class only): {', '.join(undefined)}."
    return ResultsTable(TABLE1_COLUMNS, tuple(cells), tuple(numbers), caption, metric_cols)


@dataclass(frozen=True)
class MultiTaskRow:
    """One multi-task model (MMDLM) with, per task, (y_true, p_positive) per repeat or fold.

    ``y_true`` may hold ``None``/NaN for cases without that label (IDH and
    1p/19q are often unknown); they are left out of that task's metrics.
    """

    name: str
    data: str
    tasks: Mapping[str, Sequence[tuple[Any, Any]]]


def multitask_table(
    rows: Sequence[MultiTaskRow],
    *,
    tasks: Sequence[str] = ("grade", "idh", "1p19q"),
    metric: str = "auc",
    digits: int = 4,
    caption: str | None = None,
) -> ResultsTable:
    """MMDLM's summary: one column per task with the metric's mean ± std (AUC by default)."""
    if not rows:
        raise ValueError("no rows for the table")
    metric_title = {"auc": "AUC", "prc": "PRC"}.get(metric, metric.capitalize())
    metric_cols = tuple(f"{TASK_TITLES.get(t, t)} {metric_title}" for t in tasks)
    cells: list[tuple[str, ...]] = []
    numbers: list[dict[str, MeanStd]] = []
    dropped_total = 0
    for row in rows:
        unknown = set(row.tasks) - set(tasks)
        if unknown:
            raise ValueError(f"row {row.name!r} has tasks {sorted(unknown)} not among the table's {list(tasks)}")
        nums: dict[str, MeanStd] = {}
        for task, col in zip(tasks, metric_cols):
            values: list[float] = []
            for y_raw, p_raw in row.tasks.get(task, ()):
                y, p, dropped = drop_missing(y_raw, p_raw)
                dropped_total += dropped
                values.append(binary_metrics(y, p).value(metric) if len(y) else math.nan)
            nums[col] = mean_std(values) if values else MeanStd(math.nan, math.nan, 0, 0)
        numbers.append(nums)
        cells.append((row.name, row.data) + tuple(nums[c].format(digits) for c in metric_cols))
    if caption is None:
        caption = f"{metric_title} per task, mean ± sample standard deviation (ddof=1) over repeats/folds."
        if dropped_total:
            caption += f" Cases without a label for a task are left out of that task ({dropped_total} case-evaluations)."
    return ResultsTable(("Model", "Data") + metric_cols, tuple(cells), tuple(numbers), caption, metric_cols)


# --------------------------------------------------------------------------- figures


def save_roc_pr_figure(
    rows: Sequence[RowResult], path: str | Path, *, grid_points: int = 101, title: str | None = None
) -> Path:
    """ROC and PR curves of all rows in one two-panel PNG (seed 000's Fig. 2, plus PR).

    Each row is its mean curve over repeats on a common FPR (ROC) or recall
    (PR, interpolated precision) grid, with a ±1 sample-std band when there
    is more than one repeat. Legends carry the AUC / PRC mean ± std of the
    table, so figure and table cannot disagree.
    """
    if not rows:
        raise ValueError("no rows to plot")
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    y_all = np.concatenate([row.pooled()[0] for row in rows])
    prevalence = float(y_all.mean())
    ax_pr.axhline(prevalence, linestyle="--", color="0.6", linewidth=1, label=f"chance (prevalence {prevalence:.2f})")
    for i, row in enumerate(rows):
        color = f"C{i}"
        s = row.summary()
        for ax, kind, metric, word in ((ax_roc, "roc", "auc", "AUC"), (ax_pr, "pr", "prc", "PRC")):
            curve = mean_curve(row.repeats, kind, grid_points)  # type: ignore[arg-type]
            if curve.n == 0:
                continue
            x, y_mean, y_std = curve.x, curve.y_mean, curve.y_std
            if kind == "roc":
                # Draw the vertical step at FPR 0 from the origin, as an ROC curve starts there.
                x, y_mean, y_std = np.r_[0.0, x], np.r_[0.0, y_mean], np.r_[0.0, y_std]
            ax.plot(x, y_mean, color=color, linewidth=1.8, label=f"{row.label}: {word} {s[metric].format(3)}")
            if curve.n > 1:
                ax.fill_between(
                    x,
                    np.clip(y_mean - y_std, 0, 1),
                    np.clip(y_mean + y_std, 0, 1),
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
    n_rep = {len(r.repeats) for r in rows}
    band = " (mean ± 1 std)" if max(n_rep) > 1 else ""
    ax_roc.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
               title=f"ROC{band}", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="Recall (sensitivity)", ylabel="Precision", title=f"Precision-recall{band}",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax, loc in ((ax_roc, "lower right"), (ax_pr, "lower left")):
        ax.legend(loc=loc, fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def save_reliability_figure(
    rows: Sequence[RowResult],
    path: str | Path,
    *,
    n_bins: int = DEFAULT_BINS,
    mode: Mode = "top-label",
    title: str = "Reliability (test predictions pooled over repeats)",
) -> Path:
    """One reliability diagram with every row, each row's repeats pooled."""
    datasets = {row.label: reliability_data(*row.pooled(), n_bins=n_bins, mode=mode) for row in rows}
    return save_reliability_diagram(datasets, path, title=title)


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put each artefact."""

    markdown: Path
    csv: Path
    roc_pr: Path
    reliability: Path
    predictions: Path


def write_report(
    rows: Sequence[RowResult],
    out_dir: str | Path,
    *,
    stem: str = "table1",
    threshold: float = 0.5,
    title: str | None = None,
) -> ReportFiles:
    """Everything for a binary comparison: table (MD, CSV), ROC/PR PNG, reliability PNG, predictions JSON."""
    d = Path(out_dir)
    md, cs = table1(rows, threshold=threshold).write(d, stem)
    return ReportFiles(
        markdown=md,
        csv=cs,
        roc_pr=save_roc_pr_figure(rows, d / f"{stem}_roc_pr.png", title=title),
        reliability=save_reliability_figure(rows, d / f"{stem}_reliability.png"),
        predictions=save_predictions(rows, d / f"{stem}_predictions.json"),
    )


# --------------------------------------------------------------------------- paired comparisons


@dataclass(frozen=True)
class Comparison:
    """One line of a comparison table: the paired AUC difference ``name_a − name_b``."""

    name_a: str
    name_b: str
    result: PairedDifference

    @property
    def label(self) -> str:
        return f"{self.name_a} − {self.name_b}"

    def as_dict(self) -> dict[str, Any]:
        return {"comparison": self.label, "a": self.name_a, "b": self.name_b, **self.result.as_dict()}


def paired_repeats(a: RowResult, b: RowResult, repeat_ids: Sequence[int] | None = None) -> list[PairedRepeat]:
    """Rows A and B repeat by repeat (same position = same split), aligned case by case by their ids.

    Why by position: a :class:`RowResult` lists its repeats in order; rows of one run that finished
    different numbers of repeats cannot be paired this way (pair the common repeats' records
    instead, as the PromptNet protocol does).
    """
    if len(a.repeats) != len(b.repeats):
        raise ValueError(f"rows {a.name!r} and {b.name!r} have {len(a.repeats)} and {len(b.repeats)} repeats: "
                         "pair only the repeats both finished")
    labels = list(repeat_ids) if repeat_ids is not None else list(range(len(a.repeats)))
    out = []
    for i, k in enumerate(labels):
        ids_a = a.case_ids[i] if a.case_ids is not None else None
        ids_b = b.case_ids[i] if b.case_ids is not None else None
        out.append(pair_predictions(ids_a, *a.repeats[i], ids_b, *b.repeats[i], repeat=k))
    return out


def compare_rows(
    a: RowResult,
    b: RowResult,
    *,
    repeat_ids: Sequence[int] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    scheme: Scheme = "shared",
) -> Comparison:
    """The paired AUC difference of two rows tested on the same cases (see ``paired_auc_difference``)."""
    result = paired_auc_difference(paired_repeats(a, b, repeat_ids), n_boot=n_boot, level=level, seed=seed,
                                   scheme=scheme)
    return Comparison(a.name, b.name, result)


@dataclass(frozen=True)
class StatsTable:
    """A rendered statistics table: Markdown (one or more tables, then the caption) and a flat CSV."""

    markdown_tables: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[bool, ...]], ...]
    csv_columns: tuple[str, ...]
    csv_rows: tuple[tuple[str, ...], ...]
    caption: str = ""

    def to_markdown(self) -> str:
        parts: list[str] = []
        for columns, cells, numeric in self.markdown_tables:
            lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |",
                     "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in cells]
            parts.append("\n".join(lines))
        if self.caption:
            parts.append(self.caption)
        return "\n\n".join(parts) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.csv_columns)
        w.writerows(self.csv_rows)
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.md`` and ``<stem>.csv`` (UTF-8); returns both paths."""
        return write_md_csv(self.to_markdown(), self.to_csv(), out_dir, stem)


def _pct(level: float) -> str:
    return f"{level * 100:g} %"


def _signed(x: float, digits: int) -> str:
    return "–" if math.isnan(x) else f"{x:+.{digits}f}"


def _p_text(p: float) -> str:
    """Three decimals; the bootstrap's floor 2/(n_boot+1) is below 0.001 at 2000 resamples."""
    if math.isnan(p):
        return "–"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _ci_text(low: float, high: float, digits: int, signed: bool = True) -> str:
    if math.isnan(low) or math.isnan(high):
        return "–"
    fmt = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f"[{fmt(low)}, {fmt(high)}]"


def _span(values: Sequence[float], digits: int) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


def _counts_text(values: Sequence[int]) -> str:
    s = sorted(set(values))
    if not s:
        return "0"
    return str(s[0]) if len(s) == 1 else f"{s[0]}-{s[-1]}"


def design_line(results: Sequence[PairedDifference], *, digits: int = 3, negative_name: str = "LGG") -> str:
    """What differences the design can see: 1.96·SE (and 2.80·SE for 80 % power), with the test sizes."""
    usable = [r for r in results if r.repeats and r.se > 0]  # SE 0: identical predictions, nothing to resolve
    if not usable:
        return ("No comparison had two models that differ on test parts with two cases of each class: "
                "the design's resolution cannot be estimated.")
    level = usable[0].level
    z = smallest_detectable_difference(1.0, level=level)
    z80 = smallest_detectable_difference(1.0, level=level, power=0.8)
    n_rep = _counts_text([len(r.repeats) for r in usable])
    return (
        f"Smallest difference this design can tell from 0 ({z:.2f} × bootstrap SE of the pooled difference): "
        f"{_span([r.smallest_detectable() for r in usable], digits)} AUC; detected with 80 % power: "
        f"{_span([r.smallest_detectable(0.8) for r in usable], digits)} ({z80:.2f} × SE). "
        f"Test parts: {_counts_text([n for r in usable for n in r.n_cases])} cases "
        f"({_counts_text([n for r in usable for n in r.n_negative])} {negative_name}) per repeat, "
        f"{n_rep} repeat{'s' if n_rep != '1' else ''}; "
        f"{_counts_text([r.n_distinct for r in usable])} distinct test cases "
        f"({_counts_text([r.n_distinct_negative for r in usable])} {negative_name}) in all."
    )


def _method_caption(results: Sequence[PairedDifference]) -> str:
    r0 = next((r for r in results if r.repeats), results[0] if results else None)
    n_boot = r0.n_boot if r0 else 2000
    level = r0.level if r0 else 0.95
    scheme = r0.scheme if r0 else "shared"
    how = ("one weight per case, shared by both models and by every repeat that tests the case, so a case "
           "tested in several repeats is not counted as new evidence each time" if scheme == "shared" else
           "each repeat's test cases resampled within each class, both models on the same resample")
    return (
        f"Paired difference of test AUC (A − B) per repeat, on the same test cases; Mean = mean over repeats. "
        f"{_pct(level)} CI (percentile) and two-sided p from a paired bootstrap over test cases "
        f"({n_boot} resamples; {how}). Verdict: \"higher\"/\"lower\" when the CI excludes 0, "
        f"\"not distinguishable\" when it holds 0. Detectable = {smallest_detectable_difference(1.0, level=level):.2f} "
        f"× bootstrap SE. The interval covers test-case sampling only, not training noise (the per-repeat "
        f"columns show that); no correction for multiple comparisons. DeLong's paired p per repeat is in the CSV."
    )


def _notes_caption(results: Sequence[PairedDifference]) -> str:
    notes = sorted({n for r in results for n in r.notes})
    return (" Left out: " + "; ".join(notes) + ".") if notes else ""


_CSV_COLUMNS: tuple[str, ...] = (
    "kind", "name", "a", "b", "auc_mean", "auc_std", "estimate", "ci_low", "ci_high", "level", "p_value", "se",
    "smallest_detectable", "detectable_80_power", "verdict", "n_boot", "scheme", "repeats", "n_cases",
    "n_negative", "n_distinct", "n_distinct_negative",
)


def _repeat_union(results: Sequence[PairedDifference | PooledAUC]) -> list[int]:
    return sorted({k for r in results for k in r.repeats})


def _csv_columns(repeats: Sequence[int]) -> tuple[str, ...]:
    return _CSV_COLUMNS + tuple(f"r{k}" for k in repeats) + tuple(f"delong_p_r{k}" for k in repeats)


def _joined(values: Sequence[Any]) -> str:
    return ";".join(str(v) for v in values)


def _comparison_csv_row(c: Comparison, repeats: Sequence[int]) -> tuple[str, ...]:
    r = c.result
    per = dict(zip(r.repeats, r.per_repeat))
    dl = dict(zip(r.repeats, r.delong))
    return (
        "difference", c.label, c.name_a, c.name_b, "", "", _num(r.estimate), _num(r.low), _num(r.high),
        repr(r.level), _num(r.p_value), _num(r.se), _num(r.smallest_detectable()), _num(r.smallest_detectable(0.8)),
        r.verdict, str(r.n_boot), r.scheme, _joined(r.repeats), _joined(r.n_cases), _joined(r.n_negative),
        str(r.n_distinct), str(r.n_distinct_negative),
    ) + tuple(_num(per[k]) if k in per else "" for k in repeats) + tuple(
        _num(dl[k].p_value) if k in dl else "" for k in repeats)


def _comparison_cells(comparisons: Sequence[Comparison], repeats: Sequence[int], digits: int) -> tuple[
        tuple[str, ...], tuple[tuple[str, ...], ...], tuple[bool, ...]]:
    level = comparisons[0].result.level if comparisons else 0.95
    columns = ("Comparison (A − B)", *(f"r{k}" for k in repeats), "Mean", f"{_pct(level)} CI", "p", "Detectable",
               "Verdict")
    cells = []
    for c in comparisons:
        r = c.result
        per = dict(zip(r.repeats, r.per_repeat))
        cells.append((c.label, *(_signed(per[k], digits) if k in per else "–" for k in repeats),
                      _signed(r.estimate, digits), _ci_text(r.low, r.high, digits), _p_text(r.p_value),
                      "–" if math.isnan(r.se) or r.se == 0 else f"{r.smallest_detectable():.{digits}f}", r.verdict))
    numeric = (False, *(True for _ in repeats), True, True, True, True, False)
    return columns, tuple(cells), numeric


def comparison_table(comparisons: Sequence[Comparison], *, digits: int = 3, caption: str | None = None,
                     negative_name: str = "LGG") -> StatsTable:
    """Paired AUC differences with per-repeat values, mean, CI, p, detectable difference and verdict.

    Markdown: one table, then the method, the design line (:func:`design_line`) and any repeats left
    out. CSV: one line per comparison (``kind`` = difference) with the numbers unrounded, per-repeat
    differences ``r<k>`` and DeLong's per-repeat p ``delong_p_r<k>``.
    """
    if not comparisons:
        raise ValueError("no comparisons for the table")
    results = [c.result for c in comparisons]
    repeats = _repeat_union(results)
    if caption is None:
        caption = (_method_caption(results) + _notes_caption(results) + "\n\n"
                   + design_line(results, digits=digits, negative_name=negative_name))
    return StatsTable(
        (_comparison_cells(comparisons, repeats, digits),),
        _csv_columns(repeats),
        tuple(_comparison_csv_row(c, repeats) for c in comparisons),
        caption,
    )


@dataclass(frozen=True)
class AblationRow:
    """One setting of an ablation (Table 2): its AUC over repeats and the pooled interval."""

    setting: str
    name: str
    auc: MeanStd
    pooled: PooledAUC


def ablation_row(setting: str, row: RowResult, *, repeat_ids: Sequence[int] | None = None, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0, scheme: Scheme = "shared") -> AblationRow:
    """A row's AUC mean ± sd over repeats and its pooled AUC with a bootstrap CI over test cases."""
    ids = row.case_ids if row.case_ids is not None else tuple(None for _ in row.repeats)
    pooled = pooled_auc_ci([(i, y, p) for i, (y, p) in zip(ids, row.repeats)], repeat_ids=repeat_ids,
                           n_boot=n_boot, level=level, seed=seed, scheme=scheme)
    return AblationRow(setting, row.name, row.summary()["auc"], pooled)


def ablation_table(rows: Sequence[AblationRow], comparisons: Sequence[Comparison], *, digits: int = 3,
                   caption: str | None = None, negative_name: str = "LGG") -> StatsTable:
    """Table 2: each setting's AUC (mean ± sd, pooled AUC [CI]) and the paired differences between them."""
    if not rows:
        raise ValueError("no rows for the ablation table")
    level = rows[0].pooled.level
    tables = [(("Setting", "Model", "AUC (mean ± sd)", f"Pooled AUC [{_pct(level)} CI]"),
               tuple((r.setting, r.name, r.auc.format(4), r.pooled.format(digits)) for r in rows),
               (False, False, True, True))]
    results = [c.result for c in comparisons]
    repeats = _repeat_union([*results, *(r.pooled for r in rows)])
    if comparisons:
        tables.append(_comparison_cells(comparisons, repeats, digits))
    if caption is None:
        caption = (f"AUC: mean ± sample std (ddof=1) over repeats; pooled AUC: the mean over repeats with a "
                   f"{_pct(level)} bootstrap CI over test cases (the same resampling as the differences).")
        if comparisons:
            caption += " " + _method_caption(results)
        caption += _notes_caption(results) + "".join(
            f" {r.setting}: " + "; ".join(r.pooled.notes) + "." for r in rows if r.pooled.notes)
        if comparisons:
            caption += "\n\n" + design_line(results, digits=digits, negative_name=negative_name)
    csv_rows = []
    for r in rows:
        per = dict(zip(r.pooled.repeats, r.pooled.per_repeat))
        csv_rows.append((
            "row", r.setting, r.name, "", _num(r.auc.mean), _num(r.auc.std), _num(r.pooled.estimate),
            _num(r.pooled.low), _num(r.pooled.high), repr(r.pooled.level), "", _num(r.pooled.se), "", "", "",
            str(r.pooled.n_boot), r.pooled.scheme, _joined(r.pooled.repeats), "", "", "", "",
        ) + tuple(_num(per[k]) if k in per else "" for k in repeats) + tuple("" for _ in repeats))
    csv_rows += [_comparison_csv_row(c, repeats) for c in comparisons]
    return StatsTable(tuple(tables), _csv_columns(repeats), tuple(csv_rows), caption)
