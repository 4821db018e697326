"""The evaluation report: ``report.json`` (everything), ``report.md`` (model vs reference tables)
and PNG plots (per-layer null dimension and leakage; safety vs capability)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nspo_trl.eval.capability import headline


def write_report(results: dict, output_dir: Path) -> list[Path]:
    """Write the JSON, Markdown and plots for ``results`` (see ``nspo_trl.eval.cli.evaluate``)."""
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


def _comparison(title: str, rows: list[tuple[str, int | str, float | None, float | None]], columns: str) -> list[str]:
    lines = [f"## {title}", "", f"| {columns} | model | reference | Δ |", "|---|---|---|---|---|"]
    for name, n, model, reference in rows:
        delta = model - reference if model is not None and reference is not None else None
        lines.append(f"| {name} | {n} | {_fmt(model)} | {_fmt(reference)} | {_fmt(delta)} |")
    return [*lines, ""]


def markdown(results: dict) -> str:
    model, reference = results["models"]["model"], results["models"].get("reference", {})
    lines = [f"# NSPO evaluation: `{model['path']}`", ""]
    if reference:
        lines += [f"Reference: `{reference['path']}`.", ""]
    if "safety" in model:
        rows = [(name, s["n"], s["unsafe_rate"], reference.get("safety", {}).get(name, {}).get("unsafe_rate"))
                for name, s in model["safety"].items()]  # fmt: skip
        lines += _comparison("Safety: unsafe rate (lower is better)", rows, "set | n")
    if "overrefusal" in model:
        rows = [(name, s["n"], s["refusal_rate"], reference.get("overrefusal", {}).get(name, {}).get("refusal_rate"))
                for name, s in model["overrefusal"].items()]  # fmt: skip
        lines += _comparison("Over-refusal: refusal rate on safe prompts (lower is better)", rows, "set | n")
    if "capability" in model:
        rows = []
        for task, metrics in model["capability"].items():
            for metric, value in metrics.items():
                if "stderr" not in metric:
                    rows.append((task, metric, value, reference.get("capability", {}).get(task, {}).get(metric)))
        lines += _comparison("Capability (lm-eval)", rows, "task | metric")
    drift = results.get("drift")
    if drift:
        lines += [
            "## Drift from the reference on general data",
            "",
            "| tokens | KL mean | KL max | max abs Δ log p | top-1 agreement | leakage max |",
            "|---|---|---|---|---|---|",
            f"| {drift['tokens']} | {_fmt(drift['kl_mean'])} | {_fmt(drift['kl_max'])} | "
            f"{_fmt(drift['logprob_drift_max'])} | {_fmt(drift['top1_agreement'])} | {_fmt(drift['leakage_max'])} |",
            "",
            "| layer | in | null dim | leakage |",
            "|---|---|---|---|",
        ]
        lines += [f"| `{name}` | {v['in_features']} | {v['null_dim'] if v['null_dim'] is not None else '–'} | "
                  f"{_fmt(v['leakage'])} |" for name, v in drift["layers"].items()]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_layers(results: dict, output_dir: Path) -> list[Path]:
    """Per protected layer: leakage (log scale) and, when known, the null fraction ``k / n``."""
    drift = results.get("drift")
    if not drift or not drift["layers"]:
        return []
    plt = _pyplot()
    names = list(drift["layers"])
    layers = [drift["layers"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [max(v["leakage"], 1e-12) for v in layers], color="tab:red", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("leakage ‖XΔWᵀ‖/‖XW_refᵀ‖", color="tab:red")
    ax.set_xticks(range(len(names)), [n.removeprefix("model.") for n in names], rotation=90, fontsize=6)
    if any(v["null_dim"] is not None for v in layers):
        twin = ax.twinx()
        fractions = [v["null_dim"] / v["in_features"] if v["null_dim"] is not None else float("nan") for v in layers]
        twin.plot(range(len(names)), fractions, "o-", color="tab:blue")
        twin.set_ylabel("null dimension / input width", color="tab:blue")
        twin.set_ylim(0, 1)
    ax.set_title("Per-layer leakage on general data (and NSPO null fraction)")
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
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (capability, safe) in points.items():
        ax.scatter(capability, safe, s=60, label=f"{name}: {results['models'][name]['path']}")
    ax.set_xlabel("capability (mean lm-eval score)")
    ax.set_ylabel("safe rate (1 − unsafe rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Safety vs capability")
    return [_save(fig, output_dir / "safety_vs_capability.png")]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
