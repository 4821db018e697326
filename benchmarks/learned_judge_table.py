"""Table and figure of ``alignment_tax.py`` runs trained and judged with the learned judge.

    python benchmarks/alignment_tax.py --methods grpo grpo_kl nspo_full_gradproj nspo_contrast --seeds 0 \\
        --max-steps 40 --eval-every 10 --eval-tokens 64 --out OUT \\
        --set reward_funcs=learned_judge judge_mode=threshold max_completion_length=48
    python benchmarks/learned_judge_table.py OUT

Writes ``benchmarks/results/learned_judge/``: ``table.md`` (final figures per run, the reference first),
``summary.json`` (the same numbers, no answers) and ``paths.png`` (the learned judge's unsafe and
over-refusal rates against drift along training, one line per run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "learned_judge"
COLUMNS = [
    ("unsafe DNA (learned)", "unsafe_learned"),
    ("unsafe AdvBench (learned)", "unsafe_advbench_learned"),
    ("unsafe HarmBench (learned)", "unsafe_transfer_learned"),
    ("unsafe DNA (strict)", "unsafe_strict"),
    ("unsafe AdvBench (strict)", "unsafe_advbench_strict"),
    ("over-refusal (learned)", "overrefusal_learned"),
    ("over-refusal (keyword)", "overrefusal"),
    ("KL general", "kl_mean"),
    ("top-1 agree", "top1_agreement"),
]
NAMES = {
    "reference": "reference",
    "grpo": "GRPO (lr 3e-5)",
    "nspo_full_gradproj": "NSPO `full` + gradient projection (lr 3e-4)",
    "nspo_contrast": "NSPO contrast subspace",
    "grpo_kl": "GRPO + KL",
}


def name(run: dict) -> str:
    return NAMES.get(run["method"], run["method"]) + ("" if run["method"] == "reference" else f", seed {run['seed']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the --out folder of alignment_tax.py")
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in sorted((args.runs / "runs").glob("*.json"))]
    runs.sort(
        key=lambda r: (r["method"] != "reference", list(NAMES).index(r["method"]) if r["method"] in NAMES else 99)
    )
    header = "| run | " + " | ".join(c for c, _ in COLUMNS) + " | capability (± s.e.) |"
    lines = [header, "|---|" + "---|" * (len(COLUMNS) + 1)]
    summary = {}
    for run in runs:
        final = run["final"]
        cells = [f"{final[k]:.3g}" if k == "kl_mean" else f"{final[k]:.2f}" for _, k in COLUMNS]
        capability = final["capability"]
        lines.append(
            f"| {name(run)} | " + " | ".join(cells) + f" | {capability['score']:.3f} ± {capability['stderr']:.3f} |"
        )
        summary[run["name"]] = {
            **{k: final[k] for _, k in COLUMNS},
            "capability": capability["score"],
            "capability_stderr": capability["stderr"],
            "steps": run.get("steps"),
            "overrides": run.get("overrides"),
        }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot([r for r in runs if r.get("path")])
    print("\n".join(lines))


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for run in runs:
        kl = [max(p["kl_mean"], 1e-4) for p in run["path"]]
        for ax, key in zip(axes, ("unsafe_learned", "overrefusal_learned"), strict=True):
            ax.plot(kl, [p[key] for p in run["path"]], marker="o", label=name(run))
            for point, x in zip(run["path"], kl, strict=True):
                ax.annotate(str(point["step"]), (x, point[key]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    titles = ("unsafe rate on 24 held-out harmful prompts", "over-refusal on 16 alarming-but-benign prompts")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("drift: KL(ref ‖ model) per token on general prompts (log; 0 drawn at 1e-4)")
        ax.set_title(f"learned judge: {title}", fontsize=10)
    axes[0].set_ylabel("rate (lower is better)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Along training, every 10 steps (numbers: step), 48-token greedy answers", fontsize=10)
    fig.savefig(OUT / "paths.png", dpi=110)


if __name__ == "__main__":
    main()
