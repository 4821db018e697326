"""The NSPO section of the model card that TRL writes for an ``NSPOTrainer`` run, and NSPO's citation."""

from __future__ import annotations

from collections.abc import Mapping

from nspo_trl.config import NSPOConfig
from nspo_trl.nullspace.projector import NullSpaceProjector

NSPO_CITATION = """\
@inproceedings{niu2026nspo,
    title        = {{Mitigating the Safety Alignment Tax with Null-Space Constrained Policy Optimization}},
    author       = {Yifan Niu and Han Xiao and Dongyi Liu and Nuo Chen and Jia Li},
    year         = 2026,
    booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
    eprint       = {arXiv:2512.11391}
}"""


def nspo_card_section(
    args: NSPOConfig,
    projector: NullSpaceProjector,
    num_protected: int,
    leakage: Mapping[str, Mapping[str, float]],
    details: Mapping[str, str] | None = None,
    projector_bytes: int | None = None,
    eval_report: str | None = None,
) -> str:
    """Markdown: what the run was (``details``: base model, data, reward and judge, as the trainer or
    ``nspo-trl train`` knows them), the NSPO settings, the null dimensions, the leakage per split (max over
    layers of ``‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖``, from ``leakage``: split → layer → value), where the
    projector is (``projector_bytes`` on disk; uploaded only with ``nspo_push_projector``), the projector
    per input group, and ``eval_report`` (an ``nspo-trl eval`` report) when there is one."""
    meta = projector.metadata
    summary = projector.summary()
    worst = {split: max(values.values()) for split, values in leakage.items() if values}
    lines = [
        "## NSPO",
        "",
        "Trained with [NSPO](https://huggingface.co/papers/2512.11391): after every "
        f"{args.nspo_project_every} optimizer step(s), each protected weight is set to "
        "`W_ref + (W − W_ref) P`, where `P` projects onto the null space of the layer's inputs on "
        "general-task (preservation) data, so outputs on such inputs stay unchanged.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {what} | {value} |" for what, value in (details or {}).items()]
    rule = (
        "by contrast with the harmful training prompts"
        + (" (benign training prompts protected too)" if args.nspo_contrast_protect_benign else "")
        + f", held-out preservation energy ≤ {args.nspo_contrast_budget:g} per group"
        if args.nspo_subspace == "contrast"
        else f"λ ≤ {args.nspo_alpha:g}·λmax, energy {args.nspo_energy}, max null rank {args.nspo_max_null_rank}"
    )
    lines += [
        f"| preservation examples | {meta.get('fit_examples')} fit, {meta.get('heldout_examples')} held out, "
        f"{meta.get('fit_tokens')} tokens |",
        f"| protected modules | `{', '.join(args.nspo_target_modules)}` ({num_protected} linears) |",
        f"| null space rule | {rule} |",
        f"| null dimensions | {summary['null_dim_total']} of {summary['in_features_total']} input dimensions "
        f"({100 * summary['null_fraction']:.1f}%) |",
        f"| gradient projection | {'yes' if args.nspo_project_gradients else 'no'} |",
        f"| learning rate, KL β | {args.learning_rate:g}, {args.beta:g} |",
    ]
    lines += [f"| leakage ({split}), max over layers | {value:.2e} |" for split, value in worst.items()]
    size = "" if projector_bytes is None else f" ({projector_bytes / 2**20:.1f} MiB)"
    where = (
        f"The projector (thin bases, eigenvalues, metadata){size} is in `nspo_projector/`."
        if args.nspo_push_projector
        else f"The projector{size} is not uploaded with the model (set `nspo_push_projector: true` to upload it)."
    )
    lines += [
        "",
        "Leakage is `‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖` on reference-model inputs `X` of the preservation data: "
        "`fit` on the examples the projector was built from, `heldout` on examples it never saw.",
        where,
        "",
        "| input group | in | null dim | stored basis | modules |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{group}` | {st['in_features']} | {st['null_dim']} | {st['stored']} × {st['stored_dim']} "
        f"| {len(st['modules'])} |"
        for group, st in projector.stats().items()
    ]
    if eval_report:
        lines += ["", "## Evaluation", "", eval_report.strip()]
    return "\n".join(lines)
