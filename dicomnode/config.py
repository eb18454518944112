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
class ClientTLS:
    """TLS when WE connect (dispatch to a PACS): ``ca_file`` verifies the PACS, cert/key identify us."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)


CONFIRM_CHOICES = ("commitment", "find", "none")  # DestinationSettings.confirm


@dataclass(frozen=True)
class DestinationSettings:
    """A PACS the node sends its reports to (C-STORE SCU)."""

    ae_title: str
    host: str
    port: int
    tls: ClientTLS = field(default_factory=ClientTLS)
    # How a C-STORE Success is confirmed (docs/dispatch.md, "Confirmed delivery"): "commitment" (Storage
    # Commitment Push Model: the PACS takes responsibility; it must know the node as a modality and be able
    # to connect back to our listener), "find" (a C-FIND for each SOP Instance UID: found means kept) or
    # "none" (today's fire-and-forget). Default "find": nearly every PACS is a Query/Retrieve SCP, it needs
    # no inbound connection to the node, and a PACS that refuses it costs only an "unconfirmed" mark, never
    # a delivery; commitment is the stronger promise where the PACS offers it.
    confirm: str = "find"
    # first confirmation this long after the C-STORE: PACSs that index asynchronously would otherwise answer
    # "not found" for an object they are still filing, and the node would send it again for nothing
    confirm_after_s: float = 10.0
    # no N-EVENT-REPORT this long after the PACS accepted the N-ACTION: ask again (a new transaction)
    confirm_timeout_s: float = 120.0

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


SERVE_WORKER_CHOICES = ("auto", "none", "cpu", "gpu", "cpu,gpu")
GATE_UNCHECKED_CHOICES = ("decline", "allow")


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
    # slots, timeouts and memory of the listener (docs/receive.md "Slots, timeouts and memory"):
    max_associations: int = 64  # associations past their A-ASSOCIATE-RQ; 16 stalled peers must not fill it
    max_associations_per_peer: int = 8  # per calling AE title + address: one peer cannot take every slot
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    artim_timeout_s: float = 5.0  # listener: connected (or TLS handshake) without an A-ASSOCIATE-RQ yet
    stall_timeout_s: float = 30.0  # listener: a DIMSE message (data set) begun and no byte from the peer for this long
    max_pdu: int = 1048576  # the PDU we advertise and accept; longer ones abort the association. 0: unlimited
    tls: TLSSettings = field(default_factory=TLSSettings)
    min_free_disk_mb: int = 1024
    fsync: bool = True
    quiet_period_s: float = 60.0
    release_quiet_s: float | None = None
    assembly_poll_s: float = 0.5
    sequence_rules_file: str | None = None
    log_level: str = "INFO"
    log_json: bool = False
    # -- pipeline (convert, preprocess, infer, report, dispatch) ----------------------
    broker_url: str = ""  # "": embedded (in-process transport); "redis://host:6379/0" for distributed
    serve_worker: str = "auto"  # queues the serve process consumes itself; auto = cpu,gpu embedded, none with a broker
    worker_concurrency: int = 1
    # threads of torch's pools (intra- and inter-op; SimpleITK's too) per task slot of a worker process;
    # 0 = auto: the cores this process may use // its task slots (see the README: several worker
    # processes on one host must each be given their share, e.g. 1 for two workers on two cores)
    torch_threads: int = 0
    checkpoints_dir: str | None = None  # None: data_dir/checkpoints
    checkpoint_pins: dict[str, str] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda
    task_soft_time_limit_s: float = 900.0
    task_hard_time_limit_s: float = 1200.0
    broker_visibility_timeout_s: float = 3600.0
    max_deliveries: int = 3
    reconcile_interval_s: float = 30.0
    report_cannot_grade: bool = True
    summary_image: bool = True
    # -- the gate: decline rather than guess (models.gate.GateSettings) -----------------
    gate_margin: float = 0.25  # widen each training range by this fraction of its width (each side) before declining
    gate_feature_factor: float = 1.0  # multiply the checkpoint's feature-distance threshold by this
    gate_unchecked: str = "decline"  # what nobody measured (no ranges in the checkpoint, old specs): decline | allow
    # -- the floor: a checkpoint's own held-out (test) metrics, per task (models.gate.FloorSettings); 0 disables
    floor_auc: float = 0.70  # a task whose held-out AUC is under this is not reported (grade: the model declines)
    floor_sensitivity: float = 0.5  # likewise for held-out sensitivity
    floor_specificity: float = 0.5  # likewise for held-out specificity
    destinations: tuple[DestinationSettings, ...] = ()
    dispatch_retry_initial_s: float = 10.0
    dispatch_retry_max_s: float = 600.0
    dispatch_max_attempts: int = 100
    dispatch_poll_s: float = 2.0

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def index_url(self) -> str:
        """SQLAlchemy URL of the index: PostgreSQL when configured, else SQLite in data_dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_path / 'index.sqlite3'}"

    @property
    def checkpoints_path(self) -> Path:
        return Path(self.checkpoints_dir).resolve() if self.checkpoints_dir else self.data_path / "checkpoints"

    @property
    def embedded(self) -> bool:
        """No external broker: the serve process runs the Celery worker on an in-process transport."""
        return not self.broker_url

    @property
    def serve_queues(self) -> tuple[str, ...]:
        """The Celery queues the serve process consumes itself."""
        choice = self.serve_worker
        if choice == "auto":
            return ("cpu", "gpu") if self.embedded else ()
        if choice == "none":
            return ()
        return tuple(choice.split(","))

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
        if name == "destinations":
            return tuple(_destination(d) for d in value)
        if name == "checkpoint_pins":
            if not isinstance(value, Mapping):
                raise TypeError(f"expected a table family -> checkpoint, got {value!r}")
            return {str(k): str(v) for k, v in value.items()}
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


def _destination(value: Any) -> DestinationSettings:
    """A destination is a table ``{ae_title, host, port, tls?}`` or ``"AET@host:port"``."""
    if isinstance(value, DestinationSettings):
        return value
    if isinstance(value, str):
        aet, _, rest = value.partition("@")
        host, _, port = rest.rpartition(":")
        if not aet or not host or not port.isdigit():
            raise TypeError(f"destination {value!r} is not AET@host:port")
        return DestinationSettings(aet.strip(), host.strip(), int(port))
    if isinstance(value, Mapping):
        unknown = set(value) - {"ae_title", "host", "port", "tls", "confirm", "confirm_after_s", "confirm_timeout_s"}
        if unknown:
            raise TypeError(f"destination has unknown key(s) {sorted(unknown)}")
        tls = value.get("tls") or {}
        if not isinstance(tls, Mapping):
            raise TypeError("destination tls must be a table")
        confirm = value.get("confirm", DestinationSettings.confirm)
        if not isinstance(confirm, str):
            raise TypeError(f"destination confirm must be one of {', '.join(CONFIRM_CHOICES)}, got {confirm!r}")
        timing = {k: float(value[k]) for k in ("confirm_after_s", "confirm_timeout_s") if k in value}
        return DestinationSettings(str(value["ae_title"]).strip(), str(value["host"]).strip(), int(value["port"]),
                                   ClientTLS(**dict(tls)), confirm=confirm.strip().lower(), **timing)
    raise TypeError(f"destinations entry must be a table or AET@host:port, got {value!r}")


def _validate(s: Settings) -> None:
    aets = [s.ae_title] + [p.ae_title for p in s.allowed_peers]
    for aet in aets:
        if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
            raise SettingsError(f"invalid AE title {aet!r}: 1-16 printable characters, no backslash")
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} out of range")
    if s.max_associations < 1:
        raise SettingsError("max_associations must be at least 1")
    if s.max_associations_per_peer < 1:
        raise SettingsError("max_associations_per_peer must be at least 1")
    if not (0 < s.artim_timeout_s < float("inf") and 0 < s.stall_timeout_s <= s.network_timeout_s):
        raise SettingsError("need artim_timeout_s > 0 and 0 < stall_timeout_s <= network_timeout_s (a stall "
                            "mid-dataset is cut before the general idle timeout)")
    if s.max_pdu != 0 and not 4096 <= s.max_pdu <= 0xFFFFFFFF:
        raise SettingsError(f"max_pdu {s.max_pdu} must be 0 (unlimited: a peer may make the node buffer "
                            f"gigabytes) or from 4096 to 4294967295 bytes")
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
    for d in s.destinations:
        if not d.ae_title or len(d.ae_title) > 16 or "\\" in d.ae_title:
            raise SettingsError(f"destination AE title {d.ae_title!r}: 1-16 characters, no backslash")
        if not 0 < d.port < 65536:
            raise SettingsError(f"destination {d.name}: port out of range")
        if d.confirm not in CONFIRM_CHOICES:
            raise SettingsError(f"destination {d.name}: confirm {d.confirm!r} is not one of "
                                f"{', '.join(CONFIRM_CHOICES)}")
        if d.confirm_after_s < 0 or d.confirm_timeout_s <= 0:
            raise SettingsError(f"destination {d.name}: confirm_after_s must be >= 0 and confirm_timeout_s positive")
    if s.serve_worker not in SERVE_WORKER_CHOICES:
        raise SettingsError(f"serve_worker {s.serve_worker!r} is not one of {', '.join(SERVE_WORKER_CHOICES)}")
    if s.broker_url and not s.broker_url.startswith(("redis://", "rediss://", "memory://")):
        raise SettingsError(f"broker_url {s.broker_url!r}: use redis://host:port/db (or leave empty for embedded)")
    if s.device not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"device {s.device!r} is not auto, cpu or cuda")
    if not 0 < s.task_soft_time_limit_s < s.task_hard_time_limit_s < s.broker_visibility_timeout_s:
        raise SettingsError("need 0 < task_soft_time_limit_s < task_hard_time_limit_s < broker_visibility_timeout_s "
                            "(a task running past the visibility timeout is delivered twice)")
    if s.torch_threads < 0:
        raise SettingsError(f"torch_threads {s.torch_threads} must be 0 (auto: this host's cores // the worker's "
                            f"task slots) or a positive number of threads per task slot")
    if s.max_deliveries < 1 or s.worker_concurrency < 1 or s.dispatch_max_attempts < 1:
        raise SettingsError("max_deliveries, worker_concurrency and dispatch_max_attempts must be at least 1")
    if not 0 < s.dispatch_retry_initial_s <= s.dispatch_retry_max_s:
        raise SettingsError("need 0 < dispatch_retry_initial_s <= dispatch_retry_max_s")
    if not (s.gate_margin >= 0 and s.gate_margin < float("inf")):
        raise SettingsError(f"gate_margin {s.gate_margin!r} must be a finite number >= 0 (a fraction of each "
                            f"training range's width)")
    if not (s.gate_feature_factor > 0 and s.gate_feature_factor < float("inf")):
        raise SettingsError(f"gate_feature_factor {s.gate_feature_factor!r} must be a finite number > 0")
    if s.gate_unchecked not in GATE_UNCHECKED_CHOICES:
        raise SettingsError(f"gate_unchecked {s.gate_unchecked!r} is not one of {', '.join(GATE_UNCHECKED_CHOICES)}")
    for name in ("floor_auc", "floor_sensitivity", "floor_specificity"):
        value = getattr(s, name)
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise SettingsError(f"{name} {value!r} must be a number from 0 to 1 (0 disables that check)")
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
