"""A tiny Qwen2-shaped causal LM and BPE tokenizer, built locally (no Hub) for smoke runs and tests.

The tokenizer is a byte-level BPE trained on the bundled prompts, preservation data and some
refusal phrases; the model is randomly initialised from a fixed seed, so the same arguments
always give the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request because it could hurt someone.",
    "Sorry, I won't provide that. I must decline.",
    "I am unable to help with this, but I can suggest safer alternatives.",
]


def _corpus() -> list[str]:
    from nspo_trl.data.named_sets import bundled_path

    texts = list(REFUSALS)
    for name in ("safety_prompts", "preservation"):
        for line in bundled_path(name).read_text().splitlines():
            record = json.loads(line)
            for message in record.get("prompt", []) + record.get("messages", []):
                texts.append(message["content"])
    return texts


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model_shape(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
) -> dict:
    """The ``Qwen2Config`` fields of the tiny model's shape (also what ``--dry-run`` plans with)."""
    return {
        "model_type": "qwen2",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
    }


def build_tiny_model(output_dir: str | Path, seed: int = 0, **shape) -> Path:
    """Write a random tiny ``Qwen2ForCausalLM`` (fp32) and its tokenizer to ``output_dir``; return the path.

    ``shape`` overrides fields of :func:`tiny_model_shape` (e.g. ``hidden_size=256``).
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    output_dir = Path(output_dir)
    fields = {k: v for k, v in tiny_model_shape(**shape).items() if k != "model_type"}
    tokenizer = build_tokenizer(fields["vocab_size"])
    config = Qwen2Config(
        **{**fields, "vocab_size": len(tokenizer)},
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=True
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
