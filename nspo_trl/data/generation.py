"""Greedy answers to conversational prompts: vLLM when installed, else transformers ``generate``.

Used to answer preservation prompts with the reference model and, in ``nspo_trl.eval``, to answer
benchmark prompts with the model under evaluation. Greedy decoding makes both reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence


def as_conversations(prompts: Sequence) -> list[list[dict[str, str]]]:
    """Strings become one user turn; conversations (lists of messages) are kept."""
    return [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]


def generate_responses(
    conversations: Sequence[list[dict[str, str]]],
    model_name_or_path: str,
    max_new_tokens: int = 256,
    use_vllm: bool | None = None,
    batch_size: int = 8,
    tokenizer=None,
    model=None,
    description: str = "generating",
) -> list[str]:
    """One greedy response per conversation (its chat template, generation prompt added).

    ``use_vllm=None`` uses vLLM when it is installed; transformers runs left-padded batches of
    ``batch_size`` on ``model`` (loaded from ``model_name_or_path`` unless given).
    """
    from trl.import_utils import is_vllm_available

    if use_vllm is None:
        use_vllm = is_vllm_available() and model is None
    if use_vllm:
        return _generate_with_vllm(list(conversations), model_name_or_path, max_new_tokens)
    return _generate_with_transformers(
        list(conversations), model_name_or_path, max_new_tokens, batch_size, tokenizer, model, description
    )


def _generate_with_vllm(conversations, model_name_or_path: str, max_new_tokens: int) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_name_or_path)
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=True)
    return [output.outputs[0].text for output in outputs]


def _generate_with_transformers(
    conversations, model_name_or_path, max_new_tokens, batch_size, tokenizer, model, description
) -> list[str]:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_name_or_path)
    model = model or AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype="auto")
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=None):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(**batch.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return responses
