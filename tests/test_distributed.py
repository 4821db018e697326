"""Two CPU processes (gloo) under DDP, DeepSpeed ZeRO-2 and ZeRO-3, launched with the shipped
``accelerate_configs/`` turned to CPU: the constrained update stays exact and the final weights
equal the single-process run's (same seed, same global batch, rank-independent rollouts, see
``distributed/nspo_run.py``).

The first DeepSpeed launch on a machine compiles DeepSpeed's CPU communication op (~70 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from testing_utils import capture_inputs, leakage, load_reference

from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.data.preservation import tokenize_preservation
from nspo_trl.nullspace.projector import NullSpaceProjector

pytestmark = pytest.mark.slow  # several seconds to a minute each on 2 CPU cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # nspo_run's constants
RUN = ROOT / "tests" / "distributed" / "nspo_run.py"
CONFIGS = {"ddp": "ddp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml", "zero3_persistent": "zero3.yaml"}
MLP = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]


def cpu_variant(name: str, directory: Path) -> Path:
    """The shipped config on 2 CPU processes, fp32.

    ``zero3`` partitions even the tiny weights (persistence threshold 0); ``zero3_persistent`` keeps
    DeepSpeed's default threshold, under which they stay whole on every rank besides their partitions.
    """
    config = yaml.safe_load((ROOT / "accelerate_configs" / CONFIGS[name]).read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    config.pop("gpu_ids", None)  # MULTI_GPU + use_cpu: accelerate starts torchrun with gloo
    if config["distributed_type"] == "DEEPSPEED":
        stage = config["deepspeed_config"]["zero_stage"]
        ds_json = directory / f"{name}.json"
        zero = (
            {"stage": stage}
            if name == "zero3_persistent"
            else {"stage": stage, "stage3_param_persistence_threshold": 0}
        )
        ds_json.write_text(json.dumps({
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }))  # fmt: skip
        del config["mixed_precision"]  # with a DeepSpeed file, precision lives there (fp32 here)
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_json),
            "zero3_init_flag": config["deepspeed_config"]["zero3_init_flag"],
        }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: list[str], output: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((output / "result.json").read_text())


def single_run(model_dir: str, output: Path, *flags: str) -> tuple[dict, dict[str, torch.Tensor]]:
    result = run([sys.executable, str(RUN), "--model", model_dir, "--output", str(output), *flags], output)
    result["projector"] = NullSpaceProjector.load(output / "nspo_projector")
    return result, load_file(str(output / "final.safetensors"))


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    return single_run(tiny_model_dir, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def preservation_inputs(tiny_model_dir, tokenizer):
    # the same 3 examples as tests/distributed/nspo_run.py (odd: the ranks run unequal shards)
    sequences = tokenize_preservation(load_named_dataset("nspo_trl:preservation").select(range(3)), tokenizer, 14)
    reference = load_reference(tiny_model_dir)
    weights = {n: reference.get_submodule(n).weight.detach().clone() for n in MLP}
    return capture_inputs(reference, sequences, MLP, tokenizer.pad_token_id), weights


@pytest.mark.parametrize("backend", list(CONFIGS))
def test_two_processes_match_one_and_leak_nothing(backend, single, preservation_inputs, tiny_model_dir, tmp_path):
    single_result, single_final = single
    x, reference = preservation_inputs
    config = cpu_variant(backend, tmp_path)
    output = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    save = ["--save"] if backend == "zero3" else []
    # a build budget of one down_proj covariance (float64): one pass per group instead of the single run's one pass
    widest = json.loads((Path(tiny_model_dir) / "config.json").read_text())["intermediate_size"]
    budget = widest * widest * 8
    flags = [*save, "--build-memory-gb", str(budget / 2**30)]
    result = run([*launch, str(RUN), "--model", tiny_model_dir, "--output", str(output), *flags], output)
    final = load_file(str(output / "final.safetensors"))

    # each rank's measured peak of covariance held stays within the budget; the single run held every group at once
    assert len(result["build_peak_bytes"]) == 2 and all(0 < peak <= budget for peak in result["build_peak_bytes"])
    assert single_result["build_peak_bytes"][0] > 2 * budget
    # and the projector is the single process's, built in one pass on the same data
    projector = NullSpaceProjector.load(output / "nspo_projector")
    for group, expected in single_result["projector"].factors.items():
        built = projector.factors[group]
        assert (built.null_dim, built.kind) == (expected.null_dim, expected.kind), group
        torch.testing.assert_close(built.dense(), expected.dense(), rtol=0, atol=1e-5, msg=group)

    assert result["world_size"] == 2
    assert result["zero_stage"] == {"ddp": None, "zero2": 2, "zero3": 3, "zero3_persistent": 3}[backend]
    assert result["persistent"] == {"zero3": False, "zero3_persistent": True}.get(backend)
    assert set(result["owners"].values()) == {0, 1}  # NSPO's state really is split across the ranks
    assert result["rewards"] == pytest.approx(single_result["rewards"], abs=1e-5)  # the same rollouts

    for name in MLP:
        weight = final[f"{name}.weight"]
        moved = float((weight - reference[name]).norm() / reference[name].norm())
        assert moved > 1e-3, f"{name} did not train ({moved:.1e})"
        assert leakage(weight, reference[name], x[name]) <= 1e-6, name
    differences = {name: float((final[name] - value).abs().max()) for name, value in single_final.items()}
    assert max(differences.values()) <= 1e-5, differences
    if backend != "ddp":  # DeepSpeed's fp32 master holds the projected weights too (else the next step undoes them)
        master = load_file(str(output / "master.safetensors"))
        for name in MLP:
            torch.testing.assert_close(master[name], final[f"{name}.weight"], rtol=0, atol=1e-7)
    # the trainer's own measurement, on each owner's probes, agrees
    assert max(result["leakage"]["fit"].values()) <= 1e-6
    if save:
        check_sharded_state(output / "checkpoint-10" / "nspo", reference)


def check_sharded_state(state: Path, reference: dict[str, torch.Tensor]) -> None:
    """Each rank wrote the W_ref and bases of the groups it owns; one process reads them all back by name."""
    assert (state / "COMMITTED").is_file()
    shards = sorted(p.name for p in state.glob("reference-rank*.safetensors"))
    assert shards == ["reference-rank00000-of-00002.safetensors", "reference-rank00001-of-00002.safetensors"]
    parts = [load_file(str(state / name)) for name in shards]
    assert all(parts) and not set(parts[0]) & set(parts[1])  # split, not copied
    anchors = {**parts[0], **parts[1]}
    assert set(anchors) == set(MLP)
    for name in MLP:
        torch.testing.assert_close(anchors[name], reference[name], rtol=0, atol=0)
    projector = NullSpaceProjector.load(state / "projector")  # one process now owns every group
    assert len(list((state / "projector").glob("factors-rank*.safetensors"))) == 2
    assert all(f.basis is not None for f in projector.factors.values())
    for name in MLP:
        delta = torch.randn(3, reference[name].shape[1])
        torch.testing.assert_close(projector.apply(name, projector.apply(name, delta)), projector.apply(name, delta))


def test_lora_under_zero3_matches_one_process_and_leaks_nothing(
    tiny_model_dir, preservation_inputs, tmp_path, tmp_path_factory
):
    """``A ← A P`` on ZeRO-3 partitioned adapters: the merged update ``s·B A`` stays in the null space."""
    from nspo_run import LORA_ALPHA, LORA_RANK

    x, reference = preservation_inputs
    single_result, single_final = single_run(tiny_model_dir, tmp_path_factory.mktemp("single_lora"), "--lora")
    output = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_variant("zero3", tmp_path))]
    result = run([*launch, str(RUN), "--model", tiny_model_dir, "--output", str(output), "--lora"], output)
    final = load_file(str(output / "final.safetensors"))
    assert result["world_size"] == 2 and result["zero_stage"] == 3
    assert result["rewards"] == pytest.approx(single_result["rewards"], abs=1e-5)
    differences = {name: float((final[name] - value).abs().max()) for name, value in single_final.items()}
    assert max(differences.values()) <= 1e-5, differences
    for name in MLP:
        a = next(v for k, v in final.items() if k.endswith(f"{name}.lora_A.default.weight"))
        b = next(v for k, v in final.items() if k.endswith(f"{name}.lora_B.default.weight"))
        delta = (LORA_ALPHA / LORA_RANK) * b @ a
        assert delta.norm() / reference[name].norm() > 1e-4, f"{name}: LoRA did not train"
        assert leakage(reference[name] + delta, reference[name], x[name]) <= 1e-6, name
