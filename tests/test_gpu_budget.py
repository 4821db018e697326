"""The per-GPU budget of the flagship recipe, term by term, against a calculation written out by hand."""

from __future__ import annotations

from pathlib import Path

from nspo_trl.cli.arguments import parse
from nspo_trl.cli.plan import main as plan_main
from nspo_trl.planning.gpu_budget import GiB
from nspo_trl.planning.plan import print_plan
from nspo_trl.planning.shapes import model_parameters

REPO = Path(__file__).resolve().parent.parent

# Qwen2.5-7B-Instruct: hidden 3584, MLP 18944, 28 layers, 28 heads of 128, 4 KV heads, vocab 152064, untied
H, F, L, V, KV_WIDTH = 3584, 18944, 28, 152064, 4 * 128
LAYER = (H * H + H) + 2 * (H * KV_WIDTH + KV_WIDTH) + H * H + 3 * H * F + 2 * H  # q, k, v (biased), o, MLP, norms
PARAMS = V * H + L * LAYER + H + V * H  # embeddings, layers, final norm, lm_head
RANKS = 8


def test_qwen7b_parameter_count_is_the_published_one():
    assert PARAMS == 7_615_616_512
    config = {
        "hidden_size": H, "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": V, "tie_word_embeddings": False, "model_type": "qwen2",
    }  # fmt: skip
    assert model_parameters(config) == PARAMS


def budget_lines(capsys, recipe="qwen7b", ranks=RANKS, gpu=80.0, *extra: str) -> dict[str, dict[str, float]]:
    script_args, training_args, model_args = parse([str(REPO / "recipes" / f"{recipe}.yaml"), "--dry-run", *extra])
    capsys.readouterr()
    backend = "zero3" if ranks > 1 else "ddp"
    fits = print_plan(script_args, training_args, model_args, ranks, backend, gpu)
    phases = {}
    for line in capsys.readouterr().out.splitlines():
        words = line.split()
        if words and words[0] in ("build", "generation", "training") and "=" in words:
            terms = " ".join(words[words.index("=") + 1 :]).split(", ")
            phases[words[0]] = {t.rsplit(" ", 1)[0]: float(t.rsplit(" ", 1)[1]) for t in terms}
    return phases, fits


def test_qwen7b_on_eight_80gb_gpus_every_term(capsys):
    phases, fits = budget_lines(capsys)
    gb = lambda value: round(value / GiB, 1)  # noqa: E731 (the plan prints GiB with one decimal)
    tokens = 20 * (512 + 512)  # micro-batch 20, prompt 512, completion 512
    state = 16 * PARAMS / RANKS  # bf16 weights + bf16 grads + fp32 master, m, v, sharded
    widest = F  # down_proj's input
    one_down_and_3_gate = F * F * 4 + 3 * H * H * 4  # the fullest 1.5 GiB pass of float32 covariances
    assert phases["build"] == {
        "model shard": gb(2 * PARAMS / RANKS),
        "gathered module": gb(2 * V * H),  # the embeddings (or lm_head), gathered alone
        "covariances": gb(one_down_and_3_gate),
        "forward": gb(8 * 512 * (V * 2 + (2 * F + 4 * H) * 2)),
        "NSPO state": phases["generation"]["NSPO state"],
    }  # vLLM asleep during the build (sleep mode), eigh on the CPU: no terms
    # the bound: the build adds at most 8 GiB to the model shard (and vLLM, asleep)
    assert sum(phases["build"].values()) - phases["build"]["model shard"] <= 8 * 2**30 / GiB + 0.05
    assert phases["generation"]["training state"] == gb(state)
    assert phases["generation"]["vLLM"] == gb(0.5 * 80 * GiB)
    assert phases["training"] == {
        "training state": gb(state),
        "NSPO state": phases["generation"]["NSPO state"],
        "live parameters": gb(2 * 10**9),
        "activations": gb(L * tokens * H * 2 + tokens * (6 * H + 4 * F + 2 * KV_WIDTH) * 2),
        "logits": gb(tokens * V * 6),
        "projection": gb(3 * F * H * 4),  # gate/up/down: 18944 x 3584 weights gathered in fp32
    }
    assert fits
    # eigh on the GPU instead: the float64 copy, eigenvectors and syevd workspace of down_proj's C
    on_gpu, _ = budget_lines(capsys, "qwen7b", RANKS, 80.0, "--nspo_eigh_on_cpu", "false")
    assert on_gpu["build"]["eigh workspace"] == gb((4 * widest**2 + 6 * widest + 1) * 8) == 10.7


def test_qwen7b_contrast_build_holds_three_covariances_and_a_larger_workspace(capsys):
    """A contrast subspace protecting the benign prompts holds C, C_train and C_benign per group: a third of the
    1.5 GiB budget is less than down_proj's C alone, so each down_proj pass holds its three (4.0 GiB). Its
    decomposition keeps 9 float64 n × n matrices live at once (float64 copies of C and C_train; C's eigenvectors;
    the whitening W; the eigenvectors of Wᵀ C_train W, flipped; W w; Q and R)."""
    gb = lambda value: round(value / GiB, 1)  # noqa: E731
    contrast = ("--nspo_subspace", "contrast", "--nspo_contrast_protect_benign", "true")
    phases, fits = budget_lines(capsys, "qwen7b", RANKS, 80.0, *contrast)
    assert phases["build"]["covariances"] == gb(3 * F * F * 4) == 4.0
    assert "eigh workspace" not in phases["build"] and fits  # the recipe decomposes on the CPU
    on_gpu, _ = budget_lines(capsys, "qwen7b", RANKS, 80.0, *contrast, "--nspo_eigh_on_cpu", "false")
    assert on_gpu["build"]["eigh workspace"] == gb((9 * F * F + 6 * F + 1) * 8) == 24.1
    plain, _ = budget_lines(capsys, "qwen7b", RANKS, 80.0, "--nspo_subspace", "contrast")
    assert plain["build"]["covariances"] == gb(2 * F * F * 4)  # C and C_train


def test_qwen7b_lora_on_one_80gb_gpu_every_term(capsys):
    """One GPU owns every group: its bases (<= n·n/2·4 bytes each) sit in host RAM (nspo_projector_offload)."""
    phases, fits = budget_lines(capsys, "qwen7b_lora", 1)
    gb = lambda value: round(value / GiB, 1)  # noqa: E731
    bases = L * (F * (F // 2) * 4 + H * (H // 2) * 4)  # down_proj's and gate/up's input group per layer
    assert gb(bases) == 19.4
    assert phases["build"] == {
        "model shard": gb(2 * PARAMS),  # the bf16 base, whole on its one GPU
        "covariances": gb(F * F * 4 + 3 * H * H * 4),
        "forward": gb(8 * 512 * (V * 2 + (2 * F + 4 * H) * 2)),
    }  # no NSPO state: LoRA keeps no W_ref and the bases are offloaded; vLLM asleep; eigh on the CPU
    assert sum(phases["build"].values()) - phases["build"]["model shard"] <= 8 * 2**30 / GiB
    assert phases["generation"] == {"training state": gb(2 * PARAMS), "vLLM": gb(0.4 * 80 * GiB)}
    assert phases["training"]["projection"] == gb(3 * F * H * 4 + F * (F // 2) * 4)  # plus one streamed basis
    assert "NSPO state" not in phases["training"] and fits
    # the bases on the GPU instead: all of them, in every phase
    resident, _ = budget_lines(capsys, "qwen7b_lora", 1, 80.0, "--nspo_projector_offload", "false")
    assert resident["build"]["NSPO state"] == resident["training"]["NSPO state"] == gb(bases)
    assert resident["training"]["projection"] == gb(3 * F * H * 4)


def test_a_budget_that_overflows_names_the_phase_and_term(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert plan_main(["recipes/qwen7b.yaml", "--num-processes", "8", "--gpu-memory", "24"]) == 3
    out = capsys.readouterr().out
    assert "build: 9.6 GiB of 24 GiB: FITS" in out
    assert "generation: 30.0 GiB of 24 GiB: DOES NOT FIT (largest term: training state, 14.2 GiB)" in out
    assert "training: 45.6 GiB of 24 GiB: DOES NOT FIT (largest term: logits, 17.4 GiB)" in out


def test_dry_run_and_train_refuse_a_recipe_that_does_not_fit(tmp_path, monkeypatch, capsys):
    from nspo_trl.cli.train import cli

    monkeypatch.chdir(REPO)
    assert cli(["recipes/qwen7b_lora.yaml", "--dry-run", "--gpu_memory_gib", "79.6"]) == 0  # its one-GPU launch
    capsys.readouterr()
    # the 8-GPU recipe launched as one process: DDP's 16 bytes per parameter alone are 113.5 GiB
    assert cli(["recipes/qwen7b.yaml", "--dry-run", "--gpu_memory_gib", "79.6"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("nspo_trl.train: error: gpu_memory_gib: the plan does not fit 79.6 GiB per GPU")
    )
    assert "training: 179.9 GiB of 79.6 GiB: DOES NOT FIT (largest term: training state, 113.5 GiB)" in captured.out
    assert cli(["recipes/qwen7b.yaml", "--dry-run", "--gpu_memory_gib", "79.6", "--ignore_memory_plan", "true"]) == 0
    # train refuses before anything is loaded or written
    out = tmp_path / "out"
    smoke = ["recipes/smoke.yaml", "--model_name_or_path", str(tmp_path / "tiny"), "--output_dir", str(out)]
    assert cli([*smoke, "--gpu_memory_gib", "0.0001"]) == 2
    assert "gpu_memory_gib: the plan does not fit" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "tiny").exists()
