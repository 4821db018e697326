"""Preservation ("general-task") data → token batches for covariance collection.

Accepted example layouts (the first that fits wins):

- ``messages``: a conversation (list of ``{"role", "content"}``), rendered with the chat template;
- ``prompt`` + ``completion`` (or ``response``): conversational lists (chat template over the
  concatenation) or plain strings (concatenated);
- ``text``: raw text;
- ``prompt`` alone: prompt tokens only.

Prompt *and* response tokens enter ``C`` (the paper's code uses both); padding never does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset

SUPPORTED_LAYOUTS = "'messages', 'prompt'+'completion', 'prompt'+'response', 'text' or 'prompt'"


def _is_conversation(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def layout_problem(example: dict[str, Any]) -> str | None:
    """Why ``example`` fits none of the supported layouts (None when it fits one)."""
    if "messages" in example and example["messages"] is not None:
        return None if _is_conversation(example["messages"]) else "'messages' is not a list of {role, content} turns"
    prompt = example.get("prompt")
    answer = example.get("completion", example.get("response"))
    if prompt is not None:
        if not (isinstance(prompt, str) or _is_conversation(prompt)):
            return "'prompt' is neither text nor a list of {role, content} turns"
        if answer is not None and not (isinstance(answer, str) or _is_conversation(answer)):
            return "'completion'/'response' is neither text nor a list of {role, content} turns"
        return None
    if isinstance(example.get("text"), str):
        return None
    return f"none of {SUPPORTED_LAYOUTS} (keys: {sorted(example)})"


def check_layout(dataset: Dataset, field: str = "preservation_dataset") -> None:
    """One-line ``ValueError`` naming ``field`` and the first bad row, before anything is tokenized."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{field}: empty; NSPO needs general-task examples to build its null space.")
    for index, example in enumerate(dataset):
        problem = layout_problem(example)
        if problem is not None:
            raise ValueError(f"{field}: row {index}: {problem}.")


def example_to_text(example: dict[str, Any], tokenizer) -> str:
    """Render one preservation example as the text the model reads."""
    problem = layout_problem(example)
    if problem is not None:
        raise ValueError(f"preservation_dataset: {problem}.")
    if example.get("messages"):
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    prompt = example.get("prompt")
    answer = example.get("completion", example.get("response"))
    if isinstance(prompt, list):
        turns = list(prompt) + (list(answer) if isinstance(answer, list) else [])
        if isinstance(answer, str):
            turns.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(turns, tokenize=False)
    if isinstance(prompt, str):
        return prompt + (answer if isinstance(answer, str) else "")
    if isinstance(example.get("text"), str):
        return example["text"]
    raise AssertionError("unreachable: layout_problem accepted the example")


def tokenize_preservation(dataset: Dataset, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of every example, truncated to ``max_length``; empty examples are dropped."""
    check_layout(dataset)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    sequences = []
    for example in dataset:
        text = example_to_text(example, tokenizer)
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            sequences.append(ids)
    if not sequences:
        raise ValueError("preservation_dataset: every example tokenized to nothing.")
    return sequences


def split_heldout(sequences: Sequence[list[int]], fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically split into (fit, held-out); held-out is empty for ``fraction == 0`` or one example."""
    count = round(len(sequences) * fraction)
    count = min(count, len(sequences) - 1)
    if count <= 0:
        return list(sequences), []
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout = sorted(order[:count])
    keep = sorted(order[count:])
    return [sequences[i] for i in keep], [sequences[i] for i in heldout]


def sequences_digest(sequences: Sequence[list[int]], max_length: int) -> str:
    digest = hashlib.sha256(f"max_length={max_length};".encode())
    for ids in sequences:
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def iter_batches(
    sequences: Sequence[list[int]], batch_size: int, pad_token_id: int, left: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded ``input_ids``/``attention_mask`` batches (``(batch, longest)``), in order.

    Right padding by default; ``left=True`` aligns every row's last token on the last position.
    """
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            columns = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, columns] = torch.tensor(ids)
            attention_mask[row, columns] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask}
