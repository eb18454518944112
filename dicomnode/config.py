"""One settings object, read at the edge (the CLI) and passed down.

Sources, later wins: built-in defaults, a TOML file (``--config``), then
environment variables ``DICOMNODE_<SETTING>`` (upper case; lists and tables
as JSON). No other module reads the environment: settings and logging sit at
the bottom of the import graph and import nothing of ours.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "DICOMNODE_"


@dataclass(frozen=True)
class Peer:
    """A calling AE title we accept, optionally bound to the host it must come from.

    Binding to an address matters because AE titles are sent in clear and
    anyone on the network can claim one.
    """

    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class TLSSettings:
    """Server-side TLS. ``ca_file`` set means client certificates are verified."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


@dataclass(frozen=True)
class Settings:
    """Every setting of the node. See the README's configuration reference."""

    ae_title: str = "GLIOMANODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: str = "./dicomnode-data"
    database_url: str | None = None  # None: SQLite file under data_dir
    allowed_peers: tuple[Peer, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 16
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    max_pdu: int = 0  # 0: unlimited, the fastest on loopback and LAN
    tls: TLSSettings = field(default_factory=TLSSettings)
    min_free_disk_mb: int = 1024
    fsync: bool = True
    quiet_period_s: float = 60.0
    release_quiet_s: float | None = None
    assembly_poll_s: float = 0.5
    sequence_rules_file: str | None = None
    log_level: str = "INFO"
    log_json: bool = False

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def index_url(self) -> str:
        """SQLAlchemy URL of the index: PostgreSQL when configured, else SQLite in data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'index.sqlite3'}"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, validated like a loaded one."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(changes)
        return _build(merged)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the setting and the source."""


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file at ``path`` (if any), then ``DICOMNODE_*`` variables."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw.update(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise SettingsError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    env = os.environ if environ is None else environ
    for name, fld in known.items():
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = _parse_env(name, value, _field_type(fld))
    return _build(raw)


def _field_type(fld: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(Settings)
    return hints[fld.name]


def _parse_env(name: str, value: str, typ: Any) -> Any:
    """Environment values are strings; lists and tables come as JSON."""
    base = _strip_optional(typ)
    if value == "" and base is not typ:
        return None
    if base is bool:
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}: expected a boolean, got {value!r}")
    if base in (int, float, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}: expected JSON, got {value!r} ({exc})") from exc


def _strip_optional(typ: Any) -> Any:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ


def _build(raw: Mapping[str, Any]) -> Settings:
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _coerce(name, value, hints[name])
    settings = Settings(**values)
    _validate(settings)
    return settings


def _coerce(name: str, value: Any, typ: Any) -> Any:
    base = _strip_optional(typ)
    if value is None:
        if base is typ:
            raise SettingsError(f"setting {name} may not be empty")
        return None
    try:
        if name == "allowed_peers":
            return tuple(_peer(p) for p in value)
        if name == "tls":
            if isinstance(value, TLSSettings):
                return value
            return TLSSettings(**dict(value))
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError(f"expected true/false, got {value!r}")
        if base is int:
            if isinstance(value, bool):
                raise TypeError("expected an integer")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise TypeError(f"expected a string, got {value!r}")
            return value
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: {exc}") from exc
    return value


def _peer(value: Any) -> Peer:
    """A peer is ``"AET"``, ``"AET@host"`` or a table ``{ae_title, host}``."""
    if isinstance(value, Peer):
        return value
    if isinstance(value, str):
        aet, _, host = value.partition("@")
        return Peer(aet.strip(), host.strip() or None)
    if isinstance(value, Mapping):
        return Peer(str(value["ae_title"]).strip(), value.get("host"))
    raise TypeError(f"allowed_peers entry must be a string or a table, got {value!r}")


def _validate(s: Settings) -> None:
    aets = [s.ae_title] + [p.ae_title for p in s.allowed_peers]
    for aet in aets:
        if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
            raise SettingsError(f"invalid AE title {aet!r}: 1-16 printable characters, no backslash")
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} out of range")
    if s.max_associations < 1:
        raise SettingsError("max_associations must be at least 1")
    if s.quiet_period_s <= 0:
        raise SettingsError("quiet_period_s must be positive")
    if s.release_quiet_s is not None and not 0 <= s.release_quiet_s <= s.quiet_period_s:
        raise SettingsError("release_quiet_s must be between 0 and quiet_period_s")
    if s.tls.require_client_cert and not s.tls.ca_file:
        raise SettingsError("tls.require_client_cert needs tls.ca_file")
    if bool(s.tls.cert_file) != bool(s.tls.key_file) or (
        (s.tls.ca_file or s.tls.require_client_cert) and not s.tls.enabled
    ):
        raise SettingsError("tls needs both cert_file and key_file")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"log_level {s.log_level!r} is not DEBUG, INFO, WARNING or ERROR")


def settings_reference() -> list[tuple[str, str, str]]:
    """(name, type, default) of every setting, for the README and ``dicomnode config``."""
    hints = typing.get_type_hints(Settings)
    out = []
    default = Settings()
    for f in dataclasses.fields(Settings):
        out.append((f.name, str(hints[f.name]).replace("typing.", ""), repr(getattr(default, f.name))))
    return out
