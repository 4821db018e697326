"""The evaluation figures of docs/README.md, regenerated.

1. ``docs/smoke_eval/``: ``nspo-trl eval --suite drift`` on the smoke run (train it first with
   ``nspo-trl train`` in the working directory): the real report and heatmap of a real (tiny) run.
2. ``docs/qwen7b_layout/layers.png``: the same heatmap code on Qwen2.5-7B-Instruct's layer list (from
   the config that ships with the package, ``mlp`` preset as in ``recipes/qwen7b.yaml``), to check that
   196 linears stay readable. No 7B model was run here: the values are SYNTHETIC (a smooth pattern,
   stated in the title), only the layout is being checked.

    python docs/make_eval_figures.py [--smoke-output outputs/smoke]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nspo_trl.cli import commands as cli
from nspo_trl.eval.report import plot_layers
from nspo_trl.planning.plan import model_config, protected_linears

DOCS = Path(__file__).resolve().parent


def qwen7b_layout() -> Path:
    config = model_config("Qwen/Qwen2.5-7B-Instruct")
    mlp = {name for name, *_ in protected_linears(config, ["mlp"])}
    layers = {}
    for name, _, width, _ in protected_linears(config, ["full"]):
        block = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        protected = name in mlp
        layers[name] = {
            "leakage": (1e-5 if protected else 1e-2) * 10 ** math.sin(block / 4),  # synthetic
            "in_features": width,
            "null_dim": int(width * (0.3 + 0.4 * block / 27)) if protected else None,
            "protected": protected,
        }
    out = DOCS / "qwen7b_layout"
    out.mkdir(exist_ok=True)
    results = {"drift": {"heldout": {"set": "SYNTHETIC values, Qwen2.5-7B layer list", "layers": layers}}}
    (path,) = plot_layers(results, out)
    (out / "layers.json").write_text(json.dumps(results, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-output", default="outputs/smoke", type=Path)
    args = parser.parse_args()
    reference = args.smoke_output / "tiny-qwen2"
    code = cli.main(["eval", "--model", str(args.smoke_output), "--reference", str(reference), "--suite", "drift",
                     "--output_dir", str(DOCS / "smoke_eval")])  # fmt: skip
    if code:
        raise SystemExit(code)
    print(qwen7b_layout())


if __name__ == "__main__":
    main()
