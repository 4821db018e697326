"""Shared fixtures: a tiny local Qwen2 model + tokenizer, bundled data, and measuring helpers.

Nothing here touches the network: models are built from ``Qwen2Config`` and a BPE tokenizer
trained on bundled text.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nspo_trl.data import load_named_dataset
from nspo_trl.preservation import iter_batches, tokenize_preservation
from nspo_trl.tiny_model import build_tiny_model

# trainer tests run on the GPU where there is one (CI: CPU)
USE_CPU = not torch.cuda.is_available()
# torch.distributed's rendezvous variables, which launchers (and TRL's colocated vLLM start-up) put in os.environ
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """hidden 64, intermediate 128, 2 layers, untied lm_head (so the `full` preset can train it)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, intermediate_size=128))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def safety_prompts():
    return load_named_dataset("nspo_trl:safety_prompts").shuffle(seed=0)


@pytest.fixture(scope="session")
def preservation_small():
    """Four short conversations: with a 20-token cap they give < 64 tokens, so every layer has a null space."""
    return load_named_dataset("nspo_trl:preservation").select(range(4))


PRESERVATION_MAX_LENGTH = 14


def capture_inputs(model, sequences, layer_names, pad_token_id) -> dict[str, torch.Tensor]:
    """Independent of the library's collector: plain forward hooks → {layer: (tokens, n) float64} at real tokens."""
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    mask_holder = {}

    device = next(model.parameters()).device

    def make_hook(name):
        def hook(module, args, output):
            rows[name].append(args[0].detach()[mask_holder["mask"]].double().cpu())

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layer_names]
    try:
        with torch.no_grad():
            for batch in iter_batches(sequences, 8, pad_token_id):
                batch = {key: value.to(device) for key, value in batch.items()}
                mask_holder["mask"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in rows.items()}


def leakage(weight_now: torch.Tensor, weight_ref: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W − W_ref) Xᵀ‖ / ‖W_ref Xᵀ‖ in float64."""
    weight_now, weight_ref = weight_now.detach().cpu().double(), weight_ref.detach().cpu().double()
    delta = weight_now - weight_ref
    return float((x @ delta.T).norm() / (x @ weight_ref.T).norm())


@pytest.fixture(scope="session")
def preservation_sequences(preservation_small, tokenizer):
    return tokenize_preservation(preservation_small, tokenizer, PRESERVATION_MAX_LENGTH)


def load_reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
