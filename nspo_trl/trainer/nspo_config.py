"""``NSPOConfig``: ``GRPOConfig`` plus the ``nspo_*`` fields of null-space constrained training."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import GRPOConfig

from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.targets import PRESETS

SUBSPACES = ("null", "contrast")


@dataclass
class NSPOConfig(GRPOConfig):
    r"""
    Configuration for [`NSPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    For each protected linear layer ``W`` (``out × in``), NSPO collects ``C = Σ x xᵀ`` over its inputs
    on the preservation data at the reference model, keeps the eigenvectors of ``C`` with
    ``λ ≤ nspo_alpha · λ_max`` as the null space (projector ``P``), and after every
    ``nspo_project_every`` optimizer steps sets ``W ← W_ref + (W − W_ref) P``.

    Parameters:
        nspo_target_modules (`list[str]`, defaults to `["mlp"]`):
            Layers to protect: presets `mlp` (the paper's choice), `attention`, `full` (every linear
            incl. `lm_head`, with everything else frozen), or regexes searched in module names such as
            `model.layers.0.mlp.down_proj`.
        nspo_alpha (`float`, defaults to `5e-5`):
            Relative eigenvalue threshold: directions with `λ ≤ alpha·λ_max` form the null space.
        nspo_subspace (`str`, defaults to `"null"`):
            Which directions each protected layer may change in. `null`: NSPO's null space (above).
            `contrast`: the directions the harmful training prompts (rows with `is_harmful`, else all
            prompts) use most relative to the preservation data, the leading generalised eigenvectors of
            `C_train v = μ (C + εI) v`, as many per layer group as keep the held-out preservation
            examples' energy share in them within `nspo_contrast_budget` (needs `nspo_heldout_fraction > 0`;
            `nspo_alpha`, `nspo_energy` and `nspo_max_null_rank` then do not apply). Measured on SmolLM2
            (`benchmarks/harm_contrast.py`): held-out harmful prompts put 4-6× the amplitude of general text
            into it at a budget of 1e-4, against ≈ 1× for the null space.
        nspo_contrast_budget (`float`, defaults to `1e-4`):
            With `nspo_subspace: contrast`, the largest share of held-out preservation energy per layer group
            its subspace may hold (an update there moves general outputs by at most about its square root,
            relative).
        nspo_contrast_protect_benign (`bool`, defaults to `False`):
            With `nspo_subspace: contrast`, the benign training prompts (rows with `is_harmful` false) join the
            preservation data on the right of the pencil, `C_train v = μ (C + C_benign + εI) v`: the subspace
            then avoids what harmful and benign requests share (their topic, the chat template) and keeps what
            only the harmful ones use, so refusing benign prompts is not learned along with it.
        nspo_energy (`float` or `None`):
            Optional: the top directions carrying this fraction of `tr(C)` are always kept as range.
        nspo_max_null_rank (`int` or `None`):
            Optional cap on the null dimension of each layer.
        nspo_project_every (`int`, defaults to `1`):
            Project after every this many optimizer steps (and always before a checkpoint and at the
            end). `1` keeps every weight the model, vLLM and checkpoints see inside the null space;
            `0` disables the projection (plain GRPO that still logs leakage).
        nspo_project_gradients (`bool`, defaults to `False`):
            Also project each protected gradient, `g ← g P`, before the optimizer step (the paper's
            Eq. 6), so Adam's moments only ever see null-space gradients; the weight projection after
            the step is kept as the exact safeguard. Not available under DeepSpeed.
        nspo_null_space_adamw (`bool`, defaults to `False`):
            Replace the optimizer by AdamW run in each protected weight's null-space coordinates
            ([`~nspo_trl.nullspace.optimizer.NullSpaceAdamW`]: `W = W_ref + A U₀ᵀ`, AdamW on `A`): its
            per-coordinate scaling no longer rotates steps out of the null space, so nothing of a step is
            thrown away, and its moments take `k / n` of AdamW's memory. Uses `learning_rate`,
            `adam_beta1/2`, `adam_epsilon`, `weight_decay` and the scheduler as AdamW would. One process
            only (every rank would need every basis); not under DeepSpeed.
        nspo_untie_word_embeddings (`bool`, defaults to `False`):
            Give an `lm_head` tied to the input embeddings its own copy of the matrix before training, so the
            `full` preset protects it with the null space of the final hidden states (it is otherwise frozen
            with the embeddings, which stay frozen). Costs `vocab × hidden` more trained parameters and their
            optimizer state (SmolLM2-135M: 28.3 M, +21 %); the saved model is untied. A no-op for untied
            models such as Qwen2.5-7B. Not with vLLM (its copy would stay tied), ZeRO-3 or PEFT.
        nspo_num_preservation_samples (`int` or `None`):
            Use a random subset of this many preservation examples (seeded by `seed`; the paper: 1k Alpaca
            examples); `None` uses all.
        nspo_preservation_max_length (`int`, defaults to `512`):
            Truncate each preservation example to this many tokens.
        nspo_preservation_batch_size (`int`, defaults to `8`):
            Batch size of the covariance collection forward passes.
        nspo_heldout_fraction (`float`, defaults to `0.1`):
            Fraction of preservation examples kept out of `C` to measure leakage on unseen data.
        nspo_probe_tokens (`int`, defaults to `1024`):
            Tokens per layer group kept (uniformly sampled) to measure leakage.
        nspo_covariance_dtype (`str`, defaults to `"float64"`):
            Accumulation dtype of `C`: `float64` (exact enough for any α) or `float32` (half the memory).
        nspo_projector_path (`str` or `None`):
            Projector cache directory: loaded if it exists (and must match this model, data and rule),
            otherwise built and written there.
        nspo_projector_from (`str` or `None`):
            A projector built elsewhere (`nspo-trl projector build`): a local folder or a Hub repo id. It must
            protect the same layers of the same model (fingerprint of the protected weights) under the same rule
            and subspace settings; anything else stops with one line naming what differs. No preservation data
            is needed then.
        nspo_eigh_on_cpu (`bool`, defaults to `False`):
            Eigendecompose each owned group's `C` on the CPU: the float64 `eigh` workspace
            (`(4n² + 6n + 1)·8` bytes, 10.7 GiB for n = 18944) then lives in host RAM instead of on the
            GPU, at the price of a slower build (LAPACK on the host instead of cuSOLVER).
        nspo_projector_offload (`bool`, defaults to `False`):
            Keep the projector bases in host RAM; each group's basis is copied to the weights' device when
            it is applied (once per protected layer and projection), then freed. The GPU then holds at most
            one basis (`n · min(k, n − k) · 4` bytes) instead of all owned ones (up to 19.4 GiB for
            Qwen2.5-7B's MLPs on one GPU), at the price of that host-to-GPU copy every projection step.
        nspo_push_projector (`bool`, defaults to `False`):
            `push_to_hub` also uploads `nspo_projector/` (its size is stated in the model card; up to
            ~19 GiB for Qwen2.5-7B's MLPs). By default only the model, tokenizer and card are uploaded.
        nspo_trainable_parameters (`list[str]` or `None`):
            Train only the parameters whose names (`model.named_parameters()`, a tied `lm_head.weight`
            included under both names) match one of these regexes (`re.search`); every other parameter is
            frozen. For ablations, e.g. plain GRPO (`nspo_project_every: 0`) on `["\\.mlp\\."]`,
            `["self_attn"]`, `["embed_tokens", "lm_head"]` or `["norm"]`: where is refusal learned? `None`
            (default) leaves every parameter as the preset does.
    """

    nspo_target_modules: list[str] = field(
        default_factory=lambda: ["mlp"],
        metadata={"help": "Protected layers: presets mlp|attention|full or regexes over module names."},
    )
    nspo_alpha: float = field(default=5e-5, metadata={"help": "Null space: eigenvalues <= alpha * lambda_max."})
    nspo_subspace: str = field(
        default="null",
        metadata={"help": "null (NSPO's null space) or contrast (training-prompt directions).", "choices": SUBSPACES},
    )
    nspo_contrast_budget: float = field(
        default=1e-4, metadata={"help": "contrast: max held-out preservation energy share per layer group."}
    )
    nspo_contrast_protect_benign: bool = field(
        default=False, metadata={"help": "contrast: also keep the benign training prompts' directions out."}
    )
    nspo_energy: float | None = field(
        default=None, metadata={"help": "Optional: top directions with this fraction of tr(C) stay range."}
    )
    nspo_max_null_rank: int | None = field(default=None, metadata={"help": "Optional cap on null dimensions."})
    nspo_project_every: int = field(
        default=1, metadata={"help": "Project every N optimizer steps (0 disables the projection)."}
    )
    nspo_project_gradients: bool = field(
        default=False, metadata={"help": "Also project gradients (g <- gP) before the optimizer step."}
    )
    nspo_null_space_adamw: bool = field(
        default=False, metadata={"help": "AdamW in each protected weight's null-space coordinates (one process)."}
    )
    nspo_untie_word_embeddings: bool = field(
        default=False, metadata={"help": "Untie a tied lm_head so `full` protects it by its own null space."}
    )
    nspo_num_preservation_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded random subset of this many preservation examples."}
    )
    nspo_preservation_max_length: int = field(default=512, metadata={"help": "Tokens per preservation example."})
    nspo_preservation_batch_size: int = field(default=8, metadata={"help": "Batch size of covariance collection."})
    nspo_heldout_fraction: float = field(
        default=0.1, metadata={"help": "Preservation examples held out of C to measure leakage."}
    )
    nspo_probe_tokens: int = field(default=1024, metadata={"help": "Token rows per layer group for leakage."})
    nspo_covariance_dtype: str = field(
        default="float64", metadata={"help": "Covariance accumulation dtype.", "choices": ["float64", "float32"]}
    )
    nspo_build_memory_gb: float = field(
        default=8.0,
        metadata={
            "help": "Covariance memory per process while building the projector (GiB): groups are collected "
            "in as many passes over the preservation data as this needs."
        },
    )
    nspo_projector_path: str | None = field(
        default=None, metadata={"help": "Projector cache directory (loaded if present, else written)."}
    )
    nspo_projector_from: str | None = field(
        default=None,
        metadata={"help": "A prebuilt projector to use (local folder or Hub repo id), checked against the model."},
    )
    nspo_eigh_on_cpu: bool = field(
        default=False, metadata={"help": "Eigendecompose C on the CPU (no GPU eigh workspace; slower build)."}
    )
    nspo_projector_offload: bool = field(
        default=False,
        metadata={"help": "Keep projector bases in host RAM and copy each to the GPU only while it is applied."},
    )
    nspo_push_projector: bool = field(
        default=False, metadata={"help": "push_to_hub also uploads nspo_projector/ (large: sized in the card)."}
    )
    nspo_trainable_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Train only parameters whose names match one of these regexes (ablations); others frozen."},
    )

    def __post_init__(self) -> None:
        # checked before GRPOConfig's own arithmetic on them (a 0 there is a ZeroDivisionError)
        for name, least in (
            ("per_device_train_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("num_generations", 2),
        ):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value!r}.")
        _check_output_dir(self.output_dir)
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}.")
        super().__post_init__()
        if isinstance(self.nspo_target_modules, str):
            self.nspo_target_modules = [self.nspo_target_modules]
        if not self.nspo_target_modules or not all(p.strip() for p in self.nspo_target_modules):
            raise ValueError(
                f"nspo_target_modules: empty pattern in {self.nspo_target_modules!r}; use one of {sorted(PRESETS)} "
                "or a regex."
            )
        _ = self.nullspace_rule  # validates alpha / energy / rank cap with field-named errors
        if self.nspo_subspace not in SUBSPACES:
            raise ValueError(f"nspo_subspace must be one of {list(SUBSPACES)}, got {self.nspo_subspace!r}.")
        if not 0.0 < self.nspo_contrast_budget < 1.0:
            raise ValueError(f"nspo_contrast_budget must lie in (0, 1), got {self.nspo_contrast_budget!r}; try 1e-4.")
        if self.nspo_subspace == "contrast" and self.nspo_heldout_fraction <= 0:
            raise ValueError(
                "nspo_heldout_fraction: nspo_subspace 'contrast' sizes each subspace on held-out preservation "
                "examples; set it > 0 (e.g. 0.2)."
            )
        if self.nspo_contrast_protect_benign and self.nspo_subspace != "contrast":
            raise ValueError(
                "nspo_contrast_protect_benign: applies to nspo_subspace 'contrast' only; set nspo_subspace: contrast "
                "or drop it."
            )
        if self.nspo_null_space_adamw and not self.nspo_project_every:
            raise ValueError(
                "nspo_null_space_adamw: needs the projection (nspo_project_every >= 1); set it or drop the option."
            )
        if self.nspo_untie_word_embeddings and self.use_vllm:
            raise ValueError(
                "nspo_untie_word_embeddings: vLLM's copy of the model stays tied and would drop the trained lm_head; "
                "set use_vllm false or drop the option."
            )
        optim = str(getattr(self.optim, "value", self.optim))
        if self.nspo_null_space_adamw and not optim.startswith("adamw_torch"):
            raise ValueError(
                f"nspo_null_space_adamw: replaces the optimizer, so optim={optim} would be ignored; leave optim at "
                "adamw_torch or drop nspo_null_space_adamw."
            )
        if isinstance(self.nspo_trainable_parameters, str):
            self.nspo_trainable_parameters = [self.nspo_trainable_parameters]
        for pattern in self.nspo_trainable_parameters or []:
            if not pattern.strip():
                raise ValueError("nspo_trainable_parameters: empty pattern; give regexes such as 'mlp' or 'norm'.")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"nspo_trainable_parameters: {pattern!r} is not a valid regex ({err}).") from None
        checks = [
            (self.nspo_project_every >= 0, "nspo_project_every", "must be >= 0 (0 disables the projection)"),
            (self.nspo_preservation_max_length >= 1, "nspo_preservation_max_length", "must be >= 1"),
            (self.nspo_preservation_batch_size >= 1, "nspo_preservation_batch_size", "must be >= 1"),
            (0.0 <= self.nspo_heldout_fraction < 1.0, "nspo_heldout_fraction", "must lie in [0, 1)"),
            (self.nspo_probe_tokens >= 1, "nspo_probe_tokens", "must be >= 1"),
            (
                math.isfinite(self.nspo_build_memory_gb) and self.nspo_build_memory_gb > 0,
                "nspo_build_memory_gb",
                "must be a finite number > 0",
            ),
            (
                self.nspo_num_preservation_samples is None or self.nspo_num_preservation_samples >= 1,
                "nspo_num_preservation_samples",
                "must be >= 1 or unset",
            ),
            (
                self.nspo_covariance_dtype in ("float64", "float32"),
                "nspo_covariance_dtype",
                "must be 'float64' or 'float32'",
            ),
        ]
        for ok, name, requirement in checks:
            if not ok:
                raise ValueError(f"{name} {requirement}, got {getattr(self, name)!r}.")
        projector_path = Path(self.nspo_projector_path) if self.nspo_projector_path else None
        if projector_path is not None and projector_path.exists() and not projector_path.is_dir():
            raise ValueError(
                f"nspo_projector_path: {projector_path} is a file; point it at a directory "
                "(an existing projector, or a new path to write one to)."
            )
        if self.nspo_projector_from and self.nspo_projector_path:
            raise ValueError(
                "nspo_projector_from: set either it (use a prebuilt projector) or nspo_projector_path (a cache "
                "folder, built there when missing), not both."
            )

    @property
    def nullspace_rule(self) -> NullSpaceRule:
        return NullSpaceRule(alpha=self.nspo_alpha, energy=self.nspo_energy, max_null_rank=self.nspo_max_null_rank)

    @property
    def build_covariance_copies(self) -> int:
        """Covariances a build holds per layer group at once: ``C``; with ``contrast`` also ``C_train``; with
        ``nspo_contrast_protect_benign`` also ``C_benign`` (each pass then covers that share of the groups)."""
        return 1 + (self.nspo_subspace == "contrast") + self.nspo_contrast_protect_benign

    @property
    def covariance_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.nspo_covariance_dtype)

    @property
    def freezes_non_targets(self) -> bool:
        """The ``full`` preset freezes every parameter that is not a protected weight."""
        return "full" in self.nspo_target_modules


def check_vllm_sleep_mode(args: GRPOConfig) -> None:
    """Refuse colocated vLLM's sleep mode on the CPU, where vLLM has none: vLLM itself would stop only after
    loading the model, with "Sleep mode is not supported on current platform."
    """
    if args.use_cpu and args.use_vllm and args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode:
        raise ValueError(
            "vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA, ROCm or XPU GPU, not use_cpu; set it to false."
        )


def _check_output_dir(output_dir: str | None) -> None:
    """``output_dir`` must be creatable and writable: its nearest existing ancestor is a writable directory."""
    if output_dir is None:
        return  # transformers picks its default
    if not str(output_dir).strip():
        raise ValueError("output_dir: empty; name a directory to write checkpoints and the model to.")
    existing = Path(output_dir).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output_dir: {output_dir} lies under {existing}, which is a file; choose another directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir: {existing} is not writable; choose a directory you can write to.")
