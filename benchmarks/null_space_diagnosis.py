"""Where can NSPO learn refusal? Null-space geometry of a real model's inputs, no training needed.

For every linear of SmolLM2 (the ``full`` preset's input groups), ``C`` is built from the recipe's
preservation examples ("fit") at the reference model, exactly as the trainer builds it, and its
null space ``P`` is taken at several α. Then, per layer kind (attention q/k/v input, attention
output input, MLP gate/up input, MLP down input), the share of input energy that lies in the null
space, ``e = tr(P Σ x xᵀ) / tr(Σ x xᵀ)``, for

- ``fit``: the preservation examples themselves (≈ 0 by construction: the guarantee),
- ``held-out``: preservation examples kept out of ``C`` (what drift on general data sees),
- ``harmful``: HarmBench training prompts followed by a refusal, the inputs on which NSPO must act.

An update ``ΔW = ΔW P`` changes a layer's output on inputs ``x`` by ``ΔW P x``: its effect on
harmful inputs relative to held-out general inputs is bounded by ``√(e_harmful / e_held-out)``
(selectivity). Also printed: the null fraction of the gradient that teaches refusal (the NLL of
the refusal on the harmful prompts), ``‖g P‖ / ‖g‖`` per kind, the share of that gradient per
parameter group (linears, embeddings, norms), and the energy of the "refusal direction" (mean
MLP input at the last prompt token, harmful minus benign prompts) in the null space.

    python benchmarks/null_space_diagnosis.py [--alphas 5e-5 5e-4 5e-3] [--recipe recipes/smollm2_cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nspo_trl.cli.arguments import parse
from nspo_trl.cli.train import load_preservation, prepare_model
from nspo_trl.data.named_sets import load_named_dataset, seeded_subset
from nspo_trl.data.preservation import iter_batches, split_heldout, tokenize_preservation
from nspo_trl.nullspace.collect import CovarianceCollector, run_collection
from nspo_trl.nullspace.targets import resolve_protected_layers

ROOT = Path(__file__).resolve().parent.parent
REFUSAL = "I'm sorry, but I can't help with that."


def kind_of(group: str) -> str:
    if "self_attn.q_proj" in group or "self_attn.k_proj" in group or "self_attn.v_proj" in group:
        return "attn qkv in"
    if "self_attn.o_proj" in group:
        return "attn o in"
    if "mlp.down_proj" in group:
        return "mlp down in"
    return "mlp gate/up in"


def covariances(model, modules, sequences, pad_token_id) -> tuple[dict, dict]:
    collector = CovarianceCollector(modules, dtype=torch.float32)  # α ≥ 5e-5 ≫ fp32 round-off
    run_collection(model, iter_batches(sequences, 8, pad_token_id), collector, False, description="C", total=None)
    return collector.covariances, collector.groups


def reference_and_preservation(recipe: Path):
    """The recipe's arguments, tokenizer and fp32 reference model, and its preservation examples' token ids
    split into (fit, held-out) exactly as the trainer splits them."""
    script_args, training_args, model_args = parse([str(recipe)])
    model_path = prepare_model(script_args, training_args, model_args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    preservation = load_preservation(script_args, training_args, model_path)
    preservation = seeded_subset(preservation, training_args.nspo_num_preservation_samples, training_args.seed)
    sequences = tokenize_preservation(preservation, tokenizer, training_args.nspo_preservation_max_length)
    fit, heldout = split_heldout(sequences, training_args.nspo_heldout_fraction, seed=training_args.seed)
    return script_args, training_args, tokenizer, model, fit, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=ROOT / "recipes" / "smollm2_cpu.yaml", type=Path)
    parser.add_argument("--alphas", nargs="+", type=float, default=[5e-5, 5e-4, 5e-3])
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results" / "null_space_diagnosis.json", type=Path)
    args = parser.parse_args()
    _, _, tokenizer, model, fit, heldout = reference_and_preservation(args.recipe)
    pad = tokenizer.pad_token_id
    harmful_prompts = list(load_named_dataset("nspo_trl:harmbench", "train")["prompt"])
    benign_prompts = [row["prompt"] for row in load_named_dataset("nspo_trl:safety_prompts") if not row["is_harmful"]]

    def with_refusal(prompt):
        text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": REFUSAL}], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    harmful = [with_refusal(p) for p in harmful_prompts]
    layers = resolve_protected_layers(model, ["full"])
    modules = {layer.name: layer.linear for layer in layers}
    with torch.no_grad():
        c_fit, groups = covariances(model, modules, fit, pad)
        c_held, _ = covariances(model, modules, heldout, pad)
        c_harm, _ = covariances(model, modules, harmful, pad)

    # gradient that teaches refusal: NLL of the refusal tokens after each harmful prompt
    model.zero_grad()
    prompt_lengths = [
        len(with_refusal(p)) - len(tokenizer(REFUSAL + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        for p in harmful_prompts
    ]
    for start in range(0, len(harmful), 8):
        batch = next(iter_batches(harmful[start : start + 8], 8, pad))
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for row, length in enumerate(prompt_lengths[start : start + 8]):
            labels[row, :length] = -100
        (model(**batch, labels=labels).loss * len(labels) / len(harmful)).backward()
    grad_share: dict[str, float] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        kind = (
            "embedding (tied lm_head)"
            if "embed" in name
            else "norm"
            if "norm" in name
            else ("attention" if "self_attn" in name else "mlp")
        )
        grad_share[kind] = grad_share.get(kind, 0.0) + float(param.grad.double().pow(2).sum())
    total = sum(grad_share.values())
    grad_share = {k: v / total for k, v in grad_share.items()}

    # refusal direction at every MLP input (last prompt token), harmful minus benign
    last_inputs: dict[str, dict[str, torch.Tensor]] = {"harmful": {}, "benign": {}}
    gate_groups = sorted({g for g in groups.values() if "mlp.gate_proj" in g or "mlp.up_proj" in g})
    with torch.no_grad():
        for key, prompts in (("harmful", harmful_prompts), ("benign", benign_prompts)):
            captured: dict[str, list[torch.Tensor]] = {g: [] for g in gate_groups}
            hooks = [
                modules[g].register_forward_pre_hook(lambda m, a, rows=captured[g]: rows.append(a[0][:, -1].double()))
                for g in gate_groups
            ]
            for prompt in prompts:
                ids = tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                model(**ids)
            for hook in hooks:
                hook.remove()
            last_inputs[key] = {g: torch.cat(v).mean(0) for g, v in captured.items()}

    rows = []
    eig = {g: tuple(t.double() for t in torch.linalg.eigh(c)) for g, c in c_fit.items()}
    for alpha in args.alphas:
        per_kind: dict[str, dict[str, list[float]]] = {}
        for group, (lam, vectors) in eig.items():
            null = vectors[:, lam <= alpha * lam[-1]]
            share = per_kind.setdefault(
                kind_of(group), {k: [] for k in ("null_dim", "fit", "heldout", "harmful", "grad", "direction")}
            )
            share["null_dim"].append(null.shape[1] / lam.numel())
            for key, cov in (("fit", c_fit), ("heldout", c_held), ("harmful", c_harm)):
                c = cov[group].double()
                share[key].append(float(torch.trace(null.T @ c @ null) / torch.trace(c)))
            kept = norm = 0.0
            for module, g in groups.items():
                if g == group and modules[module].weight.grad is not None:
                    grad = modules[module].weight.grad.double()
                    kept += float((grad @ null).pow(2).sum())
                    norm += float(grad.pow(2).sum())
            share["grad"].append((kept / norm) ** 0.5 if norm else float("nan"))
            if group in gate_groups:
                d = (last_inputs["harmful"][group] - last_inputs["benign"][group]).double()
                share["direction"].append(float((null.T @ d).pow(2).sum() / d.pow(2).sum()))
        for kind, share in per_kind.items():
            mean = {k: sum(v) / len(v) if v else None for k, v in share.items()}
            selectivity = (mean["harmful"] / mean["heldout"]) ** 0.5 if mean["heldout"] else float("inf")
            rows.append({"alpha": alpha, "kind": kind, **mean, "selectivity": selectivity})

    lines = [
        "| α | input kind | null dims | energy in null: fit | held-out general | harmful+refusal | "
        "selectivity √(harm/held-out) | ‖gP‖/‖g‖ (refusal NLL) | refusal direction in null |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        direction = "–" if r["direction"] is None else f"{r['direction']:.2e}"
        lines.append(
            f"| {r['alpha']:g} | {r['kind']} | {r['null_dim']:.2f} | {r['fit']:.1e} | {r['heldout']:.1e} | "
            f"{r['harmful']:.1e} | {r['selectivity']:.2f} | {r['grad']:.3f} | {direction} |"
        )
    lines += [
        "",
        "Share of the refusal-NLL gradient's squared norm per parameter group: "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(grad_share.items())),
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "grad_share": grad_share,
                "fit_examples": len(fit),
                "heldout_examples": len(heldout),
                "harmful_examples": len(harmful),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
