"""The checkpoint registry: which models run for which roles, and why; invalid files reported;
newest-or-pinned choice. Families here are tiny stand-ins with the real families' names and input
roles (so the rule is tested without the real networks), plus one run over the real ones built small."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.base import NON_ENHANCED_ROLES, ROLES, TASKS, ModelFamily, Prediction
from models.checkpoint import CheckpointError, content_hash, save_checkpoint
from models.families import FAMILY_NAMES, get_family
from models.preprocess import volume_spec
from models.registry import CheckpointRegistry

STAND_IN_ROLES: dict[str, tuple[str, ...]] = {
    "fs3dcnn": ROLES,
    "promptnet": NON_ENHANCED_ROLES,
    "crossmodal": ROLES,
    "mmdlm": ("T1CE", "T2", "FLAIR"),
}


def stand_in(name: str, roles: tuple[str, ...]) -> ModelFamily:
    def build(hp: Mapping[str, Any]) -> nn.Module:
        return nn.Linear(len(roles), 2)

    def predict(model: nn.Module, inputs: Mapping[str, torch.Tensor], **_: Any) -> Prediction:
        x = torch.stack([inputs[r].flatten(1).mean(1) for r in roles], 1)
        return Prediction(name, {"grade": TASKS["grade"]}, {"grade": torch.softmax(model(x), 1)})

    return ModelFamily(name=name, paper="stand-in", input_roles=roles, tasks={"grade": TASKS["grade"]},
                       default_hparams=dict, build=build,
                       default_spec=lambda: volume_spec(list(roles), [8, 8, 8]), predict=predict)


FAMS = {name: stand_in(name, roles) for name, roles in STAND_IN_ROLES.items()}


def write(directory: Path, family: str, file: str | None = None, created: str | None = None) -> Path:
    path = directory / (file or f"{family}.pt")
    fam = FAMS[family]
    save_checkpoint(path, fam.build({}), family, {}, fam.default_spec(), training_data={"n": 1},
                    metrics={"auc": 0.5}, families=FAMS)
    if created is not None:  # set the creation time, keeping the file valid
        payload = torch.load(path, weights_only=True)
        payload["created"] = created
        meta = {k: v for k, v in payload.items() if k not in ("state_dict", "sha256")}
        payload["sha256"] = content_hash(payload["state_dict"], meta)
        torch.save(payload, path)
    return path


@pytest.fixture()
def full_dir(tmp_path: Path) -> Path:
    for name in FAMILY_NAMES:
        write(tmp_path, name)
    return tmp_path


def expected(have: set[str]) -> set[str]:
    """DESIGN.md's rule, stated literally."""
    if "T1CE" not in have:
        return {"promptnet"} if set(NON_ENHANCED_ROLES) <= have else set()
    out = set()
    if set(ROLES) <= have:
        out |= {"fs3dcnn", "crossmodal"}
    if {"T1CE", "T2", "FLAIR"} <= have:
        out.add("mmdlm")
    return out


ALL_COMBINATIONS = [set(c) for n in range(len(ROLES) + 1) for c in itertools.combinations(ROLES, n)]


@pytest.mark.parametrize("have", ALL_COMBINATIONS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_every_role_combination_selects_by_the_rule(full_dir: Path, have: set[str]) -> None:
    registry = CheckpointRegistry(full_dir, families=FAMS)
    assert not registry.invalid and len(registry.checkpoints) == 4
    chosen = registry.select(have)
    assert {s.family.name for s in chosen} == expected(have)
    decisions = registry.explain(have)
    assert [d.family for d in decisions] == list(FAMILY_NAMES)  # every family, run or not
    for d in decisions:
        assert d.runs == (d.family in expected(have))
        assert d.reason.startswith(d.family) and d.reason.endswith(".")
        missing = [r for r in STAND_IN_ROLES[d.family] if r not in have]
        if missing:
            assert all(r in d.reason for r in missing) and "missing" in d.reason
    for s in chosen:
        assert s.checkpoint.path == full_dir / f"{s.family.name}.pt"
        assert s.family is FAMS[s.family.name]


def test_named_combinations_and_their_reasons(full_dir: Path) -> None:
    registry = CheckpointRegistry(full_dir, families=FAMS)
    assert [s.family.name for s in registry.select(ROLES)] == ["fs3dcnn", "crossmodal", "mmdlm"]
    assert [s.family.name for s in registry.select(["T1", "T2", "FLAIR", "OTHER"])] == ["promptnet"]
    assert [s.family.name for s in registry.select(["T1CE", "T2", "FLAIR"])] == ["mmdlm"]
    assert registry.select(["T1", "T2"]) == []
    why = {d.family: d.reason for d in registry.explain(ROLES)}
    assert "contrast-free path and T1CE is present" in why["promptnet"]
    assert "all present" in why["fs3dcnn"]
    few = {d.family: d.reason for d in registry.explain(["T2", "T1"])}
    assert "T1CE, FLAIR are missing" in few["fs3dcnn"]
    assert "FLAIR is missing (available: T1+T2)" in few["promptnet"]
    no_contrast = {d.family: d.reason for d in registry.explain(NON_ENHANCED_ROLES)}
    assert "no T1CE, the contrast-free path" in no_contrast["promptnet"]


def test_promptnet_steps_in_when_no_contrast_model_has_a_checkpoint(tmp_path: Path) -> None:
    write(tmp_path, "promptnet")
    registry = CheckpointRegistry(tmp_path, families=FAMS)
    chosen = registry.select(ROLES)
    assert [s.family.name for s in chosen] == ["promptnet"]
    assert "T1CE is present but no contrast-using model has a valid checkpoint" in chosen[0].reason
    why = {d.family: d.reason for d in registry.explain(ROLES)}
    assert "no valid fs3dcnn checkpoint is registered" in why["fs3dcnn"]


def test_newest_checkpoint_wins_unless_pinned(tmp_path: Path) -> None:
    old = write(tmp_path, "mmdlm", "mmdlm-old.pt", created="2024-01-01T00:00:00+00:00")
    new = write(tmp_path, "mmdlm", "mmdlm-new.pt", created="2025-06-01T00:00:00+00:00")
    mid = write(tmp_path, "mmdlm", "mmdlm-mid.pt", created="2024-12-01T00:00:00+00:00")
    roles = ["T1CE", "T2", "FLAIR"]
    (chosen,) = CheckpointRegistry(tmp_path, families=FAMS).select(roles)
    assert chosen.checkpoint.path == new and "newest of 3 valid checkpoint(s)" in chosen.reason
    (pinned,) = CheckpointRegistry(tmp_path, pins={"mmdlm": "mmdlm-old.pt"}, families=FAMS).select(roles)
    assert pinned.checkpoint.path == old and "pinned" in pinned.reason
    sha = CheckpointRegistry([mid], families=FAMS).checkpoints[0].sha256
    (by_hash,) = CheckpointRegistry(tmp_path, pins={"mmdlm": sha[:12]}, families=FAMS).select(roles)
    assert by_hash.checkpoint.path == mid
    absent = CheckpointRegistry(tmp_path, pins={"mmdlm": "gone.pt"}, families=FAMS)
    assert absent.select(roles) == []
    assert "pinned checkpoint 'gone.pt' is not among the valid checkpoints" in absent.explain(roles)[3].reason


def test_invalid_checkpoints_are_reported_not_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path, "fs3dcnn")
    bad = write(tmp_path, "crossmodal")
    payload = torch.load(bad, weights_only=True)
    payload["metrics"]["auc"] = 0.99  # edited after writing
    torch.save(payload, bad)
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 10)
    (tmp_path / "notes.txt").write_text("not a checkpoint suffix: ignored")
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        registry = CheckpointRegistry(tmp_path, families=FAMS)
    assert [c.family for c in registry.checkpoints] == ["fs3dcnn"]
    refused = {i.path.name: i for i in registry.invalid}
    assert set(refused) == {"crossmodal.pt", "junk.ckpt"}
    assert "content hash mismatch" in refused["crossmodal.pt"].error
    assert refused["crossmodal.pt"].family == "crossmodal"
    assert "not a readable checkpoint" in refused["junk.ckpt"].error
    assert "crossmodal.pt" in caplog.text and "junk.ckpt" in caplog.text
    why = {d.family: d.reason for d in registry.explain(ROLES)}
    assert "no valid crossmodal checkpoint is registered (1 invalid file(s) refused: crossmodal.pt)" in why["crossmodal"]
    assert [s.family.name for s in registry.select(ROLES)] == ["fs3dcnn"]


def test_a_listed_checkpoint_that_changed_is_refused_on_load(full_dir: Path) -> None:
    registry = CheckpointRegistry(full_dir, families=FAMS)
    (sel,) = registry.select(NON_ENHANCED_ROLES)
    loaded = sel.checkpoint.load(families=FAMS)
    assert loaded.sha256 == sel.checkpoint.sha256 and loaded.family.name == "promptnet"
    write(full_dir, "promptnet")  # replaced by a new, valid checkpoint after listing
    with pytest.raises(CheckpointError, match="changed since it was listed"):
        sel.checkpoint.load(families=FAMS)
    registry.refresh()
    assert registry.select(NON_ENHANCED_ROLES)[0].checkpoint.load(families=FAMS)


def test_real_families_built_small(tmp_path: Path) -> None:
    from test_models_checkpoint import SMALL  # tests/ is on sys.path (pytest rootdir conftest)

    for name in FAMILY_NAMES:
        family = get_family(name)
        save_checkpoint(tmp_path / f"{name}.pt", family.build(SMALL[name]), name, SMALL[name],
                        family.spec_for(SMALL[name]), training_data={"n": 1}, metrics={})
    registry = CheckpointRegistry(tmp_path)
    assert not registry.invalid
    for have in ALL_COMBINATIONS:
        assert {s.family.name for s in registry.select(have)} == expected(have), have
