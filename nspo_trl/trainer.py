"""``NSPOTrainer``: TRL's ``GRPOTrainer`` with null-space constrained updates."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
from pathlib import Path
from typing import ClassVar

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import GRPOTrainer

from nspo_trl import checkpoint as checkpointing
from nspo_trl.config import NSPOConfig, check_vllm_sleep_mode
from nspo_trl.data import seeded_subset
from nspo_trl.model_card import NSPO_CITATION, nspo_card_section
from nspo_trl.nullspace.access import full_shape, gathered, gathered_one_module_at_a_time, parameter_access
from nspo_trl.nullspace.collect import CovarianceCollector, covariance_chunks, run_collection
from nspo_trl.nullspace.contrast import CONTRAST_RIDGE
from nspo_trl.nullspace.optimizer import NullSpaceAdamW
from nspo_trl.nullspace.projector import NullSpaceProjector, SubspaceFactor, tensor_digest
from nspo_trl.nullspace.sharding import assign_owners, check_agreement, group_costs
from nspo_trl.nullspace.targets import ProtectedLayer, resolve_protected_layers, untie_output_embeddings
from nspo_trl.nullspace.update import ConstrainedUpdate
from nspo_trl.preservation import iter_batches, sequences_digest, split_heldout, tokenize_preservation
from nspo_trl.vllm_sync import use_vllm_reload

logger = logging.getLogger(__name__)

EVAL_REPORT = "eval/report.md"  # written by nspo-trl eval --output_dir <output_dir>/eval; quoted in the card


class NSPOTrainer(GRPOTrainer):
    """GRPO whose updates to protected layers stay in the null space of preservation activations.

    Before training, the trainer runs the reference model over ``preservation_dataset``, builds a
    [`NullSpaceProjector`] per protected layer (see [`NSPOConfig`]), snapshots ``W_ref`` and then,
    after optimizer steps, applies ``W ← W_ref + (W − W_ref) P`` (LoRA: ``A ← A P``). The projection
    runs in ``on_optimizer_step``, i.e. before checkpoints and before TRL's next vLLM weight sync,
    so everything downstream sees projected weights.

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, *grpo_args, **kwargs:
            as for [`~trl.GRPOTrainer`], in its positional order (``reward_processing_classes``,
            ``callbacks``, ``optimizers``, … follow ``processing_class``); ``args`` must be an [`NSPOConfig`].
        preservation_dataset ([`~datasets.Dataset`], keyword-only):
            General-task examples whose behaviour must not move (layouts: see `nspo_trl.preservation`).
            Optional only when ``args.nspo_projector_path`` points at an existing projector.

    Override points for subclasses: [`build_projector`] (how ``P`` is made) and
    [`project_updates`] (what happens after a step).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "nspo"]
    _name = "NSPO"
    _paper: ClassVar[dict[str, str]] = {
        "title": "Mitigating the Safety Alignment Tax with Null-Space Constrained Policy Optimization",
        "id": "2512.11391",
        "citation": NSPO_CITATION + "\n\n" + GRPOTrainer._paper["citation"],
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: NSPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *grpo_args,
        preservation_dataset: Dataset | None = None,
        **kwargs,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = NSPOConfig(f"{str(name).split('/')[-1]}-NSPO")
        if not isinstance(args, NSPOConfig):
            raise TypeError(f"args: NSPOTrainer needs an NSPOConfig, got {type(args).__name__}.")
        check_vllm_sleep_mode(args)  # before TRL starts vLLM
        cached = args.nspo_projector_path and Path(args.nspo_projector_path).is_dir()
        # token ids of the preservation examples that built C ("fit") and that only measure it ("heldout")
        self.preservation_sequences: dict[str, list[list[int]]] = {"fit": [], "heldout": []}
        if preservation_dataset is None and not cached:
            raise ValueError(
                "preservation_dataset: required (general-task examples) unless nspo_projector_path exists."
            )
        super().__init__(
            model, reward_funcs, args, train_dataset, eval_dataset, processing_class, *grpo_args, **kwargs
        )
        # rows of the model card's NSPO section (nspo-trl train adds the base model, data, reward and judge)
        self.card_details: dict[str, str] = {"reward": ", ".join(self.reward_func_names)}
        if args.use_vllm and use_vllm_reload(self.vllm_generation):
            logger.info("vLLM repacks its weights on this platform: weights are synced with vLLM's reload_weights")
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "NSPOTrainer: FSDP is not supported; launch with a DeepSpeed ZeRO-3 config instead "
                "(accelerate_configs/zero3.yaml), which shards the model the same way."
            )
        if args.nspo_project_gradients and self.is_deepspeed_enabled:
            raise NotImplementedError(
                "nspo_project_gradients: DeepSpeed keeps gradients in its own partitions; "
                "set it to false (the weight projection alone is exact) or launch without DeepSpeed."
            )
        if args.nspo_null_space_adamw:
            self._check_null_space_adamw()
        if args.nspo_untie_word_embeddings:
            self._untie_word_embeddings()
        self.protected_layers: list[ProtectedLayer] = resolve_protected_layers(self.model, args.nspo_target_modules)
        self.projector: NullSpaceProjector = self.build_projector(preservation_dataset).to(self.projector_device())
        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        access = parameter_access(zero_stage)
        self.constrained_update = ConstrainedUpdate(self.protected_layers, self.projector, access)
        self._freeze_unconstrainable()
        self._freeze_outside_trainable_parameters()
        self._dirty = False
        self._state_digests: dict | None = None  # digests of output_dir/_nspo_state once written (main)
        self._grad_null_fraction: dict[str, float] = {}  # ‖gP‖/‖g‖, overall and per layer kind
        self._last_leakage: dict[str, dict[str, float]] | None = None
        self.add_callback(_NSPOCallback(self))
        self.projector.save(Path(args.output_dir) / "nspo_projector")
        if self.accelerator.is_main_process:
            _log_projector(self.projector)

    def _check_null_space_adamw(self) -> None:
        if self.is_deepspeed_enabled or self.accelerator.num_processes > 1:
            raise NotImplementedError(
                "nspo_null_space_adamw: runs in one process only (every rank would need every layer's null basis); "
                "launch a single process, or use nspo_project_gradients (without DeepSpeed) or the default."
            )
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise ValueError(
                "nspo_null_space_adamw: replaces the optimizer, but one was passed (optimizers / "
                "optimizer_cls_and_kwargs); pass neither or drop nspo_null_space_adamw."
            )

    def _untie_word_embeddings(self) -> None:
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 or hasattr(self.model, "peft_config"):
            raise NotImplementedError(
                "nspo_untie_word_embeddings: ZeRO-3 has already partitioned the shared matrix and PEFT trains "
                "adapters, not lm_head; untie the checkpoint itself (tie_word_embeddings: false) or drop the option."
            )
        added = untie_output_embeddings(self.accelerator.unwrap_model(self.model))
        if added:
            self.card_details["output layer"] = f"untied from the input embeddings (+{added / 1e6:.1f}M parameters)"
            logger.info("NSPO: lm_head untied from the input embeddings (+%.1fM parameters)", added / 1e6)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """With ``nspo_null_space_adamw``, [`NullSpaceAdamW`] over Trainer's usual decay / no-decay groups."""
        if self.args.nspo_null_space_adamw and self.optimizer is None:
            settings = {
                "null_bases": self.constrained_update.null_bases(),
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
            }
            self.optimizer_cls_and_kwargs = (NullSpaceAdamW, settings)
        return super().create_optimizer(model)

    # ------------------------------------------------------------------ projector
    def reference_fingerprint(self) -> str:
        weights = [layer.linear.weight for layer in self.protected_layers]
        with gathered(weights):
            return tensor_digest({layer.name: layer.linear.weight for layer in self.protected_layers})

    def group_owners(self, groups: dict[str, str]) -> dict[str, int]:
        """Owner rank of each input group (``groups``: module → group), balancing ``W_ref`` + basis bytes."""
        shapes = {layer.name: full_shape(layer.linear.weight) for layer in self.protected_layers}
        layers = (
            (groups[layer.name], 0 if layer.is_lora else shapes[layer.name][0], shapes[layer.name][1])
            for layer in self.protected_layers
        )
        weight_bytes = self.protected_layers[0].linear.weight.element_size()
        owners = assign_owners(group_costs(layers, weight_bytes), self.accelerator.num_processes)
        check_agreement(owners, "group owners")
        return owners

    def build_projector(self, preservation_dataset: Dataset | None) -> NullSpaceProjector:
        """Collect preservation covariances at the current (reference) weights and build ``P``.

        With ``nspo_projector_path`` set, an existing projector there is loaded instead (after
        checking it was built for this model, data and rule), and a new one is written there.
        """
        args: NSPOConfig = self.args
        metadata = {
            "model_fingerprint": self.reference_fingerprint(),
            "target_modules": list(args.nspo_target_modules),
            "protected_modules": [layer.name for layer in self.protected_layers],
            "covariance_dtype": args.nspo_covariance_dtype,
        }
        contrast = args.nspo_subspace == "contrast"
        if contrast:
            targets = self.contrast_target_sequences()
            metadata.update(
                subspace="contrast",
                contrast_budget=args.nspo_contrast_budget,
                contrast_ridge=CONTRAST_RIDGE,
                contrast_protect_benign=args.nspo_contrast_protect_benign,
                target_digest=sequences_digest(targets, args.nspo_preservation_max_length),
            )
        protected = self.contrast_protected_sequences() if args.nspo_contrast_protect_benign else []
        if protected:
            metadata["protected_digest"] = sequences_digest(protected, args.nspo_preservation_max_length)
        cache = Path(args.nspo_projector_path) if args.nspo_projector_path else None
        if preservation_dataset is None:
            return self._load_cached_projector(cache, metadata)

        preservation_dataset = seeded_subset(preservation_dataset, args.nspo_num_preservation_samples, args.seed)
        sequences = tokenize_preservation(
            preservation_dataset, self.processing_class, args.nspo_preservation_max_length
        )
        fit, heldout = split_heldout(sequences, args.nspo_heldout_fraction, seed=args.seed)
        if contrast and not heldout:
            raise ValueError(
                f"nspo_heldout_fraction: {args.nspo_heldout_fraction} of {len(sequences)} preservation examples holds "
                "none out, and nspo_subspace 'contrast' is sized on held-out ones; use more examples or a larger "
                "fraction."
            )
        self.preservation_sequences = {"fit": fit, "heldout": heldout}
        metadata.update(
            data_digest=sequences_digest(sequences, args.nspo_preservation_max_length),
            heldout_fraction=args.nspo_heldout_fraction,
            probe_tokens=args.nspo_probe_tokens,
            seed=args.seed,
            fit_examples=len(fit),
            heldout_examples=len(heldout),
            probe_splits=["fit", "heldout"] if heldout else ["fit"],
        )
        if cache is not None and cache.is_dir():
            return self._load_cached_projector(cache, metadata)

        modules = {layer.name: layer.linear for layer in self.protected_layers}
        # which layers read the same input: learned from one batch, before any covariance is held
        groups = self._collect(modules, fit[:1], covariance=False, description="NSPO input groups").groups
        owners = self.group_owners(groups)
        widths = {group: full_shape(modules[group].weight)[1] for group in dict.fromkeys(groups.values())}
        element = torch.finfo(args.covariance_torch_dtype).bits // 8
        # contrast holds each group's C and C_train (and C_benign) side by side: a half (third) of the groups per pass
        budget = int(args.nspo_build_memory_gb * 2**30) // args.build_covariance_copies
        passes = covariance_chunks(widths, element, budget)
        probes = {}
        if heldout:  # first: a contrast subspace is sized on them
            heldout_stats = self._collect(
                modules, heldout, covariance=False, description="NSPO held-out probes", groups=groups
            )
            heldout_stats.reduce_to_owners(owners)
            probes["heldout"] = heldout_stats.samples
        local, fit_samples, fit_tokens = {}, {}, 0
        for index, chunk in enumerate(passes):
            description = "NSPO covariances" + (f", pass {index + 1}/{len(passes)}" if len(passes) > 1 else "")
            stats = self._collect(modules, fit, covariance=True, description=description, groups=groups, only=chunk)
            stats.reduce_to_owners(owners)
            if contrast:
                target_stats = self._collect(
                    modules, targets, covariance=True, description="NSPO training-prompt covariances", groups=groups,
                    only=chunk,
                )  # fmt: skip
                target_stats.reduce_to_owners(owners)
            if protected:  # C ← C + C_benign: the benign prompts' directions count as general ones
                benign_stats = self._collect(
                    modules, protected, covariance=True, description="NSPO benign-prompt covariances", groups=groups,
                    only=chunk,
                )  # fmt: skip
                benign_stats.reduce_to_owners(owners)
                for group in list(benign_stats.covariances):  # each freed once added
                    stats.covariances[group] += benign_stats.covariances.pop(group)
            # decompose on the owner at once, so a rank never holds more than one pass of covariances
            owned = list(stats.covariances)
            for group in tqdm(owned, desc="NSPO eigendecompositions", disable=not self.accelerator.is_main_process):
                covariance = stats.covariances.pop(group)
                if args.nspo_eigh_on_cpu:  # the float64 copy and LAPACK workspace in host RAM, not on the GPU
                    covariance = covariance.cpu()
                if contrast:
                    factor = SubspaceFactor.from_contrast(
                        covariance,
                        target_stats.covariances.pop(group).to(covariance.device),
                        probes["heldout"][group].to(covariance.device),
                        args.nspo_contrast_budget,
                    )
                else:
                    factor = SubspaceFactor.from_covariance(covariance, args.nullspace_rule)
                local[group] = factor.to(self.projector_device())  # offloaded at once: GPU holds one basis at most
            fit_samples.update(stats.samples)
            fit_tokens = max(fit_tokens, *stats.token_counts.values())
        probes = {"fit": fit_samples, **probes}
        metadata["fit_tokens"] = fit_tokens
        projector = NullSpaceProjector.from_local_factors(
            local, groups, args.nullspace_rule, metadata=metadata, probes=probes, owners=owners
        )
        if cache is not None:
            projector.save(cache)
        return projector

    def contrast_target_sequences(self) -> list[list[int]]:
        """Token ids of the training prompts a contrast subspace is built for: the harmful ones when the data
        say which (``is_harmful``), else all; rendered as generation starts (chat template + generation prompt)."""
        return self._training_prompt_sequences(harmful=True)

    def contrast_protected_sequences(self) -> list[list[int]]:
        """Token ids of the benign training prompts (``is_harmful`` false), rendered like the targets: with
        ``nspo_contrast_protect_benign`` their covariance joins the preservation covariance in the pencil."""
        return self._training_prompt_sequences(harmful=False)

    def _training_prompt_sequences(self, harmful: bool) -> list[list[int]]:
        kind = "harmful" if harmful else "benign"
        field_name = "nspo_subspace: 'contrast'" if harmful else "nspo_contrast_protect_benign"
        dataset = self.train_dataset
        if dataset is None or "prompt" not in dataset.column_names:
            raise ValueError(f"{field_name} needs a train_dataset with a 'prompt' column.")
        if "is_harmful" in dataset.column_names:
            dataset = dataset.filter(lambda row: bool(row["is_harmful"]) == harmful)
        elif not harmful:
            raise ValueError(f"{field_name} needs an 'is_harmful' column in the train_dataset to find benign prompts.")
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        sequences = []
        for prompt in dataset["prompt"]:
            text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )  # fmt: skip
            ids = tokenizer(
                text, add_special_tokens=False, truncation=True, max_length=self.args.nspo_preservation_max_length
            )["input_ids"]
            if ids:
                sequences.append(ids)
        if not sequences:
            raise ValueError(f"{field_name} found no {kind} training prompt in the train_dataset.")
        return sequences

    def _collect(
        self, modules, sequences, covariance: bool, description: str, groups=None, only=None
    ) -> CovarianceCollector:
        """One pass of the reference model over this rank's share of ``sequences`` (see ``CovarianceCollector``)."""
        args: NSPOConfig = self.args
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = sequences[rank::world] or sequences[:1]
        collector = CovarianceCollector(
            modules,
            dtype=args.covariance_torch_dtype,
            sample_tokens=args.nspo_probe_tokens if groups is not None else 0,
            seed=args.seed,
            accumulate_covariance=covariance,
            groups=groups,
            only=only,
        )
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        batch_size = args.nspo_preservation_batch_size
        # every rank runs as many forwards as rank 0 (the largest shard): ZeRO-3 gathers are collective
        total = -(-len(sequences[0::world] or sequences[:1]) // batch_size)
        batches = itertools.chain(
            iter_batches(shard, batch_size, tokenizer.pad_token_id),
            itertools.repeat(_idle_batch(tokenizer.pad_token_id), total - -(-len(shard) // batch_size)),
        )
        with gathered_one_module_at_a_time(self.model):  # ZeRO-3: one module whole at a time, never the model
            return run_collection(
                self.model, batches, collector, self.accelerator.is_main_process, description=description, total=total
            )

    def _load_cached_projector(self, cache: Path | None, expected: dict) -> NullSpaceProjector:
        if cache is None or not cache.is_dir():
            raise ValueError(f"nspo_projector_path: {cache} does not exist and no preservation_dataset was given.")
        projector = self._load_projector(cache)
        stored = {**projector.metadata, "rule": projector.rule.to_dict()}
        wanted = {**expected, "rule": self.args.nullspace_rule.to_dict()}
        differing = checkpointing.differing_fields(stored, wanted)
        if differing:
            raise ValueError(
                f"nspo_projector_path: {cache} was built for another {', '.join(differing)}; "
                "delete it or point nspo_projector_path elsewhere."
            )
        logger.info("NSPO: loaded cached projector from %s", cache)
        return projector

    def _load_projector(self, directory: Path) -> NullSpaceProjector:
        groups = NullSpaceProjector.read_groups(directory)
        if set(groups) != {layer.name for layer in self.protected_layers}:
            raise ValueError(f"{directory}: the projector protects other layers than nspo_target_modules.")
        return NullSpaceProjector.load(directory, device=self.projector_device(), owners=self.group_owners(groups))

    def projector_device(self) -> torch.device:
        """Where the projector bases live: with the protected weights, or in host RAM with
        ``nspo_projector_offload`` (``SubspaceFactor.apply`` then copies one basis at a time to the weights)."""
        if self.args.nspo_projector_offload:
            return torch.device("cpu")
        return self.protected_layers[0].linear.weight.device

    def _freeze_unconstrainable(self) -> None:
        """Freeze what the projection cannot keep in the null space (nothing when it is disabled)."""
        if self.args.nspo_project_every == 0:
            return
        constrained: set[int] = set()
        for layer in self.protected_layers:
            frozen = self.projector.factor_for(layer.name).null_dim == 0
            if layer.is_lora:
                for a in layer.lora_a.values():
                    a.requires_grad_(not frozen and a.requires_grad)
                    constrained.add(id(a))
                constrained.update(id(m.weight) for m in layer.lora_layer.lora_B.values())
                continue
            layer.linear.weight.requires_grad_(not frozen and layer.linear.weight.requires_grad)
            constrained.add(id(layer.linear.weight))
            if layer.linear.bias is not None:
                layer.linear.bias.requires_grad_(False)  # a bias shift moves every output
        if frozen := self.projector.frozen_modules():
            logger.warning(
                "NSPO: %d layers have no free direction (an empty null space, or no contrast direction within "
                "nspo_contrast_budget) and are frozen: %s",
                len(frozen),
                frozen,
            )
        if self.args.freezes_non_targets:
            for _, param in self.model.named_parameters():
                if id(param) not in constrained:
                    param.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "nspo_alpha: every trainable parameter ended up frozen (no null space anywhere); "
                "raise nspo_alpha, set nspo_energy, or use fewer preservation samples."
            )

    def _freeze_outside_trainable_parameters(self) -> None:
        """``nspo_trainable_parameters``: freeze every parameter whose names all miss the patterns."""
        patterns = self.args.nspo_trainable_parameters
        if not patterns:
            return
        names: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):  # a tied weight under both names
            names.setdefault(id(param), []).append(name)
        unmatched = [p for p in patterns if not any(re.search(p, n) for group in names.values() for n in group)]
        if unmatched:
            raise ValueError(
                f"nspo_trainable_parameters: {unmatched[0]!r} matches no parameter name "
                f"(e.g. {next(iter(names.values()))[0]!r}); fix the regex."
            )
        for param in self.model.parameters():
            if not any(re.search(p, n) for p in patterns for n in names[id(param)]):
                param.requires_grad_(False)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "nspo_trainable_parameters: every parameter it matches is frozen by the NSPO preset "
                "(e.g. embeddings and norms under 'full'); match protected weights or use another preset."
            )

    # ------------------------------------------------------------------ the update
    def project_updates(self) -> None:
        """Project every protected layer's change onto its null space (in place)."""
        self.constrained_update.project_()
        self._dirty = False

    def leakage(self) -> dict[str, dict[str, float]]:
        """Per split (``fit``/``heldout``) and layer: ``‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖`` on probe rows.

        Collective (every rank calls it); the result is also kept for the model card.
        """
        splits = self.projector.metadata.get("probe_splits") or sorted(self.projector.probes)
        self._last_leakage = {
            split: self.constrained_update.leakage(self.projector.probes.get(split, {})) for split in splits
        }
        return self._last_leakage

    def nspo_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split, per_layer in self.leakage().items():
            if per_layer:
                values = list(per_layer.values())
                metrics[f"nspo/leakage_{split}"] = max(values)
                metrics[f"nspo/leakage_{split}_mean"] = sum(values) / len(values)
        metrics["nspo/null_fraction"] = self.projector.summary()["null_fraction"]
        for kind, fraction in self._grad_null_fraction.items():
            metrics[grad_null_fraction_metric(kind)] = fraction
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self.nspo_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ model card and the Hub
    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs) -> None:
        """TRL's card (tags ``trl``/``grpo``/``nspo``, NSPO and GRPO citations) plus an NSPO section.

        The base model is ``card_details["base model"]`` when set (``nspo-trl train`` sets the Hub id
        even when the model was loaded from a local conversion), else what TRL finds; a model loaded
        from a local folder is called that instead of TRL's "[None]". ``dataset_name`` links to the Hub
        only when it is a Hub id; bundled and local sets are named in the NSPO section.
        """
        config = self.accelerator.unwrap_model(self.model).config
        local_name = config._name_or_path
        base = self.card_details.get("base model")
        if dataset_name and (":" in dataset_name or Path(dataset_name).exists()):
            dataset_name = None  # nspo_trl:<name> or a local file: no Hub page to link
        config._name_or_path = base or local_name
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)
        finally:
            config._name_or_path = local_name
        readme = Path(self.args.output_dir) / "README.md"
        if self.is_world_process_zero() and readme.is_file():
            text = readme.read_text().replace(
                "a fine-tuned version of [None](https://huggingface.co/None)",
                f"a fine-tuned version of a local model (`{Path(local_name).name}`)",
            )
            readme.write_text(text.rstrip() + "\n\n" + self.nspo_card_section() + "\n")

    def nspo_card_section(self) -> str:
        """The model card's NSPO section (see :func:`nspo_trl.model_card.nspo_card_section`)."""
        if self._last_leakage is None and self.accelerator.num_processes == 1:
            self.leakage()
        output = Path(self.args.output_dir)
        projector_files = [f for f in (output / "nspo_projector").rglob("*") if f.is_file()]
        report = output / EVAL_REPORT
        return nspo_card_section(
            self.args,
            self.projector,
            len(self.protected_layers),
            self._last_leakage or {},
            details=self.card_details,
            projector_bytes=sum(f.stat().st_size for f in projector_files) if projector_files else None,
            eval_report=report.read_text() if report.is_file() else None,
        )

    def hub_ignore_patterns(self) -> list[str]:
        """What ``push_to_hub`` leaves out of ``output_dir`` besides TRL's ``_*`` and ``checkpoint-*``: every
        folder except ``nspo_projector/`` (only with ``nspo_push_projector``) and ``eval/`` (the report in
        the card), so local folders such as a tiny model built inside ``output_dir`` never reach the Hub."""
        keep = {"eval"} | ({"nspo_projector"} if self.args.nspo_push_projector else set())
        output = Path(self.args.output_dir)
        folders = sorted(p.name for p in output.iterdir() if p.is_dir()) if output.is_dir() else []
        return [f"{name}/*" for name in folders if name not in keep]

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """``Trainer.push_to_hub``, uploading the model, tokenizer, card and ``nspo_summary.json`` only
        (see :meth:`hub_ignore_patterns`)."""
        import transformers.trainer as hf_trainer

        ignore = self.hub_ignore_patterns() if self.is_world_process_zero() else []
        original = hf_trainer.hf_api

        class _Api:  # transformers hard-codes its ignore patterns; add ours at the one call that uploads
            def __getattr__(self, name):
                return getattr(original(), name)

            def upload_folder(self, **upload):
                upload["ignore_patterns"] = [*(upload.get("ignore_patterns") or []), *ignore]
                return original().upload_folder(**upload)

        hf_trainer.hf_api = _Api
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
        finally:
            hf_trainer.hf_api = original

    # ------------------------------------------------------------------ checkpoints
    def projector_identity(self) -> dict:
        """What this run's projector was built from and by which rule: equal identities mean the same ``P``."""
        return {**self.projector.metadata, "rule": self.projector.rule.to_dict()}

    def save_nspo_state(self, directory: str | os.PathLike) -> None:
        """Write the projector, the reference weights and the probes under ``directory/nspo``, then commit.

        The state never changes during a run: this trainer writes it once under
        ``output_dir/_nspo_state`` (each rank the part it owns), takes its digests then, and copies it
        into each checkpoint, checking the copy against those digests (see ``nspo_trl.checkpoint``).
        ``nspo/COMMITTED``, with the digest of every file of the checkpoint, is written last. Collective.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        main = self.accelerator.is_main_process
        source = Path(self.args.output_dir) / checkpointing.STATE_SOURCE_DIR
        if self._state_digests is None:
            staging = source.with_name(f"{checkpointing.STATE_SOURCE_DIR}.tmp")
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.projector.save(staging / "projector")
            reference = {k: v.detach().cpu().contiguous() for k, v in self.constrained_update.reference.items()}
            save_file(reference, str(staging / checkpointing.REFERENCE_PATTERN.format(rank=rank, world=world)))
            self.accelerator.wait_for_everyone()
            if main:
                shutil.rmtree(source, ignore_errors=True)
                os.replace(staging, source)
            self._state_digests = checkpointing.tree_digests(source) if main else {}
        self.accelerator.wait_for_everyone()  # every rank's share of the checkpoint is on disk before the digests
        if main:
            checkpoint = Path(directory)
            checkpointing.copy_verified(source, checkpoint / checkpointing.NSPO_STATE_DIR, self._state_digests)
            checkpointing.commit(checkpoint, self.state.global_step, self.projector_identity())
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """Commit each checkpoint before any older one is rotated away.

        transformers writes ``checkpoint-N`` in place and then deletes checkpoints beyond
        ``save_total_limit``. Here rotation waits until ``checkpoint-N/nspo/COMMITTED`` exists (written
        last, after the NSPO state), so a crash mid-save always leaves a committed checkpoint to resume.
        """
        self.leakage()  # collective: refresh the figures the model card reports
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self.save_nspo_state(checkpoint)
        except (OSError, RuntimeError) as err:  # a full or read-only disk: one line, no partial checkpoint
            if not checkpointing.is_write_failure(err):
                raise
            needed = checkpointing.state_bytes(dict(self.model.state_dict())) + checkpointing.folder_bytes(
                Path(self.args.output_dir) / checkpointing.STATE_SOURCE_DIR
            )
            if self.optimizer is not None:
                needed += checkpointing.state_bytes(self.optimizer.state_dict()["state"])
            raise checkpointing.write_failure(checkpoint, err, needed) from None
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=self.args.output_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def load_nspo_state(self, checkpoint: str | os.PathLike, verified: bool = False) -> None:
        """Restore projector, ``W_ref`` and probes saved by [`save_nspo_state`] in ``checkpoint``.

        The checkpoint must verify against its commit record, and its projector must have been built
        from the same model, preservation data and rule as this run's (else one-line
        ``CheckpointError`` naming the differing fields). Each rank loads what it owns now, whatever
        number of ranks wrote the checkpoint. ``verified``: the caller has just checked the digests.
        """
        checkpoint = Path(checkpoint)
        state = checkpoint / checkpointing.NSPO_STATE_DIR
        if not state.is_dir():
            raise checkpointing.CheckpointError(
                f"resume_from_checkpoint: {checkpoint} has no {checkpointing.NSPO_STATE_DIR}/ state "
                "(not an NSPO checkpoint)."
            )
        if not verified:
            problem = [checkpointing.damage(checkpoint) if self.accelerator.is_main_process else None]
            broadcast_object_list(problem)  # one rank reads the files; every rank gets the verdict
            if problem[0] is not None:
                raise checkpointing.CheckpointError(checkpointing.resume_refusal(problem[0]))
        saved_identity = checkpointing.read_commit(checkpoint)["projector_metadata"]
        if checkpointing.differing_fields(saved_identity, self.projector_identity()):
            raise checkpointing.CheckpointError(
                f"resume_from_checkpoint: {checkpoint} was trained with another projector: "
                f"{checkpointing.describe_differences(saved_identity, self.projector_identity())}. Resume with the "
                "settings it was trained with, or start a new run in another output_dir."
            )
        self.projector = self.constrained_update.projector = self._load_projector(state / "projector")
        wanted = set(self.constrained_update.reference)
        reference: dict[str, torch.Tensor] = {}
        for shard in sorted(state.glob("reference-rank*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                reference.update({key: handle.get_tensor(key) for key in handle.keys() if key in wanted})  # noqa: SIM118
        self.constrained_update.load_reference(reference)
        self._state_digests = None  # the next checkpoint carries the restored state

    def last_committed_checkpoint(self) -> str | None:
        """The newest checkpoint in ``output_dir`` that is committed and verifies; newer ones that do not
        are set aside (see :func:`nspo_trl.checkpoint.newest_intact`)."""
        found = [None]
        if self.accelerator.is_main_process:
            newest = checkpointing.newest_intact(Path(self.args.output_dir))
            found = [None if newest is None else str(newest)]
        broadcast_object_list(found)  # one rank reads and sets aside; every rank resumes from its choice
        return found[0]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``resume_from_checkpoint=True`` (or ``"last"``) resumes from the newest intact checkpoint."""
        checkpoint, verified = resume_from_checkpoint, False
        if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() in ("true", "last")):
            checkpoint = self.last_committed_checkpoint()
            if checkpoint is None:
                raise checkpointing.CheckpointError(
                    f"resume_from_checkpoint: no intact committed checkpoint in {self.args.output_dir}."
                )
            verified = True
        if isinstance(checkpoint, str):
            self.load_nspo_state(checkpoint, verified=verified)
        return super().train(checkpoint, *args, **kwargs)


def grad_null_fraction_metric(kind: str) -> str:
    """The logged name of ``‖gP‖/‖g‖`` for a layer kind: ``nspo/grad_null_fraction[_mlp|_attention|_other]``."""
    return "nspo/grad_null_fraction" + ("" if kind == "all" else f"_{kind}")


def _idle_batch(pad_token_id: int) -> dict[str, torch.Tensor]:
    """One attended pad token whose activations are not collected: a forward that keeps ranks in step."""
    one = torch.ones(1, 1, dtype=torch.long)
    return {"input_ids": one * pad_token_id, "attention_mask": one, "collect_mask": torch.zeros_like(one)}


class _NSPOCallback(TrainerCallback):
    """Runs the projection at the right points of the transformers training loop."""

    def __init__(self, trainer: NSPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # fresh start: LoRA needs A ← A P for its random init (a no-op at W = W_ref otherwise). A resumed
        # run is already projected, and re-projecting would only add fp32 round-off to a bitwise resume.
        if args.nspo_project_every and state.global_step == 0:
            self.trainer.project_updates()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # gradients are visible here (DeepSpeed keeps them in its partitions); measure only on logging steps
        if self.trainer.is_deepspeed_enabled:
            return
        if args.logging_steps and (state.global_step + 1) % max(int(args.logging_steps), 1) == 0:
            self.trainer._grad_null_fraction = self.trainer.constrained_update.gradient_null_fraction()
        if args.nspo_project_every and args.nspo_project_gradients:
            self.trainer.constrained_update.project_gradients_()

    def on_optimizer_step(self, args, state, control, **kwargs):
        every = args.nspo_project_every
        if every and (state.global_step + 1) % every == 0:
            self.trainer.project_updates()
        else:
            self.trainer._dirty = True

    def on_step_end(self, args, state, control, **kwargs):
        # with an interval > 1, never let a checkpoint or the final model hold unprojected weights
        finishing = control.should_save or control.should_training_stop or state.global_step >= state.max_steps
        if args.nspo_project_every and self.trainer._dirty and finishing:
            self.trainer.project_updates()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.leakage()  # collective: the final figures for the model card


def _log_projector(projector: NullSpaceProjector) -> None:
    summary = projector.summary()
    logger.info(
        "NSPO projector: %d layers in %d input groups, null dims %d / %d (%.1f%%), %d frozen, "
        "stored %.2f M elements (dense P: %.2f M)",
        summary["modules"],
        summary["groups"],
        summary["null_dim_total"],
        summary["in_features_total"],
        100 * summary["null_fraction"],
        summary["frozen_modules"],
        summary["stored_elements"] / 1e6,
        summary["dense_elements"] / 1e6,
    )
