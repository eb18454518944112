"""Human views of a written report: plain text for a terminal, HTML, and the summary image as PNG.

These read the files as written (not the in-memory objects), so what an
operator sees is what was sent to the PACS.
"""
from __future__ import annotations

import html
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

DSR2HTML = "/usr/bin/dsr2html"  # absolute: never a same-named script from a virtual environment


def _name(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else "(unnamed)"


def _value(item: Dataset) -> str:
    vt = item.ValueType
    if vt == "TEXT":
        return str(item.TextValue)
    if vt == "CODE":
        code = item.ConceptCodeSequence[0]
        return f"{code.CodeMeaning} ({code.CodingSchemeDesignator} {code.CodeValue})"
    if vt == "NUM":
        mv = item.MeasuredValueSequence[0] if item.get("MeasuredValueSequence") else None
        if mv is None:
            return "(no value)"
        unit = mv.MeasurementUnitsCodeSequence[0].CodeValue
        return f"{mv.NumericValue}" + ("" if unit == "1" else f" {unit}")
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


def describe(sr_path: Path | str) -> str:
    """Plain text of the SR for a terminal: disclaimer, findings with probabilities, path, reasons."""
    ds = pydicom.dcmread(sr_path)
    root = _children(ds)
    out = [f"{ds.get('SeriesDescription', 'Structured report')} - {ds.get('ContentDate', '')} "
           f"{str(ds.get('ContentTime', ''))[:6]}"]
    evaluations: list[Dataset] = []
    groups: list[Dataset] = []
    for _, item in _walk(root):
        if item.ValueType == "CONTAINER" and _name(item) == "Measurement Group":
            groups.append(item)
        if item.ValueType == "CONTAINER" and _name(item) == "Qualitative Evaluations":
            evaluations = _children(item)
    by_name: dict[str, list[str]] = {}
    for item in evaluations:
        by_name.setdefault(_name(item), []).append(_value(item))
    for text in by_name.pop("Research use disclaimer", []):
        out.append(f"!! {text}")
    for text in by_name.pop("Cannot grade", []):
        out.append(f"CANNOT GRADE: {text}")
    out.append("")
    for g in groups:
        kids = _children(g)
        fields: dict[str, list[str]] = {}
        for k in kids:
            fields.setdefault(_name(k), []).append(_value(k))
        title = (fields.get("Tracking Identifier") or ["group"])[0]
        finding = (fields.get("Finding") or ["no finding"])[0]
        prob = (fields.get("Probability") or [None])[0]
        if "Model declined by the input gate" in fields:
            finding = "NOT GRADED (declined by the input gate)"
        out.append(f"* {title}: {finding}" + (f", probability {prob}" if prob is not None else ""))
        for key in ("Model declined by the input gate", "Input gate finding", "Class probabilities",
                    "Algorithm Version", "Model path and reason", "Inputs used", "Missing inputs", "Cannot grade",
                    "Key slice", "Training data", "Validation metrics", "Quality flag", "Input gate loosened"):
            for v in fields.get(key, []):
                out.append(f"    {key}: {v}")
        for k in kids:  # measurements of the case (NUM items other than the probability)
            if k.ValueType == "NUM" and _name(k) != "Probability":
                out.append(f"    {_name(k)}: {_value(k)}")
    out.append("")
    for name, values in by_name.items():
        for v in values:
            out.append(f"{name}: {v}")
    pred = ds.get("PredecessorDocumentsSequence")
    if pred:
        for study in pred:
            for series in study.ReferencedSeriesSequence:
                for sop in series.ReferencedSOPSequence:
                    out.append(f"Predecessor document: {sop.ReferencedSOPInstanceUID}")
    return "\n".join(out).rstrip() + "\n"


def _fallback_html(sr_path: Path) -> str:
    ds = pydicom.dcmread(sr_path)
    rows = []
    for depth, item in _walk(_children(ds)):
        rows.append(f'<div style="margin-left:{depth * 1.5}em"><b>{html.escape(_name(item))}</b>'
                    f"{': ' + html.escape(_value(item)) if item.ValueType != 'CONTAINER' else ''}</div>")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Glioma grading report</title></head>"
            f"<body><pre>{html.escape(describe(sr_path))}</pre><hr>{''.join(rows)}</body></html>\n")


def render_html(sr_path: Path | str, out_html: Path | str) -> Path:
    """HTML of the SR: dcmtk's ``dsr2html`` (a reference renderer) when installed, else a simple tree."""
    sr_path, out_html = Path(sr_path), Path(out_html)
    if Path(DSR2HTML).exists():
        done = subprocess.run([DSR2HTML, str(sr_path), str(out_html)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode == 0 and out_html.is_file() and out_html.stat().st_size > 0:
            return out_html
    out_html.write_text(_fallback_html(sr_path), encoding="utf-8")
    return out_html


def summary_png(summary_dcm: Path | str, out_png: Path | str) -> Path:
    """The Secondary Capture's pixels as a PNG (for a browser, a ticket or the web page)."""
    ds = pydicom.dcmread(summary_dcm)
    arr = np.asarray(ds.pixel_array, dtype=np.uint8)
    out_png = Path(out_png)
    Image.fromarray(arr, mode="RGB" if arr.ndim == 3 else "L").save(out_png)
    return out_png
