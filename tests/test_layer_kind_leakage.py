"""``layer_kind_leakage``: each kind's figure against an independent float64 computation, the output layer included.

A trained copy of the tiny model gets one known change per parameter kind; the figure of each kind must equal
``‖X ΔWᵀ‖/‖X W_refᵀ‖`` computed from inputs captured by plain forward hooks (``conftest.capture_inputs``), and
the kinds left alone must read exactly 0.
"""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import capture_inputs, leakage, load_reference

from nspo_trl.eval.tax import layer_kind_leakage
from nspo_trl.models.tiny_model import build_tiny_model
from nspo_trl.nullspace.targets import untie_output_embeddings

PAD = 0
SEQUENCES = [[5, 17, 42, 99, 3], [7, 8, 9], [200, 201, 202, 203, 204, 205, 206], [11, 12]]
MLP, ATTENTION = "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def nudge(weight: torch.nn.Parameter, seed: int, scale: float = 1e-2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.add_(scale * torch.randn(weight.shape, generator=generator))


def test_each_linear_kind_matches_an_independent_computation(tiny_model_dir):
    reference = load_reference(tiny_model_dir)
    model = copy.deepcopy(reference)
    nudge(model.get_submodule(MLP).weight, 0)
    nudge(model.get_submodule(ATTENTION).weight, 1)
    nudge(model.lm_head.weight, 2)  # untied: the output layer alone, the embeddings untouched

    kinds = layer_kind_leakage(model, reference, SEQUENCES, PAD)

    x = capture_inputs(reference, SEQUENCES, [MLP, ATTENTION, "lm_head"], PAD)
    for kind, name in (("mlp", MLP), ("attention", ATTENTION), ("other", "lm_head")):
        expected = leakage(model.get_submodule(name).weight, reference.get_submodule(name).weight, x[name])
        assert expected > 1e-4
        assert kinds[kind] == pytest.approx(expected, rel=1e-4), kind
    assert kinds["embedding"] == 0.0 and kinds["norm"] == 0.0


def test_a_tied_embedding_change_shows_on_both_of_its_uses(tied_model_dir):
    reference = load_reference(tied_model_dir)
    model = copy.deepcopy(reference)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    nudge(model.get_input_embeddings().weight, 3)

    kinds = layer_kind_leakage(model, reference, SEQUENCES, PAD)

    # the output side: the final hidden states through the changed shared matrix
    x = capture_inputs(reference, SEQUENCES, ["lm_head"], PAD)["lm_head"]
    assert kinds["other"] == pytest.approx(leakage(model.lm_head.weight, reference.lm_head.weight, x), rel=1e-4)
    # the input side: the rows of the tokens that occur
    rows = torch.tensor(sorted({t for s in SEQUENCES for t in s}))
    emb, emb_ref = model.get_input_embeddings().weight.detach(), reference.get_input_embeddings().weight.detach()
    assert kinds["embedding"] == pytest.approx(float((emb[rows] - emb_ref[rows]).norm() / emb_ref[rows].norm()))
    assert kinds["other"] > 1e-4 and kinds["embedding"] > 1e-4
    assert kinds["mlp"] == kinds["attention"] == kinds["norm"] == 0.0


def test_an_untied_copy_trained_on_its_output_layer_leaves_the_embeddings(tied_model_dir):
    reference = load_reference(tied_model_dir)
    model = copy.deepcopy(reference)
    assert untie_output_embeddings(model) > 0
    nudge(model.lm_head.weight, 4)

    kinds = layer_kind_leakage(model, reference, SEQUENCES, PAD)

    x = capture_inputs(reference, SEQUENCES, ["lm_head"], PAD)["lm_head"]
    assert kinds["other"] == pytest.approx(leakage(model.lm_head.weight, reference.lm_head.weight, x), rel=1e-4)
    assert kinds["other"] > 1e-4
    assert kinds["embedding"] == 0.0


def test_norm_leakage_is_the_largest_relative_change(tiny_model_dir):
    reference = load_reference(tiny_model_dir)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(1.01)
        model.model.norm.weight.mul_(1.03)

    kinds = layer_kind_leakage(model, reference, SEQUENCES, PAD)

    assert kinds["norm"] == pytest.approx(0.03, rel=1e-5)
    assert kinds["mlp"] == kinds["attention"] == kinds["other"] == kinds["embedding"] == 0.0
