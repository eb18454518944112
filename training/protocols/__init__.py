"""Training protocols (one module per seed paper) and what they share: configs and run options.

Each protocol is a module ``training.protocols.<name>`` with

    run(config: dict, *, data_dir: Path, out_dir: Path, options: RunOptions) -> dict   # a JSON-able summary

and optionally ``evaluate(run_dir: Path) -> dict`` (rebuild tables/figures from saved predictions).
The CLI imports them lazily (:func:`get_protocol`), so a protocol that is missing or broken
only fails when asked for, with a clear :class:`ProtocolError`.

Configs are TOML tables (``training/configs/<name>.toml`` with the paper's defaults). Overlays,
in order: a profile (``configs/<profile>.toml``'s ``[<name>]`` table and/or
``configs/<name>.<profile>.toml``), a user file (``--config F``: either the protocol's tables or
a ``[<name>]`` table holding them), then ``--set section.key=value`` (the value parsed as a TOML
literal, e.g. ``train.lr=1e-3``, ``model.widths=[8,16,32]``, ``protocol.rows=["fs","adaptive"]``;
bare words are strings). A key that is not in the defaults is refused (a typo must not be
silently ignored; an empty table in the defaults, such as PromptNet's ``[template]``, is free-form
and checked by its protocol), and so is a value of another type than the default's (ints pass as floats).
The resolved config is saved with every run and hashed into its resume key.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.loop import DistInfo

__all__ = [
    "CONFIG_DIR",
    "PROTOCOLS",
    "ConfigError",
    "ProtocolError",
    "RunOptions",
    "apply_sets",
    "config_hash",
    "get_protocol",
    "load_config",
    "merge_config",
    "parse_amp",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROTOCOLS: tuple[str, ...] = ("promptnet", "crossmodal", "mmdlm")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and why."""


class ProtocolError(RuntimeError):
    """A protocol that does not exist or cannot be imported."""


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train): device, precision, which rows/repeats, resume, progress.

    ``rows``/``repeats`` None = the config's. ``amp_dtype`` None = fp32. ``num_threads`` sets
    ``torch.set_num_threads`` (None = leave torch's default).
    """

    device: str = "cpu"
    amp_dtype: torch.dtype | None = None
    rows: tuple[str, ...] | None = None
    repeats: int | None = None
    resume: bool = True
    progress: bool = False
    num_threads: int | None = None
    dist: DistInfo = field(default_factory=DistInfo)


def parse_amp(value: str | None) -> torch.dtype | None:
    """``bf16``/``fp16``/``none`` -> dtype (None = full precision)."""
    v = (value or "none").lower()
    if v in ("none", "fp32", "no", "off"):
        return None
    if v in ("bf16", "bfloat16"):
        return torch.bfloat16
    if v in ("fp16", "float16", "half"):
        return torch.float16
    raise ConfigError(f"amp must be bf16, fp16 or none, got {value!r}")


def get_protocol(name: str) -> Any:
    """The protocol module, imported now; a missing one is a clear error, not an ImportError trace."""
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    try:
        mod = importlib.import_module(f"training.protocols.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"training.protocols.{name}":
            raise ProtocolError(f"protocol {name!r} is not available in this installation "
                                f"(training/protocols/{name}.py is missing)") from None
        raise ProtocolError(f"protocol {name!r} cannot be imported: {exc}") from exc
    if not callable(getattr(mod, "run", None)):
        raise ProtocolError(f"training.protocols.{name} has no run(config, ...) function")
    return mod


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def merge_config(base: Mapping[str, Any], overlay: Mapping[str, Any], *, where: str, prefix: str = "") -> dict[str, Any]:
    """``base`` with ``overlay``'s values; unknown keys and wrong types are :class:`ConfigError`."""
    out = copy.deepcopy(dict(base))
    # An empty table in the defaults is free-form (e.g. [template] overriding [train]): the
    # protocol checks its keys itself.
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in out and base:
            known = ", ".join(sorted(out)) or "(none)"
            raise ConfigError(f"{where}: unknown config key {dotted!r} (known here: {known})")
        if key not in out:
            out[key] = copy.deepcopy(value)
            continue
        default = out[key]
        if isinstance(default, dict) and isinstance(value, Mapping):
            out[key] = merge_config(default, value, where=where, prefix=f"{dotted}.")
            continue
        if not _type_ok(default, value):
            raise ConfigError(f"{where}: {dotted} must be a {type(default).__name__} "
                              f"(like the default {default!r}), got {value!r}")
        out[key] = float(value) if isinstance(default, float) else copy.deepcopy(value)
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set train.optimizer=adamw


def apply_sets(config: Mapping[str, Any], sets: Iterable[str], *,
               free_tables: Iterable[str] | None = None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values as TOML literals).

    ``free_tables``: top-level tables that are free-form (empty in the protocol's defaults, e.g.
    ``[template]`` overriding ``[train]``; the protocol checks their keys). Default: the tables
    empty in ``config``. Without this, a second ``--set template.x`` after ``--set template.y``
    would be refused because the table is no longer empty.
    """
    out = copy.deepcopy(dict(config))
    free = ({k for k, v in out.items() if isinstance(v, dict) and not v} if free_tables is None
            else set(free_tables))
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        nested: dict[str, Any] = {}
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _parse_value(text.strip())
        if len(parts) == 2 and parts[0] in free and isinstance(out.get(parts[0]), dict):
            out[parts[0]][parts[1]] = copy.deepcopy(nested[parts[0]][parts[1]])
            continue
        out = merge_config(out, nested, where=f"--set {item}")
    return out


def load_config(name: str, *, profile: str | None = None, config_file: str | Path | None = None,
                sets: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config of protocol ``name``: defaults, profile, user file, ``--set``s."""
    base_path = CONFIG_DIR / f"{name}.toml"
    if not base_path.exists():
        raise ConfigError(f"no default config for protocol {name!r} ({base_path} missing)")
    cfg = _read_toml(base_path)
    free = [k for k, v in cfg.items() if isinstance(v, dict) and not v]
    if profile:
        found = False
        shared = CONFIG_DIR / f"{profile}.toml"
        if shared.exists():
            table = _read_toml(shared).get(name)
            if table is not None:
                cfg = merge_config(cfg, table, where=f"{shared} [{name}]")
                found = True
        own = CONFIG_DIR / f"{name}.{profile}.toml"
        if own.exists():
            cfg = merge_config(cfg, _read_toml(own), where=str(own))
            found = True
        if not found:
            raise ConfigError(f"profile {profile!r} has no settings for protocol {name!r} "
                              f"(looked for [{name}] in {shared} and for {own})")
    if config_file is not None:
        user = _read_toml(Path(config_file))
        if name in user and isinstance(user[name], Mapping) and set(user) <= {name}:
            user = user[name]
        cfg = merge_config(cfg, user, where=str(config_file))
    return apply_sets(cfg, sets, free_tables=free)


def config_hash(config: Mapping[str, Any]) -> str:
    """16 hex digits over the canonical JSON of a config: the resume key of a run."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


PREPROCESS_CHOICES: tuple[str, ...] = ("brats", "clinical", "clinical_no_n4")


def with_preprocess(spec: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A protocol's spec in the form ``data.preprocess`` asks for.

    ``brats``: as the family writes it (skull-stripped, co-registered input
    such as BraTS); ``clinical``: its clinical variant
    (``models.preprocess.clinical_variant``), so the checkpoint reads native
    whole heads from a PACS; ``clinical_no_n4``: the same without N4, which on
    2 CPU cores costs about a second per role and case (the demo uses it to
    train in minutes). Training and the node then run the same chain.
    """
    from models.preprocess import clinical_variant, validate_spec

    mode = str(config.get("data", {}).get("preprocess", "brats"))
    if mode not in PREPROCESS_CHOICES:
        raise ConfigError(f"data.preprocess: expected one of {list(PREPROCESS_CHOICES)}, got {mode!r}")
    if mode == "brats":
        return validate_spec(spec)
    return clinical_variant(spec, bias_field=(mode == "clinical"))
