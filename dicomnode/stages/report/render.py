"""Human views of a written report: plain text for a terminal, HTML, and the summary image as PNG.

These read the files as written (not the in-memory objects), so what an
operator sees is what was sent to the PACS.

The SR is one TID 1501 group per (model, task), so a model's path, inputs,
training data and key slices sit in each of its groups; read in tree order
(as dcmtk's ``dsrdump``/``dsr2html`` show it) a three-task MMDLM says them
three times and the disclaimer comes last. These views regroup the tree by
model (the groups' algorithm identification) and say each thing once, the
disclaimer and the synthetic-training warning first, models by their plain
names.
"""
from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from dicomnode.handoff import family_title

from dicomnode.stages.report.content import NODE_ALGORITHM_NAME

# concept meanings as the SR writes them (codes.py)
_DISCLAIMER, _CANNOT, _TRAINING = "Research use disclaimer", "Cannot grade", "Training data"
_DECLINED = "Model declined by the input gate"
#: a model's fields in the order a reader wants them, said once per model even when each task's group repeats them
_MODEL_FIELDS = ("Model declined by the input gate", "Input gate finding", "Operating threshold",
                 "Model path and reason", "Inputs used",
                 "Missing inputs", "Key slice", "Training data", "Validation metrics", "Quality flag",
                 "Input gate loosened", "Cannot grade")
#: in a group, not what the reader reads (identifiers and the algorithm's identification are shown in the heading)
_SKIP = {"Tracking Identifier", "Tracking Unique Identifier", "Finding", "Finding Site", "Algorithm Name",
         "Algorithm Version", "Algorithm Manufacturer", "Algorithm Parameters", "Probability",
         "Class probabilities", "Source of Measurement"}
#: said per task (label counts, metrics of that task): once when every task's group says the same
_PER_TASK = {"Training data", "Validation metrics"}


def _name(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else "(unnamed)"


def _num(item: Dataset) -> tuple[str, str]:
    """(value, unit) of a NUM item; the unit is "" for UCUM "1" (no units)."""
    mv = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else None
    if mv is None:
        return "(no value)", ""
    unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
    return str(mv.NumericValue), "" if unit == "1" else unit


def _value(item: Dataset) -> str:
    vt = item.ValueType
    if vt == "TEXT":
        return str(item.TextValue)
    if vt == "CODE":
        code = item.ConceptCodeSequence[0]
        return f"{code.CodeMeaning} ({code.CodingSchemeDesignator} {code.CodeValue})"
    if vt == "NUM":
        value, unit = _num(item)
        return value + (f" {unit}" if unit else "")
    if vt == "UIDREF":
        return str(item.UID)
    if vt in {"IMAGE", "COMPOSITE"}:
        ref = item.ReferencedSOPSequence[0]
        frames = ref.get("ReferencedFrameNumber")
        return f"image {ref.ReferencedSOPInstanceUID}" + (f" frame {frames}" if frames else "")
    return ""


def _walk(items: list[Dataset], depth: int = 0) -> Iterator[tuple[int, Dataset]]:
    for item in items:
        yield depth, item
        yield from _walk(list(item.get("ContentSequence", [])), depth + 1)


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


@dataclass
class _Finding:
    task: str  # "grade", "IDH", "1p/19q"
    finding: str
    probability: str | None
    classes: str | None


@dataclass
class _Model:
    """Everything the SR says about one model (one algorithm identification), each thing once."""

    family: str  # the code name ("mmdlm"); "" for the node itself (no model ran)
    version: str  # the algorithm version: "<node>; checkpoint <file> sha256:<hash>"
    findings: list[_Finding] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)
    measurements: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, unit)
    per_task: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # name -> (task, value)
    declined: bool = False

    @property
    def title(self) -> str:
        if not self.family:
            return "No model graded this study"
        return family_title(self.family) + (": not graded (declined by the input gate)" if self.declined else "")

    def add(self, name: str, value: str) -> None:
        values = self.fields.setdefault(name, [])
        if value not in values:
            values.append(value)

    def settle(self) -> None:
        """Task-specific items (training label counts, metrics) into ``fields``: once if every task says the same."""
        for name, pairs in self.per_task.items():
            distinct = list(dict.fromkeys(v for _, v in pairs))
            for task, value in pairs if len(distinct) > 1 else pairs[:1]:
                self.add(name, f"{task}: {value}" if len(distinct) > 1 and task else value)


@dataclass
class _Report:
    """An SR read back for people: its header line, the version-level items, the models."""

    heading: str
    disclaimer: list[str]
    warnings: list[str]  # "Trained on SYNTHETIC data ..."
    cannot_grade: list[str]
    models: list[_Model]
    evaluations: list[tuple[str, str]]  # the rest of the Qualitative Evaluations, in order
    predecessors: list[str]
    tree: list[tuple[int, Dataset]]


def _read(sr_path: Path | str) -> _Report:
    ds = pydicom.dcmread(sr_path)
    root = _children(ds)
    evaluations: list[Dataset] = []
    groups: list[Dataset] = []
    for _, item in _walk(root):
        if item.ValueType == "CONTAINER" and _name(item) == "Measurement Group":
            groups.append(item)
        if item.ValueType == "CONTAINER" and _name(item) == "Qualitative Evaluations":
            evaluations = _children(item)
    models: dict[tuple[str, str], _Model] = {}
    for g in groups:
        kids = _children(g)
        first = {(_name(k)): _value(k) for k in reversed(kids)}  # the first value of each concept
        algorithm = first.get("Algorithm Name", NODE_ALGORITHM_NAME)
        family = algorithm.split(": ", 1)[1] if algorithm.startswith(NODE_ALGORITHM_NAME + ": ") else ""
        key = (family, first.get("Algorithm Version", ""))
        model = models.setdefault(key, _Model(family, key[1]))
        ident = first.get("Tracking Identifier", "")
        task = ident[len(family) + 1:] if family and ident.startswith(family + " ") else ident
        if _DECLINED in first:
            model.declined = True
        if "Finding" in first:
            classes = [_value(k) for k in kids if _name(k) == "Class probabilities"]
            model.findings.append(_Finding(task, first["Finding"], first.get("Probability"),
                                           classes[0] if classes else None))
        for k in kids:
            name = _name(k)
            if name in _SKIP:
                continue
            if k.ValueType == "NUM":
                value, unit = _num(k)
                if (name, value, unit) not in model.measurements:
                    model.measurements.append((name, value, unit))
            elif name in _PER_TASK:
                model.per_task.setdefault(name, []).append((task, _value(k)))
            elif k.ValueType == "TEXT":
                model.add(name, _value(k))
    for model in models.values():
        model.settle()
    disclaimer, warnings, cannot, rest = [], [], [], []
    for item in evaluations:
        name, value = _name(item), _value(item)
        if name == _DISCLAIMER:
            disclaimer.append(value)
        elif name == _TRAINING:
            warnings.append(value)
        elif name == _CANNOT:
            cannot.append(value)
        else:
            rest.append((name, value))
    predecessors = [sop.ReferencedSOPInstanceUID for study in ds.get("PredecessorDocumentsSequence", [])
                    for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence]
    heading = (f"{ds.get('SeriesDescription', 'Structured report')} - {ds.get('ContentDate', '')} "
               f"{str(ds.get('ContentTime', ''))[:6]}")
    # the cannot-grade group (the node as algorithm) repeats what the version level says: the reason, the
    # inputs, each family's decision and the flags; shown once, there
    shown = [m for m in models.values() if m.family or m.findings or m.measurements or not evaluations]
    return _Report(heading, disclaimer, warnings, cannot, shown, rest, [str(p) for p in predecessors],
                   list(_walk(root)))


#: said by a model's group and again, word for word, at the version level: said once, at the version level
_SAID_ONCE = ("Inputs used", "Missing inputs", "Cannot grade")


def _model_fields(r: _Report, m: _Model) -> list[tuple[str, list[str]]]:
    """A model's fields in reading order, without what the version level says in the same words."""
    said: dict[str, set[str]] = {}
    for name, value in [*r.evaluations, *((_CANNOT, v) for v in r.cannot_grade)]:
        said.setdefault(name, set()).add(value)
    names = [*_MODEL_FIELDS, *(n for n in m.fields if n not in _MODEL_FIELDS)]
    out = []
    for name in names:
        values = [v for v in m.fields.get(name, []) if not (name in _SAID_ONCE and v in said.get(name, set()))]
        if values:
            out.append((name, _split(name, values)))
    return out


_NEXT_SERIES = re.compile(r"; (?=(?:T1|T1CE|T2|FLAIR): series)")


def _split(name: str, values: list[str]) -> list[str]:
    """"Inputs used" is one TEXT item listing every series ("T1: series 2, ...; T2: ..."): one entry per series."""
    if name != "Inputs used":
        return values
    return [part for v in values for part in _NEXT_SERIES.split(v)]


def _version_fields(r: _Report) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for name, value in r.evaluations:
        grouped.setdefault(name, []).append(value)
    if r.predecessors:
        grouped["Predecessor document"] = list(r.predecessors)
    return [(name, _split(name, values)) for name, values in grouped.items()]


def _checkpoint(version: str) -> str:
    """"checkpoint <file> sha256:<hash>" of an algorithm version, the part that names the model's weights."""
    return version.split("; ", 1)[1] if "; checkpoint " in version else version


def describe(sr_path: Path | str) -> str:
    """Plain text of the SR for a terminal: disclaimer and warnings first, then each model once, then the path."""
    r = _read(sr_path)
    out = [r.heading]
    out += [f"!! {text}" for text in r.disclaimer]
    out += [f"!! {text}" for text in r.warnings]
    out += [f"CANNOT GRADE: {text}" for text in r.cannot_grade]
    for m in r.models:
        out.append("")
        out.append(f"* {m.title}" + (f"  ({_checkpoint(m.version)})" if m.family else ""))
        for f in m.findings:
            out.append(f"    {f.task}: {f.finding}" + (f", probability {f.probability}" if f.probability else ""))
            if f.classes:
                out.append(f"        {f.classes}")
        for name, values in _model_fields(r, m):
            if name == "Key slice":
                out.append(f"    Key slices ({len(values)}):")
                out += [f"        {v}" for v in values]
                continue
            out += [f"    {name}: {v}" for v in values]
        out += [f"    {name}: {value}" + (f" {unit}" if unit else "") for name, value, unit in m.measurements]
    out.append("")
    for name, values in _version_fields(r):
        out += [f"{name}: {value}" for value in values]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; line-height: 1.45; color: #111; }
.disclaimer { border: 2px solid #b00; background: #fff0f0; padding: .6em 1em; font-weight: 600; }
.warning { border: 2px solid #b60; background: #ffb000; padding: .6em 1em; font-weight: 700; margin-top: .6em; }
.cannot { border: 2px solid #b00; padding: .6em 1em; margin-top: .6em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #bbb; padding: .2em .6em; text-align: left; vertical-align: top; }
dt { font-weight: 600; margin-top: .4em; }
dd { margin-left: 1.5em; }
dd ul { margin: 0; padding-left: 1.2em; }
.meta { color: #555; }
details table td { font-size: 90%; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _dl(fields: list[tuple[str, list[str]]]) -> str:
    rows = []
    for name, values in fields:
        if not values:
            continue
        body = _e(values[0]) if len(values) == 1 else "<ul>" + "".join(f"<li>{_e(v)}</li>" for v in values) + "</ul>"
        rows.append(f"<dt>{_e(name)}</dt><dd>{body}</dd>")
    return f"<dl>{''.join(rows)}</dl>" if rows else ""


def html_report(sr_path: Path | str) -> str:
    """The SR as an HTML page for people: disclaimer first, each model once with its values in table cells.

    Rendered here from the SR tree rather than by dcmtk's ``dsr2html``:
    ``dsr2html`` follows the tree's order (the disclaimer sits in the last
    container, hundreds of lines down), writes each item's value inline
    after its concept name, and says a multi-task model's path, inputs and
    key slices once per task. Post-processing its HTML would depend on the
    markup of one dcmtk version; the tree is ours and stable. The complete
    tree follows at the end, one item per table row, for whoever needs it.
    """
    r = _read(sr_path)
    parts = [f"<h1>Glioma grading report</h1><p class=\"meta\">{_e(r.heading)}</p>"]
    parts += [f"<div class=\"disclaimer\">{_e(t)}</div>" for t in r.disclaimer]
    parts += [f"<div class=\"warning\">{_e(t)}</div>" for t in r.warnings]
    parts += [f"<div class=\"cannot\"><strong>CANNOT GRADE.</strong> {_e(t)}</div>" for t in r.cannot_grade]
    for m in r.models:
        section = [f"<section><h2>{_e(m.title)}</h2>"]
        if m.family:
            section.append(f"<p class=\"meta\">{_e(_checkpoint(m.version))}</p>")
        if m.findings:
            rows = "".join(f"<tr><td>{_e(f.task)}</td><td><strong>{_e(f.finding)}</strong></td>"
                           f"<td>{_e(f.probability or '')}</td><td>{_e(f.classes or '')}</td></tr>"
                           for f in m.findings)
            section.append("<table><tr><th>Task</th><th>Result</th><th>Probability of the result</th>"
                           f"<th>All classes</th></tr>{rows}</table>")
        section.append(_dl([(("Key slices" if n == "Key slice" else n), v) for n, v in _model_fields(r, m)]))
        if m.measurements:
            rows = "".join(f"<tr><td>{_e(n)}</td><td>{_e(v)}</td><td>{_e(u)}</td></tr>" for n, v, u in m.measurements)
            section.append("<h3>Measurements of the case</h3><table><tr><th>Measurement</th><th>Value</th>"
                           f"<th>Unit</th></tr>{rows}</table>")
        section.append("</section>")
        parts.append("".join(section))
    parts.append("<section><h2>Model path, inputs and notes</h2>" + _dl(_version_fields(r)) + "</section>")
    tree = "".join(
        f"<tr><td style=\"padding-left:{0.6 + depth * 1.2:.1f}em\">{_e(_name(item))}</td>"
        f"<td>{_e(_value(item)) if item.ValueType != 'CONTAINER' else ''}</td></tr>" for depth, item in r.tree)
    parts.append(f"<details><summary>Complete SR content ({len(r.tree)} items)</summary>"
                 f"<table><tr><th>Concept</th><th>Value</th></tr>{tree}</table></details>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Glioma grading report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def render_html(sr_path: Path | str, out_html: Path | str) -> Path:
    """Write :func:`html_report` of the SR to ``out_html``."""
    out_html = Path(out_html)
    out_html.write_text(html_report(sr_path), encoding="utf-8")
    return out_html


def summary_png(summary_dcm: Path | str, out_png: Path | str) -> Path:
    """The Secondary Capture's pixels as a PNG (for a browser, a ticket or the web page)."""
    ds = pydicom.dcmread(summary_dcm)
    arr = np.asarray(ds.pixel_array, dtype=np.uint8)
    out_png = Path(out_png)
    Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L").save(out_png)
    return out_png
