"""``ConstrainedUpdate.project_gradients_``: g ← g P on every trainable constrained gradient, nothing else."""

from __future__ import annotations

import torch

from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.targets import resolve_protected_layers
from nspo_trl.nullspace.update import ConstrainedUpdate


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(6, 4, bias=False))
        self.other = torch.nn.Linear(8, 3)


def build(model: TwoLayer):
    torch.manual_seed(0)
    x0 = torch.randn(3, 8, dtype=torch.float64)  # rank 3 < 8: a 5-dim null space
    x1 = torch.randn(2, 6, dtype=torch.float64)
    covariances = {"mlp.0": x0.T @ x0, "mlp.1": x1.T @ x1}
    groups = {"mlp.0": "mlp.0", "mlp.1": "mlp.1"}
    projector = NullSpaceProjector.from_covariances(covariances, groups, NullSpaceRule(alpha=1e-10))
    layers = resolve_protected_layers(model, [r"mlp\.\d"])
    return ConstrainedUpdate(layers, projector), projector, {"mlp.0": x0.float(), "mlp.1": x1.float()}


def test_projected_gradients_are_null_space_components():
    model = TwoLayer()
    update, projector, inputs = build(model)
    grads = {}
    for name, param in model.named_parameters():
        param.grad = torch.randn_like(param)
        grads[name] = param.grad.clone()
    update.project_gradients_()
    for name in ("mlp.0", "mlp.1"):
        g = model.get_submodule(name).weight.grad
        expected = grads[f"{name}.weight"].double() @ projector.factor_for(name).dense().double()
        torch.testing.assert_close(g.double(), expected, atol=1e-6, rtol=0)
        # a step along the projected gradient leaves the outputs on the preservation inputs unchanged
        assert float((inputs[name] @ g.T).norm()) <= 1e-5
        assert float(g.norm()) > 0.1 * float(grads[f"{name}.weight"].norm())
    # unprotected parameters are untouched
    assert torch.equal(model.other.weight.grad, grads["other.weight"])
    assert torch.equal(model.other.bias.grad, grads["other.bias"])


def test_frozen_or_gradless_parameters_are_skipped():
    model = TwoLayer()
    update, _, _ = build(model)
    model.mlp[0].weight.requires_grad_(False)
    model.mlp[0].weight.grad = torch.ones_like(model.mlp[0].weight)
    model.mlp[1].weight.grad = None
    update.project_gradients_()
    assert torch.equal(model.mlp[0].weight.grad, torch.ones_like(model.mlp[0].weight))
    assert model.mlp[1].weight.grad is None


class ThreeKinds(torch.nn.Module):
    """One linear of each kind the gradient null fraction is reported by: MLP, attention and the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].mlp = torch.nn.Module()
        self.layers[0].mlp.up_proj = torch.nn.Linear(8, 5, bias=False)
        self.layers[0].self_attn = torch.nn.Module()
        self.layers[0].self_attn.q_proj = torch.nn.Linear(8, 4, bias=False)
        self.lm_head = torch.nn.Linear(6, 7, bias=False)


def test_gradient_null_fraction_overall_and_per_layer_kind():
    """``‖gP‖/‖g‖`` per kind and overall, against the dense projectors by hand; a gradless kind is left out."""
    torch.manual_seed(1)
    model = ThreeKinds()
    names = {"mlp": "layers.0.mlp.up_proj", "attention": "layers.0.self_attn.q_proj", "other": "lm_head"}
    inputs = {
        names["mlp"]: torch.randn(3, 8, dtype=torch.float64),
        names["attention"]: torch.randn(6, 8, dtype=torch.float64),
        names["other"]: torch.randn(2, 6, dtype=torch.float64),
    }
    covariances = {name: x.T @ x for name, x in inputs.items()}
    projector = NullSpaceProjector.from_covariances(covariances, {n: n for n in covariances}, NullSpaceRule(1e-10))
    update = ConstrainedUpdate(resolve_protected_layers(model, list(covariances)), projector)
    kept, total = {}, {}
    for kind, name in names.items():
        g = torch.randn_like(model.get_submodule(name).weight)
        model.get_submodule(name).weight.grad = g
        kept[kind] = float((g.double() @ projector.factor_for(name).dense().double()).pow(2).sum())
        total[kind] = float(g.double().pow(2).sum())
    fractions = update.gradient_null_fraction()
    assert set(fractions) == {"mlp", "attention", "other", "all"}
    for kind in names:
        assert abs(fractions[kind] - (kept[kind] / total[kind]) ** 0.5) <= 1e-6, kind
    expected_all = (sum(kept.values()) / sum(total.values())) ** 0.5
    assert abs(fractions["all"] - expected_all) <= 1e-6
    assert len({round(f, 3) for f in fractions.values()}) == 4  # different null spaces give different shares

    model.lm_head.weight.grad = None
    assert set(update.gradient_null_fraction()) == {"mlp", "attention", "all"}
    for name in names.values():
        model.get_submodule(name).weight.grad = None
    assert update.gradient_null_fraction() == {}
