"""The model families by name, imported lazily.

Why lazy: ``import models`` must stay cheap (the node's web and index
processes import it for the checkpoint registry), and a family's network code
is only needed where a model is built. Each family is the module-level
``FAMILY`` of ``models/<name>/family.py``.

Checkpoints and the registry accept extra families (``extra``: name ->
``ModelFamily``) for tests and site plug-ins; an extra family of the same name
as a built-in one takes precedence, because the caller asked for it
explicitly.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping

from models.base import ModelFamily

FAMILY_NAMES: tuple[str, ...] = ("fs3dcnn", "promptnet", "crossmodal", "mmdlm")


def get_family(name: str) -> ModelFamily:
    """The built-in family ``name``; ValueError for an unknown name, ImportError when its code is broken."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(FAMILY_NAMES)}")
    try:
        module = importlib.import_module(f"models.{name}.family")
    except ImportError as exc:
        raise ImportError(f"model family {name!r} could not be imported: {exc}") from exc
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, ModelFamily):
        raise ImportError(f"models.{name}.family defines no FAMILY of type ModelFamily")
    if family.name != name:
        raise ImportError(f"models.{name}.family.FAMILY is named {family.name!r}, expected {name!r}")
    return family


def resolve_family(name: str, extra: Mapping[str, ModelFamily] | None = None) -> ModelFamily:
    """``extra[name]`` if given there, else the built-in family (same errors as :func:`get_family`)."""
    if extra and name in extra:
        return extra[name]
    if extra and name not in FAMILY_NAMES:
        known = ", ".join([*FAMILY_NAMES, *sorted(extra)])
        raise ValueError(f"unknown model family {name!r}; known families: {known}")
    return get_family(name)


def available_family_names() -> tuple[str, ...]:
    """Built-in families whose ``family.py`` exists (without importing them)."""
    out = []
    for name in FAMILY_NAMES:
        try:
            found = importlib.util.find_spec(f"models.{name}.family") is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out.append(name)
    return tuple(out)


def all_families() -> tuple[ModelFamily, ...]:
    """Every built-in family, in ``FAMILY_NAMES`` order (imports them all; errors are not hidden)."""
    return tuple(get_family(name) for name in FAMILY_NAMES)
