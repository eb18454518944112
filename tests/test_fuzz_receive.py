"""The receive path under fuzzing: a bounded atheris run, and every crash it found as an explicit input.

The target and its invariants are in tests/fuzz_target.py; the runner is
benchmarks/fuzz_receive.py. The bounded run (``FUZZ_SECONDS``, 60 by
default; 0 skips it) goes in a subprocess because ``atheris.Fuzz()`` exits
the process. The listener's bugs the fuzzer found (an exception escaping
``inspect_received``, data sets cut inside an element or holding values no
reader can decode, all acknowledged before) are pinned below as small inputs
that must now be refused with a permanent status. The bounded run is given
no known findings: any finding fails it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need

import fuzz_target as ft

REPO = Path(__file__).resolve().parent.parent
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "60"))

# -- regression inputs --------------------------------------------------------------------------
# Layout (fuzz_target.encode_input): syntax byte (0 implicit VR LE, 1 explicit VR LE), command
# SOP Class UID and SOP Instance UID (length byte + ASCII), then the data set as received.

_CMD_MR = b"\x01\x191.2.840.10008.5.1.4.1.1.4\x071.2.3.4"
_CMD_RAW = b"\x01\x1a1.2.840.10008.5.1.4.1.1.66\x071.2.3.4"
_CMD_RAW_IMPLICIT = b"\x00\x1a1.2.840.10008.5.1.4.1.1.66\x071.2.3.4"
# SOP Class, SOP Instance, Modality, Study and Series Instance UIDs (explicit VR LE)
_HEAD_MR = (b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.4\x00\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"
            b"\x08\x00`\x00CS\x02\x00MR \x00\r\x00UI\x08\x001.2.3.1\x00 \x00\x0e\x00UI\x08\x001.2.3.2\x00")
_HEAD_RAW = (b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.66\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"
             b"\x08\x00`\x00CS\x02\x00MR \x00\r\x00UI\x08\x001.2.3.1\x00 \x00\x0e\x00UI\x08\x001.2.3.2\x00")
_HEAD_RAW_IMPLICIT = (b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840.10008.5.1.4.1.1.66\x08\x00\x18\x00\x08\x00\x00\x00"
                      b"1.2.3.4\x00 \x00\r\x00\x08\x00\x00\x001.2.3.1\x00 \x00\x0e\x00\x08\x00\x00\x001.2.3.2\x00")
# SamplesPerPixel 1, Rows 2, Columns 2, BitsAllocated 16, then PixelData OW of 8 bytes
_SPP = b"(\x00\x02\x00US\x02\x00\x01\x00"
_ROWS = b"(\x00\x10\x00US\x02\x00\x02\x00"
_REST = b"(\x00\x11\x00US\x02\x00\x02\x00(\x00\x00\x01US\x02\x00\x10\x00\xe0\x7f\x10\x00OW\x00\x00\x08\x00\x00\x00"

VALID_MR = _CMD_MR + _HEAD_MR + _SPP + _ROWS + _REST + bytes(8)

_ESCAPES = ("inspect_received lets a pydicom exception escape instead of raising Refused: _check_pixel_length "
            "converts Rows/Columns/SamplesPerPixel/NumberOfFrames/BitsAllocated outside the parse try-block and "
            "catches only AttributeError/TypeError/ValueError; an unknown explicit VR raises NotImplementedError "
            "and a value of the wrong length raises BytesLengthException (an Exception, not a ValueError), so "
            "pynetdicom answers 0xC211 with a traceback instead of the node's 0xA9xx/0xCxxx")
_TRUNCATED = ("inspect_received acknowledges a data set cut inside its last element: pydicom's reader takes a short "
              "read(length) without complaint for a value it does not defer (<= 4096 bytes), so the parse ends "
              "exactly at the end of the file and the end-of-parse check passes; the pixel check uses the declared "
              "length, not the bytes that arrived")
_UNDECODABLE = ("inspect_received acknowledges a data set with an element whose value cannot be decoded (unknown "
                "explicit VR, value length not a multiple of the VR's size, or garbage inside a defined-length "
                "sequence): values other than a few UIDs are never converted and defined-length sequences never "
                "parsed, so the instance is stored and every later reader of that element (identification, "
                "conversion, dcmread + walk) raises")
_NO_PIXEL_REPRESENTATION = (
    "inspect_received acknowledges an image without PixelRepresentation (Type 1 in the Image Pixel module; "
    "_check_pixel_length reads only Rows, Columns, SamplesPerPixel, NumberOfFrames and BitsAllocated): in implicit "
    "VR an element whose VR is 'US or SS' by PixelRepresentation (here SmallestImagePixelValue) then cannot be "
    "decoded, and no reader can tell signed from unsigned pixels")

# (name, input, why it fails today, the kind of finding it reproduces; the full signature, with the
# pydicom frame, is taken from the run itself so a pydicom upgrade does not break these tests)
BUGS: list[tuple[str, bytes, str, str]] = [
    # (0028,0002) SamplesPerPixel with VR "U?": NotImplementedError out of _check_pixel_length
    ("escape-unknown-vr-in-image-description",
     _CMD_MR + _HEAD_MR + b"(\x00\x02\x00U?\x02\x00\x01\x00" + _ROWS + _REST + bytes(8), _ESCAPES,
     "escaped"),
    # (0028,0010) Rows US with 3 bytes: BytesLengthException out of _check_pixel_length
    ("escape-wrong-length-rows",
     _CMD_MR + _HEAD_MR + _SPP + b"(\x00\x10\x00US\x03\x00\x02\x00\x00" + _REST + bytes(8), _ESCAPES,
     "escaped"),
    # PixelData declares 8 bytes, 5 arrive
    ("accepted-truncated-pixel-data", _CMD_MR + _HEAD_MR + _SPP + _ROWS + _REST + bytes(5), _TRUNCATED,
     "accepted-truncated"),
    # last element PatientName declares 12 bytes, 4 arrive (not about pixels: any last element)
    ("accepted-truncated-last-element", _CMD_RAW + _HEAD_RAW + b"\x10\x00\x10\x00PN\x0c\x00DOE^", _TRUNCATED,
     "accepted-truncated"),
    # (0018,0081) EchoTime with VR "De"
    ("accepted-unknown-vr", _CMD_RAW + _HEAD_RAW + b"\x18\x00\x81\x00De\x02\x0012", _UNDECODABLE,
     "undecodable-element"),
    # implicit VR: (0028,0010) Rows (US) with 3 bytes
    ("accepted-wrong-value-length",
     _CMD_RAW_IMPLICIT + _HEAD_RAW_IMPLICIT + b"(\x00\x10\x00\x03\x00\x00\x00\x02\x00\x00",
     _UNDECODABLE, "undecodable-element"),
    # (0008,1140) ReferencedImageSequence, defined length 2, holding no item
    ("accepted-garbage-sequence", _CMD_RAW + _HEAD_RAW + b"\x08\x00@\x11SQ\x00\x00\x02\x00\x00\x00\x00\x00",
     _UNDECODABLE, "undecodable-element"),
    # implicit VR: (0008,1150) inside a sequence item declares 256 bytes, 2 arrive (the item's own length is right)
    ("accepted-truncated-element-in-item",
     _CMD_RAW_IMPLICIT + _HEAD_RAW_IMPLICIT
     + b"\x08\x00@\x11\x12\x00\x00\x00\xfe\xff\x00\xe0\n\x00\x00\x00\x08\x00P\x11\x00\x01\x00\x00ab", _TRUNCATED,
     "accepted-truncated"),
    # implicit VR image without PixelRepresentation (Type 1), with SmallestImagePixelValue (US or SS by it)
    ("accepted-image-without-pixel-representation",
     b"\x00\x191.2.840.10008.5.1.4.1.1.4\x071.2.3.4"
     b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840.10008.5.1.4.1.1.4\x00\x08\x00\x18\x00\x08\x00\x00\x001.2.3.4\x00"
     b" \x00\r\x00\x08\x00\x00\x001.2.3.1\x00 \x00\x0e\x00\x08\x00\x00\x001.2.3.2\x00"
     b"(\x00\x02\x00\x02\x00\x00\x00\x01\x00(\x00\x10\x00\x02\x00\x00\x00\x02\x00(\x00\x11\x00\x02\x00\x00\x00\x02\x00"
     b"(\x00\x00\x01\x02\x00\x00\x00\x10\x00(\x00\x06\x01\x02\x00\x00\x00\x00\x00"
     b"\xe0\x7f\x10\x00\x08\x00\x00\x00" + bytes(8), _NO_PIXEL_REPRESENTATION, "undecodable-element"),
    # implicit VR: a defined-length item holding a private element of undefined length that never ends
    ("accepted-unterminated-element-in-item",
     _CMD_RAW_IMPLICIT + _HEAD_RAW_IMPLICIT
     + b"\x08\x00@\x11\x10\x00\x00\x00\xfe\xff\x00\xe0\x08\x00\x00\x00\t\x00\x01\x10\xff\xff\xff\xff", _UNDECODABLE,
     "undecodable-element"),
    # deflated: a private element of unknown VR "WW" declaring 22,359 bytes, deferred by the reader, so
    # neither the VR nor its length was looked at, and the end-of-parse check measured the compressed file
    # a Sequence Delimitation Item (FFFE,E0DD) after the pixel data, outside any sequence
    ("accepted-stray-delimiter", VALID_MR + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", _UNDECODABLE,
     "undecodable-element"),
    ("accepted-deflated-deferred-unknown-vr",
     b"\x03\x191.2.840.10008.5.1.4.1.1.4\x071.2.3.4"
     + zlib.compress(_HEAD_MR + b"WWWWWW\x57\x57\x00\x00" + b"x" * 66, 9)[2:-4],
     _UNDECODABLE, "accepted-truncated"),
]


@pytest.fixture(scope="module")
def harness() -> Iterator[ft.ReceiveHarness]:
    with ft.ReceiveHarness() as h:
        yield h


def _check(harness: ft.ReceiveHarness, data: bytes) -> ft.Outcome:
    """The target's verdict: an Outcome with an allowed status, or a failure carrying the finding's report."""
    try:
        outcome = harness.run(data)
    except ft.Finding as f:
        pytest.fail(f.report(), pytrace=False)
    assert outcome.accepted or ft.allowed_status(outcome.status)
    return outcome


@pytest.mark.parametrize(("data", "kind"), [pytest.param(d, k, id=n) for n, d, r, k in BUGS])
def test_found_by_fuzzing(harness: ft.ReceiveHarness, data: bytes, kind: str) -> None:
    """Each input the fuzzer found (its reason in BUGS) is now refused with a permanent status, no finding."""
    assert ft.signature_of(harness, data) is None
    outcome = _check(harness, data)
    assert not outcome.accepted and outcome.status is not None and 0xC000 <= outcome.status <= 0xCFFF, outcome


def test_minimal_valid_input_is_accepted(harness: ft.ReceiveHarness) -> None:
    """The regression inputs above differ from this one only by their defect."""
    assert _check(harness, VALID_MR).accepted


def test_seed_corpus_reaches_acceptance_in_every_syntax(harness: ft.ReceiveHarness) -> None:
    """A fuzzer starting from refused inputs rarely gets past the first check: each syntax needs an accepted seed."""
    seeds = ft.seed_corpus()
    assert len(seeds) >= 30
    accepted: set[str] = set()
    known = {ft.signature_of(harness, d) for _, d, _, _ in BUGS}
    for data in seeds.values():
        try:
            outcome = harness.run(data)
        except ft.Finding as f:
            assert f.signature in known, f.report()
            continue
        if outcome.accepted:
            accepted.add(ft.decode_input(data)[0])
    assert accepted == set(ft.SYNTAXES)


# -- the harness's own checks fire (otherwise "no crash" would prove nothing) ----------------------


def test_guard_blocks_and_reports_writes_outside_the_data_dir(harness: ft.ReceiveHarness, tmp_path: Path) -> None:
    with ft.guarded(harness.data_dir) as violations:
        (harness.data_dir / "inside.txt").write_text("ok")
        with pytest.raises(PermissionError):
            (tmp_path / "outside.txt").write_text("no")
    (harness.data_dir / "inside.txt").unlink()
    assert not (tmp_path / "outside.txt").exists()
    assert len(violations) == 1 and "outside.txt" in violations[0]


def test_escaping_exception_and_leftover_file_are_findings(harness: ft.ReceiveHarness,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def raises(*_: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(ft, "inspect_received", raises)
    with pytest.raises(ft.Finding) as escaped:
        harness.run(VALID_MR)
    assert escaped.value.kind == "escaped"

    def leaves_a_file(path: Path, *_: object) -> None:
        (path.parent / "stray.part").write_bytes(b"x")
        raise ft.Refused(0xC210, "refused")

    monkeypatch.setattr(ft, "inspect_received", leaves_a_file)
    with pytest.raises(ft.Finding) as left:
        harness.run(VALID_MR)
    assert left.value.kind == "left-behind"
    assert not any(harness.spool.tmp.iterdir())


def test_refusal_status_outside_the_allowed_ranges_is_a_finding(harness: ft.ReceiveHarness,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def odd_status(*_: object) -> None:
        raise ft.Refused(0x0110, "processing failure")  # not a C-STORE refusal the node may give

    monkeypatch.setattr(ft, "inspect_received", odd_status)
    with pytest.raises(ft.Finding) as bad:
        harness.run(VALID_MR)
    assert bad.value.kind == "bad-status"


# -- the bounded fuzz run ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(max(FUZZ_SECONDS, 0) + 300)
def test_bounded_fuzz_run_finds_no_new_crash(harness: ft.ReceiveHarness, tmp_path: Path) -> None:
    need(FUZZ_SECONDS > 0, "FUZZ_SECONDS=0 turns the bounded fuzz run off")
    need(importlib.util.find_spec("atheris") is not None, "atheris not installed (pip install -e '.[test]')")
    # only the bugs still present: a fixed one must fail the run again if it comes back
    known = sorted(sig for sig in {ft.signature_of(harness, d) for _, d, _, _ in BUGS} if sig is not None)
    summary_file = tmp_path / "summary.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "fuzz_receive.py"), "--seconds", str(FUZZ_SECONDS),
           "--corpus", str(tmp_path / "corpus"), "--json", str(summary_file)]
    for sig in known:
        cmd += ["--known", sig]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240)
    print(proc.stdout)
    assert summary_file.exists(), f"fuzz runner failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    summary = json.loads(summary_file.read_text())
    reports = "\n\n".join(Path(c["report"]).read_text() if Path(c["report"]).exists() else c["input"]
                          for c in summary["new_crashes"])
    assert not summary["new_crashes"], f"new crash(es) in the receive path:\n{reports}"
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert summary["executions"] > 1000, summary
