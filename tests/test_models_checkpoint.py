"""The checkpoint contract: bit-exact round trip, and refusal (with a clear message) of every
tampered, mismatched or incomplete file. Uses tiny in-test families, plus each real family built
small when its code is importable."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models.base import ROLES, TASKS, ModelFamily, Prediction
from models.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    content_hash,
    load_checkpoint,
    save_checkpoint,
)
from models.families import FAMILY_NAMES, available_family_names, get_family
from models.preprocess import volume_spec


class Tiny(nn.Module):
    """A small net with a parameter, a float buffer and an integer buffer (BatchNorm)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, width, 3, padding=1)
        self.norm = nn.BatchNorm3d(width)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3, 4)))


def tiny_family(name: str, roles: tuple[str, ...]) -> ModelFamily:
    def defaults() -> dict[str, Any]:
        return {"width": 4, "dropout": 0.0}

    def build(hp: Mapping[str, Any]) -> nn.Module:
        unknown = set(hp) - set(defaults())
        if unknown:
            raise ValueError(f"unknown hparams {sorted(unknown)}")
        return Tiny(len(roles), int({**defaults(), **hp}["width"]))

    def predict(model: nn.Module, inputs: Mapping[str, torch.Tensor], *, device: str = "cpu",
                autocast_dtype: torch.dtype | None = None) -> Prediction:
        x = torch.stack([inputs[r] for r in roles], 1).to(device)
        with torch.no_grad():
            p = torch.softmax(model.eval().to(device)(x).float(), 1).cpu()
        return Prediction(name, {"grade": TASKS["grade"]}, {"grade": p})

    return ModelFamily(name=name, paper="test", input_roles=roles, tasks={"grade": TASKS["grade"]},
                       default_hparams=defaults, build=build,
                       default_spec=lambda: volume_spec(list(roles), [8, 8, 8]), predict=predict)


TINY = tiny_family("tiny", ("T1", "T2"))
TINY4 = tiny_family("tiny4", ROLES)
FAMS = {"tiny": TINY, "tiny4": TINY4}
TRAINING = {"dataset": "synthetic", "cases": 12, "split": {"train": 8, "val": 4}}
METRICS = {"val_auc": 0.75, "val_accuracy": 0.5}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def trained_tiny() -> nn.Module:
    model = TINY.build({"width": 4})
    with torch.no_grad():
        model(torch.randn(2, 2, 4, 4, 4))  # train mode: moves the BatchNorm running stats
    return model


def write(tmp_path: Path, name: str = "tiny.pt", **kw: Any) -> tuple[Path, nn.Module, str]:
    model = trained_tiny()
    path = tmp_path / name
    args: dict[str, Any] = {"training_data": TRAINING, "metrics": METRICS, "temperature": 1.5,
                            "extra": {"note": "x"}, "families": FAMS}
    args.update(kw)
    digest = save_checkpoint(path, model, "tiny", {"width": 4}, TINY.default_spec(), **args)
    return path, model, digest


def rewrite(path: Path, change: Any, *, rehash: bool) -> None:
    """Edit the stored payload; with ``rehash`` recompute the hash (a consistent but wrong file)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    if rehash:
        meta = {k: v for k, v in payload.items() if k not in ("state_dict", "sha256")}
        payload["sha256"] = content_hash(payload["state_dict"], meta)
    torch.save(payload, path)


def refused(path: Path, message: str) -> str:
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, families=FAMS)
    return str(info.value)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path, model, digest = write(tmp_path)
    loaded = load_checkpoint(path, families=FAMS)
    assert loaded.sha256 == digest and len(digest) == 64
    saved, got = model.state_dict(), loaded.model.state_dict()
    assert list(saved) == list(got)
    for key in saved:
        assert saved[key].dtype == got[key].dtype, key
        assert torch.equal(saved[key], got[key]), key
    assert got["norm.num_batches_tracked"].item() == 1
    assert loaded.model.training is False
    assert loaded.family is TINY
    assert loaded.hparams == {"width": 4, "dropout": 0.0}  # defaults made explicit
    assert loaded.spec == TINY.default_spec()
    assert loaded.labels == {"grade": ("LGG", "HGG")}
    assert loaded.input_roles == ("T1", "T2")
    assert loaded.training_data == TRAINING and loaded.metrics == METRICS
    assert loaded.temperature == 1.5 and loaded.extra == {"note": "x"}
    assert {"torch", "numpy", "python", "package"} <= set(loaded.versions)
    assert loaded.created.endswith("+00:00")
    # the same content hashes the same, whoever recomputes it
    again = load_checkpoint(path, families=FAMS)
    assert again.sha256 == digest
    x = torch.randn(1, 2, 4, 4, 4)
    assert torch.equal(model.eval()(x), loaded.model(x))


def test_tuples_in_metadata_are_stored_as_lists_and_hash_stays_stable(tmp_path: Path) -> None:
    path, _, digest = write(tmp_path, training_data={"sizes": (1, 2)}, temperature=None)
    loaded = load_checkpoint(path, families=FAMS)
    assert loaded.training_data == {"sizes": [1, 2]} and loaded.temperature is None
    assert loaded.sha256 == digest


# ----------------------------------------------------------------------------- tampering


def test_a_flipped_weight_byte_is_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)

    def flip(p: dict[str, Any]) -> None:
        w = p["state_dict"]["conv.weight"]
        w.view(torch.uint8).reshape(-1)[5] ^= 0x01

    rewrite(path, flip, rehash=False)
    msg = refused(path, "content hash mismatch")
    assert "changed after it was written" in msg


def test_a_flipped_byte_in_the_file_is_refused(tmp_path: Path) -> None:
    path, model, _ = write(tmp_path)
    raw = bytearray(path.read_bytes())
    needle = model.state_dict()["fc.weight"].numpy().tobytes()
    at = raw.find(needle)
    assert at > 0  # torch.save stores tensor bytes uncompressed
    raw[at + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="content hash mismatch|not a readable checkpoint"):
        load_checkpoint(path, families=FAMS)


def test_a_changed_label_is_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)

    def swap(p: dict[str, Any]) -> None:
        p["tasks"]["grade"] = ["HGG", "LGG"]

    rewrite(path, swap, rehash=False)
    refused(path, "content hash mismatch")
    rewrite(path, swap, rehash=True)
    msg = refused(path, "tasks/label coding")
    assert "'HGG', 'LGG'" in msg and "tiny" in msg


def test_a_changed_spec_is_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)

    def resize(p: dict[str, Any]) -> None:
        p["spec"]["transforms"][3]["shape"] = [16, 16, 16]

    rewrite(path, resize, rehash=False)
    refused(path, "content hash mismatch")

    path, _, _ = write(tmp_path, "b.pt")
    rewrite(path, lambda p: p["spec"]["transforms"].append({"name": "blur"}), rehash=True)
    refused(path, "preprocessing spec does not validate.*unknown transform 'blur'")

    path, _, _ = write(tmp_path, "c.pt")
    rewrite(path, lambda p: p["spec"].update(roles=["T1", "FLAIR"]), rehash=True)
    refused(path, r"spec roles \['T1', 'FLAIR'\] differ from the tiny family's input roles")


def test_a_swapped_architecture_name_is_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)
    rewrite(path, lambda p: p.update(family="tiny4"), rehash=False)
    refused(path, "content hash mismatch")

    path, _, _ = write(tmp_path, "b.pt")
    rewrite(path, lambda p: p.update(family="tiny4"), rehash=True)
    refused(path, r"input roles \['T1', 'T2'\] differ from the tiny4 family's")

    path, _, _ = write(tmp_path, "c.pt")
    rewrite(path, lambda p: p.update(family="resnet50"), rehash=True)
    refused(path, "unknown model family 'resnet50'")


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)
    rewrite(path, lambda p: p["hparams"].update(width=6), rehash=True)
    refused(path, r"weights: conv.weight has shape \(4, 2, 3, 3, 3\).*expects \(6, 2, 3, 3, 3\)")

    path, _, _ = write(tmp_path, "b.pt")
    rewrite(path, lambda p: p["state_dict"].pop("fc.bias"), rehash=True)
    refused(path, r"1 missing \(e.g. \['fc.bias'\]\)")

    path, _, _ = write(tmp_path, "c.pt")
    rewrite(path, lambda p: p["state_dict"].update(extra=torch.zeros(1)), rehash=True)
    refused(path, r"1 unexpected \(e.g. \['extra'\]\)")

    path, _, _ = write(tmp_path, "d.pt")
    rewrite(path, lambda p: p["state_dict"].update({"fc.bias": p["state_dict"]["fc.bias"].double()}), rehash=True)
    refused(path, "fc.bias has dtype torch.float64")

    path, _, _ = write(tmp_path, "e.pt")
    rewrite(path, lambda p: p["hparams"].update(depth=3), rehash=True)
    refused(path, "hparams do not build a tiny network")


def test_missing_fields_newer_formats_and_bad_values_are_refused(tmp_path: Path) -> None:
    path, _, _ = write(tmp_path)
    rewrite(path, lambda p: p.pop("metrics"), rehash=False)
    refused(path, r"missing field\(s\) \['metrics'\]")

    path, _, _ = write(tmp_path, "b.pt")
    rewrite(path, lambda p: p.update(format_version=FORMAT_VERSION + 1), rehash=True)
    refused(path, "newer than this code reads")

    path, _, _ = write(tmp_path, "c.pt")
    rewrite(path, lambda p: p.update(temperature=-1.0), rehash=True)
    refused(path, "temperature must be a positive")

    path, _, _ = write(tmp_path, "d.pt")
    rewrite(path, lambda p: p.update(comment="hi"), rehash=False)
    refused(path, r"unknown field\(s\) \['comment'\]")


def test_files_that_are_not_checkpoints_are_refused(tmp_path: Path) -> None:
    refused(tmp_path / "absent.pt", "no such checkpoint file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip at all")
    refused(junk, "not a readable checkpoint")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    refused(listing, "top level is list")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    refused(other, "not a glioma-models-checkpoint file")
    code = tmp_path / "code.pt"
    torch.save({"format": "glioma-models-checkpoint", "obj": Tiny(1, 1)}, code)  # a pickled module
    refused(code, "not a readable checkpoint")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Path("/"), protocol=2))
    refused(evil, "not a readable checkpoint")


# ----------------------------------------------------------------------------- refusing to write


def test_save_refuses_what_load_would_refuse(tmp_path: Path) -> None:
    model = trained_tiny()
    base: dict[str, Any] = {"training_data": TRAINING, "metrics": METRICS, "families": FAMS}
    spec = TINY.default_spec()
    with pytest.raises(CheckpointError, match="unknown model family 'nope'"):
        save_checkpoint(tmp_path / "a.pt", model, "nope", {}, spec, **base)
    with pytest.raises(CheckpointError, match="spec roles"):
        save_checkpoint(tmp_path / "a.pt", model, "tiny", {}, volume_spec(["T1"], [8, 8, 8]), **base)
    with pytest.raises(CheckpointError, match="spec does not validate"):
        save_checkpoint(tmp_path / "a.pt", model, "tiny", {}, {**spec, "version": 9}, **base)
    with pytest.raises(CheckpointError, match="training_data must be plain JSON-able"):
        save_checkpoint(tmp_path / "a.pt", model, "tiny", {}, spec, training_data={"x": object()},
                        metrics=METRICS, families=FAMS)
    with pytest.raises(CheckpointError, match="temperature"):
        save_checkpoint(tmp_path / "a.pt", model, "tiny", {}, spec, temperature=0.0, **base)
    with pytest.raises(CheckpointError, match="has shape"):
        save_checkpoint(tmp_path / "a.pt", model, "tiny", {"width": 8}, spec, **base)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- the real families, small

SMALL: dict[str, dict[str, Any]] = {
    "fs3dcnn": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [8, 8, 16],
                "blocks_per_stage": [1, 1, 1], "groups": 4, "fc_hidden": [16, 8]},
    "promptnet": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [8, 8, 16],
                  "blocks_per_stage": [1, 1, 1], "groups": 4, "fc_hidden": [16, 8]},
    "crossmodal": {"input_size": [8, 16, 16], "widths": [8, 8, 16, 16], "blocks": [1, 1, 1, 1],
                   "guide_channels": 4, "attention_reduction": 4, "hidden": 16},
    "mmdlm": {"resnet_layers": [1, 1, 1, 1], "resnet_widths": [4, 8, 8, 16], "mil_hidden_dim": 8,
              "mil_attention_dim": 8, "projection_dim": 4, "fusion_dim": 4, "slice_size": [32, 32],
              "slice_count": 6},
}


def test_family_names() -> None:
    assert FAMILY_NAMES == ("fs3dcnn", "promptnet", "crossmodal", "mmdlm")
    with pytest.raises(ValueError, match="unknown model family 'vgg'.*fs3dcnn"):
        get_family("vgg")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_round_trip_of_each_real_family_built_small(tmp_path: Path, name: str) -> None:
    family = get_family(name)
    model = family.build(SMALL[name])
    path = tmp_path / f"{name}.pt"
    digest = save_checkpoint(path, model, name, SMALL[name], family.spec_for(SMALL[name]),
                             training_data=TRAINING, metrics=METRICS)
    loaded = load_checkpoint(path)
    assert loaded.sha256 == digest and loaded.family.name == name
    assert loaded.input_roles == tuple(family.input_roles)
    assert loaded.labels == {t: tuple(v) for t, v in family.tasks.items()}
    assert loaded.hparams == {**family.default_hparams(), **SMALL[name]}
    want, got = model.state_dict(), loaded.model.state_dict()
    assert list(want) == list(got)
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    # a checkpoint's family name swapped for another family (hash recomputed) never loads
    other = next(n for n in FAMILY_NAMES if n != name and n in available_family_names())
    rewrite(path, lambda p: p.update(family=other), rehash=True)
    with pytest.raises(CheckpointError, match="differ|do not match|do not build"):
        load_checkpoint(path)


def small_spec(name: str) -> dict[str, Any]:
    """Each family's own spec for its SMALL network (the families name their spec builders differently)."""
    import importlib

    module = importlib.import_module(f"models.{name}.family")
    if name in ("fs3dcnn", "promptnet"):
        return module.make_spec(SMALL[name]["input_shape"])
    if name == "crossmodal":
        return module.make_spec(SMALL[name]["input_size"])
    return module.spec_for(SMALL[name])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_serving_path_spec_to_predict(tmp_path: Path, name: str) -> None:
    """NIfTI-like volumes -> apply_spec (the family's spec) -> to_batch -> predict, through a checkpoint:
    the arrays a spec produces are the shapes its network accepts."""
    import numpy as np

    from models.preprocess import apply_spec, to_batch

    family = get_family(name)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, family.build(SMALL[name]), name, SMALL[name], small_spec(name),
                    training_data=TRAINING, metrics=METRICS)
    ckpt = load_checkpoint(path)
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS-stored, as converters write
    cases = []
    for seed in range(2):
        vols = {}
        for role in ckpt.input_roles:
            a = np.zeros((40, 44, 36), np.float32)
            a[6:34, 5:39, 4:30] = rng.uniform(10, 100, (28, 34, 26)) * (1 + seed)
            vols[role] = (a, affine)
        cases.append(apply_spec(ckpt.spec, vols))
    pred = ckpt.family.predict(ckpt.model, to_batch(cases, ckpt.input_roles), device="cpu")
    for task, labels in ckpt.labels.items():
        p = pred.probabilities[task]
        assert p.shape == (2, len(labels)) and p.dtype == torch.float32
        assert torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_spec_that_does_not_fit_the_network_is_refused(tmp_path: Path, name: str) -> None:
    """A small network saved with the full-size spec: refused at save, and at load if written anyway."""
    family = get_family(name)
    model = family.build(SMALL[name])
    with pytest.raises(CheckpointError, match="spec produces arrays of shape"):
        save_checkpoint(tmp_path / "x.pt", model, name, SMALL[name], family.default_spec(),
                        training_data=TRAINING, metrics=METRICS)
    assert not (tmp_path / "x.pt").exists()
