"""``NSPOTrainer``: TRL's ``GRPOTrainer`` with null-space constrained updates (the TRL glue only).

``P`` is built by ``nullspace.build.ProjectorBuilder`` and applied by ``nullspace.update.ConstrainedUpdate`` when
``callback.NSPOCallback`` says; checkpoints and the Hub are mixins (``checkpointing.py``, ``hub.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from datasets import Dataset
from trl import GRPOTrainer

from nspo_trl.nullspace.access import parameter_access
from nspo_trl.nullspace.build import ProjectorBuilder
from nspo_trl.nullspace.freezing import freeze_unconstrainable, freeze_unmatched
from nspo_trl.nullspace.optimizer import NullSpaceAdamW
from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.nullspace.targets import ProtectedLayer, resolve_protected_layers, untie_output_embeddings
from nspo_trl.nullspace.update import ConstrainedUpdate
from nspo_trl.trainer.callback import NSPOCallback
from nspo_trl.trainer.checkpointing import CheckpointingMixin
from nspo_trl.trainer.hub import NSPO_CITATION, HubMixin, fetch_projector
from nspo_trl.trainer.nspo_config import NSPOConfig, check_vllm_sleep_mode
from nspo_trl.trainer.vllm_sync import use_vllm_reload

logger = logging.getLogger(__name__)


class NSPOTrainer(CheckpointingMixin, HubMixin, GRPOTrainer):
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
            General-task examples whose behaviour must not move (layouts: see `nspo_trl.data.preservation`).
            Optional only when ``args.nspo_projector_path`` points at an existing projector or
            ``args.nspo_projector_from`` names one.

    Override points for subclasses: [`build_projector`] (how ``P`` is made), [`project_updates`] and
    [`project_gradients`] (what happens at a step).
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
        if preservation_dataset is None and not cached and not args.nspo_projector_from:
            raise ValueError(
                "preservation_dataset: required (general-task examples) unless nspo_projector_path exists or "
                "nspo_projector_from names a projector."
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
        # token ids of the preservation examples that built C ("fit") and that only measure it ("heldout")
        self.preservation_sequences: dict[str, list[list[int]]] = {"fit": [], "heldout": []}
        self.projector: NullSpaceProjector = self.build_projector(preservation_dataset).to(self.projector_device())
        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        self.constrained_update = ConstrainedUpdate(
            self.protected_layers, self.projector, parameter_access(zero_stage)
        )
        if args.nspo_project_every:
            freeze_unconstrainable(self.model, self.protected_layers, self.projector, args.freezes_non_targets)
        if args.nspo_trainable_parameters:
            freeze_unmatched(self.model, args.nspo_trainable_parameters)
        self.has_unprojected_updates = False
        self._grad_null_fraction: dict[str, float] = {}  # ‖gP‖/‖g‖, overall and per layer kind
        self._last_leakage: dict[str, dict[str, float]] | None = None
        self.add_callback(NSPOCallback(self))
        self.projector.save(Path(args.output_dir) / "nspo_projector")
        if self.accelerator.is_main_process:
            logger.info("NSPO projector: %s", self.projector.describe())

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
    def projector_builder(self) -> ProjectorBuilder:
        """The builder of this run's projector: the reference model (the weights now), its tokenizer, the
        protected layers and this process's place in the run."""
        return ProjectorBuilder(
            self.model,
            self.processing_class,
            self.protected_layers,
            self.args,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            is_main_process=self.accelerator.is_main_process,
        )

    def build_projector(self, preservation_dataset: Dataset | None) -> NullSpaceProjector:
        """The projector ``P``: loaded from ``nspo_projector_from`` (checked against this model and rule), or
        built from ``preservation_dataset`` at the current (reference) weights, through ``nspo_projector_path``
        (loaded from there when it holds one of the same model, data and rule, written there otherwise)."""
        builder = self.projector_builder()
        if self.args.nspo_projector_from:
            directory = fetch_projector(self.args.nspo_projector_from, self.hub_api())
            projector = builder.load(directory, builder.model_identity(), field="nspo_projector_from")
        else:
            projector = builder.build(preservation_dataset, self.train_dataset, cache=self.args.nspo_projector_path)
        self.preservation_sequences = builder.preservation_sequences
        return projector

    def load_projector(self, directory: str | Path, field: str) -> NullSpaceProjector:
        """The projector saved in ``directory`` (its layers checked), spread over this run's ranks."""
        return self.projector_builder().load(directory, {}, field=field)

    def projector_device(self) -> torch.device:
        """Where the projector bases live: with the protected weights, or in host RAM with ``nspo_projector_offload``
        (``SubspaceFactor.apply`` then copies one basis at a time to the weights)."""
        return self.projector_builder().device()

    # ------------------------------------------------------------------ the update (called by NSPOCallback)
    def project_updates(self) -> None:
        """``W ← W_ref + (W − W_ref) P`` on every protected layer (LoRA: ``A ← A P``), in place."""
        self.constrained_update.project_()
        self.has_unprojected_updates = False

    def project_gradients(self) -> None:
        """``g ← g P`` on every protected weight's gradient, before the optimizer reads it."""
        self.constrained_update.project_gradients_()

    def measure_gradients(self) -> None:
        """Record ``‖gP‖/‖g‖`` (overall and per layer kind) for the next log."""
        self._grad_null_fraction = self.constrained_update.gradient_null_fraction()

    def mark_unprojected(self) -> None:
        """Note that an optimizer step was taken and not projected (``nspo_project_every`` > 1)."""
        self.has_unprojected_updates = True

    # ------------------------------------------------------------------ measurement
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


def grad_null_fraction_metric(kind: str) -> str:
    """The logged name of ``‖gP‖/‖g‖`` for a layer kind: ``nspo/grad_null_fraction[_mlp|_attention|_other]``."""
    return "nspo/grad_null_fraction" + ("" if kind == "all" else f"_{kind}")
