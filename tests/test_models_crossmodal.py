"""The cross-modality guidance / dual attention family (seed 001), on tiny CPU volumes."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.base import ROLES, TASKS, Prediction
from models.preprocess import apply_spec, to_batch, validate_spec
from models.crossmodal import (
    FAMILY,
    CrossModalityNet,
    WeightedCrossEntropyLoss,
    class_weights_from_counts,
    class_weights_from_labels,
    cumulative_schedule,
    make_spec,
    predict,
    set_stage,
)

SIZE = (16, 32, 32)  # (D, H, W)
TINY: dict[str, Any] = {
    "input_size": list(SIZE),
    "widths": [8, 8, 16, 16],
    "blocks": [1, 1, 1, 1],
    "guide_channels": 4,
    "attention_reduction": 4,
    "hidden": 16,
}
SECONDARIES = ("T1", "T2", "FLAIR")


@pytest.fixture(autouse=True)
def _cpu_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def tiny(**overrides: Any) -> CrossModalityNet:
    return FAMILY.build({**TINY, **overrides})


def batch(n: int = 2, roles: tuple[str, ...] = ROLES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {r: torch.randn(n, *SIZE, generator=g) for r in roles}


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def no_grad_at_all(module: torch.nn.Module) -> bool:
    return all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in module.parameters())


# ---- shapes and contract -----------------------------------------------------------------

def test_forward_shapes() -> None:
    model = tiny()
    out = model(batch(2))
    assert out.logits.shape == (2, 2)
    d, h, w = SIZE
    fh, fw = h // 16, w // 16  # stem stride 2, then three stride-2 stages; slices never down-sampled
    for role in ROLES:
        assert out.features[role].shape == (2, 16, d, fh, fw)
        assert out.pooled[role].shape == (2, 16)
        assert out.spatial_attention[role].shape == (2, d, fh * fw, fh * fw)
        assert out.slice_attention[role].shape == (2, d, d)


def test_family_contract_and_spec() -> None:
    assert FAMILY.name == "crossmodal"
    assert FAMILY.input_roles == ("T1", "T1CE", "T2", "FLAIR")
    assert dict(FAMILY.tasks) == {"grade": TASKS["grade"]}
    assert "seed 001" in FAMILY.paper
    spec = FAMILY.default_spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["version"] == 1 and spec["roles"] == list(ROLES) and spec["slices"] is None
    crop = next(t for t in spec["transforms"] if t["name"] == "crop_or_pad")
    d, h, w = FAMILY.default_hparams()["input_size"]
    assert crop["shape"] == [w, h, d]  # spec is (x, y, z); the network's (D, H, W) is (z, y, x)
    assert make_spec(SIZE)["transforms"][3]["shape"] == [32, 32, 16]
    assert spec["transforms"][-1] == {"name": "transpose", "axes": [2, 1, 0]}
    hp = FAMILY.default_hparams()
    assert json.loads(json.dumps(hp)) == hp
    assert tiny().hparams == {**hp, **TINY}


def test_default_size_builds_with_mc3_sized_branches() -> None:
    model = FAMILY.build(FAMILY.default_hparams())
    n = sum(p.numel() for p in model.parameters())
    # four MC3-18-sized encoders (~11.7M each, no fc) + attention + guidance + head
    assert 45e6 < n < 55e6
    assert model.input_size == (64, 128, 128)


def test_bad_configuration_and_inputs_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        FAMILY.build({"widht": [8, 8]})
    with pytest.raises(ValueError, match="secondary_order"):
        tiny(secondary_order=["T2", "T1"])
    model = tiny()
    wrong = {r: torch.randn(1, 16, 32, 24) for r in ROLES}
    with pytest.raises(ValueError, match=r"built for \(16, 32, 32\)"):
        model(wrong)
    with pytest.raises(KeyError, match="'FLAIR' is missing"):
        model(batch(1, roles=("T1", "T1CE", "T2")))


# ---- gradients and stages ----------------------------------------------------------------

def test_gradients_reach_every_branch_and_the_gammas() -> None:
    model = tiny()
    loss_fn = WeightedCrossEntropyLoss()
    target = torch.tensor([0, 1])
    loss_fn(model(batch(2)), target).backward()
    for role in ROLES:
        branch = model.branches[role]
        assert grad_norm(branch.low) > 0, role
        assert grad_norm(branch.high) > 0, role
        # gamma starts at 0, yet its gradient is not zero: the attention can switch itself on
        assert float(branch.attention.gamma_spatial.grad.abs()) > 0, role
        assert float(branch.attention.gamma_slice.grad.abs()) > 0, role
        if role != "T1CE":
            assert branch.guide is not None and grad_norm(branch.guide) > 0, role
    assert grad_norm(model.classifier) > 0
    # after one step the gammas are non-zero and the attention projections learn too
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.step()
    opt.zero_grad()
    loss_fn(model(batch(2)), target).backward()
    for role in ROLES:
        attention = model.branches[role].attention
        for part in (attention.spatial, attention.slice):
            for proj in (part.query, part.key, part.value):
                assert grad_norm(proj) > 0, (role, proj)


def test_primary_stage_trains_only_the_primary_and_head() -> None:
    model = tiny()
    assert set_stage(model, "primary") == ("T1CE",)
    assert model.stage == "primary" and model.active_secondaries == ()
    out = model(batch(2, roles=("T1CE",)))  # the secondaries' inputs are not needed
    assert set(out.features) == {"T1CE"}
    WeightedCrossEntropyLoss()(out, torch.tensor([0, 1])).backward()
    assert grad_norm(model.branches["T1CE"]) > 0
    for role in SECONDARIES:
        branch = model.branches[role]
        assert all(p.grad is None and not p.requires_grad for p in branch.parameters()), role
    # the classifier's slots for the absent modalities get no gradient either
    first = model.classifier[0].weight.grad
    c = model.feature_channels
    for role in SECONDARIES:
        slot = ROLES.index(role)
        assert float(first[:, slot * c : (slot + 1) * c].abs().sum()) == 0.0


def test_stage_switch_keeps_primary_weights_and_adds_secondaries_in_order() -> None:
    model = tiny()
    set_stage(model, "primary")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        WeightedCrossEntropyLoss()(model(batch(2, roles=("T1CE",))), torch.tensor([0, 1])).backward()
        opt.step()
    before = {k: v.clone() for k, v in model.branches["T1CE"].state_dict().items()}
    model.eval()
    with torch.no_grad():
        primary_before = model(batch(1, roles=("T1CE",))).features["T1CE"]

    assert set_stage(model, "all", ["FLAIR"]) == ("T1CE", "FLAIR")
    after = model.branches["T1CE"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        out = model(batch(1, roles=("T1CE", "FLAIR")))  # T1 and T2 are not needed yet
    assert torch.equal(out.features["T1CE"], primary_before)
    assert set(out.features) == {"T1CE", "FLAIR"}
    assert not any(p.requires_grad for p in model.branches["T2"].parameters())
    assert all(p.requires_grad for p in model.branches["FLAIR"].parameters())

    set_stage(model, "all", ["FLAIR", "T2"])
    assert model.active_roles == ("T1CE", "FLAIR", "T2")
    assert cumulative_schedule(model) == [
        ("primary", ()),
        ("all", ("FLAIR",)),
        ("all", ("FLAIR", "T2")),
        ("all", ("FLAIR", "T2", "T1")),
    ]
    # the stage is part of the state dict: a rebuilt model runs the same modalities
    clone = tiny()
    clone.load_state_dict(model.state_dict())
    assert clone.active_roles == ("T1CE", "FLAIR", "T2")
    with pytest.raises(ValueError, match="duplicates"):
        set_stage(model, "all", ["T2", "T2"])
    with pytest.raises(ValueError, match="not secondary roles"):
        set_stage(model, "all", ["T1CE"])


def test_freeze_primary_and_detached_guidance() -> None:
    model = tiny()
    set_stage(model, "all", freeze_primary=True)
    WeightedCrossEntropyLoss()(model(batch(2)), torch.tensor([1, 0])).backward()
    assert all(p.grad is None for p in model.branches["T1CE"].parameters())
    assert grad_norm(model.branches["T2"]) > 0

    # by default the guidance passes gradients back into the primary ...
    for detach, expect_grad in ((False, True), (True, False)):
        model = tiny(detach_guidance=detach)
        out = model(batch(2))
        out.pooled["FLAIR"].sum().backward()
        assert (grad_norm(model.branches["T1CE"]) > 0) is expect_grad


def test_frozen_batchnorm_branch_stays_in_eval_mode() -> None:
    model = tiny(norm="batch")
    set_stage(model, "all", ["T2"])
    model.train()
    assert model.branches["T1CE"].training and model.branches["T2"].training
    assert not model.branches["FLAIR"].training and not model.branches["T1"].training
    set_stage(model, "all", freeze_primary=True)
    model.train()
    assert not model.branches["T1CE"].training and model.branches["FLAIR"].training


# ---- attention ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_attention_maps_are_row_stochastic(dtype: torch.dtype | None) -> None:
    model = tiny().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(batch(2))
    for role in ROLES:
        for attention in (out.spatial_attention[role], out.slice_attention[role]):
            assert attention.dtype == torch.float32
            assert bool((attention >= 0).all())
            torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5, rtol=0)


# ---- loss ---------------------------------------------------------------------------------

def test_weighted_cross_entropy_equals_hand_computed_value() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([1, 1, 0])
    weights = [3.0, 1.0]
    # -log softmax by hand: sample 0 class 1, sample 1 class 1, sample 2 class 0
    nll = [math.log(1 + math.exp(2.0)), math.log(1 + math.exp(-1.0)), math.log(2.0)]
    w = [1.0, 1.0, 3.0]
    weighted = [wi * li for wi, li in zip(w, nll)]
    mean = WeightedCrossEntropyLoss(weights)(logits, target)
    assert mean.item() == pytest.approx(sum(weighted) / 3, rel=1e-6)
    wmean = WeightedCrossEntropyLoss(weights, reduction="weighted_mean")(logits, target)
    assert wmean.item() == pytest.approx(sum(weighted) / sum(w), rel=1e-6)
    torch.testing.assert_close(wmean, F.cross_entropy(logits, target, weight=torch.tensor(weights)))
    total = WeightedCrossEntropyLoss(weights, reduction="sum")(logits, target)
    assert total.item() == pytest.approx(sum(weighted), rel=1e-6)
    assert WeightedCrossEntropyLoss()(logits, target).item() == pytest.approx(sum(nll) / 3, rel=1e-6)


def test_class_weights_from_frequencies() -> None:
    # BraTS 2020: 76 LGG, 293 HGG -> the rare class weighs 293/76 times more
    w = class_weights_from_counts([76, 293])
    torch.testing.assert_close(w, torch.tensor([369 / 152, 369 / 586]))
    torch.testing.assert_close(class_weights_from_labels([0, 1, 1, 1]), torch.tensor([2.0, 2 / 3]))
    torch.testing.assert_close(class_weights_from_counts([5, 5]), torch.ones(2))
    with pytest.raises(ValueError, match="at least one sample"):
        class_weights_from_counts([0, 10])
    with pytest.raises(ValueError, match="class_weights"):
        WeightedCrossEntropyLoss([1.0, -1.0])


# ---- learning -----------------------------------------------------------------------------

def synthetic_grading_batch(n: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """HGG: a bright enhancing blob on T1CE and oedema on FLAIR/T2; LGG: neither."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([i % 2 for i in range(n)])
    x = {r: 0.3 * torch.randn(n, *SIZE, generator=g) for r in ROLES}
    for i in range(n):
        if labels[i] == 1:
            x["T1CE"][i, 6:10, 10:18, 12:20] += 3.0
            x["FLAIR"][i, 5:11, 8:20, 10:22] += 2.0
            x["T2"][i, 5:11, 8:20, 10:22] += 1.5
    return x, labels


@pytest.mark.parametrize("stage", ["primary", "all"])
def test_a_few_adam_steps_reduce_the_loss(stage: str) -> None:
    model = tiny()
    set_stage(model, stage)  # type: ignore[arg-type]
    x, y = synthetic_grading_batch(4)
    loss_fn = WeightedCrossEntropyLoss(class_weights_from_labels(y))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < losses[0] * 0.7, losses + [final]


# ---- inference ----------------------------------------------------------------------------

def check_prediction(pred: Prediction, n: int, roles: tuple[str, ...]) -> None:
    assert pred.family == "crossmodal"
    assert pred.labels == {"grade": ("LGG", "HGG")}
    p = pred.probabilities["grade"]
    assert p.shape == (n, 2) and p.dtype == torch.float32 and p.device.type == "cpu"
    torch.testing.assert_close(p.sum(1), torch.ones(n))
    saliency = pred.explanations["saliency"]
    assert saliency.shape == (n, *SIZE) and saliency.dtype == torch.float32
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0
    for role in roles:
        s = pred.explanations[f"slice_attention/{role}"]
        assert s.shape == (n, SIZE[0])
        torch.testing.assert_close(s.sum(1), torch.ones(n))
    assert set(k for k in pred.explanations if k.startswith("slice_attention/")) == {
        f"slice_attention/{r}" for r in roles
    }
    torch.testing.assert_close(pred.explanations["slice_attention"], pred.explanations["slice_attention/T1CE"])


def test_predict_shapes_probabilities_and_explanations() -> None:
    model = tiny()
    inputs: dict[str, torch.Tensor] = dict(batch(3))
    inputs["slice_mask"] = torch.ones(3, SIZE[0], dtype=torch.bool)  # other families' keys are ignored
    pred = predict(model, inputs)
    check_prediction(pred, 3, ROLES)
    assert float(pred.explanations["saliency"].flatten(1).amax(1).min()) == pytest.approx(1.0)
    assert not model.training
    # batched = one by one
    single = predict(model, {r: v[1:2] for r, v in inputs.items()})
    torch.testing.assert_close(single.probabilities["grade"], pred.probabilities["grade"][1:2], atol=1e-5, rtol=0)

    # weights + hparams rebuild the same predictor, bit for bit
    rebuilt = FAMILY.build(model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    again = predict(rebuilt, inputs)
    assert torch.equal(again.probabilities["grade"], pred.probabilities["grade"])
    assert torch.equal(again.explanations["saliency"], pred.explanations["saliency"])

    set_stage(model, "primary")
    check_prediction(FAMILY.predict(model, batch(2, roles=("T1CE",))), 2, ("T1CE",))


def test_predict_with_bf16_autocast_on_cpu() -> None:
    model = tiny()
    x = batch(2)
    full = predict(model, x)
    half = predict(model, x, autocast_dtype=torch.bfloat16)
    check_prediction(half, 2, ROLES)
    torch.testing.assert_close(half.probabilities["grade"], full.probabilities["grade"], atol=0.05, rtol=0)


def test_spec_prepares_what_the_network_reads() -> None:
    """NIfTI-like (x, y, z) volumes through the family's own spec come out as the network's (D, H, W)."""
    spec = make_spec(SIZE, spacing=(4.0, 4.0, 6.0))
    assert validate_spec(FAMILY.default_spec())["transforms"][-1]["axes"] == [2, 1, 0]
    rng = np.random.default_rng(0)
    affine = np.diag([-3.0, -3.0, 5.0, 1.0])
    shape = (40, 44, 20)  # (x, y, z) at 3 x 3 x 5 mm
    brain = np.zeros(shape, dtype=np.float32)
    brain[8:32, 8:36, 3:17] = 1.0
    cases = []
    for seed in range(2):
        vols = {r: ((brain * (1 + rng.random(shape))).astype(np.float32), affine) for r in ROLES}
        cases.append(apply_spec(spec, vols))
    inputs = to_batch(cases, FAMILY.input_roles)
    assert inputs["T1CE"].shape == (2, *SIZE)
    check_prediction(predict(tiny(), inputs), 2, ROLES)


def test_pooling_and_stage_stride_switches() -> None:
    """Max pooling and fewer in-plane strides (the small profile) are hparams; MC3's are the defaults."""
    assert FAMILY.default_hparams()["pooling"] == "avg"
    assert FAMILY.default_hparams()["stage_strides"] == [1, 2, 2, 2]
    base = tiny()
    x = batch(2)
    h_base = base(x).features["T1CE"].shape[-1]
    fine = tiny(stage_strides=[1, 2, 1, 1], pooling="max")
    out = fine(x)
    assert out.features["T1CE"].shape[-1] == 4 * h_base
    assert torch.equal(out.pooled["T1CE"], out.features["T1CE"].amax(dim=(2, 3, 4)))
    assert fine.hparams["pooling"] == "max" and fine.hparams["stage_strides"] == [1, 2, 1, 1]
    with pytest.raises(ValueError, match="pooling"):
        tiny(pooling="median")
    with pytest.raises(ValueError, match="stage_strides"):
        tiny(stage_strides=[1, 2])
