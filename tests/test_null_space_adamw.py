"""``NullSpaceAdamW``: AdamW on ``A`` for ``W = W_ref + A U₀ᵀ``, checked against torch's own AdamW."""

from __future__ import annotations

import pytest
import torch

from nspo_trl.nullspace import NullSpaceAdamW, NullSpaceRule, SubspaceFactor

M, N, K = 6, 10, 3


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0][:, :k].float()


def loss_of(weight: torch.Tensor, step: int) -> torch.Tensor:
    """A loss whose gradient changes from step to step (so the moments matter), with a nonzero curvature."""
    generator = torch.Generator().manual_seed(100 + step)
    target = torch.randn(M, N, generator=generator)
    inputs = torch.randn(4, N, generator=generator)
    return ((weight - target) @ inputs.T).pow(2).sum() + weight.pow(3).sum()


def run(optimizer, parameter: torch.nn.Parameter, steps: int, weight_of=lambda p: p) -> list[torch.Tensor]:
    trajectory = []
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(weight_of(parameter), step).backward()
        optimizer.step()
        trajectory.append(weight_of(parameter).detach().clone())
    return trajectory


def start() -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("basis", ["identity", "none"])
def test_a_full_axis_aligned_basis_or_none_is_torch_adamw(basis):
    """With ``U₀ = I`` (every direction free, axis-aligned) or no basis the optimizer is AdamW, decay included."""
    ours, theirs = torch.nn.Parameter(start()), torch.nn.Parameter(start())
    bases = {ours: torch.eye(N)} if basis == "identity" else {}
    settings = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    mine = run(NullSpaceAdamW([ours], bases, **settings), ours, 6)
    reference = run(torch.optim.AdamW([theirs], **settings), theirs, 6)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_it_is_adamw_on_the_null_space_coordinates():
    """Without decay the weight trajectory equals AdamW's on ``A`` with ``W = W_ref + A U₀ᵀ``."""
    u0 = orthonormal(N, K, seed=1)
    weight = torch.nn.Parameter(start())
    coordinates = torch.nn.Parameter(torch.zeros(M, K))
    anchor = start()
    settings = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    mine = run(NullSpaceAdamW([weight], {weight: u0}, **settings), weight, 8)
    reference = run(torch.optim.AdamW([coordinates], **settings), coordinates, 8, lambda a: anchor + a @ u0.T)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (mine[-1] - anchor).norm() > 0.1  # it did move


def test_every_step_lies_in_the_null_space_where_projected_adamw_throws_much_away():
    """``(W − W_ref) U_r = 0`` after every step, decay included; the step AdamW takes from the same gradients
    has a large part outside the null space (what the default's weight projection discards)."""
    basis = orthonormal(N, N, seed=2)
    u0, range_basis = basis[:, :K], basis[:, K:]
    weight, plain = torch.nn.Parameter(start()), torch.nn.Parameter(start())
    settings = dict(lr=0.05, weight_decay=0.1)
    ours = run(NullSpaceAdamW([weight], {weight: u0}, **settings), weight, 8)
    theirs = run(torch.optim.AdamW([plain], **settings), plain, 1)
    for w in ours:
        moved = w - start()
        assert float((moved @ range_basis).norm() / moved.norm()) <= 1e-6
    step = theirs[0] - start()
    assert float((step @ range_basis).norm() / step.norm()) >= 0.5


def test_a_resumed_optimizer_continues_exactly():
    """Its moments are ``(m, k)`` and go through ``state_dict``; the bases come from the projector again."""
    u0 = orthonormal(N, K, seed=3)
    straight = torch.nn.Parameter(start())
    expected = run(NullSpaceAdamW([straight], {straight: u0}, lr=0.05), straight, 6)[-1]

    first = torch.nn.Parameter(start())
    optimizer = NullSpaceAdamW([first], {first: u0}, lr=0.05)
    run(optimizer, first, 3)
    assert optimizer.state[first]["exp_avg"].shape == (M, K) == optimizer.state[first]["exp_avg_sq"].shape
    saved = optimizer.state_dict()
    resumed = torch.nn.Parameter(first.detach().clone())
    again = NullSpaceAdamW([resumed], {resumed: u0.clone()}, lr=0.05)
    again.load_state_dict(saved)
    for step in range(3, 6):
        again.zero_grad()
        loss_of(resumed, step).backward()
        again.step()
    torch.testing.assert_close(resumed.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("basis_shape", "settings", "message"),
    [
        ((N + 1, K), {}, "does not fit"),
        ((K,), {}, "does not fit"),
        ((M, K), {}, "does not fit"),
        ((N, K), {"lr": -1.0}, "invalid lr"),
        ((N, K), {"betas": (0.9, 1.0)}, "invalid lr"),
        ((N, K), {"eps": -1e-8}, "invalid lr"),
        ((N, K), {"weight_decay": -0.1}, "invalid lr"),
    ],
)
def test_bad_bases_and_settings_are_refused(basis_shape, settings, message):
    weight = torch.nn.Parameter(start())
    with pytest.raises(ValueError, match=message) as info:
        NullSpaceAdamW([weight], {weight: torch.zeros(basis_shape)}, **settings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("null_share", [0.3, 0.8])
def test_null_basis_spans_the_projector_whichever_basis_is_stored(null_share):
    """Stored as ``U₀`` (few null directions) or as the range ``U_r`` (many): ``null_basis()`` is orthonormal and
    ``U₀ U₀ᵀ = P``."""
    n = 12
    generator = torch.Generator().manual_seed(4)
    eigenvectors = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    k = int(null_share * n)
    spectrum = torch.cat([torch.full((k,), 1e-12), torch.linspace(1.0, 2.0, n - k)]).double()
    covariance = eigenvectors @ torch.diag(spectrum) @ eigenvectors.T
    factor = SubspaceFactor.from_covariance(covariance, NullSpaceRule(alpha=1e-6))
    assert factor.null_dim == k and factor.kind == ("null" if k <= n - k else "range")
    u0 = factor.null_basis()
    assert u0.shape == (n, k)
    torch.testing.assert_close(u0.T @ u0, torch.eye(k), rtol=0, atol=1e-5)
    torch.testing.assert_close(u0 @ u0.T, factor.dense(), rtol=0, atol=1e-5)
