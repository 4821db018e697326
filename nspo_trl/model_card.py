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
) -> str:
    """Markdown: the NSPO settings, the leakage per split (max over layers of
    ``‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖``, from ``leakage``: split → layer → value) and the projector per
    input group (input width, null dimension, stored basis)."""
    meta = projector.metadata
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
        f"| protected modules | `{', '.join(args.nspo_target_modules)}` ({num_protected} linears) |",
        f"| null space rule | λ ≤ {args.nspo_alpha:g}·λmax, energy {args.nspo_energy}, "
        f"max null rank {args.nspo_max_null_rank} |",
        f"| preservation examples | {meta.get('fit_examples')} fit, {meta.get('heldout_examples')} held out, "
        f"{meta.get('fit_tokens')} tokens |",
    ]
    lines += [f"| leakage ({split}), max over layers | {value:.2e} |" for split, value in worst.items()]
    lines += [
        "",
        "Leakage is `‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖` on reference-model inputs `X` of the preservation data.",
        "The projector (thin bases, eigenvalues, metadata) is in `nspo_projector/`.",
        "",
        "| input group | in | null dim | stored basis | modules |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{group}` | {st['in_features']} | {st['null_dim']} | {st['stored']} × {st['stored_dim']} "
        f"| {len(st['modules'])} |"
        for group, st in projector.stats().items()
    ]
    return "\n".join(lines)
