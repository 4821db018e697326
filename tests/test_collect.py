"""Streaming covariance collection: exact sums, padding masked, shared inputs grouped, uniform samples."""

import pytest
import torch
from torch import nn

from nspo_trl.nullspace.collect import CovarianceCollector, run_collection


class TwoBranch(nn.Module):
    """a and b read the same tensor; c reads a different one (like gate/up vs down)."""

    def __init__(self, width=6):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, 5), nn.Linear(width, 5), nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        x = torch.sin(input_ids.float().unsqueeze(-1) * torch.linspace(0.01, 0.07, self.a.in_features))
        return self.c(torch.relu(self.a(x)) * self.b(x))


def batches(seed=0, count=3):
    """Distinct token ids everywhere, so each real row can be traced back to one position."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(5000, generator=g) + 1
    out = []
    for index in range(count):
        ids = pool[index * 28 : (index + 1) * 28].reshape(4, 7).clone()
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[0, 5:] = 0
        mask[2, 3:] = 0
        ids[mask == 0] = 9999  # padding values that must not reach C
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def reference_rows(model, data, layer):
    rows = []

    def hook(module, args):
        rows.append(args[0][current["mask"]].double())

    current = {}
    handle = getattr(model, layer).register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in data:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch)
    handle.remove()
    return torch.cat(rows)


def test_covariances_are_exact_masked_and_shared():
    model = TwoBranch()
    data = batches()
    collector = run_collection(model, data, CovarianceCollector({"a": model.a, "b": model.b, "c": model.c}))
    assert collector.groups == {"a": "a", "b": "a", "c": "c"}
    assert set(collector.covariances) == {"a", "c"}
    real_tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert collector.token_counts == {"a": real_tokens, "c": real_tokens}
    for layer in ("a", "c"):
        x = reference_rows(model, data, layer)
        torch.testing.assert_close(collector.covariances[layer], x.T @ x, rtol=1e-12, atol=1e-12)


def test_float32_accumulation_is_close_to_float64():
    model = TwoBranch()
    c64 = run_collection(model, batches(), CovarianceCollector({"c": model.c})).covariances["c"]
    c32 = run_collection(model, batches(), CovarianceCollector({"c": model.c}, dtype=torch.float32)).covariances["c"]
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), c64, rtol=1e-5, atol=1e-5)


class Echo(nn.Module):
    """Both layers read the token id itself (n = 1), so every sampled row names its token exactly."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(1, 1), nn.Linear(1, 1)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        ids = input_ids.float().unsqueeze(-1)
        return self.second(ids + 0.0) + self.first(ids)


def real_ids(data) -> list[int]:
    return [int(i) for b in data for i in b["input_ids"][b["attention_mask"].bool()]]


def test_samples_are_real_rows_capped_and_shared_across_groups():
    model = Echo()
    data = batches(count=5)
    collector = run_collection(
        model, data, CovarianceCollector({"first": model.first, "second": model.second}, sample_tokens=16)
    )
    assert collector.groups == {"first": "first", "second": "second"}  # different tensors: not shared
    first, second = (collector.samples[name].squeeze(-1).long().tolist() for name in ("first", "second"))
    assert len(first) == 16 and len(set(first)) == 16  # capped, without replacement
    assert set(first) <= set(real_ids(data))  # real tokens only, never padding
    assert first == second  # both groups sampled the same tokens


def test_sampling_is_uniform_over_tokens():
    """Priority sampling must not favour early or late batches: mean sampled position ≈ the middle."""
    model = Echo()
    data = batches(count=20)
    position_of = {token: index for index, token in enumerate(real_ids(data))}
    positions = []
    for seed in range(50):
        collector = run_collection(
            model, data, CovarianceCollector({"first": model.first}, sample_tokens=10, seed=seed)
        )
        positions += [position_of[int(t)] for t in collector.samples["first"].squeeze(-1)]
    total = len(position_of)
    mean = sum(positions) / len(positions)
    # 500 uniform draws from `total` positions: the mean's standard error is total / sqrt(12 * 500) ≈ 0.013·total
    assert abs(mean - (total - 1) / 2) < 0.05 * total
    # and no quarter of the data is starved
    quarters = [sum(q * total // 4 <= p < (q + 1) * total // 4 for p in positions) for q in range(4)]
    assert min(quarters) > 0.15 * len(positions), quarters


def test_missing_mask_and_unused_layer_are_errors():
    model = TwoBranch()
    collector = CovarianceCollector({"a": model.a})
    with pytest.raises(RuntimeError, match="set_mask"), collector.hooks(), torch.no_grad():
        model(**batches()[0])
    unused = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="never ran"):
        run_collection(model, batches(), CovarianceCollector({"a": model.a, "unused": unused}))


def test_covariance_chunks_respect_the_budget_and_cover_every_group_once():
    from nspo_trl.nullspace.collect import covariance_chunks

    widths = {f"layers.{i}.mlp.gate_proj": 3584 for i in range(28)} | {
        f"layers.{i}.mlp.down_proj": 18944 for i in range(28)
    }
    budget = 8 * 2**30
    chunks = covariance_chunks(widths, 4, budget)
    assert sorted(g for chunk in chunks for g in chunk) == sorted(widths)
    assert all(sum(widths[g] ** 2 * 4 for g in chunk) <= budget for chunk in chunks)
    assert len(chunks) == 6  # 28 down_proj covariances of 1.34 GiB, at most 5 per 8 GiB pass
    assert covariance_chunks(widths, 4, 10**15) == [sorted(widths, key=lambda g: (-widths[g], g))]
    huge = covariance_chunks({"a": 100, "b": 10}, 8, 1000)  # a group over budget gets its own pass
    assert huge == [["a"], ["b"]]
    with pytest.raises(ValueError):
        covariance_chunks(widths, 4, 0)
