"""Build a :class:`NullSpaceProjector` from a model, a tokenizer and preservation data: no trainer needed.

For every input group ``g`` (the protected linears that read the same input ``x ∈ Rⁿ``), the reference
model's inputs on the preservation examples give ``C_g = Σ_t x_t x_tᵀ ∈ Rⁿˣⁿ`` (padding masked). Its
eigenvectors with ``λ ≤ α·λmax`` (:class:`~nspo_trl.nullspace.rule.NullSpaceRule`) span the null space,
``P_g = U₀ U₀ᵀ``; the contrast subspace (``nspo_subspace: contrast``) instead keeps the directions the
harmful training prompts use most for the least held-out preservation energy
(:func:`~nspo_trl.nullspace.contrast.contrast_basis`).

Memory stays bounded: which layers share an input is learned from one batch, the covariances are
collected in as many passes as ``nspo_build_memory_gb`` allows (``covariance_chunks``), and each group is
eigendecomposed on its owner rank as soon as its pass ends. Under ZeRO-3 each module is gathered whole
only while it runs. Every rank runs the same number of forwards (collectives stay in step).

The projector's ``metadata`` records what it was built from (the protected weights' fingerprint, the
modules, the preservation data's digest, the rule); :meth:`ProjectorBuilder.load` refuses a projector
whose record differs from what the caller expects, naming the fields.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from nspo_trl.data.named_sets import seeded_subset
from nspo_trl.data.preservation import iter_batches, sequences_digest, split_heldout, tokenize_preservation
from nspo_trl.nullspace.access import full_shape, gathered, gathered_one_module_at_a_time
from nspo_trl.nullspace.collect import CovarianceCollector, covariance_chunks, run_collection
from nspo_trl.nullspace.contrast import CONTRAST_RIDGE
from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor, tensor_digest
from nspo_trl.nullspace.sharding import assign_owners, check_agreement, group_costs
from nspo_trl.nullspace.targets import ProtectedLayer
from nspo_trl.utils import progress_bar_disabled

logger = logging.getLogger(__name__)

Sequences = list[list[int]]


class ProjectorMismatchError(ValueError):
    """A stored projector was built for another model, data or rule than the one asked for."""


RULE_SETTINGS = {"alpha": "nspo_alpha", "energy": "nspo_energy", "max_null_rank": "nspo_max_null_rank"}
"""The recipe setting behind each field of a stored null-space rule."""


def describe_differences(stored: Mapping, wanted: Mapping, what: str = "the checkpoint") -> str:
    """Each differing field as ``name: <what> was built with X, this run asks for Y``, joined by ``; ``.

    Fields of the stored rule are named by the setting that sets them (``nspo_alpha``, ...); strings longer
    than 24 characters (digests) are cut to their first 14.
    """

    def shown(value) -> str:
        text = repr(value) if not isinstance(value, float) else f"{value:g}"
        return text[:15] + "…'" if isinstance(value, str) and len(value) > 24 else text

    parts = []
    for key in differing_fields(stored, wanted):
        old, new = stored.get(key), wanted[key]
        if key == "rule" and isinstance(old, Mapping) and isinstance(new, Mapping):
            for field in differing_fields(old, new):
                name = RULE_SETTINGS.get(field, f"rule.{field}")
                parts.append(f"{name}: {what} was built with {shown(old.get(field))}, this run asks for "
                             f"{shown(new[field])}")  # fmt: skip
            continue
        parts.append(f"{key}: {what} was built with {shown(old)}, this run asks for {shown(new)}")
    return "; ".join(parts)


def differing_fields(stored: Mapping, wanted: Mapping) -> list[str]:
    """Keys of ``wanted`` whose value in ``stored`` differs or is missing, sorted."""
    return sorted(key for key in wanted if key not in stored or stored[key] != wanted[key])


def prompt_sequences(dataset: Dataset | None, tokenizer, harmful: bool, max_length: int, field: str) -> Sequences:
    """Token ids of the training prompts (the harmful ones, or the benign ones, when ``is_harmful`` says which),
    rendered as generation starts (chat template + generation prompt) and cut at ``max_length`` tokens."""
    kind = "harmful" if harmful else "benign"
    if dataset is None or "prompt" not in dataset.column_names:
        raise ValueError(f"{field} needs a train_dataset with a 'prompt' column.")
    if "is_harmful" in dataset.column_names:
        dataset = dataset.filter(lambda row: bool(row["is_harmful"]) == harmful)
    elif not harmful:
        raise ValueError(f"{field} needs an 'is_harmful' column in the train_dataset to find benign prompts.")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    sequences = []
    for prompt in dataset["prompt"]:
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            sequences.append(ids)
    if not sequences:
        raise ValueError(f"{field} found no {kind} training prompt in the train_dataset.")
    return sequences


def idle_batch(pad_token_id: int) -> dict[str, torch.Tensor]:
    """One attended pad token whose activations are not collected: a forward that keeps ranks in step."""
    one = torch.ones(1, 1, dtype=torch.long)
    return {"input_ids": one * pad_token_id, "attention_mask": one, "collect_mask": torch.zeros_like(one)}


class ProjectorBuilder:
    """Builds, or loads and checks, the projector of ``layers`` of ``model``.

    Args:
        model: the reference model (the weights ``W_ref``), possibly wrapped by DeepSpeed.
        tokenizer: its tokenizer (or processor).
        layers: the protected linears (:func:`~nspo_trl.nullspace.targets.resolve_protected_layers`).
        settings: an [`NSPOConfig`] (its ``nspo_*`` fields, ``seed``, ``nullspace_rule``,
            ``covariance_torch_dtype`` and ``build_covariance_copies``).
        process_index, num_processes, is_main_process: this process's place in the run (one process by default).

    After :meth:`build`, ``preservation_sequences`` holds the token ids of the examples that built ``C``
    (``"fit"``) and of those that only measure leakage (``"heldout"``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        layers: Sequence[ProtectedLayer],
        settings,
        *,
        process_index: int = 0,
        num_processes: int = 1,
        is_main_process: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.layers, self.settings = model, tokenizer, list(layers), settings
        self.process_index, self.num_processes, self.is_main_process = process_index, num_processes, is_main_process
        self.preservation_sequences: dict[str, Sequences] = {"fit": [], "heldout": []}

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A digest of the protected weights (sampled entries of each ``W_ref``): equal for the same model."""
        with gathered([layer.linear.weight for layer in self.layers]):
            return tensor_digest({layer.name: layer.linear.weight for layer in self.layers})

    def model_identity(self, contrast_targets: Sequences | None = None, protected: Sequences | None = None) -> dict:
        """What a projector must have been built for to serve this model and rule, whatever its data."""
        settings = self.settings
        identity = {
            "model_fingerprint": self.fingerprint(),
            "target_modules": list(settings.nspo_target_modules),
            "protected_modules": [layer.name for layer in self.layers],
            "covariance_dtype": settings.nspo_covariance_dtype,
            "rule": settings.nullspace_rule.to_dict(),
        }
        if settings.nspo_subspace == "contrast":
            identity.update(
                subspace="contrast",
                contrast_budget=settings.nspo_contrast_budget,
                contrast_ridge=CONTRAST_RIDGE,
                contrast_protect_benign=settings.nspo_contrast_protect_benign,
            )
            if contrast_targets is not None:
                identity["target_digest"] = sequences_digest(contrast_targets, settings.nspo_preservation_max_length)
        if protected:
            identity["protected_digest"] = sequences_digest(protected, settings.nspo_preservation_max_length)
        return identity

    def group_owners(self, groups: dict[str, str]) -> dict[str, int]:
        """Owner rank of each input group (``groups``: module → group), balancing ``W_ref`` + basis bytes."""
        shapes = {layer.name: full_shape(layer.linear.weight) for layer in self.layers}
        costs = (
            (groups[layer.name], 0 if layer.is_lora else shapes[layer.name][0], shapes[layer.name][1])
            for layer in self.layers
        )
        owners = assign_owners(group_costs(costs, self.layers[0].linear.weight.element_size()), self.num_processes)
        check_agreement(owners, "group owners")
        return owners

    def device(self) -> torch.device:
        """Where the bases live: with the protected weights, or in host RAM with ``nspo_projector_offload``."""
        return torch.device("cpu") if self.settings.nspo_projector_offload else self.layers[0].linear.weight.device

    # ------------------------------------------------------------------ load
    def load(self, directory: str | Path, expected: dict, field: str = "nspo_projector_path") -> NullSpaceProjector:
        """The projector saved in ``directory``, after checking that it protects these layers and that its record
        matches ``expected`` (else a one-line :class:`ProjectorMismatchError` naming ``field`` and what differs)."""
        directory = Path(directory)
        groups = NullSpaceProjector.read_groups(directory)
        if set(groups) != {layer.name for layer in self.layers}:
            raise ProjectorMismatchError(
                f"{field}: {directory} protects other layers than nspo_target_modules "
                f"({len(groups)} stored, {len(self.layers)} here)."
            )
        projector = NullSpaceProjector.load(directory, device=self.device(), owners=self.group_owners(groups))
        stored = {**projector.metadata, "rule": projector.rule.to_dict()}
        if differing_fields(stored, expected):
            raise ProjectorMismatchError(
                f"{field}: {directory} was built for another {', '.join(differing_fields(stored, expected))} "
                f"({describe_differences(stored, expected, 'the projector')}); point {field} at one built for this "
                "run, or at a new folder to build one."
            )
        logger.info("NSPO: loaded the projector of %s", directory)
        return projector

    # ------------------------------------------------------------------ build
    def build(
        self,
        preservation_dataset: Dataset | None,
        train_dataset: Dataset | None = None,
        cache: str | Path | None = None,
    ) -> NullSpaceProjector:
        """Collect the preservation covariances at the current (reference) weights and build ``P``.

        ``train_dataset``: the training prompts (the contrast subspace is built for its harmful ones, and
        ``nspo_contrast_protect_benign`` protects its benign ones). ``cache``: a folder loaded instead when it
        holds a projector of the same model, data and rule, and written otherwise. Collective.
        """
        settings = self.settings
        contrast = settings.nspo_subspace == "contrast"
        length = settings.nspo_preservation_max_length
        targets = (
            prompt_sequences(train_dataset, self.tokenizer, True, length, "nspo_subspace: 'contrast'")
            if contrast
            else None
        )
        protected = (
            prompt_sequences(train_dataset, self.tokenizer, False, length, "nspo_contrast_protect_benign")
            if settings.nspo_contrast_protect_benign
            else []
        )
        metadata = self.model_identity(targets, protected)
        cache = Path(cache) if cache else None
        if preservation_dataset is None:
            if cache is None or not cache.is_dir():
                raise ValueError(f"nspo_projector_path: {cache} does not exist and no preservation_dataset was given.")
            return self.load(cache, metadata)

        preservation_dataset = seeded_subset(
            preservation_dataset, settings.nspo_num_preservation_samples, settings.seed
        )
        sequences = tokenize_preservation(preservation_dataset, self.tokenizer, length)
        fit, heldout = split_heldout(sequences, settings.nspo_heldout_fraction, seed=settings.seed)
        if contrast and not heldout:
            raise ValueError(
                f"nspo_heldout_fraction: {settings.nspo_heldout_fraction} of {len(sequences)} preservation examples "
                "holds none out, and nspo_subspace 'contrast' is sized on held-out ones; use more examples or a "
                "larger fraction."
            )
        self.preservation_sequences = {"fit": fit, "heldout": heldout}
        metadata.update(
            data_digest=sequences_digest(sequences, length),
            heldout_fraction=settings.nspo_heldout_fraction,
            probe_tokens=settings.nspo_probe_tokens,
            seed=settings.seed,
            fit_examples=len(fit),
            heldout_examples=len(heldout),
            probe_splits=["fit", "heldout"] if heldout else ["fit"],
        )
        if cache is not None and cache.is_dir():
            return self.load(cache, metadata)
        projector = self._decompose(fit, heldout, targets, protected, metadata)
        if cache is not None:
            projector.save(cache)
        return projector

    def _decompose(
        self, fit: Sequences, heldout: Sequences, targets: Sequences | None, protected: Sequences, metadata: dict
    ) -> NullSpaceProjector:
        settings = self.settings
        record = {k: v for k, v in metadata.items() if k != "rule"}  # the rule is stored on its own
        modules = {layer.name: layer.linear for layer in self.layers}
        # which layers read the same input: learned from one batch, before any covariance is held
        groups = self.collect(modules, fit[:1], covariance=False, description="NSPO input groups").groups
        owners = self.group_owners(groups)
        widths = {group: full_shape(modules[group].weight)[1] for group in dict.fromkeys(groups.values())}
        element = torch.finfo(settings.covariance_torch_dtype).bits // 8
        # contrast holds each group's C and C_train (and C_benign) side by side: a half (third) of the groups per pass
        budget = int(settings.nspo_build_memory_gb * 2**30) // settings.build_covariance_copies
        passes = covariance_chunks(widths, element, budget)
        probes = {}
        if heldout:  # first: a contrast subspace is sized on them
            heldout_stats = self.collect(
                modules, heldout, covariance=False, description="NSPO held-out probes", groups=groups
            )
            heldout_stats.reduce_to_owners(owners)
            probes["heldout"] = heldout_stats.samples
        local, fit_samples, fit_tokens = {}, {}, 0
        for index, chunk in enumerate(passes):
            description = "NSPO covariances" + (f", pass {index + 1}/{len(passes)}" if len(passes) > 1 else "")
            stats = self.collect(modules, fit, covariance=True, description=description, groups=groups, only=chunk)
            stats.reduce_to_owners(owners)
            if targets is not None:
                target_stats = self.collect(
                    modules, targets, covariance=True, description="NSPO training-prompt covariances", groups=groups,
                    only=chunk,
                )  # fmt: skip
                target_stats.reduce_to_owners(owners)
            if protected:  # C ← C + C_benign: the benign prompts' directions count as general ones
                benign_stats = self.collect(
                    modules, protected, covariance=True, description="NSPO benign-prompt covariances", groups=groups,
                    only=chunk,
                )  # fmt: skip
                benign_stats.reduce_to_owners(owners)
                for group in list(benign_stats.covariances):  # each freed once added
                    stats.covariances[group] += benign_stats.covariances.pop(group)
            # decompose on the owner at once, so a rank never holds more than one pass of covariances
            owned = list(stats.covariances)
            bar = progress_bar_disabled(self.is_main_process)
            for group in tqdm(owned, desc="NSPO eigendecompositions", disable=bar):
                covariance = stats.covariances.pop(group)
                if settings.nspo_eigh_on_cpu:  # the float64 copy and LAPACK workspace in host RAM, not on the GPU
                    covariance = covariance.cpu()
                if targets is not None:
                    factor = SubspaceFactor.from_contrast(
                        covariance,
                        target_stats.covariances.pop(group).to(covariance.device),
                        probes["heldout"][group].to(covariance.device),
                        settings.nspo_contrast_budget,
                    )
                else:
                    factor = SubspaceFactor.from_covariance(covariance, settings.nullspace_rule)
                local[group] = factor.to(self.device())  # offloaded at once: a GPU holds one basis at most
            fit_samples.update(stats.samples)
            fit_tokens = max(fit_tokens, *stats.token_counts.values())
        record["fit_tokens"] = fit_tokens
        return NullSpaceProjector.from_local_factors(
            local,
            groups,
            settings.nullspace_rule,
            metadata=record,
            probes={"fit": fit_samples, **probes},
            owners=owners,
        )

    def collect(
        self, modules, sequences: Sequences, covariance: bool, description: str, groups=None, only=None
    ) -> CovarianceCollector:
        """One pass of the reference model over this rank's share of ``sequences`` (see ``CovarianceCollector``)."""
        settings = self.settings
        rank, world = self.process_index, self.num_processes
        shard = sequences[rank::world] or sequences[:1]
        collector = CovarianceCollector(
            modules,
            dtype=settings.covariance_torch_dtype,
            sample_tokens=settings.nspo_probe_tokens if groups is not None else 0,
            seed=settings.seed,
            accumulate_covariance=covariance,
            groups=groups,
            only=only,
        )
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        batch_size = settings.nspo_preservation_batch_size
        # every rank runs as many forwards as rank 0 (the largest shard): ZeRO-3 gathers are collective
        total = -(-len(sequences[0::world] or sequences[:1]) // batch_size)
        batches = itertools.chain(
            iter_batches(shard, batch_size, tokenizer.pad_token_id),
            itertools.repeat(idle_batch(tokenizer.pad_token_id), total - -(-len(shard) // batch_size)),
        )
        with gathered_one_module_at_a_time(self.model):  # ZeRO-3: one module whole at a time, never the model
            return run_collection(
                self.model, batches, collector, self.is_main_process, description=description, total=total
            )
