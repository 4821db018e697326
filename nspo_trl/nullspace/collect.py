"""Streaming preservation statistics from forward hooks on the reference model.

For each protected ``nn.Linear`` (input width ``n``) and every non-padding token ``t`` of the
preservation data, the layer input is ``x_t ∈ R^n``. The collector accumulates

    C = Σ_t x_t x_tᵀ  ∈ R^{n×n}        (float64 or float32, streamed batch by batch)

without keeping activations, and optionally keeps a uniform random sample of up to ``s`` rows
``x_t`` (``(s, n)``, float32) to measure leakage ``‖(W − W_ref) Xᵀ‖ / ‖W_ref Xᵀ‖`` later.

Layers that read the *same tensor* in a forward pass (Llama/Qwen: ``q/k/v_proj``;
``gate_proj``/``up_proj``) are detected on the first batch and share one ``C`` and one
sample: only the group's first module accumulates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from nspo_trl.nullspace.sharding import all_reduce_sum, is_distributed, rank_and_world
from nspo_trl.utils import progress_bar_disabled


class CovarianceCollector:
    """Accumulates per-group covariances (and token samples) while the model runs forward.

    Usage::

        collector = CovarianceCollector(modules, dtype=torch.float64, sample_tokens=512)
        with collector.hooks():
            for batch in batches:
                collector.set_mask(batch["attention_mask"])
                model(**batch)
        collector.reduce_to_owners(owners)  # sums over ranks; keeps each C on its owner only
        collector.covariances           # {group: (n, n)} of the groups this rank owns
        collector.groups                # {module name: group}

    A memory-bounded build (see :func:`covariance_chunks`) first learns the groups from one batch
    (``accumulate_covariance=False``), then runs one pass per chunk with ``groups`` given and
    ``only`` set to the chunk's groups.

    Args:
        modules: protected layers by name; the hook reads each one's first positional input.
        dtype: accumulation dtype of ``C`` (``torch.float64`` or ``torch.float32``).
        sample_tokens: rows of ``x`` to keep per group for leakage probes (0: none).
        seed: seed of the sampling generator (token choice is shared across groups).
        accumulate_covariance: ``False`` keeps only the token samples (held-out probes).
        groups: module → group from an earlier pass (skips detection on the first batch).
        only: accumulate only these groups (``None``: all).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        dtype: torch.dtype = torch.float64,
        sample_tokens: int = 0,
        seed: int = 0,
        accumulate_covariance: bool = True,
        groups: Mapping[str, str] | None = None,
        only: Iterable[str] | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"nspo_covariance_dtype must be float32 or float64, got {dtype}")
        self.modules = dict(modules)
        self.dtype = dtype
        self.sample_tokens = sample_tokens
        self.accumulate_covariance = accumulate_covariance
        # known groups (from an earlier pass) skip detection; ``only``: the groups this pass accumulates
        self.groups: dict[str, str] = dict(groups or {})
        self.only: set[str] | None = None if only is None else set(only)
        self.covariances: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        self._samples: dict[str, torch.Tensor] = {}
        self._sample_keys: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._mask: torch.Tensor | None = None
        self._batch_keys: torch.Tensor | None = None
        self._first_batch_inputs: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ driving
    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """Set the ``(batch, seq)`` mask of real tokens for the next forward pass."""
        self._mask = attention_mask.bool()
        if self.sample_tokens:
            # one random priority per real token, shared by every group: the kept rows are the
            # globally smallest priorities, i.e. a uniform sample without replacement
            self._batch_keys = torch.rand(int(self._mask.sum()), generator=self._generator)
        if not self.groups:
            self._first_batch_inputs = {}

    @contextmanager
    def hooks(self):
        handles = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._first_batch_inputs = None

    def finish_grouping(self) -> None:
        """Turn the first batch's input identities into groups (called after the first forward)."""
        if self.groups or self._first_batch_inputs is None:
            return
        missing = [name for name in self.modules if name not in self._first_batch_inputs]
        if missing:
            raise RuntimeError(f"protected modules never ran on preservation data: {missing[:5]}")
        self.groups.update(input_groups(self._first_batch_inputs))
        # the first batch was accumulated by every module; keep one copy per group
        for name, leader in self.groups.items():
            if name != leader:
                self.covariances.pop(name, None)
                self.token_counts.pop(name, None)
                self._samples.pop(name, None)
                self._sample_keys.pop(name, None)
        self._first_batch_inputs = None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._first_batch_inputs is not None:
                # holding the reference keeps the tensor alive, so identity stays meaningful
                self._first_batch_inputs[name] = x
            elif self.groups.get(name, name) != name:
                return  # a follower: its leader accumulates the shared input
            elif self.only is not None and name not in self.only:
                return  # another pass accumulates this group
            self._accumulate(name, x)

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        if self._mask is None:
            raise RuntimeError("call set_mask(attention_mask) before each forward pass")
        if tuple(x.shape[:-1]) != tuple(self._mask.shape):
            raise RuntimeError(f"{name}: input shape {tuple(x.shape)} does not match mask {tuple(self._mask.shape)}")
        rows = x.detach()[self._mask.to(x.device)].to(self.dtype)  # (tokens, n)
        self.token_counts[name] = self.token_counts.get(name, 0) + rows.shape[0]
        if self.accumulate_covariance:
            cov = self.covariances.get(name)
            if cov is None:
                n = rows.shape[-1]
                cov = self.covariances[name] = torch.zeros(n, n, dtype=self.dtype, device=rows.device)
            cov.addmm_(rows.T, rows)
        if self.sample_tokens:
            self._keep_sample(name, rows.float().cpu())

    def _keep_sample(self, name: str, rows: torch.Tensor) -> None:
        keys = self._batch_keys
        if name in self._samples:
            rows = torch.cat([self._samples[name], rows])
            keys = torch.cat([self._sample_keys[name], keys])
        if keys.numel() > self.sample_tokens:
            keep = torch.topk(keys, self.sample_tokens, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self._samples[name], self._sample_keys[name] = rows, keys

    # ------------------------------------------------------------------ results
    def reduce_to_owners(self, owners: Mapping[str, int]) -> None:
        """Sum each group's covariance over data-parallel ranks onto its owner (``sharding.py``).

        Every rank saw its own shard of the data; afterwards only the owner of a group keeps its
        ``C`` and its token sample, and every rank knows every group's total token count.
        """
        rank, _ = rank_and_world()
        if is_distributed():
            for group in sorted(self.covariances):
                dist.reduce(self.covariances[group], dst=owners.get(group, 0))
            counts = all_reduce_sum([float(self.token_counts[g]) for g in sorted(self.token_counts)])
            self.token_counts = {g: int(c) for g, c in zip(sorted(self.token_counts), counts, strict=True)}
        for group in list(self.covariances):
            if owners.get(group, 0) != rank:
                del self.covariances[group]
        for group in list(self._samples):
            if owners.get(group, 0) != rank:
                del self._samples[group], self._sample_keys[group]

    @property
    def samples(self) -> dict[str, torch.Tensor]:
        """Per-group ``(s, n)`` float32 token samples (this rank's data)."""
        return dict(self._samples)


def input_groups(inputs: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Module → its group's leader: modules whose forward received the very same input tensor (``is``) share a
    group, led by the first of them in ``inputs``' order (q/k/v read one input, gate/up another)."""
    leaders: list[tuple[torch.Tensor, str]] = []
    groups: dict[str, str] = {}
    for name, x in inputs.items():
        leader = next((lead for seen, lead in leaders if seen is x), None)
        if leader is None:
            leaders.append((x, name))
            leader = name
        groups[name] = leader
    return groups


def run_collection(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    collector: CovarianceCollector,
    progress: bool = False,
    description: str = "NSPO preservation activations",
    total: int | None = None,
) -> CovarianceCollector:
    """Run ``model`` (eval mode, no grad) over ``batches`` with the collector's hooks attached.

    Each batch needs ``input_ids`` and ``attention_mask`` (``(batch, seq)``), and may carry a
    ``collect_mask`` of the tokens to collect (default: the attended ones); the model's train/eval
    mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), collector.hooks():
            for batch in tqdm(batches, desc=description, disable=progress_bar_disabled(progress), total=total):
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                # "collect_mask": the tokens to collect when they differ from those attended (padding batches)
                collector.set_mask(batch.get("collect_mask", attention_mask).to(device))
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                collector.finish_grouping()
    finally:
        model.train(was_training)
    return collector


def covariance_chunks(widths: Mapping[str, int], bytes_per_element: int, budget_bytes: int) -> list[list[str]]:
    """Split groups (``widths``: group → input width ``n``) into passes whose covariances fit ``budget_bytes``.

    A pass over the preservation data holds ``Σ_g n_g² · b`` bytes of covariance on every rank
    (each rank sums its share of the data for every group of the pass, then the sums are reduced onto
    the groups' owners and decomposed there). Groups are packed largest first into the first pass
    with room left (first-fit decreasing); a group larger than the budget gets a pass of its own.
    The trade-off: the peak covariance memory per rank falls to about ``budget_bytes`` (never below
    the largest single group), while the preservation forward runs once per pass, so build time
    grows with the number of passes (Qwen2.5-7B MLP, float32, 8 GiB: 38.8 GiB of covariances in 6 passes).
    """
    if budget_bytes <= 0:
        raise ValueError(f"covariance_chunks: budget must be positive, got {budget_bytes} bytes")
    chunks: list[list[str]] = []
    used: list[int] = []
    for group in sorted(widths, key=lambda g: (-widths[g], g)):
        size = widths[group] ** 2 * bytes_per_element
        index = next((i for i, u in enumerate(used) if u + size <= budget_bytes), None)
        if index is None:
            chunks.append([])
            used.append(0)
            index = len(chunks) - 1
        chunks[index].append(group)
        used[index] += size
    return chunks
