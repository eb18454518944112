"""Logging set-up and PHI-safe identifiers.

Sits at the bottom of the import graph with ``config``: it imports nothing of
ours. Patient data is sensitive, so log lines at INFO and above name studies by
the index id or a short one-way tag of the UID, never by patient name, ID or
birth date.

Our own loggers (``dicomnode``, ``models``, ``training``) keep to that by
construction. The libraries do not: pydicom quotes the raw value of an element
it cannot validate (a UI whose corrupted length swallowed the patient elements
after it comes out as ``'1.2.3...\\x10\\x00PN\\x14\\x00Doe^Jane...'``), both through
its ``pydicom`` logger and through ``warnings.warn``; highdicom logs full UIDs
at INFO. :class:`PhiFilter`, installed by :func:`setup_logging` on the one
handler every record goes through, redacts what their lines can carry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time

# Loggers whose lines we write ourselves, PHI-free by construction (UIDs through uid_tag): never rewritten.
OUR_PACKAGES = ("dicomnode", "models", "training")

REDACTED = "<redacted>"

# Any quote a library may put around a value: ASCII, typographic, guillemets.
_QUOTES = "'\"\u2018\u2019\u201c\u201d\u00ab\u00bb"
# A word that announces a value, then (within a few words) the ":" or "=" before it:
# "Invalid value for VR UI: ...", "raw bytes = ...", "contents: ...".
_VALUE_PHRASE = re.compile(r"(?i)\b(?:values?|raw|bytes|contents?|data)\b[^:=\n]{0,40}?[:=]")
# A DICOM UID: digit components joined by dots (2.25.<128-bit number> has only three).
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){2,}(?!\w|\.\d)")
_IPV4 = re.compile(r"(?:25[0-5]|2[0-4]\d|1?\d?\d)(?:\.(?:25[0-5]|2[0-4]\d|1?\d?\d)){3}")
# What raw dataset bytes look like once they are text: a PN component separator, control
# characters, their repr escapes, the replacement character of a failed decode.
_DOUBT = re.compile(r"[\^\x00-\x08\x0b-\x1f\x7f\ufffd]|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\[0abfnrtv]")
# What logging.captureWarnings logs: warnings.formatwarning's "FILE:LINE: Category: message\n  source line\n".
_WARNING = re.compile(r"(?s)\A(?P<where>.*?:\d+): (?P<category>\w+): (?P<message>.*)\Z")


def uid_tag(uid: str | None) -> str:
    """A short stable tag for a UID, to correlate log lines without quoting it."""
    if not uid:
        return "-"
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


def is_ours(logger_name: str) -> bool:
    """Whether a logger belongs to our packages (their lines are PHI-free by construction)."""
    return any(logger_name == p or logger_name.startswith(p + ".") for p in OUR_PACKAGES)


def _redact_quoted(text: str) -> str:
    """Everything from the first quote to the last one, or to the end if there is only one.

    Why not quote by quote: a value may itself contain quotes (``'O'Brien'``,
    ``"a"b"``) and a pair-by-pair match would hand back its middle. Taking the
    outermost span cannot: at worst it also hides the plain words between
    two quoted values. A bytes prefix (``b'...'``) goes with its quote.
    """
    quotes = [i for i, ch in enumerate(text) if ch in _QUOTES]
    if not quotes:
        return text
    first, last = quotes[0], quotes[-1]
    end = last + 1 if last > first else len(text)  # a lone quote: what follows it may be the value
    if first > 0 and text[first - 1] in "bBrRuU" and (first == 1 or not text[first - 2].isalnum()):
        first -= 1
    return text[:first] + REDACTED + text[end:]


def _redact_value_phrase(text: str) -> str:
    """Cut everything after the first "value: ..." style phrase (an unquoted value)."""
    m = _VALUE_PHRASE.search(text)
    if m is None:
        return text
    if not text[m.end():].strip():
        return text
    return text[: m.end()] + " " + REDACTED


def _tag_uid(m: re.Match[str]) -> str:
    uid = m.group(0)
    if _IPV4.fullmatch(uid):  # a peer's address, not a UID
        return uid
    return "uid:" + uid_tag(uid)


def redact(text: str) -> str | None:
    """A library's message with what can carry dataset values removed; None when it still looks like data.

    In order: quoted strings and bytes literals, whatever follows a
    "value:"-style phrase, UIDs (as ``uid:<uid_tag>``, so they still match
    our own lines, which log ``uid_tag`` too). If the rest still holds a PN
    separator, control characters or escaped bytes, the value was not quoted
    and not announced, and the caller replaces the whole message.
    """
    out = _redact_quoted(text)
    out = _redact_value_phrase(out)
    out = _UID.sub(_tag_uid, out)
    return None if _DOUBT.search(out) else out


def _withheld(logger_name: str, category: str) -> str:
    return (f"{logger_name}: {category} withheld: its text may carry patient data "
            f"(log_level DEBUG shows library messages unfiltered)")


class PhiFilter(logging.Filter):
    """Keeps patient data from library log records (and captured warnings) out of the log.

    Installed on the handler (not on a logger) so every record reaches it,
    whatever logger it came from and whatever formatter (text or JSON) writes
    it afterwards. For a logger outside :data:`OUR_PACKAGES`:

    - INFO and above: the message is rewritten by :func:`redact`; if that is
      in doubt, it is replaced by a fixed text naming the logger and the
      warning class. A traceback or stack attached to the record is dropped
      (exception messages quote values too); its exception class is named.
      A captured warning (logger ``py.warnings``) keeps its file, line and
      category; its message is redacted the same way and its source line
      dropped.
    - below INFO: dropped. Such a record only gets here when a library set its
      own logger lower than ours (pydicom's ``config.debug()``), and DEBUG
      lines are where libraries dump whole datasets.

    Records of our own loggers pass unchanged: they log ``uid_tag``, never a
    value, and rewriting them would only hide what the operator needs.

    The record is rewritten in place (``msg`` and ``args``), so a second
    handler on the same logger sees the redacted text as well, never more.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if is_ours(record.name):
            return True
        if record.levelno < logging.INFO:
            return False
        try:
            text = record.getMessage()
        except Exception:  # a library's bad format string: nothing safe to show of it
            text = None
        if text is None:
            new = _withheld(record.name, "message")
        elif record.name == "py.warnings":
            new = self._warning(text)
        else:
            red = redact(text)
            new = red if red is not None else _withheld(record.name, "message")
        if record.exc_info and record.exc_info[0] is not None:
            new += f" [{record.exc_info[0].__name__}; traceback withheld]"
        record.msg, record.args = new, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    @staticmethod
    def _warning(text: str) -> str:
        """A captured warning's text, PHI removed: "FILE:LINE: Category: redacted message"."""
        m = _WARNING.match(text)
        if m is None:
            return _withheld("py.warnings", "warning")
        message = m.group("message").rstrip("\n")
        lines = message.split("\n")
        if len(lines) > 1 and lines[-1].startswith("  "):  # formatwarning's source line: code, not needed
            message = "\n".join(lines[:-1])
        red = redact(message)
        if red is None:
            return _withheld("py.warnings", m.group("category"))
        return f"{m.group('where')}: {m.group('category')}: {red}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger once, at the edge (the CLI).

    One handler on stderr carries every record, ours and the libraries'
    (pydicom, pynetdicom, highdicom, celery, ...), and warnings too
    (``logging.captureWarnings``: pydicom warns about bad values with
    ``warnings.warn`` as well as logging them, and an uncaptured warning
    would be printed raw to stderr). At any level but DEBUG the handler
    carries a :class:`PhiFilter`, so no library line quotes patient data or a
    full UID, whichever formatter (text or JSON) writes it.

    At DEBUG nothing is filtered: an operator debugging a peer asked for the
    raw messages (values, UIDs, pynetdicom's dataset dumps included), and
    such a log must be treated as containing patient data.
    """
    debug = level.upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(PhiFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    # pynetdicom logs dataset contents (patient names included) at DEBUG and
    # association chatter at INFO: keep it at WARNING unless we debug.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if debug else "WARNING")
    # highdicom logs a line per module and attribute copied into every report
    # it builds, at INFO, quoting the source dataset's full SOP Instance UID
    # (131 such lines on a running node): noise the filter would only reduce
    # to tags. Keep it at WARNING unless we debug.
    logging.getLogger("highdicom").setLevel("DEBUG" if debug else "WARNING")
