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
from testing_utils import PRESERVATION_MAX_LENGTH
from transformers import AutoTokenizer

from nspo_trl.data.named_sets import load_named_dataset
from nspo_trl.data.preservation import tokenize_preservation
from nspo_trl.models.tiny_model import build_tiny_model


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


@pytest.fixture(scope="session")
def preservation_sequences(preservation_small, tokenizer):
    return tokenize_preservation(preservation_small, tokenizer, PRESERVATION_MAX_LENGTH)
