"""The gate (models.gate): training ranges, widening, directions, the feature distance and its
threshold, the families' ``features``, and the statistics an exported checkpoint carries."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.families import FAMILY_NAMES, get_family
from models.gate import (
    FeatureStats,
    GateSettings,
    allowed_interval,
    case_measurements,
    check_features,
    check_measurements,
    feature_distance,
    ranges_from,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- ranges and measurements


def test_ranges_from_takes_min_max_per_name_over_cases_that_have_it() -> None:
    ranges = ranges_from([
        {"brain_volume_ml": 1400.0, "slice_thickness_mm/T2": 1.0},
        {"brain_volume_ml": 1200.0, "slice_thickness_mm/T2": 3.0, "atlas_mi": 0.5},
        {"brain_volume_ml": math.nan, "atlas_mi": float("inf")},
        {"brain_volume_ml": 1600.0},
    ])
    assert ranges == {"atlas_mi": [0.5, 0.5], "brain_volume_ml": [1200.0, 1600.0],
                      "slice_thickness_mm/T2": [1.0, 3.0]}
    assert list(ranges) == sorted(ranges)
    assert ranges_from([]) == {}


def test_allowed_interval_widens_by_margin_times_width_with_a_ten_percent_floor() -> None:
    assert allowed_interval(2.0, 4.0, 0.25, "both") == pytest.approx((1.5, 4.5))
    # constant training range: the width is 10 % of the magnitude
    assert allowed_interval(1.0, 1.0, 0.25, "both") == pytest.approx((0.975, 1.025))
    assert allowed_interval(-10.0, -10.0, 0.5, "both") == pytest.approx((-10.5, -9.5))
    lo, hi = allowed_interval(1.0, 1.0, 0.25, "upper")
    assert lo == -math.inf and hi == pytest.approx(1.025)
    lo, hi = allowed_interval(0.8, 0.9, 0.25, "lower")
    assert lo == pytest.approx(0.8 - 0.25 * 0.1) and hi == math.inf  # 10 % of 0.9 > 0.9 - 0.8
    with pytest.raises(ValueError):
        allowed_interval(0.0, 1.0, 0.25, "sideways")


GATE = {"ranges": {
    "slice_thickness_mm/T2": [1.0, 1.0],  # upper
    "template_coverage/T1": [0.9, 1.0],  # lower
    "brain_volume_ml": [1100.0, 1700.0],  # both
}, "n_cases": 10}
GOOD = {"slice_thickness_mm/T2": 1.0, "template_coverage/T1": 0.95, "brain_volume_ml": 1400.0}


def test_case_inside_the_ranges_passes_and_unknown_measurements_are_ignored() -> None:
    assert check_measurements(GATE, {**GOOD, "intensity_cv/T2": 99.0}) == []


def test_upper_direction_declines_only_above() -> None:
    (f,) = check_measurements(GATE, {**GOOD, "slice_thickness_mm/T2": 5.5})
    assert f.name == "slice_thickness_mm/T2" and f.value == 5.5 and f.unit == "mm"
    assert (f.low, f.high) == (1.0, 1.0)
    assert f.reason == "slice thickness (T2) 5.5 mm; this model was trained on 1.0–1.0 mm"
    assert check_measurements(GATE, {**GOOD, "slice_thickness_mm/T2": 0.5}) == []  # thinner is fine
    assert check_measurements(GATE, {**GOOD, "slice_thickness_mm/T2": 1.02}) == []  # inside the margin
    (f,) = check_measurements(GATE, {**GOOD, "slice_thickness_mm/T2": 1.04})
    assert f.reason == "slice thickness (T2) 1.04 mm; this model was trained on 1.00–1.00 mm"  # not "1.0 ... 1.0–1.0"


def test_lower_direction_declines_only_below() -> None:
    (f,) = check_measurements(GATE, {**GOOD, "template_coverage/T1": 0.6})
    assert f.name == "template_coverage/T1" and f.reason.startswith("coverage of the template brain (T1) 0.60;")
    assert "0.90–1.00" in f.reason and "mm" not in f.reason  # dimensionless: no unit printed
    assert check_measurements(GATE, {**GOOD, "template_coverage/T1": 1.5}) == []


def test_both_directions_and_margin_setting() -> None:
    assert [f.name for f in check_measurements(GATE, {**GOOD, "brain_volume_ml": 500.0})] == ["brain_volume_ml"]
    (f,) = check_measurements(GATE, {**GOOD, "brain_volume_ml": 2000.0})
    assert f.reason == "brain volume 2,000 ml; this model was trained on 1,100–1,700 ml"
    # 1900 ml: outside 1100-1700 widened by 0.25 * 600 = 150, inside with margin 0.5 (300)
    assert check_measurements(GATE, {**GOOD, "brain_volume_ml": 1900.0})
    assert check_measurements(GATE, {**GOOD, "brain_volume_ml": 1900.0}, GateSettings(margin=0.5)) == []


def test_checkpoint_without_ranges_and_missing_measurements() -> None:
    for gate in (None, {}, {"ranges": {}}):
        (f,) = check_measurements(gate, GOOD)
        assert f.reason == "this checkpoint records no training-data ranges" and f.value is None
        assert check_measurements(gate, GOOD, GateSettings(unchecked="allow")) == []
    missing = {k: v for k, v in GOOD.items() if k != "brain_volume_ml"}
    (f,) = check_measurements(GATE, missing)
    assert f.name == "brain_volume_ml" and f.value is None and "could not be measured" in f.reason
    (f,) = check_measurements(GATE, {**GOOD, "brain_volume_ml": math.nan})
    assert f.value is None
    assert check_measurements(GATE, missing, GateSettings(unchecked="allow")) == []


def test_settings_validate_and_say_when_loosened() -> None:
    assert not GateSettings().loosened and GateSettings().describe() == ""
    assert not GateSettings(margin=0.1).loosened  # stricter is not loosened
    loose = GateSettings(margin=0.5, feature_factor=2.0, unchecked="allow")
    assert loose.loosened
    text = loose.describe()
    assert text.startswith("The input gate was loosened") and text.endswith(".") and "50%" in text and "2" in text
    for bad in ({"margin": -0.1}, {"feature_factor": 0.0}, {"unchecked": "maybe"}, {"margin": math.nan}):
        with pytest.raises(ValueError):
            GateSettings(**bad)


def test_case_measurements_add_source_geometry_where_the_meta_lacks_it() -> None:
    rot = np.eye(4)
    c, s = math.cos(0.3), math.sin(0.3)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    original = {"T2": {"affine": (rot @ np.diag([0.9, 0.9, 5.5, 1.0])).tolist(), "shape": [256, 256, 30]}}
    m = case_measurements({"original": original})  # e.g. a case file written before measurements existed
    assert m["slice_thickness_mm/T2"] == pytest.approx(5.5)
    assert m["inplane_spacing_mm/T2"] == pytest.approx(0.9)
    assert m["slices/T2"] == 30
    recorded = case_measurements({"original": original,
                                  "measurements": {"slice_thickness_mm/T2": 5.0, "brain_volume_ml": 1500.0}})
    assert recorded["slice_thickness_mm/T2"] == 5.0 and recorded["brain_volume_ml"] == 1500.0  # recorded wins
    assert recorded["slices/T2"] == 30
    assert case_measurements({}) == {}


# --------------------------------------------------------------------------- feature statistics


def _gaussian(n: int, rng: np.random.Generator, dim: int = 24) -> np.ndarray:
    scales = np.linspace(3.0, 0.2, dim)
    return rng.normal(size=(n, dim)) * scales + 5.0


def test_feature_distance_separates_shifted_cases_with_threshold_from_validation() -> None:
    rng = np.random.default_rng(0)
    train, val, test = _gaussian(300, rng), _gaussian(200, rng), _gaussian(300, rng)
    stats = FeatureStats.fit(train, val, percentile=99.0, components=8)
    assert stats.components.shape == (8, 24) and stats.variances.shape == (8,)
    assert np.allclose(stats.components @ stats.components.T, np.eye(8), atol=1e-8)
    assert stats.chosen_on == "validation" and (stats.n_fit, stats.n_val) == (300, 200)
    assert stats.threshold == pytest.approx(np.percentile(stats.distance(val), 99.0))
    # squared distances of in-distribution cases average about the dimension
    assert np.mean(stats.distance(test) ** 2) == pytest.approx(24, rel=0.25)
    assert np.mean(stats.distance(test) > stats.threshold) < 0.05
    along_first = test + 8.0 * math.sqrt(stats.variances[0]) * stats.components[0]  # 8 SD on the top component
    assert np.mean(stats.distance(along_first) > stats.threshold) > 0.95
    everywhere = test + 2.0 * np.linspace(3.0, 0.2, 24)  # every feature moved by two of its SDs
    assert np.mean(stats.distance(everywhere) > stats.threshold) > 0.95
    scaled = 5.0 + (test - 5.0) * 3.0  # same mean, three times the spread
    assert np.mean(stats.distance(scaled) > stats.threshold) > 0.9


def test_threshold_comes_from_validation_not_training() -> None:
    rng = np.random.default_rng(1)
    train = _gaussian(40, rng)
    close_val = train[:10] + 1e-3
    far_val = _gaussian(50, rng) * 1.5
    a = FeatureStats.fit(train, close_val)
    b = FeatureStats.fit(train, far_val)
    assert np.allclose(a.mean, b.mean) and np.allclose(a.variances, b.variances)
    assert b.threshold > a.threshold
    assert a.threshold == pytest.approx(np.percentile(a.distance(close_val), 99.0))


def test_feature_stats_degenerate_inputs() -> None:
    rng = np.random.default_rng(2)
    constant = np.ones((5, 6))
    stats = FeatureStats.fit(constant, constant[:2])
    assert np.all(stats.variances > 0) and stats.residual_var > 0 and math.isfinite(stats.threshold)
    moved = constant[:1].copy()
    moved[0, 0] += 1.0
    assert stats.distance(moved)[0] > stats.threshold
    with pytest.raises(ValueError):
        FeatureStats.fit(rng.normal(size=(1, 6)), rng.normal(size=(3, 6)))
    with pytest.raises(ValueError):
        FeatureStats.fit(rng.normal(size=(5, 6)), rng.normal(size=(0, 6)))
    with pytest.raises(ValueError):
        FeatureStats.fit(rng.normal(size=(5, 6)), rng.normal(size=(3, 7)))
    with pytest.raises(ValueError):
        stats.distance(rng.normal(size=(2, 7)))
    with pytest.raises(ValueError):
        FeatureStats.from_dict({**stats.to_dict(), "mean": [0.0]})


def test_check_features_reason_and_settings() -> None:
    rng = np.random.default_rng(3)
    stats = FeatureStats.fit(_gaussian(50, rng), _gaussian(30, rng))
    gate = {"ranges": {}, "features": stats.to_dict()}
    t = stats.threshold
    assert check_features(gate, t * 0.9) is None
    f = check_features(gate, 41.23 if t < 41 else t * 2)
    assert f is not None and f.name == "feature_distance" and f.high == pytest.approx(t)
    assert f.reason.startswith("image features are unlike the training data (distance ")
    assert f.reason.endswith(f"threshold {t:.1f}, the 99th percentile on validation cases)")
    assert check_features(gate, t * 1.5, GateSettings(feature_factor=2.0)) is None
    looser = check_features(gate, t * 3, GateSettings(feature_factor=2.0))
    assert looser is not None and "2 × the 99th percentile" in looser.reason
    for g in (None, {"ranges": {"a": [0, 1]}}):
        nf = check_features(g, 1.0)
        assert nf is not None and nf.reason == "this checkpoint records no image-feature statistics"
        assert check_features(g, 1.0, GateSettings(unchecked="allow")) is None
    assert check_features(gate, None) is not None
    assert check_features(gate, None, GateSettings(unchecked="allow")) is None


def _tiny_fs3dcnn() -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    family = get_family("fs3dcnn")
    hp = {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [4, 4, 8], "blocks_per_stage": [1, 1, 1],
          "fc_hidden": [8, 8]}
    assert family.spec_for is not None
    return family.build(hp), hp, family.spec_for(hp)


def test_feature_stats_json_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train, val, probe = _gaussian(60, rng), _gaussian(20, rng), _gaussian(5, rng)
    stats = FeatureStats.fit(train, val, components=4)
    gate = {"ranges": ranges_from([GOOD, {**GOOD, "brain_volume_ml": 1200.0}]), "n_cases": 2,
            "features": stats.to_dict()}
    text = json.dumps(gate, allow_nan=False)  # plain JSON, no NaN/inf
    again = FeatureStats.from_dict(json.loads(text)["features"])
    assert np.array_equal(again.distance(probe), stats.distance(probe))
    model, hp, spec = _tiny_fs3dcnn()
    path = tmp_path / "gate.pt"
    digest = save_checkpoint(path, model, "fs3dcnn", hp, spec, training_data={"n": 2}, metrics={},
                             extra={"gate": gate})
    loaded = load_checkpoint(path)
    assert loaded.sha256 == digest
    assert loaded.extra["gate"] == gate
    assert np.array_equal(FeatureStats.from_dict(loaded.extra["gate"]["features"]).distance(probe),
                          stats.distance(probe))
    assert feature_distance(loaded.extra["gate"], probe[0]) == pytest.approx(float(stats.distance(probe[:1])[0]))
    assert feature_distance({"ranges": {}}, probe[0]) is None


# --------------------------------------------------------------------------- the families' features

_TINY_HP: dict[str, dict[str, Any]] = {
    "fs3dcnn": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [4, 4, 8], "blocks_per_stage": [1, 1, 1],
                "fc_hidden": [8, 8], "dropout": 0.5},
    "promptnet": {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [4, 4, 8], "blocks_per_stage": [1, 1, 1],
                  "fc_hidden": [8, 8], "dropout": 0.5},
    "crossmodal": {"input_size": [8, 16, 16], "widths": [8, 8, 16, 16], "blocks": [1, 1, 1, 1],
                   "guide_channels": 4, "attention_reduction": 4, "hidden": 16, "dropout": 0.5},
    "mmdlm": {"resnet_layers": [1, 1, 1, 1], "resnet_widths": [4, 8, 8, 16], "mil_hidden_dim": 8,
              "mil_attention_dim": 8, "projection_dim": 4, "fusion_dim": 4, "slice_size": [32, 32],
              "slice_count": 6, "dropout": 0.5, "attention_dropout": 0.5},
}
_DIMS = {"fs3dcnn": 8, "promptnet": 16, "crossmodal": 4 * 16, "mmdlm": 4}


def _inputs(name: str, batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    roles = get_family(name).input_roles
    if name == "mmdlm":
        out = {r: torch.randn(batch, 6, 32, 32, generator=g) for r in roles}
        mask = torch.ones(batch, 6, dtype=torch.bool)
        mask[1, 4:] = False
        out["slice_mask"] = mask
        return out
    shape = (8, 16, 16) if name == "crossmodal" else (16, 16, 16)
    return {r: torch.randn(batch, *shape, generator=g) for r in roles}


def _logits_from_features(name: str, model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if name == "mmdlm":
            return torch.stack([model.heads[t](z).squeeze(-1) for t in model.tasks], dim=1)
        return model.classifier(z)


def _logits(name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    fam = get_family(name)
    with torch.no_grad():
        if name == "mmdlm":
            out = model({r: inputs[r] for r in fam.input_roles}, inputs["slice_mask"])
            return torch.stack([out.logits[t] for t in model.tasks], dim=1)
        if name == "crossmodal":
            return model({r: inputs[r] for r in fam.input_roles}).logits
        return model(torch.stack([inputs[r] for r in fam.input_roles], dim=1)).logits


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_features_are_what_the_head_reads(name: str) -> None:
    torch.manual_seed(0)
    fam = get_family(name)
    assert fam.features is not None
    model = fam.build(_TINY_HP[name])
    model.train()  # dropout on: features must still be deterministic (eval inside) and the mode restored
    inputs = _inputs(name)
    z1 = fam.features(model, inputs, "cpu")
    z2 = fam.features(model, inputs)
    assert model.training
    assert z1.shape == (3, _DIMS[name]) and z1.dtype == torch.float32 and z1.device.type == "cpu"
    assert torch.equal(z1, z2) and torch.isfinite(z1).all()
    model.eval()
    assert torch.allclose(_logits_from_features(name, model, z1), _logits(name, model, inputs), atol=1e-5)
    # the logits predict() reports come from the same features
    probs = fam.predict(model, inputs, device="cpu").probabilities["grade"]
    grade = _logits_from_features(name, model, z1)
    expected = (torch.softmax(grade, dim=1) if grade.shape[1] == 2 and name != "mmdlm"
                else torch.stack([1 - torch.sigmoid(grade[:, 0]), torch.sigmoid(grade[:, 0])], dim=1))
    assert torch.allclose(probs, expected, atol=1e-5)


# --------------------------------------------------------------------------- export


def test_export_records_gate_stats_from_the_training_cache(tmp_path: Path) -> None:
    from checkpoints import hparams_for, spec_for

    from training.cohort import generate_cohort
    from training.data import VolumeCache
    from training.datasets import read_dataset
    from training.export import export_model, gate_stats

    generate_cohort(tmp_path / "cohort", n_cases=6, hgg_fraction=0.5, seed=1, shape=(24, 24, 20),
                    spacing=(8.0, 8.0, 8.0), workers=1, overwrite=True)
    cases = read_dataset(tmp_path / "cohort")
    train, val = cases[:4], cases[4:]
    fam = get_family("promptnet")
    hp = hparams_for("promptnet")
    spec = spec_for("promptnet")
    torch.manual_seed(0)
    model = fam.build(hp)
    cache = VolumeCache(spec, tmp_path / "cache")
    gate = gate_stats(model, fam, train, val, cache, batch_size=3)
    assert cache.misses == 6
    assert gate["n_cases"] == 4
    for role in fam.input_roles:  # source geometry of the 8 mm cohort
        assert gate["ranges"][f"slice_thickness_mm/{role}"] == pytest.approx([8.0, 8.0])
        assert f"slices/{role}" in gate["ranges"] and f"inplane_spacing_mm/{role}" in gate["ranges"]
    feats = gate["features"]
    assert feats["dim"] == model.fused_dim and feats["n_fit"] == 4 and feats["n_val"] == 2
    assert feats["chosen_on"] == "validation" and math.isfinite(feats["threshold"])

    # measurements survive the cache file (a second cache object reads them back)
    again = VolumeCache(spec, tmp_path / "cache")
    assert again.get(train[0]).measurements == cache.get(train[0]).measurements != {}
    assert again.hits == 1 and again.misses == 0

    sha = export_model(tmp_path / "ck" / "p.pt", model, "promptnet", hp, spec, train_cases=train, val_cases=val,
                       metrics={}, gate=gate)
    loaded = load_checkpoint(tmp_path / "ck" / "p.pt")
    assert loaded.sha256 == sha and loaded.extra["gate"] == gate
    stats = FeatureStats.from_dict(loaded.extra["gate"]["features"])
    item = cache.get(train[0])
    z = fam.features(model, {r: torch.from_numpy(item.arrays[r])[None] for r in fam.input_roles})
    assert stats.distance(z.numpy())[0] <= stats.threshold  # a training case is not declined


def test_tiny_test_checkpoints_carry_gate_stats(tmp_path_factory: pytest.TempPathFactory) -> None:
    from checkpoints import VAL_CASES, tiny_checkpoints

    folder = tiny_checkpoints(tmp_path_factory)
    for path in sorted(folder.glob("*.pt")):
        ck = load_checkpoint(path)
        gate = ck.extra["gate"]
        assert gate["ranges"] and gate["n_cases"] == len(ck.training_data["train_case_ids"])
        assert gate["features"]["n_val"] == VAL_CASES
        assert set(ck.training_data["val_case_ids"]).isdisjoint(ck.training_data["train_case_ids"])
        assert FeatureStats.from_dict(gate["features"]).dim == gate["features"]["dim"]
