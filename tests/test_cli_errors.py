"""Every everyday operator mistake is one line on stderr and exit status 2, never a traceback.

Each case runs the real CLI (``python -m dicomnode ...``) as a subprocess, as
an operator would, against real things: a port another socket holds, a
PostgreSQL port nobody listens on, a file where data_dir should be, a folder
this user may not write. Cases without shared state run side by side (each is
mostly interpreter start-up), so the file costs about the time of its slowest
cases, not the sum.

The ``serve`` cases set ``log_level = ERROR``: the node's own log lines (the
start-up warnings among them) go to stderr too, and what is under test is the
one line the CLI prints.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dicomnode.cli import main
from dicomnode.config import Settings
from dicomnode.index.reports import Reports
from dicomnode.index.schema import ReportRow
from dicomnode.index.studies import Index, InstanceMeta
from dicomnode.runtime.monitor import delivery, full_status
from dicomnode.stages.dispatch import NOT_SENT_NO_DESTINATION
from dicomnode.synth import make_phantom, write_study
from dicomnode.web.auth import verify_secret
from nodeutil import MR, PROCESS_TIMEOUT_S, REPO, RELEASE_COMPLETES, NodeProcess, free_port, store

Case = tuple[Sequence[str], dict[str, str]] | tuple[Sequence[str], dict[str, str], str]  # args, env[, stdin]


def dicomnode(args: Sequence[str], env: dict[str, str] | None = None, *, prefix: Sequence[str] = (),
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnode ARGS`` with only the DICOMNODE_* variables given (none inherited from the shell)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    full.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "dicomnode", *args], env=full, cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)


def run_all(cases: dict[str, Case]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run independent cases side by side; their results by name."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(dicomnode, case[0], case[1], stdin=case[2] if len(case) > 2 else None)
                   for name, case in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def one_line(r: subprocess.CompletedProcess[str], what: str = "") -> str:
    """The single stderr line of a mistake, after checking exit status 2 and that nothing else was printed there."""
    assert "Traceback" not in r.stderr, f"{what}: a traceback:\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, f"{what}: exit {r.returncode}, stderr:\n{r.stderr}"
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# -- the listener's address ----------------------------------------------------------------------


def test_dicom_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, listening: int) -> None:
    r = dicomnode(["serve"], {"DICOMNODE_PORT": str(listening), "DICOMNODE_DATA_DIR": str(tmp_path / "data"),
                              "DICOMNODE_HTTP_PORT": "0", "DICOMNODE_LOG_LEVEL": "ERROR"})
    assert one_line(r) == (f"dicomnode: cannot start: port {listening} on 127.0.0.1 is already in use "
                           f"(setting port / DICOMNODE_PORT)")


def test_as_a_user_without_privileges_a_low_port_and_an_unwritable_parent_are_one_line(tmp_path: Path) -> None:
    """As root, ``unshare --user`` runs the node without root's capabilities (port < 1024, any folder)."""
    prefix = ["unshare", "--user"] if os.geteuid() == 0 else []
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        base = {"DICOMNODE_HTTP_PORT": "0", "DICOMNODE_LOG_LEVEL": "ERROR"}
        low = dicomnode(["serve"], {**base, "DICOMNODE_PORT": "104", "DICOMNODE_DATA_DIR": str(tmp_path / "data")},
                        prefix=prefix)
        assert one_line(low, "port 104").startswith(
            "dicomnode: cannot start: port 104 on 127.0.0.1 needs privileges this process lacks")
        assert one_line(low).endswith("(setting port / DICOMNODE_PORT)")
        under = dicomnode(["serve"], {**base, "DICOMNODE_PORT": str(free_port()),
                                      "DICOMNODE_DATA_DIR": str(readonly / "data")}, prefix=prefix)
        assert one_line(under, "read-only parent") == (
            f"dicomnode: cannot start: data_dir {readonly / 'data'} cannot be created: Permission denied "
            f"(setting data_dir / DICOMNODE_DATA_DIR)")
    finally:
        readonly.chmod(0o755)


# -- the index database --------------------------------------------------------------------------


def test_an_unreachable_index_is_one_line_for_every_command_that_opens_it(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    env = {"DICOMNODE_DATABASE_URL": f"postgresql+psycopg://dicomnode:hunter2@127.0.0.1:{port}/x",
           "DICOMNODE_DATA_DIR": str(tmp_path / "data"), "DICOMNODE_HTTP_PORT": "0", "DICOMNODE_LOG_LEVEL": "ERROR",
           "DICOMNODE_PORT": str(free_port())}
    commands = {"status": ["status"], "events": ["events"], "retry": ["retry"], "purge": ["purge"],
                "db current": ["db", "current"], "worker": ["worker"], "serve": ["serve"], "web": ["web"]}
    extra = {"worker": {"DICOMNODE_BROKER_URL": "redis://127.0.0.1:6379/15"},
             "web": {"DICOMNODE_HTTP_PORT": str(free_port())}}
    results = run_all({name: (args, {**env, **extra.get(name, {})}) for name, args in commands.items()})
    where = f"postgresql+psycopg://dicomnode:***@127.0.0.1:{port}/x"
    for name, r in results.items():
        line = one_line(r, name)
        prefix = {"serve": "dicomnode: cannot start",
                  "web": "dicomnode web: cannot start"}.get(name, f"dicomnode {name}")
        assert line.startswith(f"{prefix}: cannot reach the index database {where}: "), line
        assert "refused" in line.lower() and "hunter2" not in r.stderr + r.stdout, line


def test_a_database_url_that_is_no_url_is_one_line(tmp_path: Path) -> None:
    env = {"DICOMNODE_DATABASE_URL": "postgres is on db1", "DICOMNODE_DATA_DIR": str(tmp_path / "data"),
           "DICOMNODE_HTTP_PORT": "0", "DICOMNODE_LOG_LEVEL": "ERROR", "DICOMNODE_PORT": str(free_port())}
    results = run_all({"status": (["status"], env), "serve": (["serve"], env)})
    expected = ("database_url is not a valid SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db) "
                "(setting database_url / DICOMNODE_DATABASE_URL)")
    assert one_line(results["status"]) == f"dicomnode status: {expected}"
    assert one_line(results["serve"]) == f"dicomnode: cannot start: {expected}"


# -- data_dir ------------------------------------------------------------------------------------


def test_a_file_in_place_of_data_dir_is_one_line_naming_it(tmp_path: Path) -> None:
    afile = tmp_path / "data"
    afile.write_text("not a folder")
    env = {"DICOMNODE_DATA_DIR": str(afile), "DICOMNODE_HTTP_PORT": "0", "DICOMNODE_LOG_LEVEL": "ERROR",
           "DICOMNODE_PORT": str(free_port())}
    results = run_all({"status": (["status"], env), "serve": (["serve"], env),
                       "db upgrade": (["db", "upgrade"], env),
                       "under it": (["serve"], {**env, "DICOMNODE_DATA_DIR": str(afile / "sub")})})
    said = f"data_dir {afile} is a file, not a folder (setting data_dir / DICOMNODE_DATA_DIR)"
    assert one_line(results["status"]) == f"dicomnode status: {said}"
    assert one_line(results["db upgrade"]) == f"dicomnode db upgrade: {said}"
    assert one_line(results["serve"]) == f"dicomnode: cannot start: {said}"
    assert one_line(results["under it"]) == (f"dicomnode: cannot start: data_dir {afile / 'sub'} cannot be created: "
                                             f"Not a directory (setting data_dir / DICOMNODE_DATA_DIR)")
    assert afile.read_text() == "not a folder"


def test_status_and_events_on_a_data_dir_that_does_not_exist_say_nothing_is_there_and_create_nothing(
        tmp_path: Path) -> None:
    env = {"DICOMNODE_DATA_DIR": str(tmp_path / "nothing-here")}
    results = run_all({"status": (["status"], env), "events": (["events"], env),
                       "events --json": (["events", "--json"], env)})
    for name, r in results.items():
        assert r.returncode == 0 and r.stderr == "", f"{name}: exit {r.returncode}\n{r.stderr}"
    assert results["status"].stdout == "no studies\n"
    assert results["events"].stdout == ""
    assert json.loads(results["events --json"].stdout) == []
    assert not (tmp_path / "nothing-here").exists()


# -- settings from the environment ---------------------------------------------------------------


def test_a_bad_environment_value_is_one_line_naming_the_variable() -> None:
    """Every type and validation rule is covered in test_config.py; here, that the CLI prints it as one line."""
    results = run_all({
        "abc": (["status"], {"DICOMNODE_PORT": "abc"}),
        "70000": (["serve"], {"DICOMNODE_PORT": "70000"}),
        "json": (["config"], {"DICOMNODE_DESTINATIONS": '["PACS@pacs"]'}),
    })
    assert one_line(results["abc"]) == "dicomnode: DICOMNODE_PORT: expected an integer, got 'abc'"
    assert one_line(results["70000"]) == "dicomnode: DICOMNODE_PORT: port 70000 out of range (1-65535)"
    assert one_line(results["json"]) == ("dicomnode: DICOMNODE_DESTINATIONS: destination 'PACS@pacs' "
                                         "is not AET@host:port")


def test_an_unknown_variable_is_a_one_line_warning_with_the_nearest_setting_and_the_command_goes_on(
        tmp_path: Path) -> None:
    r = dicomnode(["status"], {"DICOMNODE_PROT": "11113", "DICOMNODE_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 0 and r.stdout == "no studies\n"
    assert r.stderr.splitlines() == ["dicomnode: warning: DICOMNODE_PROT is not a setting "
                                     "(did you mean DICOMNODE_PORT?)"]


# -- the other commands --------------------------------------------------------------------------


def test_send_echo_worker_and_hash_secret_mistakes_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "study"
    (tmp_path / "d").mkdir()
    results = run_all({
        "send": (["send", str(missing), "--to", "PACS@127.0.0.1:104"], {}),
        "send --to": (["send", str(tmp_path), "--to", "PACS@127.0.0.1"], {}),
        "echo": (["echo", "--destinations"], {}),
        "echo port": (["echo", "127.0.0.1", "70000", "--aet", "PACS"], {}),
        "send host": (["send", str(tmp_path), "--to", "PACS@no-such-host.invalid:104"], {}),
        "worker embedded": (["worker"], {"DICOMNODE_DATA_DIR": str(tmp_path / "d")}),
        "worker broker": (["worker"], {"DICOMNODE_DATA_DIR": str(tmp_path / "d"), "DICOMNODE_LOG_LEVEL": "ERROR",
                                       "DICOMNODE_BROKER_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}),
        "hash-secret empty": (["hash-secret"], {}, ""),
        "hash-secret": (["hash-secret"], {}, "s3cret\n"),
    })
    assert one_line(results["send"]) == f"dicomnode send: no such file or folder: {missing}"
    assert one_line(results["send --to"]) == ("dicomnode send: --to must look like AET@HOST:PORT "
                                              "(e.g. PACS@10.0.0.5:104), got 'PACS@127.0.0.1'")
    assert one_line(results["echo"]) == ("dicomnode echo: no destinations configured: nothing to echo "
                                         "(setting destinations / DICOMNODE_DESTINATIONS)")
    assert one_line(results["echo port"]) == "dicomnode echo: port 70000 out of range (1-65535)"
    assert one_line(results["send host"]).startswith(
        "dicomnode send: --to PACS@no-such-host.invalid:104: host 'no-such-host.invalid' cannot be resolved (")
    assert one_line(results["worker embedded"]).startswith("dicomnode worker: needs broker_url")
    line = one_line(results["worker broker"])
    assert line.startswith("dicomnode worker: cannot reach the broker redis://") and "hunter2" not in line, line
    assert one_line(results["hash-secret empty"]).startswith("dicomnode hash-secret: an empty secret protects nothing")
    hashed = results["hash-secret"]
    assert hashed.returncode == 0 and hashed.stderr == "", hashed.stderr
    assert verify_secret("s3cret", hashed.stdout.strip()) and not verify_secret("s3cret\n", hashed.stdout.strip())


def test_the_new_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command, words in (("web", ["HTTP side"]), ("purge", ["--dry-run", "--json"]),
                           ("hash-secret", ["standard input", "http_token_hash"])):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: dicomnode {command}") and all(w in out for w in words), out


# -- no destination, said honestly ---------------------------------------------------------------


def test_delivery_is_said_from_the_outbox_never_from_the_report_step() -> None:
    report = {"report_written": True}
    sent = {"state": "sent", "confirmation": "confirmed"}
    assert delivery(None, [], False, None) is None  # no report yet
    assert delivery(report, [], False, "done") == NOT_SENT_NO_DESTINATION == "not sent: no destination"
    assert delivery({"report_written": False}, [], True, "done") == "not sent: no report written"
    assert delivery(report, [], True, "pending") == "waiting for the dispatch step"
    assert delivery(report, [sent, sent], True, "done") == "sent, confirmed"
    assert delivery(report, [sent, {"state": "sent", "confirmation": "awaiting"}], True, "done") == \
        "sent, awaiting confirmation"
    assert delivery(report, [sent, {"state": "pending", "confirmation": None}], True, "done") == \
        "sending: 1 of 2 object(s) sent"
    assert delivery(report, [sent, {"state": "parked", "confirmation": None}], True, "done").startswith(
        "parked: 1 of 2 object(s) not sent")


def test_an_old_report_row_that_said_sent_is_shown_as_written_and_not_sent(tmp_path: Path) -> None:
    """Rows stored before ``report_written`` carry ``report_sent: true`` for "written"; status says what is true."""
    settings = Settings().replace(data_dir=str(tmp_path))
    index = Index(settings.index_url)
    try:
        out = index.add_instance(InstanceMeta("1.2.3.4.5", MR, "1.2.840.10008.1.2.1", "1.2.3", "1.2.3.4", "MR", 1,
                                              "t2", True), "spool/store/a.dcm", 10, "SCU", "127.0.0.1")
        version_id = index.status()["studies"][0]["versions"][0]["version_id"]
        with index.engine.begin() as c:
            c.execute(ReportRow.__table__.insert().values(
                version_id=version_id, study_id=out.study_id, version=out.version, sr_sop_instance_uid="1.2.9",
                sr_series_instance_uid="1.2.8", files=["reports/study-1/v1/sr.dcm"], created_at=time.time(),
                summary={"cannot_grade": "no T1", "models": [], "report_sent": True}))
        assert Reports(index, tmp_path).by_version()[version_id]["report_sent"] is True  # stored as it was
        (version,) = full_status(index, settings)["studies"][0]["versions"]
    finally:
        index.close()
    assert version["report"]["report_sent"] is False and version["report"]["report_written"] is True
    assert version["delivery"] == "not sent: no destination"


def finished(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The study's last version once its pipeline is done or failed (nothing more will happen to it)."""
    if not doc["studies"] or not doc["studies"][0]["versions"]:
        return None
    version = doc["studies"][0]["versions"][-1]
    state = version.get("pipeline_state") or ""
    return version if state == "done" or state.startswith("failed") else None


@pytest.mark.slow
def test_without_destinations_serve_warns_and_status_says_not_sent(tmp_path: Path) -> None:
    volumes, affine = make_phantom(shape=(48, 48, 24), seed=5, tumour=True, grade="HGG")
    files = write_study(volumes, affine, tmp_path / "study", vendor="siemens", seed=5, roles=("T2",)).all_files()
    node = NodeProcess(tmp_path / "data", checkpoints_dir=str(tmp_path / "no-checkpoints"), **RELEASE_COMPLETES)
    node.start()
    try:
        assert ("no destinations configured: reports are written to "
                f"{(tmp_path / 'data' / 'reports').resolve()} but sent nowhere (setting destinations)") in node.log()
        assert set(store(node.port, *files)) == {0}
        doc = node.wait_for(lambda d: finished(d) is not None)
        version = finished(doc)
        assert version is not None
        assert version["pipeline_state"] == "done", version
        assert version["report"]["report_written"] is True and version["report"]["report_sent"] is False
        assert version["deliveries"] == [] and version["delivery"] == "not sent: no destination"
        text = node.cli("status").stdout
        assert "    delivery: not sent: no destination\n" in text, text
    finally:
        node.stop()
