"""One settings object, read at the edge (the CLI) and passed down.

Sources, later wins: built-in defaults, a TOML file (``--config``), then
environment variables ``DICOMNODE_<SETTING>`` (upper case; lists and tables
as JSON). No other module reads the environment: settings and logging sit at
the bottom of the import graph and import nothing of ours.
"""
from __future__ import annotations

import dataclasses
import difflib
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
# DICOMNODE_* variables that are not settings: this repository's own tests and benchmarks read them
NOT_SETTINGS = frozenset({"DICOMNODE_TEST_ARTIFACTS", "DICOMNODE_BENCH_TREE"})


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
    # -- the HTTP side: dashboard, REST API, /metrics, /healthz, /readyz (docs/operations.md) ----------------
    http_host: str = "127.0.0.1"  # beyond loopback, every request but /healthz needs credentials
    http_port: int = 8081  # 0 turns the HTTP side off
    # credentials, stored hashed (`dicomnode hash-secret` prints a hash): a bearer token, and/or users
    http_token_hash: str = ""
    http_users: dict[str, str] = field(default_factory=dict)  # user name -> password hash
    http_tls_cert_file: str | None = None
    http_tls_key_file: str | None = None
    # -- retention: spool and work files of delivered versions (the index keeps the record) ------------------
    retention_days: float = 30.0  # delivered versions older than this lose their files; 0 keeps them forever
    retention_min_free_disk_mb: int = 4096  # under this much free space, oldest delivered versions go first
    retention_interval_s: float = 3600.0  # how often the serve process runs the purge

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
    """A setting that cannot be used; the message names the setting and the source.

    ``settings`` are the names the message is about. :func:`load_settings`
    uses them to name where a bad value came from: an operator who set
    ``DICOMNODE_PORT`` looks for that variable, not for ``port``.
    """

    def __init__(self, message: str, *settings: str) -> None:
        super().__init__(message)
        self.settings = settings


def env_name(setting: str) -> str:
    """The environment variable of a setting (``port`` -> ``DICOMNODE_PORT``)."""
    return ENV_PREFIX + setting.upper()


def _did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean X?)`` for the nearest choice, or nothing: a typo costs one reading, not a search."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file at ``path`` (if any), then ``DICOMNODE_*`` variables.

    A bad value's message names its source: the variable when it came from
    the environment, the file when it came from there. Unknown variables do
    not stop it (see :func:`unknown_env`).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw.update(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise SettingsError(f"config file not found: {path}") from exc
        except IsADirectoryError as exc:
            raise SettingsError(f"config file {path} is a folder, not a TOML file") from exc
        except PermissionError as exc:
            raise SettingsError(f"config file {path} cannot be read (permission denied)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"unknown setting(s) in {path}: "
                            + ", ".join(name + _did_you_mean(name, known) for name in unknown))
    from_file = set(raw)
    env = os.environ if environ is None else environ
    from_env: dict[str, str] = {}
    for name, fld in known.items():
        value = env.get(env_name(name))
        if value is not None:
            raw[name] = _parse_env(name, value, _field_type(fld))
            from_env[name] = env_name(name)
    try:
        return _build(raw)
    except SettingsError as exc:
        named = [from_env[n] for n in exc.settings if n in from_env]
        if named:
            message = str(exc)
            for n in exc.settings:
                message = message.removeprefix(f"setting {n}: ")
            raise SettingsError(f"{', '.join(named)}: {message}", *exc.settings) from exc
        if path is not None and any(n in from_file for n in exc.settings):
            raise SettingsError(f"{exc} (in {path})", *exc.settings) from exc
        raise


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``DICOMNODE_*`` variable that is not a setting, naming the nearest setting.

    Without it a misspelt variable (``DICOMNODE_PROT``) leaves the default in
    force without a word. A warning rather than an error: a variable left over
    from another release, or meant for another tool, must not stop a node.
    """
    env = os.environ if environ is None else environ
    names = [f.name for f in dataclasses.fields(Settings)]
    out = []
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in NOT_SETTINGS and var not in map(env_name, names):
            # compared without the common prefix, which would make every name look close
            close = difflib.get_close_matches(var.removeprefix(ENV_PREFIX).lower(), names, n=1, cutoff=0.6)
            out.append(f"{var} is not a setting" + (f" (did you mean {env_name(close[0])}?)" if close else ""))
    return out


def _field_type(fld: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(Settings)
    return hints[fld.name]


def _parse_env(name: str, value: str, typ: Any) -> Any:
    """Environment values are strings; lists and tables come as JSON. A bad one is named by its variable."""
    var = env_name(name)
    base = _strip_optional(typ)
    if value == "" and base is not typ:
        return None
    if base is bool:
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{var}: expected a boolean (true/false, 1/0, yes/no, on/off), got {value!r}", name)
    if base is int:
        try:
            return int(value.strip())
        except ValueError:
            raise SettingsError(f"{var}: expected an integer, got {value!r}", name) from None
    if base is float:
        try:
            return float(value.strip())
        except ValueError:
            raise SettingsError(f"{var}: expected a number, got {value!r}", name) from None
    if base is str:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{var}: expected JSON, got {value!r} ({exc})", name) from exc


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


TABLES = {"checkpoint_pins": "a table family -> checkpoint", "http_users": "a table user -> password hash"}


def _coerce(name: str, value: Any, typ: Any) -> Any:
    base = _strip_optional(typ)
    if value is None:
        if base is typ:
            raise SettingsError(f"setting {name} may not be empty", name)
        return None
    try:
        if name == "allowed_peers":
            if isinstance(value, (str, Mapping)):
                raise TypeError(f"expected a list of peers, got {value!r}")
            return tuple(_peer(p) for p in value)
        if name == "tls":
            if isinstance(value, TLSSettings):
                return value
            return TLSSettings(**_table(value, TLSSettings, "tls"))
        if name == "destinations":
            if isinstance(value, (str, Mapping)):
                raise TypeError(f"expected a list of destinations, got {value!r}")
            return tuple(_destination(d) for d in value)
        if name in TABLES:
            if not isinstance(value, Mapping):
                raise TypeError(f"expected {TABLES[name]}, got {value!r}")
            return {str(k): str(v) for k, v in value.items()}
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError(f"expected true/false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError(f"expected an integer, got {value!r}")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise TypeError(f"expected an integer, got {value!r}") from None
        if base is float:
            if isinstance(value, bool):
                raise TypeError(f"expected a number, got {value!r}")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise TypeError(f"expected a number, got {value!r}") from None
        if base is str:
            if not isinstance(value, str):
                raise TypeError(f"expected a string, got {value!r}")
            return value
    except (TypeError, ValueError, KeyError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise SettingsError(f"setting {name}: {detail}", name) from exc
    return value


def _table(value: Any, cls: type, what: str) -> dict[str, Any]:
    """A TOML/JSON table for ``cls``: unknown keys are named (with the nearest known one), not a TypeError."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a table, got {value!r}")
    keys = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise TypeError(f"{what} has unknown key(s) "
                        + ", ".join(repr(k) + _did_you_mean(str(k), keys) for k in unknown))
    return dict(value)


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
        keys = ("ae_title", "host", "port", "tls", "confirm", "confirm_after_s", "confirm_timeout_s")
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise TypeError("destination has unknown key(s) "
                            + ", ".join(repr(k) + _did_you_mean(str(k), keys) for k in unknown))
        tls = _table(value.get("tls") or {}, ClientTLS, "destination tls")
        confirm = value.get("confirm", DestinationSettings.confirm)
        if not isinstance(confirm, str):
            raise TypeError(f"destination confirm must be one of {', '.join(CONFIRM_CHOICES)}, got {confirm!r}")
        timing = {k: float(value[k]) for k in ("confirm_after_s", "confirm_timeout_s") if k in value}
        return DestinationSettings(str(value["ae_title"]).strip(), str(value["host"]).strip(), int(value["port"]),
                                   ClientTLS(**dict(tls)), confirm=confirm.strip().lower(), **timing)
    raise TypeError(f"destinations entry must be a table or AET@host:port, got {value!r}")


def _validate(s: Settings) -> None:
    """Values that parse but cannot work; each error names the settings it is about (see :class:`SettingsError`)."""
    for aet, where in [(s.ae_title, "ae_title")] + [(p.ae_title, "allowed_peers") for p in s.allowed_peers]:
        if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
            raise SettingsError(f"invalid AE title {aet!r} in {where}: 1-16 printable characters, no backslash", where)
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} out of range (1-65535)", "port")
    if s.max_associations < 1:
        raise SettingsError("max_associations must be at least 1", "max_associations")
    if s.max_associations_per_peer < 1:
        raise SettingsError("max_associations_per_peer must be at least 1", "max_associations_per_peer")
    if not (0 < s.artim_timeout_s < float("inf") and 0 < s.stall_timeout_s <= s.network_timeout_s):
        raise SettingsError("need artim_timeout_s > 0 and 0 < stall_timeout_s <= network_timeout_s (a stall "
                            "mid-dataset is cut before the general idle timeout)",
                            "artim_timeout_s", "stall_timeout_s", "network_timeout_s")
    if s.max_pdu != 0 and not 4096 <= s.max_pdu <= 0xFFFFFFFF:
        raise SettingsError(f"max_pdu {s.max_pdu} must be 0 (unlimited: a peer may make the node buffer "
                            f"gigabytes) or from 4096 to 4294967295 bytes", "max_pdu")
    if s.quiet_period_s <= 0:
        raise SettingsError("quiet_period_s must be positive", "quiet_period_s")
    if s.release_quiet_s is not None and not 0 <= s.release_quiet_s <= s.quiet_period_s:
        raise SettingsError("release_quiet_s must be between 0 and quiet_period_s", "release_quiet_s", "quiet_period_s")
    if s.tls.require_client_cert and not s.tls.ca_file:
        raise SettingsError("tls.require_client_cert needs tls.ca_file", "tls")
    if bool(s.tls.cert_file) != bool(s.tls.key_file) or (
        (s.tls.ca_file or s.tls.require_client_cert) and not s.tls.enabled
    ):
        raise SettingsError("tls needs both cert_file and key_file", "tls")
    for d in s.destinations:
        if not d.ae_title or len(d.ae_title) > 16 or "\\" in d.ae_title:
            raise SettingsError(f"destination AE title {d.ae_title!r}: 1-16 characters, no backslash", "destinations")
        if not 0 < d.port < 65536:
            raise SettingsError(f"destination {d.name}: port out of range", "destinations")
        if d.confirm not in CONFIRM_CHOICES:
            raise SettingsError(f"destination {d.name}: confirm {d.confirm!r} is not one of "
                                f"{', '.join(CONFIRM_CHOICES)}", "destinations")
        if d.confirm_after_s < 0 or d.confirm_timeout_s <= 0:
            raise SettingsError(f"destination {d.name}: confirm_after_s must be >= 0 and confirm_timeout_s positive",
                                "destinations")
    if s.serve_worker not in SERVE_WORKER_CHOICES:
        raise SettingsError(f"serve_worker {s.serve_worker!r} is not one of {', '.join(SERVE_WORKER_CHOICES)}",
                            "serve_worker")
    if s.broker_url and not s.broker_url.startswith(("redis://", "rediss://", "memory://")):
        raise SettingsError(f"broker_url {s.broker_url!r}: use redis://host:port/db (or leave empty for embedded)",
                            "broker_url")
    if s.device not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"device {s.device!r} is not auto, cpu or cuda", "device")
    if not 0 < s.task_soft_time_limit_s < s.task_hard_time_limit_s < s.broker_visibility_timeout_s:
        raise SettingsError("need 0 < task_soft_time_limit_s < task_hard_time_limit_s < broker_visibility_timeout_s "
                            "(a task running past the visibility timeout is delivered twice)",
                            "task_soft_time_limit_s", "task_hard_time_limit_s", "broker_visibility_timeout_s")
    if s.torch_threads < 0:
        raise SettingsError(f"torch_threads {s.torch_threads} must be 0 (auto: this host's cores // the worker's "
                            f"task slots) or a positive number of threads per task slot", "torch_threads")
    for name in ("max_deliveries", "worker_concurrency", "dispatch_max_attempts"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{name} {getattr(s, name)} must be at least 1", name)
    if not 0 < s.dispatch_retry_initial_s <= s.dispatch_retry_max_s:
        raise SettingsError("need 0 < dispatch_retry_initial_s <= dispatch_retry_max_s",
                            "dispatch_retry_initial_s", "dispatch_retry_max_s")
    if s.dispatch_poll_s <= 0 or s.assembly_poll_s <= 0 or s.reconcile_interval_s <= 0:
        raise SettingsError("dispatch_poll_s, assembly_poll_s and reconcile_interval_s must be positive",
                            "dispatch_poll_s", "assembly_poll_s", "reconcile_interval_s")
    if s.min_free_disk_mb < 0:
        raise SettingsError(f"min_free_disk_mb {s.min_free_disk_mb} must be >= 0", "min_free_disk_mb")
    if not (s.gate_margin >= 0 and s.gate_margin < float("inf")):
        raise SettingsError(f"gate_margin {s.gate_margin!r} must be a finite number >= 0 (a fraction of each "
                            f"training range's width)", "gate_margin")
    if not (s.gate_feature_factor > 0 and s.gate_feature_factor < float("inf")):
        raise SettingsError(f"gate_feature_factor {s.gate_feature_factor!r} must be a finite number > 0",
                            "gate_feature_factor")
    if s.gate_unchecked not in GATE_UNCHECKED_CHOICES:
        raise SettingsError(f"gate_unchecked {s.gate_unchecked!r} is not one of {', '.join(GATE_UNCHECKED_CHOICES)}",
                            "gate_unchecked")
    for name in ("floor_auc", "floor_sensitivity", "floor_specificity"):
        value = getattr(s, name)
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise SettingsError(f"{name} {value!r} must be a number from 0 to 1 (0 disables that check)", name)
    if not (s.http_port == 0 or 0 < s.http_port < 65536):
        raise SettingsError(f"http_port {s.http_port} out of range (0 turns the HTTP side off)", "http_port")
    if s.http_port and s.http_port == s.port:
        raise SettingsError(f"http_port {s.http_port} is also the DICOM port (setting port): give the HTTP side "
                            f"another port, or 0 to turn it off", "http_port")
    if bool(s.http_tls_cert_file) != bool(s.http_tls_key_file):
        raise SettingsError("HTTP TLS needs both http_tls_cert_file and http_tls_key_file",
                            "http_tls_cert_file", "http_tls_key_file")
    if s.retention_days < 0 or s.retention_min_free_disk_mb < 0 or s.retention_interval_s <= 0:
        raise SettingsError("retention_days and retention_min_free_disk_mb must be >= 0 (0 turns that rule off) "
                            "and retention_interval_s positive",
                            "retention_days", "retention_min_free_disk_mb", "retention_interval_s")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"log_level {s.log_level!r} is not DEBUG, INFO, WARNING or ERROR", "log_level")


def settings_reference() -> list[tuple[str, str, str]]:
    """(name, type, default) of every setting, for the README and ``dicomnode config``."""
    hints = typing.get_type_hints(Settings)
    out = []
    default = Settings()
    for f in dataclasses.fields(Settings):
        out.append((f.name, str(hints[f.name]).replace("typing.", ""), repr(getattr(default, f.name))))
    return out
