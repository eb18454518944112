"""``dicomnode``: thin shells over the library (as pynetdicom's apps are).

Settings are read here, once, and passed down.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import Settings, SettingsError, load_settings
from .logs import setup_logging


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings.log_level, settings.log_json)
    from sqlalchemy.exc import SQLAlchemyError

    from .node import Node

    try:
        node = Node(settings)
    except (ValueError, OSError, SQLAlchemyError) as exc:  # bad rules file, unwritable data_dir, unreachable index
        print(f"dicomnode: cannot start: {exc}", file=sys.stderr)
        return 2
    node.serve_forever()
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from .scu import Destination, echo

    status = echo(Destination(args.aet, args.host, args.port), calling_ae=args.calling, timeout_s=args.timeout)
    if status is None:
        print(f"C-ECHO {args.aet}@{args.host}:{args.port}: no association (refused, rejected or unreachable)")
        return 1
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from .scu import Destination, send

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
    from .index import Index

    settings = _settings(args)
    if settings.database_url is None and not (settings.data_path / "index.sqlite3").exists():
        doc: dict = {"schema": "dicomnode.status/1", "generated_at": None, "studies": []}
    else:
        index = Index(settings.index_url)
        try:
            doc = index.status()
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
                  + (f" ({v['complete_reason']}, {v['completed_at']})" if v["completed_at"] else ""))
            for se in v["series"]:
                role = se["role"] or "-"
                print(f"    #{se['series_number'] if se['series_number'] is not None else '?':>4} "
                      f"{(se['description'] or '')[:32]:32} {se['instances']:>5} inst  "
                      f"{role:6} {se['status'] or '':11} {se['reason'] or ''}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from .index import Index

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
    from .synth import make_phantom, write_study

    volumes, affine = make_phantom(shape=tuple(args.shape), seed=args.seed, tumour=True, grade=args.grade)
    written = write_study(volumes, affine, args.out, vendor=args.vendor, enhanced=args.enhanced, seed=args.seed)
    print(f"wrote {len(written.all_files())} files, {len(written.series)} series to {args.out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(dataclasses.asdict(settings), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomnode", description="PACS-integrated glioma-grading DICOM node")
    p.add_argument("--config", type=Path, help="TOML settings file (env DICOMNODE_<SETTING> overrides it)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the node: C-ECHO/C-STORE listener, assembly")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    sp.add_argument("host")
    sp.add_argument("port", type=int)
    sp.add_argument("--aet", required=True, help="called AE title of the peer")
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
    sp.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40])
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("config", help="print the effective settings")
    sp.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
