"""Seed 000's two families: the template / full-sequence 3D CNN (``fs3dcnn``) and adaptive PromptNet.

Everything runs on the CPU at 32^3 with tiny widths; the networks are fully convolutional with
global pooling, so the behaviour checked here is the behaviour at the default size.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from models.base import NON_ENHANCED_ROLES, ROLES, TASKS, Prediction
from models.checkpoint import load_checkpoint, save_checkpoint
from models.common3d import group_count
from models.preprocess import validate_spec
from models.fs3dcnn import FAMILY as FS_FAMILY
from models.fs3dcnn import FS3DOutput, FullSequence3DCNN, fs3dcnn_loss
from models.promptnet import (
    FAMILY as PN_FAMILY,
)
from models.promptnet import (
    PromptLossConfig,
    PromptNet,
    PromptNetCriterion,
    PromptNetOutput,
    adaptive_weight,
    loss_config,
    promptnet_loss,
)

SHAPE = (32, 32, 32)
TINY: dict[str, Any] = {
    "input_shape": list(SHAPE),
    "stem_width": 4,
    "widths": [8, 8, 16],
    "blocks_per_stage": [1, 1, 1],
    "groups": 4,
    "fc_hidden": [16, 8],
    "dropout": 0.0,
}


@pytest.fixture(autouse=True)
def _cpu_threads() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def tiny_template() -> FullSequence3DCNN:
    return FS_FAMILY.build(TINY)


def tiny_student(**over: Any) -> PromptNet:
    return PN_FAMILY.build({**TINY, **over})


def synthetic_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4, 32, 32, 32) volumes in ROLES order and labels 0/1; HGG gets a bright T2/FLAIR blob
    (visible without T1CE) and an enhancing rim-like shell on T1CE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *SHAPE, generator=g)
    y = torch.tensor([i % 2 for i in range(n)])
    zz, yy, xx = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in SHAPE), indexing="ij")
    r = ((zz - 16) ** 2 + (yy - 12) ** 2 + (xx - 18) ** 2).sqrt()
    blob = (r < 6).float()
    shell = ((r >= 6) & (r < 8)).float()
    for i in range(n):
        if y[i] == 1:
            x[i, ROLES.index("T2")] += 2.0 * blob
            x[i, ROLES.index("FLAIR")] += 2.0 * blob
            x[i, ROLES.index("T1CE")] += 3.0 * shell
    return x, y


def ne_part(x: torch.Tensor) -> torch.Tensor:
    return x[:, [ROLES.index(r) for r in NON_ENHANCED_ROLES]]


def by_role(x: torch.Tensor, roles: tuple[str, ...] = ROLES) -> dict[str, torch.Tensor]:
    return {r: x[:, ROLES.index(r)] for r in roles}


# ------------------------------------------------------------------ shapes and the contract


def test_group_count_divides() -> None:
    assert group_count(16, 8) == 8
    assert group_count(6, 8) == 6
    assert group_count(12, 8) == 6
    assert group_count(7, 4) == 1


def test_fs3dcnn_output_shapes() -> None:
    net = tiny_template()
    x, _ = synthetic_batch(2)
    out = net(x)
    assert isinstance(out, FS3DOutput)
    assert out.logits.shape == (2, 2)
    assert out.features.shape == (2, 16) and net.feature_dim == 16
    assert torch.allclose(out.probabilities.sum(1), torch.ones(2))
    assert torch.equal(net.forward_features(x), out.features)


def test_fs3dcnn_refuses_wrong_input() -> None:
    net = tiny_template()
    with pytest.raises(ValueError, match="4 input channels"):
        net(torch.zeros(1, 3, *SHAPE))
    with pytest.raises(ValueError, match="input_shape"):
        net(torch.zeros(1, 4, 32, 32, 16))


@pytest.mark.parametrize("branch_inputs", ["shared", "per_sequence"])
@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_promptnet_output_shapes(branch_inputs: str, fusion: str) -> None:
    net = tiny_student(branch_inputs=branch_inputs, fusion=fusion)
    x, _ = synthetic_batch(2)
    out = net(ne_part(x))
    assert isinstance(out, PromptNetOutput)
    n_ne = 1 if branch_inputs == "shared" else 3
    assert out.logits.shape == (2, 2)
    assert out.z_cf.shape == (2, 16)
    assert len(out.z_ne) == n_ne and all(z.shape == (2, 16) for z in out.z_ne)
    assert out.features.shape == (2, 16 * (n_ne + 1) if fusion == "concat" else 16)


def test_promptnet_projection_to_template_dim() -> None:
    net = tiny_student(template_feature_dim=12)
    out = net(torch.randn(2, 3, *SHAPE))
    assert out.z_cf.shape == (2, 12)
    assert isinstance(net.cf_projection, torch.nn.Linear)
    with pytest.raises(ValueError, match="equal size"):
        tiny_student(template_feature_dim=12, fusion="sum")


def test_family_contracts() -> None:
    assert FS_FAMILY.name == "fs3dcnn" and FS_FAMILY.input_roles == ROLES
    assert PN_FAMILY.name == "promptnet" and PN_FAMILY.input_roles == ("T1", "T2", "FLAIR")
    for fam in (FS_FAMILY, PN_FAMILY):
        assert dict(fam.tasks) == {"grade": TASKS["grade"]}
        spec = fam.default_spec()
        json.dumps(spec)
        assert validate_spec(spec) == spec
        json.dumps(fam.default_hparams())
        assert spec["version"] == 1 and spec["roles"] == list(fam.input_roles) and spec["slices"] is None
        names = [t["name"] for t in spec["transforms"]]
        assert names == ["reorient", "resample", "brain_mask", "crop_or_pad", "normalize"]
        crop = spec["transforms"][names.index("crop_or_pad")]
        assert crop["shape"] == fam.default_hparams()["input_shape"] == [160, 192, 144]
        with pytest.raises(ValueError, match="unknown hyper-parameter"):
            fam.build({"widht": 3})
    with pytest.raises(ValueError, match="prompt mode"):
        PN_FAMILY.build({**TINY, "prompt_mode": "sometimes"})
    with pytest.raises(ValueError, match="branch_inputs"):
        PN_FAMILY.build({**TINY, "branch_inputs": "each"})
    assert loss_config({"prompt_mode": "fixed"}) == PromptLossConfig(mode="fixed")


def test_promptnet_state_dict_holds_no_template() -> None:
    student = tiny_student()
    crit = PromptNetCriterion(tiny_template())
    assert crit.template is not None
    assert not any(k.startswith("template") for k in student.state_dict())
    assert sum(p.numel() for p in student.parameters()) == sum(v.numel() for v in student.state_dict().values())


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("branch_inputs,fusion", [("shared", "concat"), ("per_sequence", "concat"), ("per_sequence", "gated")])
def test_gradients_reach_every_branch_and_not_the_template(branch_inputs: str, fusion: str) -> None:
    template = tiny_template()
    template.train()  # the criterion must put it back into eval mode itself
    crit = PromptNetCriterion(template, PromptLossConfig(mode="adaptive"))
    student = tiny_student(branch_inputs=branch_inputs, fusion=fusion)
    x, y = synthetic_batch(2)
    total, parts = crit(student(ne_part(x)), x, y)
    total.backward()
    groups: dict[str, torch.nn.Module] = {"cf_branch": student.cf_branch, "classifier": student.classifier}
    for i, b in enumerate(student.ne_branches):
        groups[f"ne_branch{i}"] = b
    if student.gate is not None:
        groups["gate"] = student.gate
    for name, mod in groups.items():
        grads = [p.grad for p in mod.parameters()]
        assert all(g is not None for g in grads), f"{name}: a parameter got no gradient"
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, f"{name}: zero gradient"
    assert not template.training
    for p in template.parameters():
        assert p.requires_grad is False and p.grad is None
    assert float(parts["prompt"].detach()) > 0


def test_unfrozen_template_is_refused() -> None:
    crit = PromptNetCriterion(tiny_template())
    crit.template.classifier.requires_grad_(True)
    x, y = synthetic_batch(2)
    with pytest.raises(RuntimeError, match="frozen"):
        crit(tiny_student()(ne_part(x)), x, y)


def test_adaptive_weight_is_detached_by_default() -> None:
    template = tiny_template()
    crit = PromptNetCriterion(template)
    assert crit.config.detach_weight is True
    student = tiny_student()
    x, y = synthetic_batch(2)
    t_out = crit.template_outputs(x)

    out = student(ne_part(x))
    _, parts = promptnet_loss(out, t_out, y, "adaptive")
    (g,) = torch.autograd.grad(parts["prompt"], out.logits, allow_unused=True)
    assert g is None  # the prompt term reaches the network only through z_CF

    out = student(ne_part(x))
    _, parts = promptnet_loss(out, t_out, y, "adaptive", detach_weight=False)
    (g,) = torch.autograd.grad(parts["prompt"], out.logits, allow_unused=True)
    assert g is not None and float(g.abs().sum()) > 0  # undetached: the net could shrink w instead


# ------------------------------------------------------------------ Table 2's switches


def handmade_outputs() -> tuple[PromptNetOutput, FS3DOutput, torch.Tensor]:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]], requires_grad=True)
    z_cf = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0], [-1.0, 0.0, 1.0, 0.5]], requires_grad=True)
    student = PromptNetOutput(logits=logits, features=z_cf, z_cf=z_cf, z_ne=(z_cf,))
    t_logits = torch.tensor([[1.0, 0.0], [-2.0, 2.0], [0.0, 3.0]])
    z_cef = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 1.0, 0.0]])
    return student, FS3DOutput(logits=t_logits, features=z_cef), torch.tensor([0, 1, 1])


def test_table2_none_is_cross_entropy_only() -> None:
    s, t, y = handmade_outputs()
    ce = torch.nn.functional.cross_entropy(s.logits, y)
    total, parts = promptnet_loss(s, t, y, "none")
    assert torch.allclose(total, ce) and float(parts["prompt"]) == 0.0
    total2, _ = promptnet_loss(s, None, y, "none")  # row 1 needs no template at all
    assert torch.allclose(total2, ce)
    crit = PromptNetCriterion(tiny_template(), PromptLossConfig(mode="none"))
    x, yb = synthetic_batch(2)
    out = tiny_student()(ne_part(x))
    total3, _ = crit(out, None, yb)
    assert torch.allclose(total3, torch.nn.functional.cross_entropy(out.logits, yb))


def test_table2_fixed_is_ce_plus_constant_times_l1() -> None:
    s, t, y = handmade_outputs()
    ce = torch.nn.functional.cross_entropy(s.logits, y)
    l1 = (t.features - s.z_cf).abs().mean(dim=1)  # per sample: [1.0, 1.0, 0.25]
    assert torch.allclose(l1, torch.tensor([1.0, 1.0, 0.25]))
    total, parts = promptnet_loss(s, t, y, "fixed")
    assert torch.allclose(total, ce + l1.mean())
    total, parts = promptnet_loss(s, t, y, "fixed", fixed_weight=0.5)
    assert torch.allclose(total, ce + 0.5 * l1.mean())
    assert torch.allclose(parts["weight_per_sample"], torch.full((3,), 0.5))


def test_table2_adaptive_is_ce_plus_per_sample_weight_times_l1() -> None:
    s, t, y = handmade_outputs()
    ce = torch.nn.functional.cross_entropy(s.logits, y)
    l1 = (t.features - s.z_cf).abs().mean(dim=1)
    gap = (torch.softmax(t.logits, 1) - torch.softmax(s.logits, 1)).abs()
    w_sum, w_mean = gap.sum(1), gap.mean(1)
    assert torch.allclose(w_sum, 2 * w_mean)  # two classes: the L1 norm is 2|p_T - p|
    total, parts = promptnet_loss(s, t, y, "adaptive")
    assert torch.allclose(total, ce + (w_sum * l1).mean())
    assert torch.allclose(parts["weight_per_sample"], w_sum)
    assert not torch.allclose(total, ce + l1.mean())  # differs from the fixed row
    total, _ = promptnet_loss(s, t, y, "adaptive", weight_reduction="mean")
    assert torch.allclose(total, ce + (w_mean * l1).mean())
    w = adaptive_weight(torch.softmax(s.logits, 1), torch.softmax(t.logits, 1))
    assert torch.allclose(w, w_sum) and not w.requires_grad


def test_class_weights_change_the_classification_part() -> None:
    s, t, y = handmade_outputs()
    plain, _ = promptnet_loss(s, t, y, "none")
    weighted, _ = promptnet_loss(s, t, y, "none", class_weights=[3.9, 1.0])
    ref = torch.nn.functional.cross_entropy(s.logits, y, weight=torch.tensor([3.9, 1.0]))
    assert torch.allclose(weighted, ref) and not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="prompt mode"):
        promptnet_loss(s, t, y, "always")
    with pytest.raises(ValueError, match="needs the template"):
        promptnet_loss(s, None, y, "adaptive")


# ------------------------------------------------------------------ the models can learn


def _eval_loss(fn: Any) -> float:
    with torch.no_grad():
        return float(fn())


def test_fs3dcnn_learns_on_a_tiny_batch() -> None:
    net = tiny_template()
    x, y = synthetic_batch(4)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = _eval_loss(lambda: fs3dcnn_loss(net(x).logits, y))
    for _ in range(20):
        opt.zero_grad()
        fs3dcnn_loss(net(x).logits, y).backward()
        opt.step()
    after = _eval_loss(lambda: fs3dcnn_loss(net(x).logits, y))
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_promptnet_learns_on_a_tiny_batch(mode: str) -> None:
    template = tiny_template()
    t_opt = torch.optim.Adam(template.parameters(), lr=3e-3)
    x, y = synthetic_batch(4)
    for _ in range(6):  # stage 1: a (briefly) trained template
        t_opt.zero_grad()
        fs3dcnn_loss(template(x).logits, y).backward()
        t_opt.step()
    t_state = {k: v.clone() for k, v in template.state_dict().items()}
    crit = PromptNetCriterion(template, PromptLossConfig(mode=mode))
    student = tiny_student()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    xs = ne_part(x)
    with torch.no_grad():
        before_total, before_parts = crit(student(xs), x, y)
    before = {k: float(v.mean()) for k, v in before_parts.items()}
    for _ in range(12):
        opt.zero_grad()
        total, _ = crit(student(xs), x, y)
        total.backward()
        opt.step()
    with torch.no_grad():
        after_total, after = crit(student(xs), x, y)
    assert float(after_total) < 0.7 * float(before_total), (before, after)
    assert float(after["classification"]) < before["classification"]
    assert float(after["prompt_l1"]) < before["prompt_l1"]  # z_CF moved towards z_CEF
    for k, v in template.state_dict().items():  # stage 2 never changes the template
        assert torch.equal(v, t_state[k]), k


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("which", ["fs3dcnn", "promptnet"])
def test_predict_shapes_probabilities_and_saliency(which: str) -> None:
    fam = FS_FAMILY if which == "fs3dcnn" else PN_FAMILY
    net = fam.build(TINY)
    net.train()
    x, _ = synthetic_batch(3)
    pred = fam.predict(net, by_role(x))  # every role given; promptnet ignores T1CE
    assert isinstance(pred, Prediction) and pred.family == which
    assert pred.labels == {"grade": TASKS["grade"]}
    p = pred.probabilities["grade"]
    assert p.shape == (3, 2) and p.dtype == torch.float32 and p.device.type == "cpu"
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-6)
    sal = pred.explanations["saliency"]
    assert sal.shape == (3, *SHAPE) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0.0 and float(sal.max()) <= 1.0
    assert net.training  # the caller's mode is restored
    assert all(prm.grad is None for prm in net.parameters())  # saliency accumulates nothing
    fast = fam.predict(net, by_role(x), saliency=False)
    assert "saliency" not in fast.explanations
    assert torch.allclose(fast.probabilities["grade"], p, atol=1e-5)


@pytest.mark.parametrize("which", ["fs3dcnn", "promptnet"])
def test_checkpoint_round_trip_predicts_identically(which: str, tmp_path: Any) -> None:
    from models.fs3dcnn.family import make_spec as fs_spec
    from models.promptnet.family import make_spec as pn_spec

    fam = FS_FAMILY if which == "fs3dcnn" else PN_FAMILY
    spec = (fs_spec if which == "fs3dcnn" else pn_spec)(SHAPE)
    hp = {**fam.default_hparams(), **TINY}
    net = fam.build(hp)
    path = tmp_path / f"{which}.pt"
    save_checkpoint(path, net, which, hp, spec, training_data={"synthetic": True}, metrics={})
    loaded = load_checkpoint(path)
    x, _ = synthetic_batch(2)
    a = fam.predict(net, by_role(x), saliency=False).probabilities["grade"]
    b = loaded.family.predict(loaded.model, by_role(x), saliency=False).probabilities["grade"]
    assert torch.equal(a, b)
    assert loaded.spec["transforms"][3]["shape"] == list(SHAPE)


def test_preprocessed_nifti_volumes_feed_predict() -> None:
    """The family's own spec (at a small size) applied to NIfTI volumes by role feeds predict."""
    import nibabel as nib
    import numpy as np

    from models.preprocess import apply_spec, to_batch
    from models.promptnet.family import make_spec

    grid = np.indices((60, 72, 48), dtype=np.float32)
    centre = np.array([30.0, 36.0, 24.0]).reshape(3, 1, 1, 1)
    head = (((grid - centre) / np.array([22.0, 28.0, 18.0]).reshape(3, 1, 1, 1)) ** 2).sum(0) < 1
    affine = np.diag([-3.0, 3.0, 3.0, 1.0])
    rng = np.random.default_rng(0)
    vols = {r: nib.Nifti1Image((head * (100 + 10 * rng.standard_normal(head.shape))).astype(np.float32), affine)
            for r in ROLES}
    spec = make_spec(SHAPE, spacing=(4.0, 4.0, 4.0))
    cases = [apply_spec(spec, vols) for _ in range(2)]
    batch = to_batch(cases, PN_FAMILY.input_roles)
    assert batch["T1"].shape == (2, *SHAPE)
    pred = PN_FAMILY.predict(PN_FAMILY.build(TINY), batch)
    assert pred.probabilities["grade"].shape == (2, 2)
    assert pred.explanations["saliency"].shape == (2, *SHAPE)


def test_predict_on_a_frozen_template_still_explains() -> None:
    net = tiny_template().requires_grad_(False)
    x, _ = synthetic_batch(1)
    pred = FS_FAMILY.predict(net, by_role(x))
    assert pred.explanations["saliency"].shape == (1, *SHAPE)


@pytest.mark.parametrize("which", ["fs3dcnn", "promptnet"])
def test_predict_bf16_autocast_on_cpu(which: str) -> None:
    fam = FS_FAMILY if which == "fs3dcnn" else PN_FAMILY
    net = fam.build(TINY)
    x, _ = synthetic_batch(2)
    ref = fam.predict(net, by_role(x), saliency=False).probabilities["grade"]
    pred = fam.predict(net, by_role(x), autocast_dtype=torch.bfloat16)
    p = pred.probabilities["grade"]
    assert p.dtype == torch.float32 and torch.allclose(p.sum(1), torch.ones(2), atol=1e-6)
    assert torch.allclose(p, ref, atol=0.05)
    assert pred.explanations["saliency"].dtype == torch.float32


def test_predict_refuses_missing_or_mismatched_roles() -> None:
    net = PN_FAMILY.build(TINY)
    x, _ = synthetic_batch(1)
    roles = by_role(x)
    del roles["FLAIR"]
    with pytest.raises(ValueError, match="FLAIR"):
        PN_FAMILY.predict(net, roles)
    roles = by_role(x)
    roles["T2"] = roles["T2"][:, :16]
    with pytest.raises(ValueError, match="'T2' has shape"):
        PN_FAMILY.predict(net, roles)


def test_pooling_switch_max_by_default_avg_on_request() -> None:
    """Global pooling is a documented switch (max by default: a small enhancing rim survives it)."""
    import torch.nn as nn

    from models.fs3dcnn.family import FAMILY as FS

    tiny = {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [4, 4, 8], "groups": 2, "fc_hidden": [8, 4]}
    assert isinstance(FS.build(tiny).encoder.pool, nn.AdaptiveMaxPool3d)
    assert isinstance(FS.build({**tiny, "pooling": "avg"}).encoder.pool, nn.AdaptiveAvgPool3d)
    with pytest.raises(ValueError, match="pooling"):
        FS.build({**tiny, "pooling": "median"})


def test_norm_and_stride_switches() -> None:
    """The small profile's departures are hparams: per-stage strides, the norm layer (GroupNorm by default)."""
    import torch.nn as nn

    from models.fs3dcnn.family import FAMILY as FS
    from models.promptnet.family import FAMILY as PN

    tiny = {"input_shape": [16, 16, 16], "stem_width": 4, "widths": [4, 4, 8], "groups": 2, "fc_hidden": [8, 4],
            "blocks_per_stage": [1, 1, 1]}
    net = FS.build(tiny)
    assert isinstance(net.encoder.stem.norm, nn.GroupNorm) and net.encoder.total_stride == 16
    x = torch.randn(2, 4, 16, 16, 16)
    assert net.forward_with_maps(x)[1][0].shape[2:] == (1, 1, 1)
    strided = FS.build({**tiny, "stage_strides": [2, 1, 1]})
    assert strided.encoder.total_stride == 4
    assert strided.forward_with_maps(x)[1][0].shape[2:] == (4, 4, 4)
    for kind, cls in (("batch", nn.BatchNorm3d), ("none", nn.Identity)):
        m = FS.build({**tiny, "norm": kind})
        assert isinstance(m.encoder.stem.norm, cls)
        assert m(x).logits.shape == (2, 2)
    inst = FS.build({**tiny, "norm": "instance"}).encoder.stem.norm
    assert isinstance(inst, nn.GroupNorm) and inst.num_groups == inst.num_channels
    pn = PN.build({**tiny, "stage_strides": [2, 1, 1], "norm": "none"})
    assert pn.cf_branch.total_stride == 4
    with pytest.raises(ValueError, match="norm"):
        FS.build({**tiny, "norm": "layer"})
