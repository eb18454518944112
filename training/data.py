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

Why a cache: preprocessing (reorient, resample, crop, z-score) costs far more than a small
network's forward pass, and it is the same every epoch and every repeat, so it is done once per
case and spec. The cache file name holds a hash of the *validated* spec, so a changed spec
(another grid, spacing, normalisation) can never reuse stale arrays; each file also records the
source files' sizes and modification times and is rebuilt when a source changes.
Preprocessing always goes through ``models.preprocess.apply_spec``: the node serves with the
same function on the same spec (no train/serve skew).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.preprocess import PreprocessError, SpecError, apply_spec, validate_spec
from training.cases import TASKS, Case
from training.datasets import DatasetError

__all__ = [
    "CACHE_FORMAT",
    "CachedCase",
    "CaseDataset",
    "VolumeCache",
    "collate_cases",
    "make_loader",
    "random_flip",
    "spec_hash",
    "to_device",
]

#: bump when the cache file layout changes (part of every file's key)
CACHE_FORMAT = 1

Batch = dict[str, Any]


def spec_hash(spec: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the validated spec's canonical JSON (+ the cache format).

    Validated first, so two specs that differ only in spelled-out defaults share a cache.
    """
    clean = validate_spec(spec)
    text = json.dumps({"cache_format": CACHE_FORMAT, "spec": clean}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    """One case's preprocessed arrays: ``arrays[role]`` float32; slice specs add mask and indices."""

    case_id: str
    arrays: dict[str, np.ndarray]
    slice_mask: np.ndarray | None = None
    slice_indices: np.ndarray | None = None


class VolumeCache:
    """Preprocessed arrays per (case, spec) on disk: ``cache_dir/<spec hash>/<case>.npz``.

    ``get(case)`` returns the cached arrays, computing and storing them the first time (or when
    the source files changed). Writes are atomic (temporary file + rename), so parallel loader
    workers or two runs sharing one cache never read half a file.
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

    def path(self, case: Case) -> Path:
        return self.dir / f"{_safe_name(case.case_id)}.npz"

    def _prepare(self, case: Case) -> CachedCase:
        missing = [r for r in self.roles if r not in case.images]
        if missing:
            raise DatasetError(f"has no {missing} but the model's spec needs {list(self.roles)}",
                               case_id=case.case_id)
        try:
            pre = apply_spec(self.spec, {r: case.images[r] for r in self.roles})
        except (PreprocessError, SpecError) as exc:
            raise DatasetError(f"cannot be preprocessed: {exc}", case_id=case.case_id) from exc
        except (OSError, ValueError) as exc:  # unreadable / truncated NIfTI
            raise DatasetError(f"cannot be read for preprocessing: {type(exc).__name__}: {exc}",
                               path=next(iter(case.images.values()), None), case_id=case.case_id) from exc
        return CachedCase(case.case_id, dict(pre.arrays), pre.slice_mask, pre.slice_indices)

    def _store(self, case: Case, item: CachedCase) -> None:
        payload: dict[str, np.ndarray] = {f"role_{r}": a for r, a in item.arrays.items()}
        if item.slice_mask is not None:
            payload["slice_mask"] = item.slice_mask
        if item.slice_indices is not None:
            payload["slice_indices"] = item.slice_indices
        payload["stamp"] = np.array(_source_stamp(case, self.roles))
        payload["case_id"] = np.array(case.case_id)
        target = self.path(case)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npz")
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)
        os.replace(tmp, target)

    def _load(self, case: Case) -> CachedCase | None:
        p = self.path(case)
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["stamp"]) != _source_stamp(case, self.roles) or str(z["case_id"]) != case.case_id:
                    return None
                arrays = {r: z[f"role_{r}"] for r in self.roles}
                sm = z["slice_mask"] if "slice_mask" in z.files else None
                si = z["slice_indices"] if "slice_indices" in z.files else None
        except (OSError, KeyError, ValueError):
            return None  # a damaged cache file is rebuilt, never trusted
        return CachedCase(case.case_id, arrays, sm, si)

    def get(self, case: Case) -> CachedCase:
        item = self._load(case)
        if item is not None:
            self.hits += 1
            return item
        self.misses += 1
        item = self._prepare(case)
        self._store(case, item)
        return item

    def warm(self, cases: Iterable[Case], *, progress: bool = False) -> None:
        """Prepare every case now (once), so training epochs only read arrays."""
        from tqdm import tqdm

        cases = list(cases)
        for c in tqdm(cases, desc=f"preprocess ({self.key})", disable=not progress, leave=False):
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
