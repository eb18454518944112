"""A real Orthanc PACS for tests: started on free loopback ports, restartable on the same ports and storage."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from nodeutil import NODE_AET, PROCESS_TIMEOUT_S, free_port

ORTHANC_AET = "ORTHANC"


class Orthanc:
    """Orthanc with its own storage, as a hospital PACS stand-in.

    ``node_port``: the node is registered as modality ``node`` (AE ``NODE_AET``),
    so ``POST /modalities/node/store`` routes a study to it. ``stop()`` then
    ``start()`` restarts it on the same ports with the same storage (a PACS that
    was down for a while).
    """

    def __init__(self, workdir: Path, node_port: int, *, node_aet: str = NODE_AET, start: bool = True) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = ORTHANC_AET
        cfg = {
            "Name": "test-pacs",
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"node": [node_aet, "127.0.0.1", node_port]},
            "Plugins": [],
        }
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = None
        if start:
            self.start()

    @property
    def destination(self) -> dict[str, Any]:
        """This PACS as a node ``destinations`` entry."""
        return {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": self.dicom_port}

    def start(self, timeout: float = PROCESS_TIMEOUT_S) -> Orthanc:
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.workdir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.time() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start") from None
                time.sleep(0.2)

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=120) as rsp:
            return rsp.read()

    def upload(self, files: list[Path]) -> str:
        """Store files in Orthanc; returns its study id."""
        study = None
        for f in files:
            study = self.request("POST", "/instances", f.read_bytes())["ParentStudy"]
        assert study
        return study

    def instances_by_modality(self, orthanc_study: str, modality: str) -> list[str]:
        """Orthanc instance ids of the study's series with this modality (e.g. "SR", "OT")."""
        out: list[str] = []
        for series in self.get(f"/studies/{orthanc_study}/series"):
            if series["MainDicomTags"].get("Modality") == modality:
                out.extend(series["Instances"])
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
