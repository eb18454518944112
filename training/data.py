"""Preprocessed-volume cache, the torch Dataset over it, and the loaders every protocol uses.

Stable API (other protocols build on it; keep it small):

```python
from training.data import VolumeCache, CaseDataset, collate_cases, make_loader, to_device, spec_hash

cache = VolumeCache(spec, cache_dir)          # spec = family.spec_for(hparams) (maybe with a spacing override)
cache.warm(cases, progress=True)              # prepares every case ONCE (models.preprocess.apply_spec), on disk
ds = CaseDataset(cases, cache, tasks=("grade",), in_memory=True, augment=None)
loader = make_loader(ds, batch_size=4, shuffle=True, seed=0, num_workers=0, device="cpu")
for batch in loader:                          # batch = collate_cases([...])
    batch = to_device(batch, device)
    batch["T1"]              # (B, D, H, W) float32 (slice specs: (B, S, H, W))
    batch["slice_mask"]      # (B, S) bool, slice specs only
    batch["labels"]["grade"] # (B,) int64, -1 where the label is missing
    batch["case_id"]         # list[str]
```

Why a cache: preprocessing (reorient, resample, crop, z-score; the clinical specs add N4 bias
correction, brain extraction and two registrations, minutes per case) costs far more than a small
network's forward pass, and it is the same every epoch and every repeat, so it is done once per
case and spec (``python -m training prepare`` fills the cache ahead of training, in parallel;
``training.prepare``). The cache folder is named by a hash of the *validated* spec, so a changed
spec (another grid, spacing, normalisation) can never reuse stale arrays; each entry also records
the case id, the source files' paths, sizes and modification times and a fingerprint of the
preprocessing code and the libraries it runs on (:func:`preprocess_fingerprint`), and is rebuilt
when any of them changes. An entry is a ``models.casefile`` case file: the arrays AND the prepared
case's ``meta`` (with ``meta["measurements"]``, the gate's training ranges), the format the node
hands from its preprocess step to inference. A case that cannot be prepared is recorded
(``<spec hash>/failed/<case>.json``, with the reason) and not tried again until its sources or the
code change (or ``prepare --retry-failed``).
Preprocessing always goes through ``models.preprocess.apply_spec``: the node serves with the
same function on the same spec (no train/serve skew).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from torch.utils.data import DataLoader, Dataset

from models.casefile import load_case, save_case
from models.preprocess import PreprocessedCase, PreprocessError, SpecError, apply_spec, validate_spec
from training.cases import TASKS, Case
from training.datasets import DatasetError

__all__ = [
    "CACHE_FORMAT",
    "CachedCase",
    "CaseDataset",
    "VolumeCache",
    "collate_cases",
    "make_loader",
    "preprocess_fingerprint",
    "random_flip",
    "spec_hash",
    "to_device",
]

#: bump when the cache layout changes (part of every spec hash). 2: entries are models.casefile
#: case files (arrays + the prepared case's meta), failures recorded next to them.
CACHE_FORMAT = 2

#: libraries whose version can change a prepared array (interpolation, registration, brain extraction)
_FINGERPRINT_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "nibabel", "SimpleITK", "deepbet", "nilearn", "torch")
#: the key of a cache entry's provenance inside its ``meta`` (stripped again when read)
_STAMP_KEY = "training_cache"

Batch = dict[str, Any]


def spec_hash(spec: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the validated spec's canonical JSON (+ the cache format).

    Validated first, so two specs that differ only in spelled-out defaults share a cache.
    """
    clean = validate_spec(spec)
    text = json.dumps({"cache_format": CACHE_FORMAT, "spec": clean}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _module_files(root: Path) -> list[Path]:
    """``models/preprocess.py`` and every ``models`` module it imports (in-function imports too),
    followed transitively: the code that decides a prepared array."""
    pkg = root.parent
    seen: set[Path] = set()
    todo = [root]
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_bytes(), filename=str(f))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == pkg.name:
                    names |= {a.name for a in node.names}
                elif node.module.startswith(pkg.name + "."):
                    names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith(pkg.name + ".")}
        for name in names:
            for cand in (pkg / f"{name}.py", pkg / name / "__init__.py"):
                if cand.is_file() and cand not in seen:
                    todo.append(cand)
    return sorted(seen)


def _code_only(path: Path) -> str:
    """The module's syntax tree without docstrings, comments, formatting or line numbers: editing
    the documentation of ``models/preprocess.py`` does not throw a prepared cache away."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@functools.lru_cache(maxsize=1)
def preprocess_fingerprint() -> str:
    """16 hex digits over the preprocessing code and the versions of the libraries it runs on.

    Why: the spec hash says WHAT preparation was asked for; this says which implementation
    answered. A cache entry made by other code (a fixed registration, another SimpleITK) is
    rebuilt instead of being trained on, so training's arrays stay the ones the node's
    ``apply_spec`` would make today. The cost: changing the code of ``models/preprocess.py`` (or
    of a ``models`` module it imports) re-prepares the cache; docstrings, comments and formatting
    do not count.
    """
    import models.preprocess as mp

    h = hashlib.sha256()
    root = Path(mp.__file__).resolve()
    for f in _module_files(root):
        h.update(f.relative_to(root.parent).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(_code_only(f).encode()).digest())
    for pkg in _FINGERPRINT_PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{pkg}={version}\0".encode())
    h.update(f"python={sys.version_info[0]}.{sys.version_info[1]}".encode())
    return h.hexdigest()[:16]


# Now, right after models.preprocess was imported: the fingerprint describes the code this
# process runs, not a file edited on disk since.
preprocess_fingerprint()


def _safe_name(case_id: str) -> str:
    """A file name from a case id; the hash suffix keeps two ids that sanitise alike apart."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)[:80]
    return f"{clean}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"


def _source_stamp(case: Case, roles: Sequence[str]) -> str:
    """Identity of the source files (path, size, mtime): a changed file invalidates its cache."""
    parts = []
    for r in roles:
        p = case.images.get(r)
        if p is None:
            parts.append(f"{r}:-")
            continue
        try:
            st = os.stat(p)
            parts.append(f"{r}:{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{r}:{p}:missing")
    return "|".join(parts)


@dataclass(frozen=True)
class CachedCase:
    """One case's preprocessed arrays: ``arrays[role]`` float32; slice specs add mask and indices.

    ``meta`` is the prepared case's ``meta`` as :func:`models.preprocess.apply_spec` wrote it
    (JSON data: steps, original geometry, and with the clinical transforms ``measurements``).
    """

    case_id: str
    arrays: dict[str, np.ndarray]
    slice_mask: np.ndarray | None = None
    slice_indices: np.ndarray | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def measurements(self) -> dict[str, float]:
        """``meta["measurements"]`` ({name: value}, the gate's inputs); empty for specs that make none."""
        return dict(self.meta.get("measurements") or {})


class VolumeCache:
    """Prepared cases per (case, spec) on disk: ``cache_dir/<spec hash>/<case>.npz``.

    ``get(case)`` returns the cached arrays, computing and storing them the first time (or when
    the source files or the preprocessing code changed). Writes are atomic (temporary file +
    rename), so parallel preparation workers, loader workers or two runs sharing one cache never
    read half a file. A failure is recorded under ``failed/`` and raised again (without preparing
    again) while the sources and code are unchanged.
    """

    def __init__(self, spec: Mapping[str, Any], cache_dir: str | os.PathLike[str]) -> None:
        self.spec: dict[str, Any] = validate_spec(spec)
        self.roles: tuple[str, ...] = tuple(self.spec["roles"])
        self.key: str = spec_hash(self.spec)
        self.dir: Path = Path(cache_dir) / self.key
        self.dir.mkdir(parents=True, exist_ok=True)
        spec_file = self.dir / "spec.json"
        if not spec_file.exists():
            tmp = spec_file.with_name(f".spec.json.{os.getpid()}")
            tmp.write_text(json.dumps(self.spec, indent=1, sort_keys=True))
            os.replace(tmp, spec_file)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ where and what
    def path(self, case: Case) -> Path:
        return self.dir / f"{_safe_name(case.case_id)}.npz"

    def failure_path(self, case: Case) -> Path:
        return self.dir / "failed" / f"{_safe_name(case.case_id)}.json"

    def stamp(self, case: Case) -> dict[str, str]:
        """What a valid entry of ``case`` must record: case id, source files, spec key, code."""
        return {"case_id": case.case_id, "sources": _source_stamp(case, self.roles), "spec": self.key,
                "code": preprocess_fingerprint()}

    # ------------------------------------------------------------------ prepare
    def prepare(self, case: Case, memo: MutableMapping[str, Any] | None = None) -> PreprocessedCase:
        """``apply_spec`` on the case's files (nothing read from or written to the cache).

        ``memo``: ``apply_spec``'s memo of the clinical transforms' intermediate results (bias
        fields, masks, registrations); one dict shared by several specs of ONE case pays for them
        once (``training.prepare`` does that). The arrays are the same with or without it.
        """
        missing = [r for r in self.roles if r not in case.images]
        if missing:
            raise DatasetError(f"has no {missing} but the model's spec needs {list(self.roles)}",
                               case_id=case.case_id)
        try:
            volumes = {r: case.images[r] for r in self.roles}
            return apply_spec(self.spec, volumes) if memo is None else apply_spec(self.spec, volumes, cache=memo)
        except (PreprocessError, SpecError) as exc:
            raise DatasetError(f"cannot be preprocessed: {exc}", case_id=case.case_id) from exc
        except (OSError, ValueError, EOFError, zlib.error, ImageFileError) as exc:  # unreadable / truncated NIfTI
            raise DatasetError(f"cannot be read for preprocessing: {type(exc).__name__}: {exc}",
                               path=next(iter(case.images.values()), None), case_id=case.case_id) from exc

    def store(self, case: Case, pre: PreprocessedCase) -> None:
        """Write ``pre`` as the entry of ``case`` (a ``models.casefile`` case file + provenance)."""
        meta = dict(pre.meta)
        meta[_STAMP_KEY] = self.stamp(case)
        save_case(PreprocessedCase(arrays=pre.arrays, affine=pre.affine, meta=meta, mask=pre.mask,
                                   template_mask=getattr(pre, "template_mask", None),
                                   slice_mask=pre.slice_mask, slice_indices=pre.slice_indices), self.path(case))
        self.failure_path(case).unlink(missing_ok=True)

    # ------------------------------------------------------------------ read
    def _header_meta(self, case: Case) -> dict[str, Any] | None:
        """The entry's meta when it is valid for ``case`` now (reads the JSON header only), else None."""
        p = self.path(case)
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                header = json.loads(bytes(z["header.json"]).decode())
        except (OSError, KeyError, ValueError, EOFError):
            return None  # a damaged entry is rebuilt, never trusted
        meta = header.get("meta") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get(_STAMP_KEY) != self.stamp(case):
            return None
        return meta

    def valid(self, case: Case) -> bool:
        """True when a usable entry exists (its sources, spec and code unchanged); cheap: header only."""
        return self._header_meta(case) is not None

    def meta(self, case: Case) -> dict[str, Any]:
        """The prepared case's ``meta`` (preparing the case first if needed), without reading the arrays."""
        meta = self._header_meta(case)
        if meta is None:
            return dict(self.get(case).meta)
        meta = dict(meta)
        meta.pop(_STAMP_KEY, None)
        return meta

    def load(self, case: Case) -> PreprocessedCase | None:
        """The whole prepared case (arrays, masks, affine, meta) from a valid entry, else None."""
        p = self.path(case)
        if not p.exists():
            return None
        try:
            pre = load_case(p)
        except (OSError, KeyError, ValueError, EOFError):
            return None
        if not isinstance(pre.meta, dict) or pre.meta.get(_STAMP_KEY) != self.stamp(case):
            return None
        pre.meta = {k: v for k, v in pre.meta.items() if k != _STAMP_KEY}
        return pre

    def recorded_failure(self, case: Case) -> str | None:
        """The reason recorded when ``case`` last failed with these sources and code, else None."""
        p = self.failure_path(case)
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("stamp") != self.stamp(case):
            return None
        return str(rec.get("reason") or "failed")

    def record_failure(self, case: Case, reason: str) -> None:
        """Keep why ``case`` cannot be prepared (atomic write), so it is excluded, not retried blindly."""
        p = self.failure_path(case)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"case_id": case.case_id, "reason": reason, "stamp": self.stamp(case)}, indent=1))
        os.replace(tmp, p)

    def clear_failure(self, case: Case) -> None:
        self.failure_path(case).unlink(missing_ok=True)

    @staticmethod
    def _cached(case: Case, pre: PreprocessedCase) -> CachedCase:
        return CachedCase(case.case_id, dict(pre.arrays), pre.slice_mask, pre.slice_indices, dict(pre.meta))

    def get(self, case: Case) -> CachedCase:
        """The prepared case: from a valid entry, else prepared now and stored.

        Raises :class:`DatasetError` when the case cannot be prepared (recorded, so the next
        call raises the same reason at once).
        """
        pre = self.load(case)
        if pre is not None:
            self.hits += 1
            return self._cached(case, pre)
        reason = self.recorded_failure(case)
        if reason is not None:
            raise DatasetError(f"{reason} (recorded in {self.failure_path(case)}; fix the data, or rerun "
                               f"`python -m training prepare --retry-failed` after a transient failure)",
                               case_id=case.case_id)
        self.misses += 1
        try:
            pre = self.prepare(case)
        except DatasetError as exc:
            self.record_failure(case, exc.problem)
            raise
        self.store(case, pre)
        return self._cached(case, pre)

    def warm(self, cases: Iterable[Case], *, progress: bool = False) -> None:
        """Prepare every case now (once), so training epochs only read arrays (first failure raises;
        ``training.prepare.prepare_cases`` prepares in parallel and excludes failures instead)."""
        from tqdm import tqdm

        cases = list(cases)
        for c in tqdm(cases, desc=f"preprocess ({self.key})", disable=None if progress else True, leave=False):
            if self.valid(c):
                self.hits += 1
            else:
                self.get(c)



    def warm(self, cases: Iterable[Case], *, progress: bool = False) -> None:
        """Prepare every case now (once), so training epochs only read arrays."""
        from tqdm import tqdm

        cases = list(cases)
        for c in tqdm(cases, desc=f"preprocess ({self.key})", disable=None if progress else True, leave=False):
            self.get(c)


def random_flip(axes: Sequence[int] = (2,), p: float = 0.5) -> Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]:
    """Augmentation: flip every role along each axis in ``axes`` (array axes, 0-based, of one role's
    (D, H, W) array) with probability ``p``; the same flip for all roles, so they stay aligned.

    Why only flips: they are exact (no interpolation) and left/right symmetry of the brain makes
    them label-preserving; the paper names no augmentation, so it is off in the paper's config.
    """
    axes_t = tuple(int(a) for a in axes)

    def apply(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = dict(arrays)
        for ax in axes_t:
            if rng.random() < p:
                out = {r: np.flip(a, axis=ax) for r, a in out.items()}
        return {r: np.ascontiguousarray(a) for r, a in out.items()}

    return apply


class CaseDataset(Dataset):
    """Cases -> {role: tensor, ..., "labels": {task: int or -1}, "case_id": str[, "slice_mask"]}.

    ``in_memory`` keeps the arrays after the first read (small cohorts fit in RAM; with many
    loader workers each keeps its own copy, so leave it off for full-size data). ``augment`` is
    ``f(arrays, rng) -> arrays``; its random stream is seeded from (``seed``, epoch, index) via
    :meth:`set_epoch`, so augmented runs are reproducible whatever the worker count.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        cache: VolumeCache,
        *,
        tasks: Sequence[str] = tuple(TASKS),
        in_memory: bool = False,
        augment: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None,
        seed: int = 0,
    ) -> None:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
        self.cases = list(cases)
        self.cache = cache
        self.tasks = tuple(tasks)
        self.in_memory = in_memory
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._mem: dict[int, CachedCase] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels(self, task: str) -> np.ndarray:
        """(N,) int64 labels of ``task``, -1 where missing (for class weights and strata)."""
        return np.array([-1 if c.labels.get(task) is None else int(c.labels[task]) for c in self.cases], dtype=np.int64)

    def __getitem__(self, index: int) -> Batch:
        case = self.cases[index]
        item = self._mem.get(index)
        if item is None:
            item = self.cache.get(case)
            if self.in_memory:
                self._mem[index] = item
        arrays = item.arrays
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            arrays = self.augment(dict(arrays), rng)
        out: Batch = {r: torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for r, a in arrays.items()}
        if item.slice_mask is not None:
            out["slice_mask"] = torch.from_numpy(np.asarray(item.slice_mask, dtype=bool).copy())
        out["labels"] = {t: (-1 if case.labels.get(t) is None else int(case.labels[t])) for t in self.tasks}
        out["case_id"] = case.case_id
        return out


def collate_cases(items: Sequence[Batch]) -> Batch:
    """Stack a list of :class:`CaseDataset` items: tensors -> (B, ...), labels -> {task: (B,) int64}."""
    if not items:
        raise ValueError("collate_cases: empty batch")
    out: Batch = {}
    for key, value in items[0].items():
        if key == "labels":
            out["labels"] = {t: torch.tensor([it["labels"][t] for it in items], dtype=torch.int64) for t in value}
        elif key == "case_id":
            out["case_id"] = [it["case_id"] for it in items]
        elif isinstance(value, torch.Tensor):
            out[key] = torch.stack([it[key] for it in items])
        else:
            out[key] = [it[key] for it in items]
    return out


def to_device(batch: Batch, device: torch.device | str, *, non_blocking: bool = True) -> Batch:
    """Move every tensor of a batch (labels included) to ``device``; other values stay."""
    dev = torch.device(device)
    nb = non_blocking and dev.type == "cuda"
    out: Batch = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dev, non_blocking=nb)
        elif isinstance(v, Mapping):
            out[k] = {t: (x.to(dev, non_blocking=nb) if isinstance(x, torch.Tensor) else x) for t, x in v.items()}
        else:
            out[k] = v
    return out


class _EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): the order is reproducible after a resume."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loader(
    dataset: CaseDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    world_size: int = 1,
    rank: int = 0,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader that keeps a GPU busy where there is one and stays cheap on a 2-core CPU.

    ``num_workers=0`` (the CPU default) reads in the training process: the cache makes a read a
    memcpy, and on two cores extra processes only compete with the model. On CUDA give workers
    (e.g. 4-8): then ``pin_memory`` and ``persistent_workers`` are on and each worker prefetches
    ``prefetch_factor`` batches. With ``world_size > 1`` (torchrun) a ``DistributedSampler``
    gives each rank its share. The sampler (and the dataset's augmentation stream) follow
    ``set_epoch`` so every epoch's order is a function of (seed, epoch): resumable and reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    sampler: torch.utils.data.Sampler[int]
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = _EpochSeededSampler(len(dataset), seed, shuffle)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_cases,
        pin_memory=dev.type == "cuda",
        drop_last=drop_last,
        **kwargs,
    )
