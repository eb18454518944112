"""/metrics, /healthz and /readyz: a real Prometheus scraping a real node, and the figures against a real index.

(a) ``dicomnode serve`` with its HTTP side on a free loopback port, scraped
every second by Debian's Prometheus (loading deploy/prometheus/alerts.yml);
the instances sent must come out of Prometheus's own query API, with a
refused instance under its status label.
(b) The figures and the readiness checks against the real listener
(``StorageSCP``) on a real index in this process (SQLite and PostgreSQL: the
collector's SQL must run on both), through the routers' own HTTP app.
(c) deploy/prometheus/ passes ``promtool check`` and its alerts fire on the
series they are meant for (``promtool test rules``), and every metric the
alerts name is one /metrics serves.

Prometheus and promtool are required in CI (CI=true); a developer machine
without them skips those tests.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from conftest import REPO, need
from dicomnode.config import Settings
from dicomnode.dicom.scp import StorageSCP
from dicomnode.index.jobs import Jobs
from dicomnode.index.studies import Index
from dicomnode.spool import Spool
from dicomnode.stages.dispatch import Outbox
from dicomnode.web import health, metrics
from dicomnode.web.state import WebState
from nodeutil import (NODE_AET, PROCESS_TIMEOUT_S, NodeProcess, associate, free_port, mr_dataset, store, terminate,
                      wait_until)

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
DEPLOY = REPO / "deploy" / "prometheus"
NO_PIXELS = 0xA900  # what the listener answers an MR image without pixel data


def tool(path: Path) -> str:
    need(path.exists(), f"{path} (Debian package prometheus) not installed")
    return str(path)


class Prometheus:
    """Debian's Prometheus on a free loopback port, its TSDB in a temporary folder."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = {  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "dicomnode", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [tool(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=logf, stderr=subprocess.STDOUT, cwd=workdir)
        wait_until(self._ready, timeout=PROCESS_TIMEOUT_S, what="Prometheus ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` now (Prometheus's HTTP API)."""
        rsp = httpx.get(f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=30)
        rsp.raise_for_status()
        body = rsp.json()
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def value(self, promql: str) -> float | None:
        """The single value of ``promql`` now; None while it has no sample."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def stop(self) -> int:
        """SIGTERM and wait: the exit status of a clean shutdown."""
        return terminate(self.proc)


# -- (a) a real Prometheus scraping a real `dicomnode serve` -------------------------------------


def test_prometheus_scrapes_the_instances_a_node_received(tmp_path: Path) -> None:
    tool(PROMETHEUS)
    http_port = free_port()
    node = NodeProcess(tmp_path / "node", http_port=http_port).start()
    prom: Prometheus | None = None
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _get(f"{base}/healthz") == 200, what="the node's /healthz")
        rsp = httpx.get(f"{base}/healthz", timeout=30)
        assert rsp.json() == {"status": "alive"}
        # ready once the back half runs: every check passes on a healthy node
        wait_until(lambda: _get(f"{base}/readyz") == 200, what="the node's /readyz")
        ready = httpx.get(f"{base}/readyz", timeout=30).json()
        assert ready["ready"] is True
        assert {"index", "listener", "pipeline", "disk"} <= set(ready["checks"])

        prom = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{http_port}"], [DEPLOY / "alerts.yml"])
        wait_until(lambda: prom.value('up{job="dicomnode"}') == 1.0, what="Prometheus scraping the node")
        assert prom.value("dicomnode_instances_received_total") == 0.0

        n = 5
        study, series = generate_uid(), generate_uid()
        sent = [mr_dataset(study, series, instance=i + 1) for i in range(n)]
        assert store(node.port, *sent) == [0] * n
        nopix = mr_dataset(study, series)
        del nopix.PixelData
        assert store(node.port, nopix) == [NO_PIXELS]

        wait_until(lambda: prom.value("dicomnode_instances_received_total") == float(n),
                   what=f"dicomnode_instances_received_total == {n} in Prometheus")
        wait_until(lambda: prom.value('dicomnode_instances_refused_total{status="0xA900"}') == 1.0,
                   what="the refused instance under status 0xA900 in Prometheus")
        # the listener runs in this process: its open associations are a figure too
        assert prom.value("dicomnode_associations_open") is not None
        # the shipped rules load and evaluate against the node's real series (no checkpoint here)
        wait_until(lambda: prom.query('ALERTS{alertname="DicomnodeNoCheckpoints"}'),
                   what="DicomnodeNoCheckpoints pending in Prometheus")
        rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    finally:
        status = prom.stop() if prom is not None else 0
        node.stop()
    assert status == 0, prom.log() if prom is not None else ""


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=30).status_code
    except httpx.HTTPError:
        return 0


# -- (b) figures and readiness against the real listener and a real index, in this process --------


class Rig:
    """A real listener on a real index, and the HTTP app of the routers under test."""

    def __init__(self, settings: Settings, index: Index) -> None:
        self.settings, self.index = settings, index
        self.scp = StorageSCP(settings, index, Spool(settings.data_path, fsync=False))
        self.scp.start()
        self.ready = True

    def client(self, state: WebState | None = None) -> TestClient:
        return self.app(state or WebState(self.settings, self.index, listener=self.scp, ready=lambda: self.ready))

    @staticmethod
    def app(state: WebState) -> TestClient:
        app = FastAPI()
        app.include_router(metrics.router(state))
        app.include_router(health.router(state))
        return TestClient(app)


@pytest.fixture(params=["sqlite", "postgresql"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    """On SQLite and on PostgreSQL: the collector's SQL (substr, CASE, GROUP BY) must run on both."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    yield from _rig(tmp_path, url)


@pytest.fixture
def sqlite_rig(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, None)


def _rig(tmp_path: Path, url: str | None) -> Iterator[Rig]:
    settings = Settings().replace(
        ae_title=NODE_AET, host="127.0.0.1", port=free_port(), data_dir=str(tmp_path / "data"),
        database_url=url, min_free_disk_mb=10,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    settings.data_path.mkdir(parents=True, exist_ok=True)
    index = Index(settings.index_url)
    r = Rig(settings, index)
    yield r
    r.scp.stop()
    index.close()


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed: (sample name, sorted labels) -> value."""
    rsp = client.get("/metrics")
    assert rsp.status_code == 200
    assert rsp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(rsp.text) for s in fam.samples}


def test_metrics_count_what_the_listener_and_the_pipeline_recorded(rig: Rig, tmp_path: Path) -> None:
    client = rig.client()
    before = scrape(client)
    assert before[("dicomnode_instances_received_total", ())] == 0.0
    assert before[("dicomnode_info", (("version", metrics.package_version()),))] == 1.0

    # two studies of three instances, one sent twice, one refused, one association rejected
    studies = [(generate_uid(), generate_uid()) for _ in range(2)]
    sent = [mr_dataset(st, se, instance=i + 1) for st, se in studies for i in range(3)]
    assert store(rig.scp.port, *sent) == [0] * 6
    assert store(rig.scp.port, sent[0]) == [0]  # a duplicate: first copy kept, Success
    nopix = mr_dataset(*studies[0])
    del nopix.PixelData
    assert store(rig.scp.port, nopix) == [NO_PIXELS]
    wrong = associate(rig.scp.port, called="NOTTHENODE")
    assert wrong.is_rejected

    # pipeline steps as the runner records them: one done, one failed, one waiting on each queue
    versions = [v["version_id"] for s in rig.index.status()["studies"] for v in s["versions"]]
    study_ids = [s["id"] for s in rig.index.status()["studies"]]
    jobs = Jobs(rig.index)
    jobs.create(versions[0], study_ids[0], "convert")
    assert jobs.claim(versions[0], "convert", holder="test:1", lease_s=60, max_deliveries=3).outcome == "run"
    assert jobs.finish(versions[0], "convert", holder="test:1", seconds=0.3, detail={}, next_stage="preprocess")
    jobs.create(versions[1], study_ids[1], "convert")
    assert jobs.claim(versions[1], "convert", holder="test:1", lease_s=60, max_deliveries=3).outcome == "run"
    jobs.fail(versions[1], "convert", holder="test:1", error="no usable series", seconds=42.0)
    jobs.create(versions[1], study_ids[1], "infer")
    # a report object owed to the (unreachable) destination, and a checkpoint file (plus one that is not)
    report = rig.settings.data_path / "reports" / "sr.dcm"
    report.parent.mkdir(parents=True)
    mr_dataset(*studies[0]).save_as(report, enforce_file_format=True)
    assert Outbox(rig.index, rig.settings).enqueue([report], study_id=study_ids[0], version_id=versions[0]) == 1
    rig.settings.checkpoints_path.mkdir(parents=True)
    (rig.settings.checkpoints_path / "grade.pt").write_bytes(b"not validated here")
    (rig.settings.checkpoints_path / "README.txt").write_text("not a checkpoint")

    m = scrape(client)
    assert m[("dicomnode_instances_received_total", ())] == 7.0
    assert m[("dicomnode_instances_duplicate_total", ())] == 1.0
    assert m[("dicomnode_instances_refused_total", (("status", "0xA900"),))] == 1.0
    assert m[("dicomnode_associations_rejected_total", (("reason", "called_ae"),))] == 1.0
    assert m[("dicomnode_study_versions", (("state", "receiving"),))] == 2.0
    assert m[("dicomnode_pipeline_steps", (("stage", "convert"), ("state", "done")))] == 1.0
    assert m[("dicomnode_pipeline_steps", (("stage", "convert"), ("state", "failed")))] == 1.0
    assert m[("dicomnode_pipeline_steps", (("stage", "preprocess"), ("state", "pending")))] == 1.0
    assert m[("dicomnode_queue_depth", (("queue", "cpu"),))] == 1.0  # preprocess
    assert m[("dicomnode_queue_depth", (("queue", "gpu"),))] == 1.0  # infer
    assert m[("dicomnode_step_failures_total", (("kind", "failed"),))] == 1.0
    done = (("stage", "convert"), ("state", "done"))
    assert m[("dicomnode_stage_duration_seconds_bucket", (("le", "0.25"), *done))] == 0.0
    assert m[("dicomnode_stage_duration_seconds_bucket", (("le", "0.5"), *done))] == 1.0
    assert m[("dicomnode_stage_duration_seconds_count", done)] == 1.0
    assert m[("dicomnode_stage_duration_seconds_sum", done)] == pytest.approx(0.3)
    failed = (("stage", "convert"), ("state", "failed"))
    assert m[("dicomnode_stage_duration_seconds_bucket", (("le", "30.0"), *failed))] == 0.0
    assert m[("dicomnode_stage_duration_seconds_bucket", (("le", "60.0"), *failed))] == 1.0
    assert m[("dicomnode_stage_duration_seconds_bucket", (("le", "+Inf"), *failed))] == 1.0
    assert m[("dicomnode_deliveries", (("state", "pending"),))] == 1.0
    assert m[("dicomnode_deliveries", (("state", "parked"),))] == 0.0
    assert m[("dicomnode_checkpoint_files", ())] == 1.0
    assert m[("dicomnode_disk_min_free_bytes", ())] == 10 * 1024 * 1024
    assert m[("dicomnode_disk_free_bytes", ())] > m[("dicomnode_disk_min_free_bytes", ())]
    assert m[("dicomnode_ready", ())] == 1.0

    # an association held open is counted while it lasts
    assert m[("dicomnode_associations_open", ())] == 0.0
    held = associate(rig.scp.port)
    assert held.is_established
    try:
        wait_until(lambda: scrape(client)[("dicomnode_associations_open", ())] == 1.0, what="one open association")
    finally:
        held.release()
    wait_until(lambda: scrape(client)[("dicomnode_associations_open", ())] == 0.0, what="no open association")

    # the scrape of an index with a few studies stays cheap (printed for the record, not asserted)
    t0 = time.perf_counter()
    for _ in range(10):
        scrape(client)
    print(f"/metrics on {rig.settings.index_url.split(':')[0]}: {(time.perf_counter() - t0) / 10 * 1000:.1f} ms a scrape")


def test_metrics_survive_a_restart_and_agree_without_the_listener(rig: Rig) -> None:
    """The figures are the index's: a fresh collector (a restarted node, or `dicomnode web`) reads the same."""
    study, series = generate_uid(), generate_uid()
    assert store(rig.scp.port, *[mr_dataset(study, series, instance=i + 1) for i in range(3)]) == [0] * 3
    served = scrape(rig.client())
    second = Index(rig.settings.index_url)
    try:
        web = scrape(rig.client(WebState(rig.settings, second)))
    finally:
        second.close()
    assert web[("dicomnode_instances_received_total", ())] == served[("dicomnode_instances_received_total", ())] == 3
    assert ("dicomnode_associations_open", ()) in served and ("dicomnode_associations_open", ()) not in web


def test_healthz_and_readyz_name_the_failing_check(rig: Rig) -> None:
    client = rig.client()
    rsp = client.get("/healthz")
    assert (rsp.status_code, rsp.json()) == (200, {"status": "alive"})
    rsp = client.get("/readyz")
    assert rsp.status_code == 200, rsp.json()
    body = rsp.json()
    assert body["ready"] is True
    assert set(body["checks"]) == {"index", "listener", "pipeline", "disk"}  # embedded: no broker
    assert all(c["ok"] for c in body["checks"].values())

    def failing(client: TestClient) -> dict[str, str]:
        rsp = client.get("/readyz")
        assert rsp.status_code == 503
        assert rsp.json()["ready"] is False
        return {k: c["detail"] for k, c in rsp.json()["checks"].items() if not c["ok"]}

    # the back half not (yet) running
    rig.ready = False
    assert set(failing(client)) == {"pipeline"}
    rig.ready = True
    # free disk under an absurd watermark
    greedy = rig.settings.replace(min_free_disk_mb=1 << 40)
    bad = failing(rig.client(WebState(greedy, rig.index, listener=rig.scp, ready=lambda: True)))
    assert set(bad) == {"disk"} and "min_free_disk_mb" in bad["disk"]
    # `dicomnode web`: no listener in this process, so the DICOM port is probed over TCP
    assert rig.client(WebState(rig.settings, rig.index)).get("/readyz").status_code == 200
    silent = rig.settings.replace(port=free_port())
    bad = failing(rig.client(WebState(silent, rig.index)))
    assert set(bad) == {"listener"} and str(silent.port) in bad["listener"]
    # the listener stopped in this process
    rig.scp.stop()
    assert set(failing(client)) == {"listener"}
    assert client.get("/healthz").status_code == 200  # still alive: a restart would not help readiness
    rig.scp.start()
    # distributed mode: the broker is checked, and its URL (which may hold a password) is not shown
    dead_broker = rig.settings.replace(broker_url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    bad = failing(rig.client(WebState(dead_broker, rig.index, listener=rig.scp, ready=lambda: True)))
    assert set(bad) == {"broker"} and "secret" not in bad["broker"]
    # the scrape says the same as /readyz
    m = scrape(rig.client(WebState(dead_broker, rig.index, listener=rig.scp, ready=lambda: True)))
    assert m[("dicomnode_ready", ())] == 0.0
    assert m[("dicomnode_ready_check", (("check", "broker"),))] == 0.0
    assert m[("dicomnode_ready_check", (("check", "index"),))] == 1.0


def test_an_unreachable_index_fails_readyz_and_the_scrape_still_answers(pg_url: str, tmp_path: Path) -> None:
    """The index gone (its PostgreSQL database dropped under it): /readyz says so, /metrics answers without it."""
    settings = Settings().replace(data_dir=str(tmp_path / "data"), database_url=pg_url, min_free_disk_mb=10,
                                  port=free_port())
    settings.data_path.mkdir(parents=True)
    index = Index(settings.index_url)
    try:
        client = Rig.app(WebState(settings, index, ready=lambda: True))
        assert scrape(client)[("dicomnode_instances_received_total", ())] == 0.0
        name = pg_url.rsplit("/", 1)[1]
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        rsp = client.get("/readyz")
        assert rsp.status_code == 503
        assert rsp.json()["checks"]["index"]["ok"] is False
        m = scrape(client)
        assert ("dicomnode_instances_received_total", ()) not in m
        assert m[("dicomnode_ready_check", (("check", "index"),))] == 0.0
        assert m[("dicomnode_info", (("version", metrics.package_version()),))] == 1.0
    finally:
        index.close()


def test_readyz_passes_with_a_live_broker(rig: Rig) -> None:
    need(_get_redis(), "Redis on 127.0.0.1:6379")
    live = rig.settings.replace(broker_url="redis://127.0.0.1:6379/0")
    rsp = rig.client(WebState(live, rig.index, listener=rig.scp, ready=lambda: True)).get("/readyz")
    assert rsp.status_code == 200, rsp.json()
    assert rsp.json()["checks"]["broker"]["ok"] is True


def _get_redis() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=5):
            return True
    except OSError:
        return False


# -- (c) deploy/prometheus/ is valid, and its alerts fire on what they are meant for ------------


def test_deploy_config_and_rules_pass_promtool() -> None:
    promtool = tool(PROMTOOL)
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


NODE = 'job="dicomnode", instance="node:8081"'
RULE_TESTS = f"""
rule_files: [alerts.yml]  # the copy without annotations, next to this file
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{{NODE}}}'
        values: '1 1 0x10'
      - series: 'dicomnode_disk_free_bytes{{{NODE}}}'
        values: '5e9x5 1.5e9x20'
      - series: 'dicomnode_disk_min_free_bytes{{{NODE}}}'
        values: '1e9x30'
      - series: 'dicomnode_deliveries{{{NODE}, state="parked"}}'
        values: '0x5 2x10'
      - series: 'dicomnode_pipeline_steps{{{NODE}, stage="infer", state="failed"}}'
        values: '0x5 1x10'
      - series: 'dicomnode_instances_refused_total{{{NODE}, status="0xA700"}}'
        values: '0 0 0+3x20'
      - series: 'dicomnode_ready_check{{{NODE}, check="listener"}}'
        values: '1x3 0x10'
      - series: 'dicomnode_ready_check{{{NODE}, check="index"}}'
        values: '1x15'
      - series: 'dicomnode_queue_depth{{{NODE}, queue="gpu"}}'
        values: '0x5 3x90'
      # steps finish until minute 20, then none: stalled from minute 50 (30 min window), alert 15 min later
      - series: 'dicomnode_stage_duration_seconds_count{{{NODE}, stage="convert", state="done"}}'
        values: '1+1x20 21x80'
    alert_rule_test:
      - {{eval_time: 1m, alertname: DicomnodeDown, exp_alerts: []}}
      - eval_time: 5m
        alertname: DicomnodeDown
        exp_alerts: [{{exp_labels: {{severity: critical, job: dicomnode, instance: "node:8081"}}}}]
      - {{eval_time: 4m, alertname: DicomnodeDiskLow, exp_alerts: []}}
      - eval_time: 20m
        alertname: DicomnodeDiskLow
        exp_alerts: [{{exp_labels: {{severity: warning, job: dicomnode, instance: "node:8081"}}}}]
      - {{eval_time: 20m, alertname: DicomnodeDiskFull, exp_alerts: []}}
      - eval_time: 10m
        alertname: DicomnodeDeliveriesParked
        exp_alerts: [{{exp_labels: {{severity: warning, job: dicomnode, instance: "node:8081", state: parked}}}}]
      - eval_time: 10m
        alertname: DicomnodeStepsFailed
        exp_alerts: [{{exp_labels: {{severity: warning, job: dicomnode, instance: "node:8081", stage: infer}}}}]
      - {{eval_time: 2m, alertname: DicomnodeRefusalsSpike, exp_alerts: []}}
      - eval_time: 15m
        alertname: DicomnodeRefusalsSpike
        exp_alerts: [{{exp_labels: {{severity: warning, job: dicomnode, instance: "node:8081"}}}}]
      - eval_time: 10m
        alertname: DicomnodeNotReady
        exp_alerts: [{{exp_labels: {{severity: critical, job: dicomnode, instance: "node:8081", check: listener}}}}]
      - {{eval_time: 45m, alertname: DicomnodePipelineStalled, exp_alerts: []}}
      - {{eval_time: 60m, alertname: DicomnodePipelineStalled, exp_alerts: []}}
      - eval_time: 70m
        alertname: DicomnodePipelineStalled
        exp_alerts: [{{exp_labels: {{severity: critical, job: dicomnode, instance: "node:8081"}}}}]
"""


def without_annotations(rules: str) -> str:
    """The rules minus their annotations, which promtool would otherwise compare word for word.

    (Their templates are checked by ``promtool check rules``.) Line-based, on
    the layout alerts.yml keeps: ``annotations:`` and the deeper-indented lines under it.
    """
    out, skipping_deeper_than = [], None
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if skipping_deeper_than is not None and (indent > skipping_deeper_than or not line.strip()):
            continue
        skipping_deeper_than = indent if line.strip() == "annotations:" else None
        if skipping_deeper_than is None:
            out.append(line)
    return "\n".join(out) + "\n"


def test_alerts_fire_on_the_series_they_watch(tmp_path: Path) -> None:
    promtool = tool(PROMTOOL)
    rules = without_annotations((DEPLOY / "alerts.yml").read_text())
    assert "annotations" not in rules and rules.count("alert: ") >= 10
    (tmp_path / "alerts.yml").write_text(rules)
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS)
    out = subprocess.run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def test_every_metric_the_alerts_name_is_served(sqlite_rig: Rig) -> None:
    """A renamed metric would silence its alert without any error: the names must match what /metrics serves."""
    text = sqlite_rig.client().get("/metrics").text
    served = {fam.name + suffix for fam in text_string_to_metric_families(text)
              for suffix in SAMPLE_SUFFIXES.get(fam.type, ("",))}
    named = set(re.findall(r"\bdicomnode_[a-z_]+", (DEPLOY / "alerts.yml").read_text()))
    assert len(named) >= 8, f"alerts.yml names too few dicomnode metrics: {named}"
    missing = named - served
    assert not missing, f"alerts.yml names metrics /metrics does not serve: {sorted(missing)}"
