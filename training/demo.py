"""Demo checkpoints for ``dicomnode demo``: a small synthetic cohort, trained and exported in minutes.

```python
from training.demo import make_demo_checkpoints

art = make_demo_checkpoints(Path("/var/lib/node/checkpoints"), work_dir=Path("/tmp/demo-work"))
art.checkpoints            # {"fs3dcnn": Path, "promptnet": Path, "mmdlm": Path}  (in out_dir)
art.metrics                # {"fs3dcnn": {"auc": ..., ...}, ...}  held-out (test part) metrics per checkpoint
art.held_out_cases         # BraTS-layout case folders none of the models trained or selected on
```

What it does, on the CPU (``threads`` torch threads, 2 by default):

1. writes a synthetic BraTS-like cohort (``training.cohort``, the small profile: 100 cases on the
   3 mm grid) into ``work_dir/cohort``;
2. runs seed 000's protocol (``training.protocols.promptnet``) for one stratified 4:1 split with the
   rows ``fs`` (the template, which is also the FS 3D CNN grader) and ``adaptive`` (adaptive
   PromptNet, T1/T2/FLAIR), and, unless ``mmdlm=False``, MMDLM's protocol on the same split
   fractions (one hold-out split);
3. copies the checkpoints into ``out_dir`` with ``training.export.copy_checkpoints`` (each is validated
   by ``models.checkpoint.load_checkpoint`` first). Every checkpoint's ``training_data.description``
   says ``synthetic demo cohort (dicomnode training module), NOT for clinical use``; its metrics hold the
   validation and held-out (test part) figures.

The held-out cases are the split's test part: the node's demo can turn one into a DICOM study
(``dicomnode.synth.write_study``; this module never imports ``dicomnode``) and the served models
meet a case they never saw. ``size="tiny"`` (tests) shrinks cohort, grid, networks and epochs so the
whole call takes well under a minute; its models are not meant to grade anything.

Measured (2-core VM, ``threads=2``): see ``docs/training.md`` ("Demo checkpoints").
"""
from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEMO_DESCRIPTION", "DemoArtifacts", "make_demo_checkpoints"]

DEMO_DESCRIPTION = "synthetic demo cohort (dicomnode training module), NOT for clinical use"

#: per size: cohort, promptnet --set overrides, mmdlm --set overrides
_SIZES: dict[str, dict[str, Any]] = {
    "demo": {
        "n_cases": 100,         # the small profile's cohort (79 HGG / 21 LGG); 60 cases = 38 training
        "shape": None,          # cases were too few for the template in 12 epochs (held-out AUC 0.50)
        "spacing": None,        # the small profile's 64x64x48 at 3x3x3.25 mm
        # clinical_no_n4: the checkpoints read native whole heads (co-registration, deepbet, MNI152 grid);
        # N4 is left out because it costs ~1 s per role and case on 2 cores (a site config keeps it)
        "promptnet": [
            "template.epochs=18", "student.epochs=8", "template.milestones=[14]", "student.milestones=[100]",
            "data.preprocess=clinical_no_n4",
        ],
        "mmdlm": [
            # 8 stage-1 epochs: with the public code's augmentation and the disjoint stage-3 half, 4 no
            # longer learn the grade (held-out AUC 0.58; 8: 0.88; docs/mmdlm.md)
            "stage1.epochs=8", "stage3.epochs=15", "data.preprocess=clinical_no_n4",
        ],
    },
    "tiny": {
        "n_cases": 16,
        "shape": [32, 32, 24],
        "spacing": [6.0, 6.0, 6.5],
        "promptnet": [
            "model.input_shape=[32,32,24]", "data.spacing=[6.0,6.0,6.5]", "model.stem_width=4",
            "model.widths=[4,8,8]", "model.blocks_per_stage=[1,1,1]", "model.fc_hidden=[8,8]",
            "template.epochs=2", "student.epochs=2", "train.milestones=[100]", "data.preprocess=clinical_no_n4",
        ],
        "mmdlm": [
            "model.slice_size=[32,32]", "model.slice_count=8", "model.spacing_mm=[6.0,6.0,6.5]",
            "model.resnet_widths=[4,8,8,8]", "model.mil_hidden_dim=8", "model.mil_attention_dim=8",
            "model.projection_dim=8", "model.fusion_dim=8", "stage1.epochs=1", "stage3.epochs=2",
            "data.preprocess=clinical_no_n4",
        ],
    },
}


@dataclass(frozen=True)
class DemoArtifacts:
    """What :func:`make_demo_checkpoints` made.

    ``checkpoints``: family -> checkpoint path in ``out_dir`` (``fs3dcnn``, ``promptnet``, and ``mmdlm``
    when it was trained). ``metrics``: family -> held-out (test part) metrics, as stored in the
    checkpoint (grade AUC etc.; MMDLM: per task). ``held_out_cases``: the test part's case folders
    (BraTS layout: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``), never trained or selected on.
    ``cohort_dir``/``run_dirs`` lie in ``work_dir``; ``seconds``: wall time per step and in total.
    ``figures``: family -> its held-out ROC/PR and reliability PNGs (``out_dir/figures``, a folder the
    node's checkpoint registry does not read).
    """

    checkpoints: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    held_out_cases: list[Path]
    cohort_dir: Path
    run_dirs: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    description: str = DEMO_DESCRIPTION
    figures: dict[str, list[Path]] = field(default_factory=dict)


def _extra_sets(extra: Sequence[str] | None) -> list[str]:
    return list(extra or [])


def make_demo_checkpoints(
    out_dir: Path,
    *,
    work_dir: Path,
    seed: int = 0,
    threads: int = 2,
    size: str = "demo",
    mmdlm: bool = True,
    promptnet_sets: Sequence[str] | None = None,
    mmdlm_sets: Sequence[str] | None = None,
    overwrite: bool = True,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> DemoArtifacts:
    """Generate a synthetic cohort, train the demo models, export them into ``out_dir``.

    ``size``: ``"demo"`` (default, ~2-3 min on 2 cores) or ``"tiny"`` (tests: seconds, useless
    models). ``mmdlm=False`` skips MMDLM. ``*_sets`` append ``--set``-style overrides. ``overwrite``
    replaces a previous demo's cohort and runs in ``work_dir`` (the checkpoints in ``out_dir`` are
    replaced file by file, atomically). Raises what the protocols raise (``DatasetError``,
    ``ConfigError``, ``ExportError``).

    ``progress``: the protocols' own progress on stderr (one bar per model on a terminal, else a line
    per epoch with loss and validation AUC; preparation lines); ``say``: called with one line when
    each step starts and ends (with its wall time), so that a caller on a busy machine is never left
    without a word for minutes. Neither changes what is trained.
    """
    import torch

    from training.cohort import generate_cohort
    from training.datasets import read_dataset
    from training.export import copy_checkpoints
    from training.protocols import RunOptions, get_protocol, load_config

    if size not in _SIZES:
        raise ValueError(f"size must be one of {sorted(_SIZES)}, got {size!r}")
    prof = _SIZES[size]
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    old_threads = torch.get_num_threads()
    tell = say or (lambda _line: None)

    cohort = work_dir / "cohort"
    if cohort.exists() and overwrite:
        shutil.rmtree(cohort)
    t0 = time.perf_counter()
    grid = {k: prof[k] for k in ("shape", "spacing") if prof[k] is not None}
    tell(f"cohort: writing {prof['n_cases']} synthetic cases to {cohort} ...")
    generate_cohort(cohort, profile="small", n_cases=int(prof["n_cases"]), seed=seed,
                    workers=max(1, int(threads)), **grid)
    seconds["cohort"] = time.perf_counter() - t0
    tell(f"cohort: done in {seconds['cohort']:.0f} s")

    # one preparation cache for both protocols, filled here first so that its progress can be said in a
    # few lines (the protocols then find every case prepared and say so in one line)
    cache = work_dir / "cache"
    if cache.exists() and overwrite:
        shutil.rmtree(cache)
    desc = f'protocol.data_description="{DEMO_DESCRIPTION}"'
    cache_set = f"data.cache_dir={json.dumps(str(cache.resolve()))}"
    options = RunOptions(device="cpu", repeats=1, resume=False, progress=progress, num_threads=int(threads))
    checkpoints: dict[str, Path] = {}
    metrics: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    test_ids: list[str] = []
    try:
        # -- seed 000: template (= FS 3D CNN) and adaptive PromptNet, one 4:1 split
        run = work_dir / "run-promptnet"
        if run.exists() and overwrite:
            shutil.rmtree(run)
        cfg = load_config("promptnet", profile="small", sets=[
            desc, cache_set, f"protocol.seed={seed}", f"split.seed={seed}", 'protocol.rows=["fs","adaptive"]',
            *prof["promptnet"], *_extra_sets(promptnet_sets)])
        seconds["prepare promptnet"] = _prepare(cohort, "promptnet", cfg, cache, threads, tell)
        t0 = time.perf_counter()
        tell(f"fs3dcnn and promptnet (seed 000 protocol: row 'fs' = the template = FS 3D CNN, "
             f"{cfg['template']['epochs']} epochs; then row 'adaptive' = PromptNet, {cfg['student']['epochs']} "
             f"epochs) into {run} ...")
        get_protocol("promptnet").run(cfg, data_dir=cohort, out_dir=run, options=options)
        seconds["promptnet"] = time.perf_counter() - t0
        tell(f"fs3dcnn and promptnet: done in {seconds['promptnet']:.0f} s")
        run_dirs["promptnet"] = run
        for row, family in (("fs", "fs3dcnn"), ("adaptive", "promptnet")):
            rec = json.loads((run / "results" / f"{row}-r0.json").read_text())
            metrics[family] = {"test": rec["test"]["metrics"], "val": rec["val"]["metrics"],
                               "n_test": len(rec["test"]["y"]), "best_epoch": rec["best_epoch"]}
            test_ids = list(rec["test"]["case_ids"])
        for p in copy_checkpoints(run, out_dir, rows=["fs", "adaptive"]):
            checkpoints["fs3dcnn" if "-fs-" in p.name else "promptnet"] = p

        # -- seed 002: MMDLM on one hold-out split of the same cohort
        if mmdlm:
            run = work_dir / "run-mmdlm"
            if run.exists() and overwrite:
                shutil.rmtree(run)
            cfg = load_config("mmdlm", profile="small", sets=[
                desc, cache_set, f"protocol.seed={seed}", 'split.scheme="holdout"', f"split.seed={seed}",
                *prof["mmdlm"], *_extra_sets(mmdlm_sets)])
            seconds["prepare mmdlm"] = _prepare(cohort, "mmdlm", cfg, cache, threads, tell)
            t0 = time.perf_counter()
            tell(f"mmdlm (seed 002 protocol: stage 1, one slice network per sequence, {cfg['stage1']['epochs']} "
                 f"epochs each; stage 3, the multi-task head, {cfg['stage3']['epochs']} epochs) into {run} ...")
            get_protocol("mmdlm").run(cfg, data_dir=cohort, out_dir=run, options=options)
            seconds["mmdlm"] = time.perf_counter() - t0
            tell(f"mmdlm: done in {seconds['mmdlm']:.0f} s")
            run_dirs["mmdlm"] = run
            res = sorted(run.glob("**/result.json"))
            if res:
                rec = json.loads(res[0].read_text())
                metrics["mmdlm"] = {"test": rec["test"], "val": rec["val"], "n_test": rec["n"]["test"]}
            (p,) = copy_checkpoints(run, out_dir)
            checkpoints["mmdlm"] = p
    finally:
        torch.set_num_threads(old_threads)

    figures = write_figures(run_dirs, out_dir / "figures")
    by_id = {c.case_id: c for c in read_dataset(cohort, verify="none")}
    held_out = [Path(by_id[i].images["T1"]).parent for i in test_ids if i in by_id]
    seconds["total"] = time.perf_counter() - t_all
    return DemoArtifacts(checkpoints=checkpoints, metrics=metrics, held_out_cases=held_out, cohort_dir=cohort,
                         run_dirs=run_dirs, seconds=seconds, figures=figures)


PREPARE_SAY_EVERY_S = 10.0  # at most one preparation progress line this often (and at each tenth)


def _prepare(cohort: Path, protocol: str, config: Mapping[str, Any], cache: Path, threads: int,
             tell: Callable[[str], None]) -> float:
    """Prepare every cohort case with ``protocol``'s specs into ``cache`` (what its run would do first),
    saying how far it got every tenth of the cases or ``PREPARE_SAY_EVERY_S``, not once per case.

    Same function, specs and cache as the protocol's own preparation (``training.prepare``), in
    ``threads`` processes: the run that follows reuses every entry and only checks them.
    """
    import torch

    from training.datasets import read_dataset
    from training.prepare import prepare_cases, protocol_specs

    torch.set_num_threads(int(threads))  # as the protocol's run sets it before preparing
    specs = protocol_specs(protocol, config)
    cases = read_dataset(cohort, verify=str(config["data"]["verify"]))
    t0 = time.perf_counter()
    said = [t0]
    names = ", ".join(specs)

    def progress(line: str) -> None:
        m = re.match(r"prepare \[(\d+)/(\d+)\]", line)  # one line per (case, spec) from prepare_cases
        if m is None:
            return
        done, todo = int(m.group(1)), int(m.group(2))
        now = time.perf_counter()
        tenth = done * 10 // todo > (done - 1) * 10 // todo
        if done == todo or (tenth and now - said[0] >= 1.0) or now - said[0] >= PREPARE_SAY_EVERY_S:
            tell(f"  preparing inputs ({names}): {done}/{todo} ({now - t0:.0f} s)")
            said[0] = now

    tell(f"preparing the inputs of {protocol} ({names}: {len(cases)} cases, once per spec) into {cache} ...")
    # one process per torch thread: on the demo's template-space cohort preparation is resampling,
    # single-threaded numpy work, so a second process halves its ~75 s (the 3-minute budget)
    summary = prepare_cases(cases, specs, cache, workers=max(1, int(threads)), progress=progress)
    took = time.perf_counter() - t0
    failed = sum(o.status == "failed" for o in summary.outcomes)
    tell(f"preparing the inputs of {protocol}: done in {took:.0f} s"
         + (f" ({failed} failed; the run leaves them out and lists them)" if failed else ""))
    return took


#: the protocols' report rows -> the family their checkpoint serves as
_PROMPTNET_ROWS = {"fs": "fs3dcnn", "adaptive": "promptnet"}


def write_figures(run_dirs: Mapping[str, Path], folder: Path) -> dict[str, list[Path]]:
    """Per served model, its held-out ROC/PR curves and reliability diagram as PNGs in ``folder``.

    Why next to the checkpoints: the protocols draw their figures per run, with every compared row in
    one picture (``<run>/report``); whoever looks at a node's checkpoints wants each model's own
    held-out curves beside it (``<family>-roc-pr.png``, ``<family>-reliability.png``). They are drawn
    from the predictions each run saved (the report module's ``*_predictions.json``), so a figure shows
    exactly the test predictions the checkpoint's metrics were computed from.
    """
    from training.reports import load_predictions, save_reliability_figure, save_roc_pr_figure

    out: dict[str, list[Path]] = {}
    if "promptnet" in run_dirs:
        run = run_dirs["promptnet"]
        for row, family in _PROMPTNET_ROWS.items():
            rec = json.loads((run / "results" / f"{row}-r0.json").read_text())
            rows = [_row_result(family, rec["test"]["y"], rec["test"]["p"], rec["test"]["case_ids"])]
            out[family] = _draw(family, rows, folder, save_roc_pr_figure, save_reliability_figure)
    if "mmdlm" in run_dirs:
        preds = run_dirs["mmdlm"] / "report" / "mmdlm_predictions.json"
        rows = load_predictions(preds)
        grade = [r for r in rows if r.name.endswith(" grade")] or rows[:1]
        fig = _draw("mmdlm", grade, folder, save_roc_pr_figure, None)
        out["mmdlm"] = [*fig, save_reliability_figure(rows, folder / "mmdlm-reliability.png",
                                                      title="mmdlm: reliability of each task (held-out test part)")]
    return out


def _row_result(label: str, y: Sequence[int], p: Sequence[float], case_ids: Sequence[str]) -> Any:
    import numpy as np

    from training.reports import RowResult

    return RowResult(label, "held-out test part", ((np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)),),
                     (tuple(case_ids),))


def _draw(family: str, rows: Sequence[Any], folder: Path, roc: Callable[..., Path],
          reliability: Callable[..., Path] | None) -> list[Path]:
    paths = [roc(rows, folder / f"{family}-roc-pr.png", title=f"{family}: held-out test part (synthetic demo cohort)")]
    if reliability is not None:
        paths.append(reliability(rows, folder / f"{family}-reliability.png",
                                 title=f"{family}: reliability (held-out test part)"))
    return paths


def summary_lines(art: DemoArtifacts) -> list[str]:
    """Human-readable lines for a CLI: checkpoints, held-out AUCs, timing."""
    lines = [f"{fam}: {path}" for fam, path in art.checkpoints.items()]
    lines += [f"{fam} figures: {', '.join(str(p) for p in paths)}" for fam, paths in art.figures.items()]
    for fam, m in art.metrics.items():
        lines.append(f"{fam} held-out metrics: {json.dumps(_short(m), sort_keys=True)}")
    lines.append(f"held-out cases ({len(art.held_out_cases)}): {art.held_out_cases[0] if art.held_out_cases else '-'} ...")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in art.seconds.items()))
    lines.append(f"training data: {art.description}")
    return lines


def _short(m: Mapping[str, Any]) -> Any:
    if isinstance(m, Mapping):
        return {k: _short(v) for k, v in m.items() if k in ("test", "auc", "test_metrics", "grade", "idh", "1p19q", "n_test")}
    return m
