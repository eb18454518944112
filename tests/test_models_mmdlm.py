"""MMDLM (seed 002): shapes, MIL masking, 1p/19q loss masking, gradients, learning, predict.

Everything runs on a tiny configuration of the same topology (ResNet stages of
one block, widths 4-16, 32x32 slices, bags of 6) so the suite runs on two CPU
cores in seconds.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models.base import TASKS, Prediction
from models.mmdlm import (
    FAMILY,
    MISSING,
    MMDLM,
    MMDLMLoss,
    build,
    default_spec,
    l2_penalty,
    predict,
    spec_for,
)
from models.resnet2d import ResNet2d, resnet34_2d

ROLES = ("T1CE", "T2", "FLAIR")
TINY: dict[str, Any] = {
    "resnet_layers": [1, 1, 1, 1],
    "resnet_widths": [4, 8, 8, 16],
    "mil_hidden_dim": 8,
    "mil_attention_dim": 8,
    "projection_dim": 4,
    "fusion_dim": 4,
    "slice_size": [32, 32],
    "slice_count": 6,
}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny(**overrides: Any) -> MMDLM:
    return build({**TINY, **overrides})


def bags(batch: int = 3, count: int = 6, size: int = 32, lengths: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random slices per role and a mask with `lengths` real slices per bag (default: bag i has count - i)."""
    lengths = lengths or tuple(max(1, count - i) for i in range(batch))
    slices = {role: torch.randn(batch, count, size, size) for role in ROLES}
    mask = torch.zeros(batch, count, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return slices, mask


# -- the backbone -----------------------------------------------------------------


def test_resnet34_is_torchvisions_resnet34_with_one_channel_input() -> None:
    net = resnet34_2d()
    # torchvision resnet34: 21,797,672 parameters; minus fc (513,000) and the 3->1 channel conv1 (6,272).
    assert sum(p.numel() for p in net.parameters()) == 21_278_400
    assert net.feature_dim == 512
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (7, 7) and net.conv1.bias is None
    small = ResNet2d(1, (1, 1), (4, 8))
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 8)
    with pytest.raises(ValueError, match="expects"):
        small(torch.randn(2, 3, 32, 32))


# -- network ----------------------------------------------------------------------


def test_forward_shapes_and_attention_rows() -> None:
    model = tiny().eval()
    slices, mask = bags()
    out = model(slices, mask)
    assert set(out.logits) == {"grade", "idh", "1p19q"}
    for logit in out.logits.values():
        assert logit.shape == (3,)
    assert out.fused.shape == (3, 4)
    for role in ROLES:
        weights = out.attention[role]
        assert weights.shape == (3, 6) and weights.dtype == torch.float32
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
        assert torch.all(weights[~mask] == 0.0)  # exactly zero, not small
        assert torch.all(weights[mask] > 0.0)


def test_padding_content_never_changes_the_output() -> None:
    model = tiny().eval()
    slices, mask = bags()
    reference = model(slices, mask)
    altered = {role: x.clone() for role, x in slices.items()}
    for x in altered.values():
        x[~mask] = torch.randn_like(x[~mask]) * 1e3
    out = model(altered, mask)
    for task in reference.logits:
        assert torch.equal(out.logits[task], reference.logits[task])
    # The features path too: even NaN in padded positions cannot leak through 0 * NaN.
    features = model.extract_features(slices, mask)
    poisoned = {role: f.clone() for role, f in features.items()}
    for f in poisoned.values():
        f[~mask] = float("nan")
    out = model.forward_features(poisoned, mask)
    for task in reference.logits:
        torch.testing.assert_close(out.logits[task], reference.logits[task])


def test_bag_of_only_padding_is_refused() -> None:
    model = tiny().eval()
    slices, mask = bags(batch=2)
    mask[1] = False
    with pytest.raises(ValueError, match=r"bag\(s\) \[1\] contain only padding"):
        model(slices, mask)
    with pytest.raises(TypeError, match="bool"):
        model(slices, mask.float())


def test_end_to_end_and_features_paths_agree() -> None:
    model = tiny().eval()
    slices, mask = bags()
    direct = model(slices, mask)
    features = model.extract_features(slices, mask)
    assert features["T2"].shape == (3, 6, 16)
    assert torch.all(features["T2"][~mask] == 0)
    staged = model.forward_features(features, mask)
    for task in direct.logits:
        torch.testing.assert_close(staged.logits[task], direct.logits[task])
    for role in ROLES:
        torch.testing.assert_close(staged.attention[role], direct.attention[role])


def test_extractor_chunking_at_inference_changes_nothing() -> None:
    model = tiny().eval()
    slices, mask = bags()
    whole = model(slices, mask)
    model.extractor_chunk = 2
    chunked = model(slices, mask)
    for task in whole.logits:
        torch.testing.assert_close(chunked.logits[task], whole.logits[task])


def test_per_role_masks() -> None:
    model = tiny().eval()
    slices, mask = bags()
    other = mask.clone()
    other[0, 5] = False
    out = model(slices, {"T1CE": mask, "T2": other, "FLAIR": mask})
    assert out.attention["T2"][0, 5] == 0 and out.attention["T1CE"][0, 5] > 0


def test_mil_sharing_is_switchable() -> None:
    shared = tiny()
    assert shared.mil_for("T2") is shared.mil_for("FLAIR") is shared.mil_for("T1CE")
    separate = tiny(share_mil=False)
    assert separate.mil_for("T2") is not separate.mil_for("FLAIR")
    extra = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert extra == 2 * sum(p.numel() for p in shared.mil_for("T2").parameters())


@pytest.mark.parametrize("share_mil", [True, False])
def test_gradients_reach_every_extractor_and_the_mil(share_mil: bool) -> None:
    model = tiny(share_mil=share_mil).train()
    slices, mask = bags()
    targets = {"grade": torch.tensor([1, 0, 1]), "idh": torch.tensor([1, 1, 0]), "1p19q": torch.tensor([1, 0, 1])}
    total, _ = MMDLMLoss()(model(slices, mask).logits, targets)
    total.backward()
    named = dict(model.named_parameters())
    for name, param in named.items():
        assert param.grad is not None, f"no gradient for {name}"
    for role in ROLES:
        grads = [p.grad.abs().sum() for p in model.extractors[role].parameters()]
        assert torch.stack(grads).sum() > 0, f"extractor {role} got zero gradient"
        mil = model.mil_for(role)
        assert mil.attention_a[0].weight.grad.abs().sum() > 0
        assert mil.attention_b[0].weight.grad.abs().sum() > 0
        assert mil.attention_c.weight.grad.abs().sum() > 0


# -- loss -------------------------------------------------------------------------


def _logits(batch: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {task: torch.randn(batch, generator=gen, requires_grad=True) for task in ("grade", "idh", "1p19q")}


def test_1p19q_masked_where_idh_wildtype_or_unknown() -> None:
    loss = MMDLMLoss()
    logits = _logits()
    # samples: IDH-mutant, IDH-wildtype, IDH-mutant with 1p/19q unknown, IDH unknown with 1p/19q known
    base = {
        "grade": torch.tensor([0, 1, 0, 1]),
        "idh": torch.tensor([1, 0, 1, MISSING]),
        "1p19q": torch.tensor([1, 0, MISSING, 1]),
    }
    total, parts = loss(logits, base)
    keep = loss.effective_masks(base)["1p19q"]
    assert keep.tolist() == [True, False, False, True]
    # Changing 1p/19q on the IDH-wildtype sample (masked) leaves the loss unchanged ...
    changed = {**base, "1p19q": torch.tensor([1, 1, MISSING, 1])}
    assert torch.equal(loss(logits, changed)[0], total)
    # ... changing it on an IDH-mutant sample (unmasked) changes it.
    changed = {**base, "1p19q": torch.tensor([0, 0, MISSING, 1])}
    assert not torch.equal(loss(logits, changed)[0], total)
    # The masked 1p/19q part is the mean BCE over the kept samples only.
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits["1p19q"][[0, 3]], torch.tensor([1.0, 1.0])
    )
    torch.testing.assert_close(parts["1p19q"], expected)
    # Missing IDH is masked in the IDH loss too.
    assert loss.effective_masks(base)["idh"].tolist() == [True, True, True, False]


def test_1p19q_rule_is_switchable() -> None:
    targets = {
        "grade": torch.tensor([0, 1, 0, 1]),
        "idh": torch.tensor([1, 0, 1, MISSING]),
        "1p19q": torch.tensor([1, 0, MISSING, 1]),
    }
    assert MMDLMLoss(one_p19q_rule="idh_mutant").effective_masks(targets)["1p19q"].tolist() == [True, False, False, False]
    assert MMDLMLoss(one_p19q_rule="labelled").effective_masks(targets)["1p19q"].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="one_p19q_rule"):
        MMDLMLoss(one_p19q_rule="always")
    explicit = MMDLMLoss().effective_masks(targets, {"grade": torch.tensor([True, False, True, True])})
    assert explicit["grade"].tolist() == [True, False, True, True]


def test_task_weights_and_a_task_with_no_labels() -> None:
    logits = _logits()
    targets = {
        "grade": torch.tensor([0, 1, 0, 1]),
        "idh": torch.tensor([0, 0, 0, 0]),  # all wildtype: no 1p/19q sample counts
        "1p19q": torch.tensor([1, 0, 1, 0]),
    }
    total, parts = MMDLMLoss()(logits, targets)
    assert parts["1p19q"].item() == 0.0
    torch.testing.assert_close(total, parts["grade"] + parts["idh"])
    weighted, _ = MMDLMLoss(task_weights={"grade": 2.0, "idh": 0.5})(logits, targets)
    torch.testing.assert_close(weighted, 2.0 * parts["grade"] + 0.5 * parts["idh"])
    weighted.backward()
    assert torch.all(logits["1p19q"].grad == 0)
    with pytest.raises(ValueError, match="unknown task"):
        MMDLMLoss(task_weights={"survival": 1.0})
    assert l2_penalty(torch.nn.Linear(2, 1).parameters()).item() > 0


# -- learning ---------------------------------------------------------------------


def test_a_few_adam_steps_reduce_the_loss() -> None:
    torch.manual_seed(3)
    model = tiny(dropout=0.0, attention_dropout=0.0).train()
    slices, mask = bags(batch=4, lengths=(6, 5, 6, 4))
    # A learnable signal: positive bags have one bright slice in every sequence.
    targets = {"grade": torch.tensor([1, 0, 1, 0]), "idh": torch.tensor([1, 1, 0, 0]), "1p19q": torch.tensor([1, 0, 0, 0])}
    for i in range(4):
        for role in ROLES:
            slices[role][i, 2] += 3.0 * float(targets["grade"][i])
            slices[role][i, 1] += 3.0 * float(targets["idh"][i])
    criterion = MMDLMLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses: list[float] = []
    for _ in range(25):
        optimiser.zero_grad()
        total, _ = criterion(model(slices, mask).logits, targets)
        total.backward()
        optimiser.step()
        losses.append(total.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- predict and the family contract ----------------------------------------------


def test_predict_shapes_probabilities_and_key_slices() -> None:
    model = tiny()
    slices, mask = bags(batch=3, lengths=(6, 4, 2))
    prediction = predict(model, {**slices, "slice_mask": mask})
    assert isinstance(prediction, Prediction) and prediction.family == "mmdlm"
    assert prediction.labels == {task: TASKS[task] for task in ("grade", "idh", "1p19q")}
    for task, probs in prediction.probabilities.items():
        assert probs.shape == (3, 2) and probs.dtype == torch.float32 and probs.device.type == "cpu"
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    for role in ROLES:
        attention = prediction.explanations[f"slice_attention/{role}"]
        assert attention.shape == (3, 6)
        torch.testing.assert_close(attention.sum(dim=1), torch.ones(3))
        assert torch.all(attention[~mask] == 0)
        key = prediction.explanations[f"key_slices/{role}"]
        assert key.shape == (3, 3) and key.dtype == torch.int64
        assert key[2, 2].item() == -1  # bag 2 has only 2 real slices
        for row in range(3):
            real = [int(i) for i in key[row] if i >= 0]
            assert all(mask[row, i] for i in real)
            weights = attention[row, real]
            assert torch.all(weights[:-1] >= weights[1:])  # most attended first
    assert not model.training


def test_predict_bf16_autocast_on_cpu() -> None:
    model = tiny()
    slices, mask = bags(batch=2)
    reference = predict(model, {**slices, "slice_mask": mask})
    prediction = predict(model, {**slices, "slice_mask": mask}, autocast_dtype=torch.bfloat16)
    for task, probs in prediction.probabilities.items():
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, reference.probabilities[task], atol=0.1, rtol=0.0)
    for role in ROLES:
        attention = prediction.explanations[f"slice_attention/{role}"]
        assert attention.dtype == torch.float32
        torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
        assert torch.all(attention[~mask] == 0)


def test_predict_refuses_missing_roles() -> None:
    slices, mask = bags(batch=1)
    del slices["FLAIR"]
    with pytest.raises(ValueError, match="FLAIR"):
        predict(tiny(), {**slices, "slice_mask": mask})


def test_family_contract_and_spec() -> None:
    assert FAMILY.name == "mmdlm" and FAMILY.paper == "seed 002 (MMDLM)"
    assert FAMILY.input_roles == ("T1CE", "T2", "FLAIR")
    assert dict(FAMILY.tasks) == {task: TASKS[task] for task in ("grade", "idh", "1p19q")}
    hparams = FAMILY.default_hparams()
    assert hparams["mil_hidden_dim"] == hparams["mil_attention_dim"] == 256 and hparams["share_mil"] is True
    spec = FAMILY.default_spec()
    assert json.loads(json.dumps(spec)) == spec == default_spec()
    assert spec["roles"] == ["T1CE", "T2", "FLAIR"]
    assert spec["slices"] == {
        "axis": 2, "selection": "brain_range", "count": 80, "size": [224, 224], "normalize": "zscore_brain_per_slice"
    }
    resample = next(t for t in spec["transforms"] if t["name"] == "resample")
    assert resample["spacing"][2] == 2.0  # the public code's 2 mm slice thickness
    crop = next(t for t in spec["transforms"] if t["name"] == "crop_or_pad")
    assert crop["shape"] == [224, 224, 80]  # 224 x 224 x 160 mm at 1 x 1 x 2 mm
    small = spec_for(TINY)
    assert small["slices"]["size"] == [32, 32] and small["slices"]["count"] == 6
    # A small spec sees the same field of view, resized: not a 32 mm patch.
    assert next(t for t in small["transforms"] if t["name"] == "crop_or_pad")["shape"] == [224, 224, 80]
    with pytest.raises(ValueError, match="unknown mmdlm hyper-parameters"):
        FAMILY.build({"resnet_depth": 18})
    assert isinstance(FAMILY.build(TINY), MMDLM)


def test_spec_preprocess_and_predict_fit_together() -> None:
    """The family's spec, applied by models.preprocess to NIfTI-like volumes, feeds predict directly."""
    np = pytest.importorskip("numpy")
    from models.preprocess import apply_spec, to_batch

    hparams = {**TINY, "slice_count": 40}
    rng = np.random.default_rng(0)
    volume = np.zeros((60, 60, 50), dtype=np.float32)
    volume[15:45, 12:48, 10:40] = rng.random((30, 36, 30), dtype=np.float32) + 1.0  # "brain": 30 slices of 2 mm
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    case = apply_spec(spec_for(hparams), {role: (volume * (i + 1), affine) for i, role in enumerate(ROLES)})
    batch = to_batch([case], ROLES)
    assert batch["T2"].shape == (1, 40, 32, 32) and batch["slice_mask"].sum().item() == 30
    prediction = predict(build(hparams), batch)
    assert prediction.probabilities["grade"].shape == (1, 2)
    attention = prediction.explanations["slice_attention/FLAIR"]
    assert torch.all(attention[~batch["slice_mask"]] == 0)


def test_models_mmdlm_imports_nothing_from_dicomnode_or_training() -> None:
    root = Path(__file__).resolve().parent.parent / "models"
    for path in [root / "resnet2d.py", *sorted((root / "mmdlm").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"dicomnode", "training"}, f"{path.name} imports {name}"
