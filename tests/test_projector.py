"""Factor-form projector against the dense textbook formula, on random data."""

import pytest
import torch

from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor, tensor_digest
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.sharding import assign_owners, rank_loads


def low_rank_activations(n: int, tokens: int, rank: int, seed: int = 0) -> torch.Tensor:
    """(tokens, n) activations spanning a `rank`-dimensional subspace plus tiny noise, with a steep spectrum."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, -2, rank, dtype=torch.float64)
    coeffs = torch.randn(tokens, rank, generator=g, dtype=torch.float64) * scales
    return coeffs @ basis.T + 1e-9 * torch.randn(tokens, n, generator=g, dtype=torch.float64)


def dense_reference(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference code's recipe: SVD of C = XᵀX, keep singular vectors with S < alpha·max(S)."""
    cov = x.T @ x
    u, s, _ = torch.linalg.svd(cov)
    null = u[:, s < alpha * s.max()]
    return null @ null.T


@pytest.mark.parametrize(("n", "rank"), [(48, 10), (48, 40), (96, 90), (64, 0)])
def test_factor_matches_dense_formula(n, rank):
    alpha = 5e-5
    x = low_rank_activations(n, tokens=500, rank=rank) if rank else torch.randn(500, n, dtype=torch.float64)
    factor = SubspaceFactor.from_covariance(x.T @ x, NullSpaceRule(alpha=alpha), basis_dtype=torch.float64)
    reference = dense_reference(x, alpha)
    expected_null = round(torch.trace(reference).item())
    assert factor.null_dim == expected_null == (n - rank if rank else 0)
    # the thinner basis is what gets stored
    assert factor.basis.shape[1] == min(expected_null, n - expected_null)
    assert factor.kind == ("null" if expected_null <= n - expected_null else "range")
    p = factor.dense()
    torch.testing.assert_close(p, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)  # idempotent
    torch.testing.assert_close(p, p.T, atol=1e-12, rtol=0)  # symmetric


def test_update_leaves_preservation_outputs_unchanged():
    n, m = 64, 40
    x = low_rank_activations(n, tokens=300, rank=24, seed=1)  # (tokens, n)
    factor = SubspaceFactor.from_covariance(x.T @ x, NullSpaceRule(alpha=5e-5))
    delta = torch.randn(m, n, dtype=torch.float64)
    projected = factor.apply(delta.float()).double()
    # (D P) X ≈ 0 relative to D X, and the update still has most of its null-space part
    assert (projected @ x.T).norm() / (delta @ x.T).norm() < 1e-6
    assert projected.norm() > 0.5 * delta.norm()
    # descent: <g, gP> = ‖gP‖² ≥ 0
    g = torch.randn(m, n)
    gp = factor.apply(g)
    torch.testing.assert_close((g * gp).sum(), (gp * gp).sum(), rtol=1e-5, atol=1e-5)


def test_rank_cap_and_energy_are_conservative():
    x = low_rank_activations(32, tokens=200, rank=8, seed=2)
    cov = x.T @ x
    assert SubspaceFactor.from_covariance(cov, NullSpaceRule()).null_dim == 24
    assert SubspaceFactor.from_covariance(cov, NullSpaceRule(max_null_rank=5)).null_dim == 5
    lam = torch.linalg.eigvalsh(cov)
    # energy 0.9 keeps the top directions carrying 90% of tr(C); fewer than 8 of them suffice
    range_dim = int((torch.flip(lam, [0]).cumsum(0) < 0.9 * lam.sum()).sum()) + 1
    assert range_dim < 8
    assert SubspaceFactor.from_covariance(cov, NullSpaceRule(energy=0.9)).null_dim == 24  # alpha still binds
    loose = NullSpaceRule(alpha=0.5, energy=0.9)
    assert SubspaceFactor.from_covariance(cov, loose).null_dim == min(
        32 - range_dim, int((lam <= 0.5 * lam[-1]).sum())
    )


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, 2.0])
def test_alpha_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="nspo_alpha"):
        NullSpaceRule(alpha=bad)


def test_zero_covariance_is_an_error():
    with pytest.raises(ValueError, match="no preservation tokens"):
        SubspaceFactor.from_covariance(torch.zeros(4, 4), NullSpaceRule())


def test_save_load_roundtrip(tmp_path):
    x = low_rank_activations(16, tokens=100, rank=6, seed=3)
    projector = NullSpaceProjector.from_covariances(
        {"a": x.T @ x, "b": torch.eye(16, dtype=torch.float64)},
        {"a": "a", "a2": "a", "b": "b"},
        NullSpaceRule(alpha=1e-4),
        metadata={"model_fingerprint": "abc"},
    )
    assert projector.frozen_modules() == ["b"]
    projector.save(tmp_path / "proj")
    projector.save(tmp_path / "proj")  # overwrite in place
    loaded = NullSpaceProjector.load(tmp_path / "proj")
    assert loaded.groups == projector.groups and loaded.metadata == {"model_fingerprint": "abc"}
    assert loaded.rule == NullSpaceRule(alpha=1e-4)
    delta = torch.randn(5, 16)
    for module in ("a", "a2", "b"):
        torch.testing.assert_close(loaded.apply(module, delta), projector.apply(module, delta))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no staging leftovers


def test_load_keeps_only_the_bases_this_rank_owns(tmp_path):
    """A rank that does not own a group knows its spectrum and null dimension but holds no basis."""
    x = low_rank_activations(16, tokens=100, rank=6, seed=4)
    projector = NullSpaceProjector.from_covariances(
        {"a": x.T @ x, "b": x.T @ x + torch.eye(16, dtype=torch.float64)}, {"a": "a", "b": "b"}, NullSpaceRule()
    )
    projector.save(tmp_path / "proj")
    loaded = NullSpaceProjector.load(tmp_path / "proj", owners={"a": 0, "b": 1})  # this process is rank 0
    assert loaded.factors["a"].basis is not None and loaded.factors["b"].basis is None
    assert loaded.factors["b"].null_dim == projector.factors["b"].null_dim == 0
    assert loaded.stats() == projector.stats() and loaded.summary() == projector.summary()
    with pytest.raises(RuntimeError, match="does not own"):
        loaded.apply("b", torch.randn(2, 16))


def test_owner_assignment_is_balanced_and_deterministic():
    costs = {f"g{i}": c for i, c in enumerate([9, 7, 6, 5, 5, 4, 3, 3, 2, 1])}
    owners = assign_owners(costs, 3)
    assert owners == assign_owners(dict(reversed(list(costs.items()))), 3)  # independent of order
    assert set(owners) == set(costs) and set(owners.values()) == {0, 1, 2}
    loads = rank_loads(costs, owners, 3)
    assert sum(loads) == sum(costs.values())
    assert max(loads) - min(loads) <= max(costs.values())
    assert assign_owners(costs, 1) == dict.fromkeys(costs, 0)


def _saved_projector(directory):
    x = low_rank_activations(16, tokens=100, rank=6, seed=3)
    NullSpaceProjector.from_covariances({"a": x.T @ x}, {"a": "a"}, NullSpaceRule(alpha=1e-4)).save(directory)
    return directory


def _factors(directory):
    return next(directory.glob("factors-rank*.safetensors"))


PROJECTOR_DAMAGE = {
    "garbled json": (lambda d: (d / "projector.json").write_text('{"groups": {"a": '), "projector.json"),
    "json not an object": (lambda d: (d / "projector.json").write_text("[1, 2]"), "projector.json"),
    "json without factors": (lambda d: (d / "projector.json").write_text('{"groups": {}}'), "projector.json"),
    "json not utf-8": (lambda d: (d / "projector.json").write_bytes(b"\xff\xfe{"), "projector.json"),
    "json missing": (lambda d: (d / "projector.json").unlink(), "projector.json"),
    "factors truncated": (lambda d: _factors(d).write_bytes(_factors(d).read_bytes()[:40]), "factors-rank"),
    "factors garbage": (lambda d: _factors(d).write_bytes(b"\x00" * 64), "factors-rank"),
    "factors missing": (lambda d: _factors(d).unlink(), "factors-rank"),
}


@pytest.mark.parametrize("case", sorted(PROJECTOR_DAMAGE))
def test_unreadable_projector_is_one_line_naming_the_file(tmp_path, case):
    damage, named = PROJECTOR_DAMAGE[case]
    directory = _saved_projector(tmp_path / "proj")
    damage(directory)
    with pytest.raises(ValueError) as info:
        NullSpaceProjector.load(directory)
    message = str(info.value)
    assert named in message and str(directory) in message and "\n" not in message, message


@pytest.mark.parametrize("numel", [4096, 884_736, 28_311_552, 67_895_296])  # up to Qwen2.5-7B's gate_proj
def test_tensor_digest_samples_the_last_element_of_any_size(numel):
    """Past 2^24 elements float32 spacing rounds the last sampled index to ``numel``; the digest still reads the
    last element (and no further), and a change there changes it."""
    tensor = torch.zeros(numel)
    before = tensor_digest({"w": tensor})
    tensor[-1] = 1.0
    assert tensor_digest({"w": tensor}) != before
