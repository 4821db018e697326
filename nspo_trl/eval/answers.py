"""A model's greedy answers to prompts, and the token ids of (prompt, answer) pairs that drift is measured on."""

from __future__ import annotations

from collections.abc import Sequence

from nspo_trl.data.generation import generate_responses


def greedy_answers(model, tokenizer, prompts: Sequence, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers of ``model`` (in eval mode; its mode is restored) to conversational prompts."""
    was_training = model.training
    model.eval()
    try:
        return generate_responses(
            prompts,
            "",
            max_new_tokens,
            use_vllm=False,
            batch_size=batch_size,
            tokenizer=tokenizer,
            model=model,
            description="held-out answers",
        )
    finally:
        model.train(was_training)


def answer_sequences(tokenizer, prompts: Sequence, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt followed by its answer, as the chat template renders them."""
    conversations = [[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
