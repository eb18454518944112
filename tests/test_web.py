"""The HTTP side of a real node: REST API, dashboard pages, credentials, retries, and no patient data where it must not be.

Real processes only: ``dicomnode serve`` subprocesses with ``http_port`` set,
a real Orthanc as the PACS, HTTP over loopback with httpx. One node (the
module's ``secured`` fixture) faces the network (``http_host = 0.0.0.0``, a
bearer token and a Basic user configured) and grades one study with the tiny
test checkpoints; its report step is made to fail first (``reports/study-1``
is a file, as after a disk or permission mistake) and comes back through
``POST /api/versions/1/retry``; its PACS is down, so the report's deliveries
park, and come back through ``POST /api/deliveries/N/retry`` once the PACS is
up. Other tests start a node that never grades anything, or none at all.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from checkpoints import tiny_checkpoints
from conftest import need
from dicomnode.synth import make_phantom, write_study
from dicomnode.web.auth import Authenticator, hash_secret, is_hash, verify_secret
from dicomnode.config import Settings
from nodeutil import (LOOSE_GATE, NODE_AET, PROCESS_TIMEOUT_S, REPO, RELEASE_COMPLETES, NodeProcess, epoch,
                      free_port, wait_until)
from pacs import Orthanc

TOKEN = "web-test-token-7f3a"
USER, PASSWORD = "radiologist", "correct horse battery staple"
PATIENT_NAME, PATIENT_ID = "WEBTEST^PATIENT", "WEBPID4711"
# what must never leave the node except on the report page, to an authenticated request
PHI = (PATIENT_NAME, PATIENT_ID, "WEBTEST")


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class Web:
    """An httpx client on a node's HTTP side (loopback), with the credentials a test gives."""

    def __init__(self, port: int, headers: dict[str, str] | None = None, *, scheme: str = "http",
                 verify: ssl.SSLContext | bool = True) -> None:
        self.base = f"{scheme}://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, headers=headers or {}, timeout=120, follow_redirects=False,
                                   verify=verify)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(path, **kw)

    def json(self, path: str, **kw: Any) -> Any:
        r = self.get(path, **kw)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        return r.json()

    def close(self) -> None:
        self.client.close()


def answers(port: int, scheme: str = "http", verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(f"{scheme}://127.0.0.1:{port}/healthz", timeout=5, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def version_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    studies = doc.get("studies") or []
    return studies[0]["versions"][-1] if studies and studies[0]["versions"] else None


def write_web_study(out: Path, seed: int = 3) -> Path:
    """Four sequences as Enhanced MR (one file per series: quick to send) with the test's patient name and ID."""
    volumes, affine = make_phantom(shape=(64, 64, 40), seed=seed, tumour=True, grade="HGG")
    write_study(volumes, affine, out, vendor="siemens", seed=seed, enhanced=True, patient_name=PATIENT_NAME,
                patient_id=PATIENT_ID)
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoints(tmp_path_factory)


class Secured:
    def __init__(self, node: NodeProcess, orthanc: Orthanc, http_port: int, study_dir: Path) -> None:
        self.node, self.orthanc, self.http_port, self.study_dir = node, orthanc, http_port, study_dir
        self.web = Web(http_port, bearer())
        self.anon = Web(http_port)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, ckpt_dir: Path) -> Iterator[Secured]:
    """A node beyond loopback with credentials, one graded study, its report step retried, its deliveries parked."""
    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    tmp = tmp_path_factory.mktemp("web")
    port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp / "pacs", port, start=False)  # the PACS is down: deliveries park
    node = NodeProcess(tmp / "data", port=port, checkpoints_dir=str(ckpt_dir), destinations=[orthanc.destination],
                       dispatch_max_attempts=1, dispatch_poll_s=0.5, http_host="0.0.0.0", http_port=http_port,
                       http_token_hash=hash_secret(TOKEN), http_users={USER: hash_secret(PASSWORD)},
                       **RELEASE_COMPLETES, **LOOSE_GATE)
    # the report step will fail: where it writes the version's report folder is a file (a disk mistake)
    blocker = node.data_dir / "reports" / "study-1"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    node.start()
    s = Secured(node, orthanc, http_port, write_web_study(tmp / "study"))
    try:
        wait_until(lambda: answers(http_port), what="the HTTP side answers")
        sent = node.cli("send", str(s.study_dir), "--to", f"{NODE_AET}@127.0.0.1:{port}")
        assert "sent 4/4" in sent.stdout, sent.stdout + sent.stderr
        wait_until(lambda: (version_of(s.web.json("/api/status")) or {}).get("pipeline_state") == "failed at report",
                   what="the report step failed")
        yield s
    finally:
        s.web.close()
        s.anon.close()
        node.stop()
        orthanc.stop()


def test_hash_secret_round_trip_and_a_wrong_secret_fails() -> None:
    stored = hash_secret("s3cret token")
    assert stored.startswith("scrypt$16384$8$1$") and is_hash(stored)
    assert verify_secret("s3cret token", stored)
    assert not verify_secret("s3cret tokeN", stored) and not verify_secret("", stored)
    assert hash_secret("s3cret token") != stored  # a fresh salt every time
    assert not verify_secret("s3cret token", stored.replace("scrypt$", "bcrypt$")) and not is_hash("s3cret token")
    with pytest.raises(ValueError):
        hash_secret("")


def test_the_credential_rule_is_checked_at_start_up() -> None:
    base = Settings()
    assert Authenticator(base).open  # loopback, nothing configured: open
    assert not Authenticator(base.replace(http_users={"a": hash_secret("b")})).open  # configured: required
    with pytest.raises(ValueError, match="http_token_hash"):
        Authenticator(base.replace(http_host="0.0.0.0"))
    with pytest.raises(ValueError, match="http_token_hash is not a hash"):
        Authenticator(base.replace(http_token_hash="the plain token pasted in"))
    assert Authenticator(base.replace(http_host="::1")).open and Authenticator(base.replace(http_host="localhost")).open


def test_a_failed_step_comes_back_through_the_api(secured: Secured) -> None:
    web, node = secured.web, secured.node
    assert web.post("/api/versions/999/retry").status_code == 404
    vid = version_of(web.json("/api/status"))["version_id"]
    # the operator fixes the disk mistake and presses retry: the step runs again at once (queued by the
    # request, not by a reconcile pass an hour later), and the pipeline goes on to dispatch
    (node.data_dir / "reports" / "study-1").unlink(missing_ok=True)
    r = web.post(f"/api/versions/{vid}/retry")
    assert r.status_code == 200 and r.json() == {"version_id": vid, "retried": ["report"], "queued": True}, r.text
    v = wait_until(lambda: (lambda v: v if v["pipeline_state"] == "done" and v["deliveries"]
                            and all(d["state"] == "parked" for d in v["deliveries"]) else None)(
        version_of(web.json("/api/status"))), what="report done, deliveries parked")
    assert v["report"]["models"] and v["pipeline"]["report"]["state"] == "done"
    kinds = [e["kind"] for e in web.json("/api/events", params={"study": 1})]
    assert "step_failed" in kinds and "retry" in kinds
    assert kinds.index("step_failed") < kinds.index("retry")
    # nothing failed any more: a second retry sets nothing back
    assert web.post(f"/api/versions/{vid}/retry").json()["retried"] == []


def parked(secured: Secured) -> list[dict[str, Any]]:
    """The version's deliveries once the report step ran and every one of them parked (or was sent since)."""
    def ready() -> list[dict[str, Any]] | None:
        v = version_of(secured.web.json("/api/status"))
        if v is None or v["pipeline_state"] != "done" or not v["deliveries"]:
            if v is not None and v["pipeline_state"] == "failed at report":
                (secured.node.data_dir / "reports" / "study-1").unlink(missing_ok=True)
                secured.web.post(f"/api/versions/{v['version_id']}/retry")
            return None
        return v["deliveries"] if all(d["state"] in ("parked", "sent") for d in v["deliveries"]) else None
    return wait_until(ready, what="the report's deliveries parked")


def test_a_parked_delivery_is_sent_after_a_retry_over_http(secured: Secured) -> None:
    web = secured.web
    deliveries = parked(secured)
    assert web.post("/api/deliveries/999999/retry").status_code == 404
    secured.orthanc.start()  # the PACS is back
    for d in deliveries:
        if d["state"] == "parked":
            r = web.post(f"/api/deliveries/{d['id']}/retry")
            assert r.status_code == 200 and r.json()["state"] == "pending", r.text
            again = web.post(f"/api/deliveries/{d['id']}/retry")  # pending or sent by now: nothing to retry
            assert again.status_code == 409 and "not parked" in again.json()["detail"], again.text
    wait_until(lambda: all(d["state"] == "sent" for d in version_of(web.json("/api/status"))["deliveries"]),
               what="every delivery sent after the retry")
    assert any(e["kind"] == "delivery_requeued" for e in web.json("/api/events"))


def test_beyond_loopback_every_route_but_healthz_needs_credentials(secured: Secured) -> None:
    anon = secured.anon
    for path in ("/", "/api/status", "/metrics", "/events", "/versions/1", "/openapi.json", "/readyz"):
        r = anon.get(path)
        assert r.status_code == 401, (path, r.status_code)
        assert any(h.startswith("Basic ") for h in r.headers.get_list("www-authenticate")), (path, r.headers)
        assert not any(p in r.text for p in PHI)
    assert anon.post("/api/versions/1/retry").status_code == 401
    assert anon.get("/healthz").status_code == 200
    for headers in (bearer(), basic()):
        for path in ("/", "/api/status", "/metrics"):
            assert anon.get(path, headers=headers).status_code == 200, (path, headers)
    for wrong in (basic(password="wrong"), basic(user="nobody"), {"Authorization": "Bearer not-the-token"},
                  {"Authorization": "Basic !!!"}):
        assert anon.get("/api/status", headers=wrong).status_code == 401, wrong


def test_patient_data_only_on_the_report_page_and_only_with_credentials(secured: Secured) -> None:
    web, node = secured.web, secured.node
    parked(secured)  # the report exists
    vid = version_of(web.json("/api/status"))["version_id"]
    uid = node.status()["studies"][0]["study_instance_uid"]
    for headers in (bearer(), basic()):
        page = secured.anon.get(f"/versions/{vid}", headers=headers)
        assert page.status_code == 200 and PATIENT_NAME in page.text and PATIENT_ID in page.text
    assert secured.anon.get(f"/versions/{vid}").status_code == 401
    # every page the dashboard links, and every link and image on them: index ids in URLs, never PHI or a UID
    seen: set[str] = set()
    todo = ["/", "/events", f"/versions/{vid}", "/events?study=1"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        r = web.get(path)
        assert r.status_code in (200, 503), (path, r.status_code)  # /readyz says 503 while the PACS is down
        if not r.headers.get("content-type", "").startswith("text/html"):
            continue
        if not path.startswith("/versions/"):
            assert not any(p in r.text for p in PHI), path
        for url in re.findall(r'(?:href|src|action)="([^"]*)"', r.text):
            assert not any(p.lower() in url.lower() for p in PHI) and uid not in url, url
            assert re.fullmatch(r"/(versions/\d+(/summary(-\d+)?\.png|/retry)?|deliveries/\d+/retry|events(\?[\w=&%.]*)?"
                                r"|api/[\w/]+|readyz|metrics|openapi\.json)?", url.replace("&amp;", "&")), url
            if url.startswith(("/versions/", "/events")) and not url.endswith("/retry"):
                todo.append(url.replace("&amp;", "&"))
    assert f"/versions/{vid}/summary.png" in seen or web.get(f"/versions/{vid}/summary.png").status_code == 200
    png = web.get(f"/versions/{vid}/summary.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    # the API's documents carry no patient data either, and neither does the node's log
    assert not any(p in json.dumps(web.json("/api/status")) + json.dumps(web.json("/api/events")) for p in PHI)
    log = node.log()
    assert "HTTP side on http://0.0.0.0:" in log
    assert not any(p in log for p in PHI), [ln for ln in log.splitlines() if any(p in ln for p in PHI)]


def test_api_status_is_the_cli_document(secured: Secured) -> None:
    web, node = secured.web, secured.node
    parked(secured)

    def same() -> bool:  # deliveries may move (a retry, a confirmation) between two reads: equal once settled
        api, cli = web.json("/api/status"), node.status()
        return api["schema"] == cli["schema"] == "dicomnode.status/1" and api["studies"] == cli["studies"]
    wait_until(same, timeout=120, what="/api/status equals `dicomnode status --json`")
    vid = version_of(web.json("/api/status"))["version_id"]
    one = web.json(f"/api/versions/{vid}")
    assert one["version_id"] == vid and one["study_id"] == 1 and "pipeline" in one
    assert web.get("/api/versions/999").status_code == 404


def test_events_filters(secured: Secured) -> None:
    web = secured.web
    parked(secured)
    every = web.json("/api/events", params={"limit": 10000})
    assert len(every) >= 4 and [e["id"] for e in every] == sorted(e["id"] for e in every)
    complete = web.json("/api/events", params={"kind": "version_complete"})
    assert [e["kind"] for e in complete] == ["version_complete"] and complete[0]["study_id"] == 1
    two = web.json("/api/events", params={"kind": "version_complete,node_started"})
    assert {e["kind"] for e in two} == {"version_complete", "node_started"}
    assert all(e["study_id"] == 1 for e in web.json("/api/events", params={"study": 1}))
    assert web.json("/api/events", params={"study": 999}) == []
    at = complete[0]["at"]
    since_iso = web.json("/api/events", params={"since": at})
    assert since_iso and since_iso[0]["id"] == complete[0]["id"] and all(e["at"] >= at for e in since_iso)
    by_epoch = web.json("/api/events", params={"since": f"{epoch(at):.3f}"})
    assert [e["id"] for e in by_epoch] == [e["id"] for e in since_iso]
    newest = web.json("/api/events", params={"limit": 1})
    assert len(newest) == 1 and newest[0]["id"] == max(e["id"] for e in web.json("/api/events"))
    bad = web.get("/api/events", params={"since": "yesterday-ish"})
    assert bad.status_code == 422 and "since" in bad.text
    page = web.get("/events", params={"kind": "version_complete", "study": "1"})
    assert page.status_code == 200 and "version_complete" in page.text and "node_started</td>" not in page.text


def test_openapi_is_served_and_the_cdn_documentation_is_off(secured: Secured) -> None:
    doc = secured.web.json("/openapi.json")
    for path in ("/api/status", "/api/events", "/api/versions/{version_id}/retry",
                 "/api/deliveries/{delivery_id}/retry"):
        assert path in doc["paths"], sorted(doc["paths"])
    assert "/" not in doc["paths"]  # the HTML pages are not API
    assert secured.web.get("/docs").status_code == 404 and secured.web.get("/redoc").status_code == 404


def test_the_http_side_alone_serves_the_same_index(secured: Secured) -> None:
    """``run_web``: the dashboard without a listener, on the node's index; SIGTERM ends it with 0."""
    node, port = secured.node, free_port()
    env = {**node.env(), "DICOMNODE_HTTP_PORT": str(port)}
    code = ("import sys; from dicomnode.config import load_settings; from dicomnode.logs import setup_logging; "
            "from dicomnode.web.server import run_web; s = load_settings(None); setup_logging(s.log_level); "
            "sys.exit(run_web(s))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: proc.poll() is not None or answers(port), what="the HTTP side alone answers")
        assert proc.poll() is None, proc.communicate()[0]
        alone = Web(port, bearer())
        try:
            assert alone.json("/api/status")["studies"][0]["id"] == 1
            page = alone.get("/")
            assert page.status_code == 200 and "dashboard only" in page.text
        finally:
            alone.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=PROCESS_TIMEOUT_S)[0]
    assert proc.returncode == 0, out
    assert f"HTTP side on http://0.0.0.0:{port}/" in out


def serve_fails(tmp: Path, **settings: Any) -> tuple[subprocess.CompletedProcess[str], NodeProcess]:
    node = NodeProcess(tmp / "data", **settings)
    node.data_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "dicomnode", "serve"], env=node.env(), cwd=REPO,
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    return done, node


def test_a_busy_http_port_stops_start_up_in_one_line_before_the_dicom_port_opens(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port = busy.getsockname()[1]
        done, node = serve_fails(tmp_path, http_port=http_port)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (f"dicomnode: cannot start: http_port {http_port} on 127.0.0.1 is already in use "
                         "(setting http_port; 0 turns the HTTP side off)"), done.stderr
    assert "Traceback" not in done.stderr and "listening as" not in done.stderr


def test_beyond_loopback_without_credentials_is_a_start_up_error(tmp_path: Path) -> None:
    done, _ = serve_fails(tmp_path, http_host="0.0.0.0", http_port=free_port())
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dicomnode: cannot start: http_host 0.0.0.0") and "http_token_hash" in last \
        and "http_users" in last, done.stderr
    assert "Traceback" not in done.stderr and "listening as" not in done.stderr


def test_unreadable_tls_files_stop_start_up_in_one_line(tmp_path: Path) -> None:
    done, _ = serve_fails(tmp_path, http_port=free_port(), http_tls_cert_file=str(tmp_path / "missing.pem"),
                          http_tls_key_file=str(tmp_path / "missing.key"))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dicomnode: cannot start: http_tls_cert_file/http_tls_key_file"), done.stderr
    assert "Traceback" not in done.stderr and "listening as" not in done.stderr


def test_open_on_loopback_over_tls_to_loopback_names_and_same_site_posts_only(tmp_path: Path, pki: Path) -> None:
    """No credentials on loopback: open, but not to a rebound DNS name nor to another site's form; TLS when asked."""
    http_port = free_port()
    ca = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    node = NodeProcess(tmp_path / "data", http_port=http_port, http_tls_cert_file=str(pki / "server.pem"),
                       http_tls_key_file=str(pki / "server.key")).start()
    try:
        wait_until(lambda: answers(http_port, "https", ca), what="the HTTP side answers over TLS")
        web = Web(http_port, scheme="https", verify=ca)
        try:
            assert web.get("/").status_code == 200 and "open on loopback" in web.get("/").text
            assert web.json("/api/status")["studies"] == []
            assert web.post("/api/versions/1/retry").status_code == 404  # open: the action runs (no such version)
            # DNS rebinding: a page on another name resolved to 127.0.0.1 reads nothing
            assert web.get("/api/status", headers={"Host": f"evil.example:{http_port}"}).status_code == 403
            assert web.get("/", headers={"Host": f"localhost:{http_port}"}).status_code == 200
            # a form on another site posting to the buttons is refused; the node's own pages may post
            assert web.post("/api/deliveries/1/retry", headers={"Origin": "https://evil.example"}).status_code == 403
            assert web.post("/deliveries/1/retry", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
            assert web.post("/deliveries/1/retry", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 404
        finally:
            web.close()
    finally:
        node.stop()
    assert f"HTTP side on https://127.0.0.1:{http_port}/ (open on loopback" in node.log()
    assert node.proc is not None and node.proc.returncode == 0, node.log()
