"""``dicomnode``: thin shells over the library (as pynetdicom's apps are).

Settings are read here, once, and passed down.

Imports are at the top, as everywhere in dicomnode, with one exception: the
commands that bring torch or ``training`` into the process import what they
need inside their own function (tests/test_layout.py lists them): ``demo``
(it trains demo checkpoints) and ``synth`` (``--head`` builds a cohort head
with ``training``; the phantom writer alone adds PIL and a fifth of a second
of imports). So ``serve``, whose start-up is measured (benchmarks/startup.py),
``worker``, ``status`` and the rest never load what only those commands use.

Every everyday operator mistake (a bad setting or variable, a data_dir that
cannot be used, an index database or broker that cannot be reached, a port
taken, a path that does not exist) ends in one line on stderr and exit status
2, never a traceback: the commands raise :class:`OperatorError` and
:func:`main` prints it. Exit 1 stays for "ran, and the answer is no" (a peer
that refuses, a file that was not sent, a schema behind its head).
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
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kombu.exceptions import OperationalError as BrokerUnreachable
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError, SQLAlchemyError

from dicomnode.config import Settings, SettingsError, env_name, load_settings, unknown_env
from dicomnode.dicom.scu import echo_destinations
from dicomnode.dicom.scu import Destination, echo, send
from dicomnode.index import migrate
from dicomnode.index.studies import Index
from dicomnode.logs import setup_logging
from dicomnode.node import Node
from dicomnode.runtime.app import make_app
from dicomnode.runtime.monitor import full_status
from dicomnode.runtime.retention import purge
from dicomnode.runtime.service import Pipeline, run_worker
from dicomnode.stages.dispatch import NO_DESTINATIONS, Outbox
from dicomnode.stages.dispatch import describe as describe_delivery
from dicomnode.web.auth import hash_secret
from dicomnode.web.server import run_web

gc.freeze()
if _gc_was_enabled:
    gc.enable()

log = logging.getLogger(__name__)

# the database could not be reached or its URL used: one line and exit 2, as for a bad setting
UNREACHABLE = (OperationalError, InterfaceError, ArgumentError, NoSuchModuleError)
# ... and everything else that stops a command at the index's door (a driver not installed, a schema it cannot use)
INDEX_ERRORS = (*UNREACHABLE, ImportError, migrate.SchemaError)


class OperatorError(Exception):
    """An everyday mistake, said in one line: :func:`main` prints ``dicomnode <command>: <message>``, exit 2."""


def _hint(setting: str) -> str:
    """Where to fix it, both ways an operator sets it: ``(setting port / DICOMNODE_PORT)``."""
    return f"(setting {setting} / {env_name(setting)})"


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's reason (the driver's own, where SQLAlchemy wraps one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _settings(args: argparse.Namespace) -> Settings:
    """The settings, after a warning for each DICOMNODE_* variable that is no setting (a typo keeps a default)."""
    for warning in unknown_env():
        print(f"dicomnode: warning: {warning}", file=sys.stderr)
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _data_dir(settings: Settings, *, create: bool) -> None:
    """A data_dir the command can use, else OperatorError naming it and the path.

    ``create``: the commands that write (``serve``, ``db upgrade``) make it,
    parents included, as the node always has; a folder that cannot be made or
    written is said here rather than as the SQLite driver's "unable to open
    database file" later.
    """
    path = settings.data_path
    if path.exists() and not path.is_dir():
        raise OperatorError(f"data_dir {path} is a file, not a folder {_hint('data_dir')}")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OperatorError(f"data_dir {path} cannot be created: {exc.strerror or exc} {_hint('data_dir')}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OperatorError(f"data_dir {path} is not writable by this user {_hint('data_dir')}")


def _no_index_yet(settings: Settings) -> bool:
    """SQLite in data_dir and no file there yet: nothing has been received (asking must not create one)."""
    return not settings.database_url and not (settings.data_path / "index.sqlite3").exists()


def _index_problem(exc: BaseException, settings: Settings) -> str:
    """One line for an index database that cannot be used; the URL shown without its password."""
    if isinstance(exc, migrate.SchemaError):
        return str(exc)
    if isinstance(exc, ArgumentError):
        return (f"database_url is not a valid SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db) "
                f"{_hint('database_url')}")
    if not settings.database_url and not settings.data_path.is_dir():  # SQLite's "unable to open database file"
        return f"data_dir {settings.data_path} does not exist {_hint('data_dir')}"
    where = _db_where(settings)
    if isinstance(exc, (ImportError, NoSuchModuleError)):
        return f"the index database {where} needs a driver that is not installed here: {_one_line(exc)}"
    return f"cannot reach the index database {where}: {_one_line(exc)}"


@contextmanager
def _index(settings: Settings) -> Iterator[Index]:
    """The index, opened (and its schema checked) for one command; a database that cannot be used is one line."""
    try:
        index = Index(settings.index_url)
    except INDEX_ERRORS as exc:
        raise OperatorError(_index_problem(exc, settings)) from exc
    try:
        yield index
    except UNREACHABLE as exc:  # it went away while the command ran
        raise OperatorError(_index_problem(exc, settings)) from exc
    finally:
        index.close()


def _cannot_start(message: str, prog: str = "dicomnode") -> int:
    """``dicomnode: cannot start: ...`` (``dicomnode web: ...`` for the HTTP side alone, as web.server says it)."""
    print(f"{prog}: cannot start: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    try:
        _data_dir(settings, create=True)
    except OperatorError as exc:
        return _cannot_start(str(exc))
    if not settings.destinations:
        log.warning("%s: reports are written to %s but sent nowhere (setting destinations)", NO_DESTINATIONS,
                    settings.data_path / "reports")
    try:
        node = Node(settings)
    except (*UNREACHABLE, migrate.SchemaError) as exc:
        return _cannot_start(_index_problem(exc, settings))
    except (ValueError, OSError, ImportError, SQLAlchemyError) as exc:
        # a bad rules file, a driver that is not installed, a database error that is not about reaching it
        return _cannot_start(_one_line(exc))
    try:
        return node.serve_forever()
    except OSError as exc:
        # the listener's address (dicom.scp.ListenError) or the HTTP side's: one line that names the setting
        return _cannot_start(_one_line(exc))


def _broker_problem(settings: Settings) -> str | None:
    """Why the broker cannot be reached, or None: one attempt, so that a typo is not retried for minutes.

    A worker started before its broker exits 2 and is started again by its
    service manager (deploy/systemd: Restart=on-failure).
    """
    with make_app(settings).connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=10)
        except BrokerUnreachable as exc:
            return f"cannot reach the broker {conn.as_uri()}: {_one_line(exc)} {_hint('broker_url')}"
    return None


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues or any(q not in ("cpu", "gpu") for q in queues):
        raise OperatorError(f"--queues must be cpu, gpu or cpu,gpu, got {args.queues!r}")
    if settings.embedded:
        raise OperatorError(f"needs broker_url (redis://host:6379/0): without one, `dicomnode serve` runs the "
                            f"pipeline itself {_hint('broker_url')}")
    _data_dir(settings, create=False)
    with _index(settings):  # every task needs it: said once at start, not as a traceback per task
        pass
    problem = _broker_problem(settings)
    if problem:
        raise OperatorError(problem)
    try:
        run_worker(settings, queues, concurrency=args.concurrency, pool=args.pool)
    except ValueError as exc:
        raise OperatorError(str(exc)) from exc
    return 0


def _existing_index(settings: Settings, command: str) -> None:
    """For commands that change the index: it must already exist (a wrong data_dir must not get a fresh one)."""
    _data_dir(settings, create=False)
    if _no_index_yet(settings):
        raise OperatorError(f"no index database in data_dir {settings.data_path} (nothing received there yet): "
                            f"nothing to {command} {_hint('data_dir')}")


def cmd_retry(args: argparse.Namespace) -> int:
    """Operator action: failed (parked) pipeline steps and parked deliveries back into the queue."""
    settings = _settings(args)
    _existing_index(settings, "retry")
    with _index(settings) as index:
        refs = Pipeline(settings, index).jobs.retry(args.version_id)
        sent = Outbox(index, settings).retry(None) if args.deliveries else 0
        if refs:
            index.add_event("retry", f"operator retry of {len(refs)} failed step(s)")
    print(f"{len(refs)} failed step(s) set back to pending (the running node queues them within "
          f"reconcile_interval_s = {settings.reconcile_interval_s:g} s); {sent} parked deliveries retried")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Operator action: one retention pass now (``--dry-run``: only say what would go)."""
    settings = _settings(args)
    _existing_index(settings, "purge")
    with _index(settings) as index:
        report = purge(settings, index, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, default=str))
        return 0
    for line in report.lines():
        print(line)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """The HTTP side alone (dashboard, REST, /metrics), e.g. on a host that does not run the listener."""
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    _data_dir(settings, create=False)
    try:
        with _index(settings):  # said as every command says it, before the server opens its own connection
            pass
    except OperatorError as exc:
        return _cannot_start(str(exc), "dicomnode web")
    try:
        return run_web(settings)
    except INDEX_ERRORS as exc:
        return _cannot_start(_index_problem(exc, settings), "dicomnode web")
    except OSError as exc:  # the HTTP port taken (web.server.PortInUse names http_port), a certificate unreadable
        return _cannot_start(_one_line(exc), "dicomnode web")


def cmd_hash_secret(args: argparse.Namespace) -> int:
    """The stored form of a token or password, for http_token_hash / http_users: only the hash goes in the settings.

    From standard input (``printf %s "$TOKEN" | dicomnode hash-secret``; one
    trailing newline is dropped), or asked twice without echo on a terminal.
    """
    if sys.stdin.isatty():
        secret = getpass.getpass("secret: ")
        if getpass.getpass("again: ") != secret:
            raise OperatorError("the two entries differ; nothing printed")
    else:
        secret = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not secret:
        raise OperatorError("an empty secret protects nothing; give one on standard input or at the prompt")
    print(hash_secret(secret))
    return 0


def _unresolvable(host: str) -> str | None:
    """Why ``host`` has no address (a typo, usually), or None; said before pynetdicom raises it as a traceback."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"host {host!r} cannot be resolved ({getattr(exc, 'strerror', None) or exc})"
    return None


def _peer_problem(host: str, port: int) -> str | None:
    if not 0 < port < 65536:
        return f"port {port} out of range (1-65535)"
    return _unresolvable(host)


def cmd_echo(args: argparse.Namespace) -> int:
    if args.destinations:
        settings = _settings(args)
        if not settings.destinations:
            raise OperatorError(f"{NO_DESTINATIONS}: nothing to echo {_hint('destinations')}")
        ok = True
        reachable = []
        for d in settings.destinations:  # each destination's own line, as for any other failure
            problem = _unresolvable(d.host)
            if problem:
                print(f"C-ECHO {d.name}: FAILED {problem} (setting destinations)")
                ok = False
            else:
                reachable.append(d)
        for name, good, detail in echo_destinations(settings.replace(destinations=reachable)):
            print(f"C-ECHO {name}: {'ok' if good else 'FAILED'} {detail}".rstrip())
            ok = ok and good
        return 0 if ok else 1
    if args.host is None or args.port is None or args.aet is None:
        raise OperatorError("give HOST PORT --aet AET, or --destinations")
    problem = _peer_problem(args.host, args.port)
    if problem:
        raise OperatorError(problem)

    status = echo(Destination(args.aet, args.host, args.port), calling_ae=args.calling, timeout_s=args.timeout)
    if status is None:
        print(f"C-ECHO {args.aet}@{args.host}:{args.port}: no association (refused, rejected or unreachable)")
        return 1
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OperatorError(f"no such file or folder: {missing[0]}{more}")
    try:
        dest = Destination.parse(args.to)
    except ValueError as exc:
        raise OperatorError(f"--to must look like AET@HOST:PORT (e.g. PACS@10.0.0.5:104), got {args.to!r}") from exc
    problem = _peer_problem(dest.host, dest.port)
    if problem:
        raise OperatorError(f"--to {args.to}: {problem}")
    try:
        results = send(args.paths, dest, calling_ae=args.calling, timeout_s=args.timeout)
    except FileNotFoundError as exc:  # gone between the check and the send
        raise OperatorError(f"no such file or folder: {exc}") from exc
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = "not sent" if r.status is None else f"0x{r.status:04X}"
        print(f"FAILED {r.path}: {status} {r.comment}".rstrip())
    print(f"sent {len(results) - len(failed)}/{len(results)} to {args.to}")
    return 0 if not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _data_dir(settings, create=False)
    if _no_index_yet(settings):
        doc: dict = {"schema": "dicomnode.status/1", "generated_at": None, "studies": []}
    else:
        with _index(settings) as index:
            doc = full_status(index, settings)
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
            if v.get("delivery"):
                print(f"    delivery: {v['delivery']}")
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
    _data_dir(settings, create=False)
    if _no_index_yet(settings):  # as status: nothing received here yet, and asking must not create an index
        events: list[dict] = []
    else:
        with _index(settings) as index:
            events = index.recent_events(args.limit)
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
    return run_demo(settings, workdir, without_t1ce=args.without_t1ce, quick=args.quick, progress=not args.quiet)


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
    sqlite_file = settings.data_path / "index.sqlite3" if not settings.database_url else None
    if sqlite_file is not None:
        _data_dir(settings, create=args.db_command == "upgrade")
    if args.db_command == "current" and sqlite_file is not None and not sqlite_file.exists():
        # asking must not create: SQLite would make an empty file at the path
        print(f"index database {where}: does not exist yet (the node, or `{migrate.UPGRADE_COMMAND}`, creates it)")
        return 1
    try:
        if args.db_command == "upgrade":
            now = migrate.upgrade(settings.index_url)
            print(f"index database {where}: at revision {now}" + (" (head)" if now == head else ""))
            return 0
        found = migrate.current_revision(settings.index_url)
    except (*UNREACHABLE, ImportError) as exc:
        raise OperatorError(_index_problem(exc, settings)) from exc
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
    sp.add_argument("--quiet", action="store_true",
                    help="for scripts: no training progress, send progress or heartbeats (the lines that open and "
                         "close each step and the closing summary remain)")
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

    sp = sub.add_parser("web", help="the HTTP side alone: dashboard, REST API, /metrics (serve runs it too)",
                        description="The HTTP side alone (dashboard, REST API, /metrics, /healthz, /readyz) on "
                                    "http_host:http_port, until SIGTERM/SIGINT; `serve` runs it too.")
    sp.set_defaults(func=cmd_web)

    sp = sub.add_parser("purge", help="operator: one retention pass now (spool and work files of delivered "
                                      "versions; the index keeps the record)",
                        description="One retention pass now: the spool and work files of delivered study versions "
                                    "older than retention_days (or, under retention_min_free_disk_mb, the oldest "
                                    "first) are removed; the index keeps the record.")
    sp.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    sp.add_argument("--json", action="store_true", help="the report as JSON")
    sp.set_defaults(func=cmd_purge)

    sp = sub.add_parser("hash-secret", help="print the stored form of a token or password (http_token_hash, "
                                            "http_users), read from standard input or asked for",
                        description="Print the stored form of a token or password for http_token_hash or "
                                    "http_users. The secret is read from standard input (one trailing newline "
                                    "dropped) or, on a terminal, asked for twice without echo.")
    sp.set_defaults(func=cmd_hash_secret)
    return p


def _prog(args: argparse.Namespace) -> str:
    """``dicomnode <command>`` (``dicomnode db upgrade``): the prefix of a command's one-line errors."""
    sub = getattr(args, "db_command", None)
    return f"dicomnode {args.command}" + (f" {sub}" if sub else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OperatorError as exc:
        print(f"{_prog(args)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
