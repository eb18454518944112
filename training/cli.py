"""``python -m training``: generate data, train, evaluate, export, and the one-command Table 1 experiment.

```
python -m training generate OUT [--profile small|full] [--seed N] [--n-cases N] [--workers N] [--overwrite]
                            [--shape X Y Z] [--spacing SX SY SZ] [--hgg-fraction F]
python -m training train PROTOCOL --data DIR --out RUN [--profile small] [--config F] [--set k=v ...]
                         [--repeats N] [--rows fs none fixed adaptive] [--device cpu|cuda] [--amp bf16|fp16]
                         [--threads N] [--no-resume] [--progress|--no-progress]
python -m training evaluate RUN                      # rebuild tables and figures from saved predictions
python -m training export RUN --to DIR [--rows ...] [--repeat K]
python -m training table1 --data DIR --out RUN       # seed 000's Table 1 on the small synthetic cohort
python -m training demo-checkpoints --out DIR [--work DIR] [--seed N] [--threads N] [--no-mmdlm] [--size demo|tiny]
                                    [--quiet]
python -m training prepare [PROTOCOL] --data PATH --cache DIR [--spec FILE.json ...] [--profile small]
                           [--config F] [--set k=v ...] [--workers N] [--retry-failed] [--rebuild] [--quiet]
```

A thin shell over the library, as pynetdicom's apps are: every subcommand is a few lines that call
``training.cohort``, ``training.protocols``, ``training.export``. Bad data, configs or run folders
end with one line ``error: ...`` and exit status 2, not a traceback. Settings are read here, at the
edge (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from torchrun), and passed down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate the glioma-grading models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write the synthetic BraTS-like cohort (BraTS2020 layout)")
    g.add_argument("out", type=Path)
    g.add_argument("--profile", choices=("small", "full"), default="small")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-cases", type=int, default=None)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--overwrite", action="store_true", help="replace a previous cohort in OUT")
    g.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="grid (voxels)")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"), help="voxel size (mm)")
    g.add_argument("--hgg-fraction", type=float, default=None, help="default: BraTS2020's 293/369")

    def run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, default=None, help="TOML overrides")
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. train.lr=1e-4 (repeatable)")
        sp.add_argument("--repeats", type=int, default=None)
        sp.add_argument("--rows", nargs="+", default=None)
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
        sp.add_argument("--amp", default=None, choices=("bf16", "fp16", "none"))
        sp.add_argument("--no-resume", action="store_true", help="retrain everything (default: resume)")
        sp.add_argument("--progress", dest="progress", action="store_true", default=None)
        sp.add_argument("--no-progress", dest="progress", action="store_false")

    t = sub.add_parser("train", help="run a protocol (promptnet, crossmodal, mmdlm)")
    t.add_argument("protocol")
    t.add_argument("--data", type=Path, required=True, help="BraTS folder, manifest CSV or UCSF-PDGM folder")
    t.add_argument("--out", type=Path, required=True, help="run folder (resumed when it exists)")
    t.add_argument("--profile", default=None, help="config profile, e.g. small (configs/small.toml)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    run_args(t)

    e = sub.add_parser("evaluate", help="rebuild a run's tables and figures from its saved predictions")
    e.add_argument("run", type=Path)

    x = sub.add_parser("export", help="copy a run's chosen checkpoints into the node's checkpoint folder")
    x.add_argument("run", type=Path)
    x.add_argument("--to", type=Path, required=True)
    x.add_argument("--rows", nargs="+", default=None, help="default: every row")
    x.add_argument("--repeat", type=int, default=None, help="default: per row, the best repeat on validation")

    tb = sub.add_parser("table1", help="seed 000's Table 1 on the small synthetic cohort (generated if DIR is empty)")
    tb.add_argument("--data", type=Path, required=True)
    tb.add_argument("--out", type=Path, required=True)
    tb.add_argument("--seed", type=int, default=0, help="cohort seed (only when generating)")
    tb.add_argument("--profile", default="small")
    tb.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the 2-core machine is shared; timings stay comparable)")
    run_args(tb)

    dm = sub.add_parser("demo-checkpoints", help="synthetic demo cohort -> trained demo checkpoints in DIR "
                                                 "(NOT for clinical use)")
    dm.add_argument("--out", type=Path, required=True, help="checkpoint folder (the node's)")
    dm.add_argument("--work", type=Path, default=None, help="cohort and run folders (default: OUT/../demo-work)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--threads", type=int, default=2)
    dm.add_argument("--size", choices=("demo", "tiny"), default="demo")
    dm.add_argument("--no-mmdlm", action="store_true", help="skip MMDLM")
    dm.add_argument("--quiet", action="store_true",
                    help="no progress on stderr (default: a line per step, and per model a bar on a terminal "
                         "or a line per epoch with loss and validation AUC in a log)")
    pr = sub.add_parser("prepare", help="preprocess every case of a dataset ONCE per spec into a cache that "
                                         "training reads (--set data.cache_dir=DIR)")
    pr.add_argument("protocol", nargs="?", default=None,
                    help="prepare with the spec(s) this protocol trains with (promptnet, crossmodal, mmdlm)")
    pr.add_argument("--spec", dest="specs", type=Path, action="append", default=[], metavar="FILE.json",
                    help="prepare with this spec (JSON: a spec, or an object with a 'spec' key); repeatable")
    pr.add_argument("--data", type=Path, required=True, help="BraTS folder, manifest CSV or UCSF-PDGM folder")
    pr.add_argument("--cache", type=Path, required=True, help="cache folder (train with --set data.cache_dir=DIR)")
    pr.add_argument("--profile", default=None, help="config profile of PROTOCOL, e.g. small")
    pr.add_argument("--config", type=Path, default=None, help="TOML overrides of PROTOCOL's config")
    pr.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config value of PROTOCOL (as for train)")
    pr.add_argument("--workers", type=int, default=1,
                    help="parallel preparation processes (default 1: the right number on a 2-core machine)")
    pr.add_argument("--retry-failed", action="store_true", help="try cases again whose failure was recorded")
    pr.add_argument("--rebuild", action="store_true", help="prepare every case again, even valid entries")
    pr.add_argument("--verify", choices=("none", "header", "data"), default=None,
                    help="dataset check when reading (default: the protocol's data.verify, else header)")
    pr.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")
    return p


def _prepare(args: argparse.Namespace) -> int:
    """``prepare``: the specs (a protocol's and/or files), then every case once per spec."""
    from training.prepare import load_spec_file, prepare_dataset, protocol_specs
    from training.protocols import ConfigError, load_config

    if args.protocol is None and not args.specs:
        raise ConfigError("prepare: name a PROTOCOL (its training specs) or give --spec FILE.json")
    if args.protocol is None and (args.profile or args.config or args.sets):
        raise ConfigError("prepare: --profile, --config and --set need a PROTOCOL")
    if args.workers < 1:
        raise ConfigError(f"prepare: --workers must be >= 1, got {args.workers}")
    specs: dict[str, Any] = {}
    verify = args.verify
    if args.protocol is not None:
        config = load_config(args.protocol, profile=args.profile, config_file=args.config, sets=args.sets)
        specs.update(protocol_specs(args.protocol, config))
        verify = verify or str(config["data"]["verify"])
    for f in args.specs:
        specs[f.stem if f.stem not in specs else str(f)] = load_spec_file(f)
    if not args.data.exists():
        from training.datasets import DatasetError

        raise DatasetError("data path does not exist", path=args.data)
    summary = prepare_dataset(args.data, specs, args.cache, verify=verify or "header", workers=args.workers,
                              retry_failed=args.retry_failed, rebuild=args.rebuild, progress=not args.quiet)
    print(summary.line())
    if summary.n_cases and summary.count("failed") + summary.count("skipped") == len(summary.outcomes):
        print("error: no case could be prepared", file=sys.stderr)
        return 2
    return 0


def _device(arg: str | None, local_rank: int, world: int) -> str:
    import torch

    if arg:
        return arg if not (arg == "cuda" and world > 1) else f"cuda:{local_rank}"
    if torch.cuda.is_available():
        return f"cuda:{local_rank}" if world > 1 else "cuda"
    return "cpu"


def _options(args: argparse.Namespace, threads: int | None) -> Any:
    from training.loop import init_distributed
    from training.protocols import RunOptions, parse_amp

    dist = init_distributed(os.environ)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return RunOptions(
        device=_device(args.device, dist.local_rank, dist.world_size),
        amp_dtype=parse_amp(args.amp) if args.amp else None,
        rows=tuple(args.rows) if args.rows else None,
        repeats=args.repeats,
        resume=not args.no_resume,
        progress=progress,
        num_threads=threads,
        dist=dist,
    )


def _train(protocol: str, data: Path, out: Path, profile: str | None, args: argparse.Namespace,
           threads: int | None) -> dict[str, Any]:
    from training.protocols import get_protocol, load_config

    mod = get_protocol(protocol)
    if not data.exists():
        from training.datasets import DatasetError

        raise DatasetError("data path does not exist", path=data)
    config = load_config(protocol, profile=profile, config_file=args.config, sets=args.sets)
    options = _options(args, threads)
    t0 = time.perf_counter()
    summary = mod.run(config, data_dir=data, out_dir=out, options=options)
    elapsed = time.perf_counter() - t0
    if options.dist.is_main:
        _print_tables(summary)
        print(f"\nrun folder: {out}  ({elapsed:.0f} s)")
    return summary if isinstance(summary, dict) else {}


#: What a protocol's summary holds as Markdown, in the order printed: Table 1, its paired comparisons
#: (differences with 95 % CIs and verdicts), Table 2 (the ablation).
_TABLE_KEYS: tuple[tuple[str, str], ...] = (
    ("table_markdown", ""),
    ("comparisons_markdown", "Paired differences (A − B), same test cases"),
    ("table2_markdown", "Table 2: ablation of the prompt loss"),
)


def _print_tables(summary: Any) -> None:
    """Print every table a protocol's summary carries, each under a heading after the first."""
    if not isinstance(summary, dict):
        return
    for key, heading in _TABLE_KEYS:
        text = summary.get(key)
        if text:
            if heading:
                print(f"\n{heading}\n")
            print(text)


def _generate(out: Path, profile: str, seed: int, n_cases: int | None, workers: int | None, overwrite: bool,
              progress: bool, **grid: Any) -> None:
    from training.cohort import generate_cohort

    from training.protocols import ConfigError

    t0 = time.perf_counter()
    try:
        s = generate_cohort(out, profile=profile, seed=seed, n_cases=n_cases, workers=workers, overwrite=overwrite,
                            progress=progress, **{k: v for k, v in grid.items() if v is not None})
    except (ValueError, FileExistsError, NotADirectoryError) as exc:  # bad sizes, a non-empty folder
        raise ConfigError(f"generate {out}: {exc}") from exc
    print(f"cohort written to {out} in {time.perf_counter() - t0:.0f} s: grade {s.counts['grade']}")


def _say(line: str) -> None:
    """A step of a long command, on stderr with the progress (stdout keeps the results)."""
    print(line, file=sys.stderr, flush=True)


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def main(argv: Sequence[str] | None = None) -> int:
    from models.checkpoint import CheckpointError
    from training.datasets import DatasetError
    from training.export import ExportError
    from training.loop import ResumeError
    from training.protocols import ConfigError, ProtocolError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args.out, args.profile, args.seed, args.n_cases, args.workers, args.overwrite,
                      sys.stderr.isatty(), shape=args.shape, spacing=args.spacing, hgg_fraction=args.hgg_fraction)
        elif args.command == "train":
            _train(args.protocol, args.data, args.out, args.profile, args, args.threads)
        elif args.command == "evaluate":
            from training.protocols import get_protocol

            info_path = args.run / "run.json"
            if not info_path.exists():
                raise ExportError(f"{args.run}: not a run folder (no run.json)")
            info = json.loads(info_path.read_text())
            mod = get_protocol(info["protocol"])
            if not callable(getattr(mod, "evaluate", None)):
                raise ProtocolError(f"protocol {info['protocol']!r} has no evaluate(run_dir)")
            summary = mod.evaluate(args.run)
            _print_tables(summary)
        elif args.command == "export":
            from training.export import copy_checkpoints

            for p in copy_checkpoints(args.run, args.to, rows=args.rows, repeat=args.repeat):
                print(p)
        elif args.command == "table1":
            if _is_empty(args.data):
                print(f"{args.data} is empty: generating the {args.profile} synthetic cohort (seed {args.seed})")
                _generate(args.data, args.profile, args.seed, None, None, False, sys.stderr.isatty())
            _train("promptnet", args.data, args.out, args.profile, args, args.threads)
        elif args.command == "prepare":
            return _prepare(args)
        elif args.command == "demo-checkpoints":
            from training.demo import make_demo_checkpoints, summary_lines

            work = args.work if args.work is not None else args.out.resolve().parent / "demo-work"
            art = make_demo_checkpoints(args.out, work_dir=work, seed=args.seed, threads=args.threads,
                                        size=args.size, mmdlm=not args.no_mmdlm, progress=not args.quiet,
                                        say=None if args.quiet else _say)
            for line in summary_lines(art):
                print(line)
    except (DatasetError, ConfigError, ProtocolError, ResumeError, ExportError, CheckpointError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
