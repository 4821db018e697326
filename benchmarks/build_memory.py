"""Per-rank peak memory of NSPO's whole projector build, before and after the memory-bounded build.

Two CPU processes under DeepSpeed ZeRO-3 (gloo, every weight partitioned) build the projector of a
Qwen2-shaped random model (Qwen2.5-0.5B's layer shape by default: hidden 896, MLP 4864) from the bundled
preservation data, once per variant:

- ``before``: one pass holding every group's covariance on every rank until the reduction (what the
  build did before ``nspo_build_memory_gb``; ``nspo_build_memory_gb`` large enough for one pass);
- ``after``: ``nspo_build_memory_gb`` = one ``down_proj`` covariance: as many passes as that needs, a
  rank holding one pass of covariances at most, eigendecomposed on the owner at once.

Each rank reports the peak bytes of covariance it held at once (an instrumented collector,
``tests/distributed/nspo_run.py``), its peak resident memory during ``build_projector`` above the level
at its start (sampled every millisecond; freed memory the allocator keeps still counts), and the build's
wall time. The resident peak also holds each owned group's float64 ``eigh`` (``(4n² + 6n + 1)·8`` bytes,
722 MiB at n = 4864), which no covariance budget removes (``nspo_eigh_on_cpu`` moves it off a GPU).
The old build also gathered the whole model on every rank under ZeRO-3; that code is gone, so its cost
is stated by arithmetic (parameters × 4 bytes), not measured.

    python benchmarks/build_memory.py                     # 4 layers of Qwen2.5-0.5B's shape (~5 min on 2 free cores)
    python benchmarks/build_memory.py --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # the instrumented collector

from results_table import record  # noqa: E402


def child(model: str, budget_gb: float, out: str) -> None:
    import psutil
    import torch
    from nspo_run import CovarianceMeter
    from projector_build import RssSampler
    from transformers import AutoTokenizer

    from nspo_trl import NSPOConfig, NSPOTrainer
    from nspo_trl.data.named_sets import load_named_dataset
    from nspo_trl.nullspace.sharding import all_gather_objects

    meter = CovarianceMeter()
    args = NSPOConfig(
        output_dir=str(Path(out) / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        nspo_target_modules=["mlp"],
        nspo_preservation_max_length=64,
        nspo_preservation_batch_size=4,
        nspo_heldout_fraction=0.0,
        nspo_build_memory_gb=budget_gb,
    )
    window = {}
    build = NSPOTrainer.build_projector

    def measured_build(self, *a, **kw):  # resident memory from the build's start to its end only
        window["baseline"], window["sampler"] = psutil.Process().memory_info().rss, RssSampler()
        window["sampler"].start()
        start = time.perf_counter()
        projector = build(self, *a, **kw)
        window["seconds"], window["rss"] = time.perf_counter() - start, window["sampler"].stop() - window["baseline"]
        return projector

    NSPOTrainer.build_projector = measured_build
    trainer = NSPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=load_named_dataset("nspo_trl:safety_prompts"),
        processing_class=AutoTokenizer.from_pretrained(model),
        preservation_dataset=load_named_dataset("nspo_trl:preservation"),
    )
    measured = {"covariance_peak": meter.peak, "rss_peak": window["rss"], "seconds": window["seconds"]}
    ranks = all_gather_objects(measured)
    if trainer.accelerator.is_main_process:
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.model.parameters())
        summary = {"ranks": ranks, "params": params, "torch": torch.__version__}
        (Path(out) / "result.json").write_text(json.dumps(summary))


def accelerate_config(directory: Path, processes: int) -> Path:
    """ZeRO-3 on ``processes`` CPU processes (gloo), fp32, every weight partitioned (persistence threshold 0)."""
    import yaml

    ds = directory / "zero3.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    }))  # fmt: skip
    config = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "use_cpu": True,
        "num_machines": 1, "num_processes": processes, "machine_rank": 0, "main_training_function": "main",
        "deepspeed_config": {"deepspeed_config_file": str(ds), "zero3_init_flag": True},
    }  # fmt: skip
    path = directory / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BUDGET_GB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.child[2])
        return

    from nspo_trl.models.tiny_model import build_tiny_model

    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers)
    shape.update(num_attention_heads=args.hidden // 64, num_key_value_heads=2)
    down = args.intermediate**2 * 8  # one float64 down_proj covariance
    every_group = args.layers * (args.intermediate**2 + args.hidden**2) * 8
    variants = {"before": 2 * every_group / 2**30, "after": down / 2**30}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", **shape)
        config = accelerate_config(tmp, args.processes)
        for name, budget in variants.items():
            out = tmp / name
            out.mkdir()
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), __file__]
            done = subprocess.run(
                [*command, "--child", str(model), str(budget), str(out)], capture_output=True, text=True, env=env
            )
            if done.returncode:
                sys.exit(f"{name}: the build failed:\n{done.stderr[-4000:]}")
            results[name] = json.loads((out / "result.json").read_text())

    params = results["after"]["params"]
    print(f"Qwen2-shaped model, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate} "
          f"({params / 1e6:.0f} M params), MLP targets, {args.processes} processes, ZeRO-3 on CPU, "
          "float64 C")  # fmt: skip
    print(f"covariances of every group: {every_group / 2**20:.0f} MiB; one down_proj: {down / 2**20:.0f} MiB")
    for name, result in results.items():
        for rank, r in enumerate(result["ranks"]):
            row = {
                "model": f"{args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}",
                "build": name,
                "nspo_build_memory_gb": f"{variants[name]:.3g}",
                "rank": str(rank),
                "covariance peak (measured)": f"{r['covariance_peak'] / 2**20:.0f} MiB",
                "resident peak above start": f"{r['rss_peak'] / 2**20:.0f} MiB",
                "build s": f"{r['seconds']:.1f}",
            }
            table = record("build_memory", row, key=("model", "build", "rank"))
    print(table.read_text(), end="")
    print(f"recorded in {table}")
    worst = {name: max(r["covariance_peak"] for r in result["ranks"]) for name, result in results.items()}
    rss = {name: max(r["rss_peak"] for r in result["ranks"]) for name, result in results.items()}
    print(f"ratio before/after, most loaded rank: covariances {worst['before'] / worst['after']:.2f}x, "
          f"resident {rss['before'] / rss['after']:.2f}x; the old whole-model gather (not measured, code gone) "
          f"added {params * 4 / 2**20:.0f} MiB per rank here, "
          f"{7.6e9 * 2 / 2**30:.1f} GiB for Qwen2.5-7B in bf16")  # fmt: skip


if __name__ == "__main__":
    main()
