"""The dashboard in a real browser: headless Debian Chromium driven by Selenium, against a real node and PACS.

What a person does: open the dashboard of a node that graded a study, find
the version, open its report page, read the findings and see the key-slice
image (the <img> actually decoded: ``naturalWidth > 0``), then press "Retry"
on a delivery that parked while the PACS was down and watch it become sent.
No JavaScript of ours runs (the pages have none); Selenium only drives the
browser. The checkpoints are the tiny test ones, re-described as trained on
synthetic data (as the demo's are), so the page must say so above the
findings.

Screenshots (dashboard, report page, after the retry) go to the folder in
``DICOMNODE_SCREENSHOTS`` when set, else the test's tmp_path. Selenium
Manager never runs (the driver's path is given), so nothing is downloaded;
in CI (``CI=true``) a missing chromium or chromedriver fails the test.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from checkpoints import tiny_checkpoints
from conftest import need
from dicomnode.synth import make_phantom, write_study
from models.checkpoint import load_checkpoint, save_checkpoint
from nodeutil import LOOSE_GATE, NODE_AET, PROCESS_TIMEOUT_S, RELEASE_COMPLETES, NodeProcess, free_port, wait_until
from pacs import Orthanc

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PATIENT_NAME, PATIENT_ID = "BROWSER^PATIENT", "BRWPID0815"
SYNTHETIC = "synthetic BraTS-like cohort (tests/checkpoints.py), not for clinical use"
T = TypeVar("T")


def described_as_synthetic(src: Path, dst: Path) -> Path:
    """The tiny checkpoints re-saved with a training-data description, as ``training.export`` writes the demo's."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.pt")):
        ck = load_checkpoint(path)
        save_checkpoint(dst / path.name, ck.model, ck.family.name, ck.hparams, ck.spec,
                        training_data={**ck.training_data, "description": SYNTHETIC}, metrics=ck.metrics,
                        temperature=ck.temperature, extra=ck.extra)
    return dst


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def screenshot(driver: webdriver.Chrome, folder: Path, name: str) -> Path:
    """The whole page (the window grown to its height), as PNG."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1400, max(1000, min(height + 40, 6000)))
    path = folder / name
    assert driver.save_screenshot(str(path)), path
    driver.set_window_size(1400, 1000)
    return path


def retrying(action: Callable[[], T]) -> T:
    """An action on a page that may reload under it (the dashboard refreshes itself every few seconds).

    Polled with nodeutil's bound in minutes, never a count of quick tries: on a busy machine a reload
    can take longer than a few fractions of a second.
    """
    done: list[T] = []

    def attempt() -> bool:
        try:
            done.append(action())
        except StaleElementReferenceException:
            return False
        return True

    wait_until(attempt, timeout=PROCESS_TIMEOUT_S, every=0.2, what="an element that stays on the page")
    return done[0]


def settled_parked(node: NodeProcess) -> dict[str, Any] | None:
    studies = node.status()["studies"]
    if not studies or not studies[0]["versions"]:
        return None
    v = studies[0]["versions"][-1]
    ok = v.get("pipeline_state") == "done" and v["deliveries"] and all(d["state"] == "parked" for d in v["deliveries"])
    return v if ok else None


def test_dashboard_report_page_and_retry_in_a_browser(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    need(CHROMIUM.exists(), f"{CHROMIUM} (Debian package chromium)")
    need(CHROMEDRIVER.exists(), f"{CHROMEDRIVER} (Debian package chromium-driver)")
    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    shots = Path(os.environ.get("DICOMNODE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    ckpts = described_as_synthetic(tiny_checkpoints(tmp_path_factory), tmp_path / "checkpoints")

    port, http_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "pacs", port, start=False)  # down: the report's deliveries park
    node = NodeProcess(tmp_path / "data", port=port, checkpoints_dir=str(ckpts), destinations=[orthanc.destination],
                       dispatch_max_attempts=1, dispatch_poll_s=0.5, http_port=http_port,
                       **RELEASE_COMPLETES, **LOOSE_GATE)
    volumes, affine = make_phantom(shape=(64, 64, 40), seed=4, tumour=True, grade="HGG")
    write_study(volumes, affine, tmp_path / "study", vendor="siemens", seed=4, enhanced=True,
                patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    node.start()
    driver: webdriver.Chrome | None = None
    try:
        sent = node.cli("send", str(tmp_path / "study"), "--to", f"{NODE_AET}@127.0.0.1:{port}")
        assert "sent 4/4" in sent.stdout, sent.stdout + sent.stderr
        version = wait_until(lambda: settled_parked(node), what="report done and its deliveries parked")
        vid, parked = version["version_id"], [d["id"] for d in version["deliveries"]]
        base = f"http://127.0.0.1:{http_port}"
        try:
            driver = browser()
        except WebDriverException as exc:
            pytest.fail(f"headless chromium did not start: {exc.msg}")
        driver.set_page_load_timeout(120)

        # the dashboard: the version is listed, with its parked deliveries and a retry button each
        driver.get(base + "/")
        assert "Studies" in driver.title
        row = driver.find_element(By.ID, f"version-{vid}")
        assert "done" in row.text and "parked" in row.text
        screenshot(driver, shots, "dashboard.png")
        retrying(lambda: driver.find_element(By.CSS_SELECTOR, f'#version-{vid} a[href="/versions/{vid}"]').click())

        # the report page: disclaimer first, the synthetic-data warning, then the findings, then the key slices
        wait_until(lambda: driver.current_url.endswith(f"/versions/{vid}"), timeout=60, what="report page open")
        disclaimer = driver.find_element(By.CSS_SELECTOR, ".disclaimer")
        synthetic = driver.find_element(By.CSS_SELECTOR, ".synthetic")
        cards = driver.find_elements(By.CSS_SELECTOR, ".card.finding")
        assert "RESEARCH USE ONLY" in disclaimer.text and "synthetic data" in synthetic.text
        assert cards, driver.page_source[:3000]
        assert disclaimer.location["y"] < synthetic.location["y"] < cards[0].location["y"]
        labels = {c.find_element(By.CSS_SELECTOR, ".label").text for c in cards}
        assert labels & {"HGG", "LGG"}, labels
        assert all("P = 0." in c.text or "P = 1." in c.text for c in cards), [c.text for c in cards]
        table = driver.find_element(By.XPATH, "//h2[text()='Findings']/following-sibling::table[1]")
        assert "calibrated probability" in table.text
        img = driver.find_element(By.CSS_SELECTOR, f'img[src="/versions/{vid}/summary.png"]')
        assert cards[-1].location["y"] < img.location["y"]
        images = driver.find_elements(By.CSS_SELECTOR, ".summary img")  # the summary may run to several images
        for each in images:
            wait_until(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                     each), timeout=120, what="a summary image decoded")
            assert int(driver.execute_script("return arguments[0].naturalWidth", each)) >= 512
        page = driver.page_source
        assert "Which models ran, and why" in page and "Quality" in page
        # open on loopback, nobody is signed in: no patient name or ID on the page, and none in its URL
        assert PATIENT_NAME not in page and PATIENT_ID not in page and "BROWSER" not in driver.current_url
        screenshot(driver, shots, "report.png")

        # the PACS is back; the operator presses Retry on one parked delivery on the dashboard
        orthanc.start()
        driver.get(base + "/")
        first, other = parked[0], parked[1:]
        retrying(lambda: driver.find_element(
            By.CSS_SELECTOR, f'#version-{vid} form[action="/deliveries/{first}/retry"] button').click())
        wait_until(lambda: driver.current_url.rstrip("/") == base, timeout=60, what="back on the dashboard (303)")

        def shows_sent() -> bool:
            driver.refresh()
            try:
                return "sent" in driver.find_element(By.ID, f"delivery-{first}").text
            except (StaleElementReferenceException, WebDriverException):
                return False
        wait_until(shows_sent, timeout=PROCESS_TIMEOUT_S, every=1.0, what=f"delivery {first} shown as sent")
        for d in other:  # only the one pressed was retried
            assert "parked" in driver.find_element(By.ID, f"delivery-{d}").text
        screenshot(driver, shots, "after-retry.png")
        assert any(d["id"] == first and d["state"] == "sent"
                   for d in node.status()["studies"][0]["versions"][-1]["deliveries"])
    finally:
        if driver is not None:
            driver.quit()
        node.stop()
        orthanc.stop()
    assert not any(p in node.log() for p in (PATIENT_NAME, PATIENT_ID))
