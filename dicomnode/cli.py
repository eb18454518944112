"""``dicomnode``: thin shells over the library (as pynetdicom's apps are).

Settings are read here, once, and passed down.

Imports are at the top, as everywhere in dicomnode, with one exception: the
commands that bring torch or ``training`` into the process import what they
need inside their own function (tests/test_layout.py lists them): ``demo``
(it trains demo checkpoints) and ``synth`` (``--head`` builds a cohort head
with ``training``; the phantom writer alone adds PIL and a fifth of a second
of imports). So ``serve``, whose start-up is measured (benchmarks/startup.py),
``worker``, ``status`` and the rest never load what only those commands use.
"""
from __future__ import annotations

# ruff: noqa: E402
import gc

# The imports below (SQLAlchemy, pydicom, pynetdicom, Celery, alembic) allocate
# hundreds of thousands of long-lived objects and no garbage: the cyclic
# collector would run some 360 times over them for nothing (about 0.1 s of the
# node's start-up). Collection resumes after them, with what they made frozen
# (gc.freeze), which also keeps collections in prefork worker children from
# writing to, and so copying, the pages they share with their parent.
_gc_was_enabled = gc.isenabled()
gc.disable()

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError, SQLAlchemyError

from dicomnode.config import Settings, SettingsError, load_settings
from dicomnode.dicom.scu import echo_destinations
from dicomnode.dicom.scu import Destination, echo, send
from dicomnode.index import migrate
from dicomnode.index.studies import Index
from dicomnode.logs import setup_logging
from dicomnode.node import Node
from dicomnode.runtime.monitor import full_status
from dicomnode.runtime.service import Pipeline, run_worker
from dicomnode.stages.dispatch import Outbox
from dicomnode.stages.dispatch import describe as describe_delivery

gc.freeze()
if _gc_was_enabled:
    gc.enable()

# the database could not be reached or its URL used: `dicomnode db` exits 2, as for a bad setting
UNREACHABLE = (OperationalError, InterfaceError, ArgumentError, NoSuchModuleError)


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    try:
        node = Node(settings)
    except (ValueError, OSError, SQLAlchemyError, migrate.SchemaError) as exc:
        # bad rules file, unwritable data_dir, unreachable index, an index at a schema this code does not know
        print(f"dicomnode: cannot start: {exc}", file=sys.stderr)
        return 2
    return node.serve_forever()


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues or any(q not in ("cpu", "gpu") for q in queues):
        print("dicomnode worker: --queues must be cpu, gpu or cpu,gpu", file=sys.stderr)
        return 2
    try:
        run_worker(settings, queues, concurrency=args.concurrency, pool=args.pool)
    except ValueError as exc:
        print(f"dicomnode worker: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Operator action: failed (parked) pipeline steps and parked deliveries back into the queue."""
    settings = _settings(args)
    index = Index(settings.index_url)
    try:
        refs = Pipeline(settings, index).jobs.retry(args.version_id)
        sent = Outbox(index, settings).retry(None) if args.deliveries else 0
        if refs:
            index.add_event("retry", f"operator retry of {len(refs)} failed step(s)")
    finally:
        index.close()
    print(f"{len(refs)} failed step(s) set back to pending (the running node queues them within "
          f"reconcile_interval_s = {settings.reconcile_interval_s:g} s); {sent} parked deliveries retried")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    if args.destinations:
        settings = _settings(args)
        if not settings.destinations:
            print("no destinations configured")
            return 1
        ok = True
        for name, good, detail in echo_destinations(settings):
            print(f"C-ECHO {name}: {'ok' if good else 'FAILED'} {detail}".rstrip())
            ok = ok and good
        return 0 if ok else 1
    if args.host is None or args.port is None or args.aet is None:
        print("dicomnode echo: give HOST PORT --aet AET, or --destinations", file=sys.stderr)
        return 2

    status = echo(Destination(args.aet, args.host, args.port), calling_ae=args.calling, timeout_s=args.timeout)
    if status is None:
        print(f"C-ECHO {args.aet}@{args.host}:{args.port}: no association (refused, rejected or unreachable)")
        return 1
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    try:
        dest = Destination.parse(args.to)
        results = send(args.paths, dest, calling_ae=args.calling, timeout_s=args.timeout)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dicomnode send: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = "not sent" if r.status is None else f"0x{r.status:04X}"
        print(f"FAILED {r.path}: {status} {r.comment}".rstrip())
    print(f"sent {len(results) - len(failed)}/{len(results)} to {args.to}")
    return 0 if not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.database_url is None and not (settings.data_path / "index.sqlite3").exists():
        doc: dict = {"schema": "dicomnode.status/1", "generated_at": None, "studies": []}
    else:
        index = Index(settings.index_url)
        try:
            doc = full_status(index, settings)
        finally:
            index.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not doc["studies"]:
        print("no studies")
    for st in doc["studies"]:
        print(f"study {st['id']}  instances {st['instances']}  duplicates {st['duplicates']}")
        for v in st["versions"]:
            print(f"  version {v['version']}: {v['state']}"
                  + (f" ({v['complete_reason']}, {v['completed_at']})" if v["completed_at"] else "")
                  + f"  pipeline: {v.get('pipeline_state', '-')}")
            for stage, step in v.get("pipeline", {}).items():
                secs = f"{step['seconds']:.2f} s" if step.get("seconds") is not None else ""
                err = f"  {step['error']}" if step.get("error") else ""
                print(f"    step {stage:10} {step['state']:8} deliveries {step['deliveries']} {secs}{err}")
            rep = v.get("report")
            if rep:
                if rep.get("cannot_grade"):
                    print(f"    report: cannot grade: {rep['cannot_grade']}")
                for m in rep.get("models", []):
                    finds = ", ".join(f"{t} {f['label']} (P({f.get('positive_class', 'positive')}) = {f['probability']:.2f})"
                                      for t, f in m["findings"].items())
                    print(f"    report: {m['family']}: {finds}")
                for d in rep.get("declined", []):  # the input gate: reasons, never a grade
                    print(f"    report: {d['family']}: not graded: {'; '.join(d['reasons'])}")
                if rep.get("gate_loosened"):
                    print(f"    report: {rep['gate_loosened']}")
            for d in v.get("deliveries", []):
                print(f"    delivery to {d.get('destination')}: {describe_delivery(d)}"
                      + (f" ({d.get('last_error')})" if d.get("last_error") else ""))
            for se in v["series"]:
                role = se["role"] or "-"
                print(f"    #{se['series_number'] if se['series_number'] is not None else '?':>4} "
                      f"{(se['description'] or '')[:32]:32} {se['instances']:>5} inst  "
                      f"{role:6} {se['status'] or '':11} {se['reason'] or ''}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    settings = _settings(args)
    index = Index(settings.index_url)
    try:
        events = index.recent_events(args.limit)
    finally:
        index.close()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        study = f" study {e['study_id']}" if e["study_id"] is not None else ""
        print(f"{e['at']} {e['kind']:22}{study} {e['message']}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from dicomnode.synth import make_phantom, write_study

    if not args.head:
        if args.case_dir is not None or args.geometry is not None:
            print("dicomnode synth: --case-dir and --geometry need --head", file=sys.stderr)
            return 2
        volumes, affine = make_phantom(shape=tuple(args.shape), seed=args.seed, tumour=True, grade=args.grade)
        written = write_study(volumes, affine, args.out, vendor=args.vendor, enhanced=args.enhanced, seed=args.seed)
        print(f"wrote {len(written.all_files())} files, {len(written.series)} series to {args.out}")
        return 0
    # the top floor may call training: a whole head in native scanner geometry around a cohort brain
    from training.heads import load_brats_case, native_study, synthetic_case

    style = args.geometry or "mixed"
    try:
        case = (load_brats_case(args.case_dir) if args.case_dir is not None
                else synthetic_case(seed=args.seed, grade=args.grade))
        study = native_study(case, style, vendor=args.vendor, seed=args.seed)
        written = write_study(**study.writer_args(), out_dir=args.out, vendor=args.vendor, enhanced=args.enhanced,
                              seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"dicomnode synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written.all_files())} files, {len(written.series)} series ({style} {args.vendor} "
          f"whole head around {case.case_id}) to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging("WARNING" if not args.verbose else settings.log_level, settings.log_json)
    from dicomnode.demo import run_demo

    workdir = Path(args.workdir)
    if settings.data_dir == Settings().data_dir:  # the demo keeps its data apart from a real node's
        settings = settings.replace(data_dir=str(workdir / "node-data"),
                                    checkpoints_dir=settings.checkpoints_dir or str(workdir / "checkpoints"))
    return run_demo(settings, workdir, without_t1ce=args.without_t1ce, quick=args.quick)


def _db_where(settings: Settings) -> str:
    """The index database for people: its URL without the password."""
    try:
        return make_url(settings.index_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "database_url (not a valid SQLAlchemy URL)"


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade`` / ``db current``: one line each; exit 2 when the database cannot be reached.

    ``current`` exits 0 when the database is at this code's head revision and 1
    otherwise (behind, empty, or written by a newer node), so a deployment
    script can run ``dicomnode db current || dicomnode db upgrade``.
    """
    settings = _settings(args)
    setup_logging("WARNING", settings.log_json)  # one line on stdout; alembic's own INFO lines are not wanted
    where = _db_where(settings)
    head = migrate.head_revision()
    sqlite_file = settings.data_path / "index.sqlite3" if settings.database_url is None else None
    if args.db_command == "current" and sqlite_file is not None and not sqlite_file.exists():
        # asking must not create: SQLite would make an empty file at the path
        print(f"index database {where}: does not exist yet (the node, or `{migrate.UPGRADE_COMMAND}`, creates it)")
        return 1
    try:
        if args.db_command == "upgrade":
            if sqlite_file is not None:
                settings.data_path.mkdir(parents=True, exist_ok=True)
            now = migrate.upgrade(settings.index_url)
            print(f"index database {where}: at revision {now}" + (" (head)" if now == head else ""))
            return 0
        found = migrate.current_revision(settings.index_url)
    except UNREACHABLE as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"dicomnode db {args.db_command}: cannot reach the index database {where}: {reason}", file=sys.stderr)
        return 2
    except migrate.SchemaError as exc:
        print(f"dicomnode db {args.db_command}: {exc}", file=sys.stderr)
        return 1
    if found == head:
        print(f"index database {where}: revision {found} (head)")
        return 0
    if found is None:
        print(f"index database {where}: no schema revision (empty, or made by release 1); this dicomnode expects "
              f"{head}: run `{migrate.UPGRADE_COMMAND}`")
    elif found in migrate.known_revisions():
        print(f"index database {where}: revision {found}, behind this dicomnode's {head}: "
              f"run `{migrate.UPGRADE_COMMAND}`")
    else:
        print(f"index database {where}: revision {found}, unknown to this dicomnode (head {head}): "
              f"a newer dicomnode upgraded it")
    return 1


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(dataclasses.asdict(settings), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomnode", description="PACS-integrated glioma-grading DICOM node")
    p.add_argument("--config", type=Path, help="TOML settings file (env DICOMNODE_<SETTING> overrides it)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the node: listener, assembly, pipeline (embedded worker by default), dispatch")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("worker", help="a pipeline worker process (distributed mode, needs broker_url)")
    sp.add_argument("--queues", default="cpu,gpu", help="cpu, gpu or cpu,gpu (GPU hosts: gpu)")
    sp.add_argument("--concurrency", type=int, default=None, help="task slots (default: worker_concurrency)")
    sp.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                    help="prefork (default) enforces time limits and requeues on worker loss")
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("retry", help="operator: queue failed pipeline steps (and parked deliveries) again")
    sp.add_argument("--version-id", type=int, default=None, help="only this study version (status --json: version_id)")
    sp.add_argument("--deliveries", action="store_true", help="also retry parked deliveries")
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser("echo", help="C-ECHO a DICOM peer, or every configured destination")
    sp.add_argument("host", nargs="?")
    sp.add_argument("port", type=int, nargs="?")
    sp.add_argument("--aet", help="called AE title of the peer")
    sp.add_argument("--destinations", action="store_true", help="C-ECHO every configured destination")
    sp.add_argument("--calling", default="DICOMNODE", help="our calling AE title")
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_echo)

    sp = sub.add_parser("send", help="C-STORE files or folders to a peer")
    sp.add_argument("paths", nargs="+")
    sp.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    sp.add_argument("--calling", default="DICOMNODE", help="our calling AE title")
    sp.add_argument("--timeout", type=float, default=60.0)
    sp.set_defaults(func=cmd_send)

    sp = sub.add_parser("status", help="studies, versions, series with role and reason")
    sp.add_argument("--json", action="store_true", help="the stable dicomnode.status/1 document")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("events", help="the event log: rejected associations, refused stores, completions")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_events)

    sp = sub.add_parser("synth", help="write a synthetic multi-sequence brain MR study (DICOM)")
    sp.add_argument("out", type=Path)
    sp.add_argument("--vendor", default="siemens", choices=["siemens", "ge", "philips"])
    sp.add_argument("--enhanced", action="store_true", help="Enhanced MR multi-frame instead of classic")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--grade", default="HGG", choices=["HGG", "LGG"])
    sp.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], help="phantom grid (without --head)")
    sp.add_argument("--head", action="store_true",
                    help="a whole head in native scanner geometry around a synthetic cohort brain "
                         "(training.heads), instead of the phantom")
    sp.add_argument("--geometry", choices=["3d", "2d", "mixed"], default=None,
                    help="with --head: 3D 1 mm, 2D 5 mm axial, or mixed (3D T1/T1CE, 2D T2/FLAIR; default)")
    sp.add_argument("--case-dir", type=Path, default=None,
                    help="with --head: a BraTS-layout case folder (<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz) "
                         "instead of a freshly made cohort case")
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("demo", help="train demo checkpoints if none, run the node and a local PACS, "
                                     "send a synthetic study, show the report")
    sp.add_argument("--workdir", default="./dicomnode-demo", help="where the demo writes everything")
    sp.add_argument("--without-t1ce", action="store_true", help="send T1, T2, FLAIR only (the PromptNet path)")
    sp.add_argument("--verbose", action="store_true", help="the node's log on the terminal")
    sp.add_argument("--quick", action="store_true",
                    help="smoke test: tiny demo models in seconds (they grade nothing meaningfully)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("db", help="the index database's schema: upgrade it, or show its revision")
    dbsub = sp.add_subparsers(dest="db_command", required=True)
    dbsub.add_parser("upgrade", help="migrate the index database to this dicomnode's schema (back it up first)")
    dbsub.add_parser("current", help="the index database's schema revision (exit 0 at head, 1 otherwise)")
    sp.set_defaults(func=cmd_db)

    sp = sub.add_parser("config", help="print the effective settings")
    sp.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
