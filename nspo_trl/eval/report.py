"""The evaluation report: ``report.json`` (everything), ``report.md`` (model vs reference tables a
reviewer can read) and PNG plots (leakage and null fraction as layer × module heatmaps; safety vs
capability).

Rates over ``n`` prompts carry their binomial standard error ``√(p(1 − p)/n)``; lm-eval metrics carry
lm-eval's own ``*_stderr``. Only metrics are listed, under plain names (``acc,none`` is "accuracy").
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from nspo_trl.eval.capability import headline

# lm-eval metric keys ("name,filter") → plain names; keys that are not scores (sample_len, alias) are dropped
METRIC_NAMES = {
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "exact_match": "exact match",
    "prompt_level_strict_acc": "prompt-level accuracy (strict)",
    "prompt_level_loose_acc": "prompt-level accuracy (loose)",
    "inst_level_strict_acc": "instruction-level accuracy (strict)",
    "inst_level_loose_acc": "instruction-level accuracy (loose)",
    "f1": "F1",
    "mcc": "Matthews correlation",
    "bleu": "BLEU",
    "perplexity": "perplexity",
    "word_perplexity": "word perplexity",
}
FILTER_NAMES = {"none": "", "strict-match": " (strict match)", "flexible-extract": " (flexible extract)"}
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_report(results: dict, output_dir: Path) -> list[Path]:
    """Write the JSON, Markdown and plots for ``results`` (see ``nspo_trl.cli.eval.evaluate``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "report.json", output_dir / "report.md"]
    written[0].write_text(json.dumps(results, indent=2, sort_keys=True))
    written[1].write_text(markdown(results))
    written += plot_layers(results, output_dir) + plot_safety_vs_capability(results, output_dir)
    return written


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"


def rate_with_error(rate: float | None, n: int) -> str:
    """``p ± √(p(1 − p)/n)`` (binomial standard error), or ``p`` when ``n`` < 2."""
    if rate is None or (isinstance(rate, float) and math.isnan(rate)):
        return "–"
    if n < 2:
        return _fmt(rate)
    return f"{rate:.3f} ± {math.sqrt(rate * (1 - rate) / n):.3f}"


def plain_metric(key: str) -> str | None:
    """``acc,none`` → ``accuracy``; ``exact_match,strict-match`` → ``exact match (strict match)``; None for
    entries that are not scores (standard errors, ``sample_len``, aliases)."""
    name, _, filter_ = key.partition(",")
    if name.endswith("_stderr") or name not in METRIC_NAMES:
        return None
    return METRIC_NAMES[name] + FILTER_NAMES.get(filter_, f" ({filter_})")


def _rates_table(title: str, suite: str, rate: str, model: dict, reference: dict) -> list[str]:
    lines = [f"## {title}", "", "| set | n | model | reference | Δ |", "|---|---|---|---|---|"]
    for name, entry in model[suite].items():
        other = reference.get(suite, {}).get(name, {})
        delta = entry[rate] - other[rate] if rate in other else None
        lines.append(
            f"| {name} | {entry['n']} | {rate_with_error(entry[rate], entry['n'])} | "
            f"{rate_with_error(other.get(rate), other.get('n', 0))} | {_fmt(delta)} |"
        )
    return [*lines, ""]


def _capability_table(model: dict, reference: dict) -> list[str]:
    lines = ["## Capability (lm-eval)", "", "| task | metric | model | reference | Δ |", "|---|---|---|---|---|"]
    for task, metrics in model["capability"].items():
        theirs = reference.get("capability", {}).get(task, {})
        for key, value in metrics.items():
            name = plain_metric(key)
            if name is None:
                continue
            stderr_key = key.replace(",", "_stderr,", 1)

            def cell(scores: dict, score: float | None, stderr_key: str = stderr_key) -> str:
                error = scores.get(stderr_key)
                if score is None:
                    return "–"
                return f"{score:.3f} ± {error:.3f}" if isinstance(error, float) and error > 0 else _fmt(score)

            other = theirs.get(key)
            delta = value - other if other is not None else None
            lines.append(f"| {task} | {name} | {cell(metrics, value)} | {cell(theirs, other)} | {_fmt(delta)} |")
    return [*lines, ""]


def _layer_groups(layers: dict) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {"protected": [], "unprotected": []}
    for entry in layers.values():
        groups["protected" if entry.get("protected") else "unprotected"].append(entry["leakage"])
    return groups


def drift_interpretation(drift: dict) -> str:
    """One sentence reading the drift tables: how far general outputs moved (held-out KL), whether the
    projector's own data fared better than new data, and where the drift comes from (protected vs
    unprotected layers)."""
    fit, heldout = drift.get("fit"), drift.get("heldout")
    last = heldout or fit
    level = last["kl_mean"]
    where = "held-out" if heldout else "fit"
    if level > 0.1:
        parts = [f"at {level:.2g} nats per token on {where} general data the outputs changed substantially"]
    elif level < 0.01:
        parts = [f"at {level:.2g} nats per token on {where} general data the outputs stayed close to the reference"]
    else:
        parts = [f"the {where} KL of {level:.2g} nats per token is a moderate change"]
    if fit and heldout and fit["kl_mean"] > 0:
        ratio = heldout["kl_mean"] / fit["kl_mean"]
        if ratio > 2:
            parts.append(f"held-out KL is {ratio:.1f}× the fit KL: the null space holds the data it was built from "
                         "better than new general inputs (more or broader preservation data would help)")  # fmt: skip
        else:
            parts.append(f"held-out KL is {ratio:.1f}× the fit KL: new general inputs fare as the fit data does")
    groups = _layer_groups(last["layers"])
    if groups["protected"] and groups["unprotected"]:
        shielded, free = max(groups["protected"]), max(groups["unprotected"])
        reading = (
            "the drift comes mainly from layers NSPO does not constrain"
            if free > 10 * shielded
            else "protected layers move their outputs too, so the null space misses part of these inputs"
            if shielded > 0.1
            else "both kinds contribute"
        )
        parts.append(f"protected layers leak at most {shielded:.2g} and unprotected ones up to {free:.2g}: {reading}")
    elif groups["unprotected"]:
        parts.append("the checkpoint has no projector, so no layer was constrained")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def _drift_tables(drift: dict) -> list[str]:
    lines = [
        "## Drift from the reference on general data",
        "",
        "`fit`: the preservation data the projector was built from; `held-out`: general data it never saw. "
        "KL(reference ‖ model) per token; leakage `‖X ΔWᵀ‖/‖X W_refᵀ‖` on the reference's inputs.",
        "",
        "| data | set | tokens | KL mean | KL max | max abs Δ log p | top-1 agreement | leakage max (protected) "
        "| leakage max (unprotected) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, report in drift.items():
        groups = _layer_groups(report["layers"])
        worst = {kind: max(values) if values else None for kind, values in groups.items()}
        lines.append(
            f"| {'held-out' if split == 'heldout' else split} | `{report['set']}` | {report['tokens']} | "
            f"{_fmt(report['kl_mean'])} | {_fmt(report['kl_max'])} | {_fmt(report['logprob_drift_max'])} | "
            f"{_fmt(report['top1_agreement'])} | {_fmt(worst['protected'])} | {_fmt(worst['unprotected'])} |"
        )
    lines += ["", drift_interpretation(drift), "", "Per layer: `layers.png` (heatmaps) and `report.json`.", ""]
    return lines


def markdown(results: dict) -> str:
    model, reference = results["models"]["model"], results["models"].get("reference", {})
    lines = [f"# NSPO evaluation: `{_relative(model['path'])}`", ""]
    if reference:
        lines += [f"Reference: `{_relative(reference['path'])}`. Rates: value ± binomial standard error.", ""]
    if "safety" in model:
        lines += _rates_table("Safety: unsafe rate (lower is better)", "safety", "unsafe_rate", model, reference)
    if "overrefusal" in model:
        title = "Over-refusal: refusal rate on safe prompts (lower is better)"
        lines += _rates_table(title, "overrefusal", "refusal_rate", model, reference)
    if "capability" in model:
        lines += _capability_table(model, reference)
    if results.get("drift"):
        lines += _drift_tables(results["drift"])
    return "\n".join(lines)


def layer_grid(layers: dict, value) -> tuple[list[str], list[str], list[list[float]]]:
    """``(rows, columns, grid)``: one row per block index (``layers.<i>``; modules outside the blocks, such
    as ``lm_head``, share a last row ``other``), one column per module kind, ``value(entry)`` in each cell
    (NaN where the block has no such module)."""
    cells: dict[tuple[str, str], float] = {}
    for name, entry in layers.items():
        match = re.search(r"layers\.(\d+)\.(?:\w+\.)?(\w+)$", name)
        row, column = (f"{int(match.group(1)):>3}", match.group(2)) if match else ("other", name.rsplit(".", 1)[-1])
        cells[row, column] = value(entry)
    rows = sorted({r for r, _ in cells}, key=lambda r: (not r.strip().isdigit(), int(r) if r.strip().isdigit() else r))
    found = {c for _, c in cells}
    columns = [c for c in MODULE_ORDER if c in found] + sorted(found - set(MODULE_ORDER))
    grid = [[cells.get((r, c), float("nan")) for c in columns] for r in rows]
    return rows, columns, grid


def plot_layers(results: dict, output_dir: Path) -> list[Path]:
    """Heatmaps over block × module: log10 leakage (held-out data when measured, else fit) and, when the
    checkpoint has a projector, the null fraction ``k / n``. Readable from 2 to 80 blocks."""
    drift = results.get("drift")
    report = (drift or {}).get("heldout") or (drift or {}).get("fit")
    if not report or not report["layers"]:
        return []
    import numpy as np

    plt = _pyplot()
    layers = report["layers"]
    rows, columns, leak = layer_grid(layers, lambda v: math.log10(max(v["leakage"], 1e-12)))
    panels = [("log10 leakage ‖XΔWᵀ‖/‖XW_refᵀ‖", leak, "magma", None)]
    if any(v["null_dim"] is not None for v in layers.values()):
        _, _, null = layer_grid(layers, lambda v: v["null_dim"] / v["in_features"] if v["null_dim"] else float("nan"))
        panels.append(("null dimension / input width (blank: unprotected)", null, "viridis", (0, 1)))
    height = min(14, 1.6 + 0.22 * len(rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), height), layout="constrained", squeeze=False)
    for ax, (title, grid, cmap, limits) in zip(axes[0], panels, strict=True):
        image = ax.imshow(np.array(grid, dtype=float), aspect="auto", cmap=cmap,
                          vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)  # fmt: skip
        ax.set_xticks(range(len(columns)), [c.removesuffix("_proj") for c in columns], rotation=45)
        step = max(1, len(rows) // 30)  # at most ~30 row labels
        ax.set_yticks(range(0, len(rows), step), [rows[i].strip() for i in range(0, len(rows), step)], fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    split = "held-out" if drift.get("heldout") else "fit"
    fig.suptitle(f"Per-layer drift on {split} general data ({report['set']})", fontsize=10)
    return [_save(fig, output_dir / "layers.png")]


def plot_safety_vs_capability(results: dict, output_dir: Path) -> list[Path]:
    """One point per model: mean capability score against mean safe rate (1 − unsafe rate)."""
    points = {}
    for name, entry in results["models"].items():
        if "safety" not in entry or "capability" not in entry:
            continue
        scores = [h[1] for h in map(headline, entry["capability"].values()) if h is not None]
        rates = [s["unsafe_rate"] for s in entry["safety"].values()]
        if scores and rates:
            points[name] = (sum(scores) / len(scores), 1 - sum(rates) / len(rates))
    if not points:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), layout="constrained")
    for name, (capability, safe) in points.items():
        ax.scatter(capability, safe, s=60, label=f"{name}: {_relative(results['models'][name]['path'])}", zorder=3)
    ax.set_xlabel("capability (mean lm-eval score)")
    ax.set_ylabel("safe rate (1 − unsafe rate)")
    ax.set_xlim(-0.05, 1.05)  # points on the edges stay whole
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Safety vs capability")
    return [_save(fig, output_dir / "safety_vs_capability.png")]


def _relative(path: str) -> str:
    """A local path relative to the working directory (a Hub id unchanged), for titles and legends."""
    if not Path(path).exists():
        return path
    try:
        return os.path.relpath(path)
    except ValueError:
        return Path(path).name


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
