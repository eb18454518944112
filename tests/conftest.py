"""Shared fixtures.

Tests talk to real parts (pynetdicom associations, dcmtk, Redis, PostgreSQL).
A test that needs a component or the shared real data skips on a developer
machine that lacks it, but fails in CI (CI=true): a skip there would hide a
missing install step.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "real"


def need(condition: bool, why: str) -> None:
    """Skip locally, fail in CI, when a required component is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but missing: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``../shared/data/real`` (real vendor DICOM); never copied into the repo."""
    need(REAL_DATA.is_dir(), f"{REAL_DATA} not present")
    return REAL_DATA


def dcmtk_tool(name: str) -> str:
    """Absolute path of a dcmtk tool: pynetdicom's console scripts shadow the names."""
    path = Path("/usr/bin") / name
    need(path.exists(), f"dcmtk {name} not installed")
    return str(path)


@pytest.fixture(scope="session")
def have_dcmtk() -> None:
    dcmtk_tool("storescu")
    need(shutil.which("dsrdump") is not None, "dcmtk not installed")


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=30):
            return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    need(_pg_available(), "PostgreSQL on 127.0.0.1:5432")
    import psycopg

    name = f"dicomnode_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    need(shutil.which("openssl") is not None, "openssl CLI")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[Any, int]]:
    """A real Orthanc on a free loopback port (the PACS of the node tests), stopped after the test."""
    from nodeutil import free_port
    from pacs import Orthanc

    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    need(shutil.which("dciodvfy") is not None, "dciodvfy (Debian package dicom3tools)")
    dcmtk_tool("dsrdump")
    port = free_port()
    orthanc = Orthanc(tmp_path / "pacs", port)
    yield orthanc, port
    orthanc.stop()
