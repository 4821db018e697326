"""Could a harm-aware subspace give NSPO selectivity? Null space by contrast vs by small eigenvalues.

NSPO frees the directions general (preservation) inputs barely use: the eigenvectors of the
preservation covariance ``C_g`` with the smallest eigenvalues. On SmolLM2 harmful requests put the same
share of their energy into that null space as unseen general text (selectivity ≈ 1,
``null_space_diagnosis.py``), so an update there moves both alike. This script asks whether a subspace
picked by *contrast* does better, with no training:

- ``null``: the ``k`` eigenvectors of ``C_g`` with the smallest eigenvalues (NSPO's rule, ``k`` swept);
- ``contrast``: the ``k`` leading generalised eigenvectors of ``C_h v = μ (C_g + εI) v``, ``C_h`` the
  covariance of harmful training prompts followed by a refusal (directions harmful inputs use and general
  inputs do not), orthonormalised.

Both are fitted on the recipe's preservation "fit" examples and the harmful *training* prompts, then
measured on data neither saw: per subspace ``S`` (orthonormal ``(n, k)``) and probe set ``X``, the share
of input energy ``e(X) = ‖Sᵀ X‖² / ‖X‖²`` for held-out preservation examples (general), held-out harmful
prompts + refusal (test split), and alarming-but-benign prompts + refusal (over-refusal risk). An update
``ΔW = ΔW S Sᵀ`` changes a layer's output on inputs ``x`` by ``ΔW S Sᵀ x``, so at a general-energy budget
``b`` (largest ``k`` with ``e(general) ≤ b``) the attainable effect on harmful inputs relative to general
ones is bounded by ``√(e(harmful) / e(general))``: the selectivity. Means over the 30 layers per input kind.

``--prompts-only`` drops the refusal from every harmful and alarming sequence (``C_h`` and the probes):
the refusal's own tokens never occur in general data, so with them the contrast directions may be those
of the refusal text rather than of the requests.

    python benchmarks/harm_contrast.py [--budgets 1e-4 1e-3 1e-2] [--harmful-fit 200]
    python benchmarks/harm_contrast.py --prompts-only --out benchmarks/results/harm_contrast/prompts_only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from null_space_diagnosis import REFUSAL, covariances, kind_of, reference_and_preservation

from nspo_trl.data.named_sets import load_named_dataset, seeded_subset
from nspo_trl.nullspace.contrast import CONTRAST_RIDGE, contrast_basis_from_eigh, dim_within_budget, energy_curve
from nspo_trl.nullspace.targets import resolve_protected_layers

ROOT = Path(__file__).resolve().parent.parent
PROBES = ("general", "harmful", "alarming")


def at_budget(curves: dict[str, torch.Tensor], budget: float) -> dict[str, float]:
    """The probe energies at the largest ``k`` whose general energy stays within ``budget`` (k = 0: all zero)."""
    k = dim_within_budget(curves["general"], budget)
    row = {"k_fraction": k / curves["general"].numel()}
    row.update({key: float(curve[k - 1]) if k else 0.0 for key, curve in curves.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=ROOT / "recipes" / "smollm2_cpu.yaml", type=Path)
    parser.add_argument("--budgets", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--harmful-fit", type=int, default=200, help="harmful training prompts C_h is built from")
    parser.add_argument("--ridge", type=float, default=CONTRAST_RIDGE, help="ε / λmax(C_g) of the contrast pencil")
    parser.add_argument("--prompts-only", action="store_true", help="prompts and the generation prompt, no refusal")
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results" / "harm_contrast", type=Path)
    args = parser.parse_args()
    script_args, training_args, tokenizer, model, fit, heldout = reference_and_preservation(args.recipe)
    pad = tokenizer.pad_token_id

    def with_refusal(prompts) -> list[list[int]]:
        if args.prompts_only:
            texts = tokenizer.apply_chat_template(list(prompts), tokenize=False, add_generation_prompt=True)
        else:
            conversations = [[*p, {"role": "assistant", "content": REFUSAL}] for p in prompts]
            texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    train = load_named_dataset(script_args.dataset_name, "train").filter(lambda row: row["is_harmful"])
    harmful_fit = with_refusal(seeded_subset(train, args.harmful_fit, training_args.seed)["prompt"])
    harmful_test = with_refusal(load_named_dataset(script_args.heldout_harmful_dataset, "test")["prompt"])
    alarming = with_refusal(load_named_dataset("nspo_trl:overrefusal_prompts")["prompt"])

    modules = {layer.name: layer.linear for layer in resolve_protected_layers(model, ["full"])}
    with torch.no_grad():
        c_fit, _ = covariances(model, modules, fit, pad)
        c_harm_fit, _ = covariances(model, modules, harmful_fit, pad)
        probes = {
            "general": covariances(model, modules, heldout, pad)[0],
            "harmful": covariances(model, modules, harmful_test, pad)[0],
            "alarming": covariances(model, modules, alarming, pad)[0],
        }

    rows: list[dict] = []
    for group in sorted(c_fit):
        c_general = c_fit[group].double()
        held = {key: probes[key][group].double() for key in PROBES}
        lam, null_basis = torch.linalg.eigh(c_general)  # ascending eigenvalues: NSPO's null directions first
        contrast = contrast_basis_from_eigh(lam, null_basis, c_harm_fit[group].double(), args.ridge)
        bases = {"null": null_basis, "contrast": contrast}
        for subspace, basis in bases.items():
            curves = {key: energy_curve(basis, c) for key, c in held.items()}
            for budget in args.budgets:
                rows.append(
                    {"group": group, "kind": kind_of(group), "subspace": subspace, "budget": budget}
                    | at_budget(curves, budget)
                )

    table = []
    for budget in args.budgets:
        for kind in sorted({r["kind"] for r in rows}):
            for subspace in ("null", "contrast"):
                chosen = [r for r in rows if (r["budget"], r["kind"], r["subspace"]) == (budget, kind, subspace)]
                mean = {key: statistics.fmean(r[key] for r in chosen) for key in ("k_fraction", *PROBES)}
                ratio = mean["harmful"] / mean["general"] if mean["general"] else float("nan")
                table.append({"budget": budget, "kind": kind, "subspace": subspace, **mean, "selectivity": ratio**0.5})
    suffix = " (prompt only)" if args.prompts_only else " + refusal"
    lines = [
        f"SmolLM2, `{args.recipe.name}`: C_g from {len(fit)} preservation examples, C_h from {len(harmful_fit)} "
        f"harmful training prompts{suffix}; probes: {len(heldout)} held-out preservation examples, "
        f"{len(harmful_test)} held-out harmful and {len(alarming)} alarming-but-benign prompts{suffix}",
        "",
        "| general-energy budget | input kind | subspace | dims | e(general) | e(harmful) | e(alarming) "
        "| selectivity √(harm/general) | harmful / alarming |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['budget']:g} | {r['kind']} | {r['subspace']} | {r['k_fraction']:.3f} | {r['general']:.1e} | "
        f"{r['harmful']:.1e} | {r['alarming']:.1e} | {r['selectivity']:.2f} | "
        f"{r['harmful'] / r['alarming'] if r['alarming'] else float('nan'):.2f} |"
        for r in table
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"table": table, "per_group": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
