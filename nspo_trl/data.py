"""Data sets by name: the small sets bundled with the package, local files, or Hub ids.

``nspo_trl:<name>`` loads ``nspo_trl/resources/<name>.jsonl`` (written for this project):

- ``nspo_trl:safety_prompts``: 32 harmful and 32 benign conversational prompts, column
  ``is_harmful`` (for the rule-based refusal reward of smoke runs);
- ``nspo_trl:preservation``: 60 general-task conversations (arithmetic, code, instruction
  following) in ``messages`` layout, for building the null space.

Anything else goes to ``datasets.load_dataset`` unchanged (a Hub id, a local directory, or a
``.json``/``.jsonl``/``.parquet``/``.csv`` file).

Safety prompts come from PKU-SafeRLHF (:func:`pku_saferlhf_prompts`, the paper trains on 40% of its
unique prompts); preservation sets from any prompt/response data (:func:`preservation_pairs`) or
from prompts answered by the reference model (:func:`generate_preservation_responses`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from datasets import Dataset, load_dataset

logger = logging.getLogger(__name__)
PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"
PKU_SAFETY_COLUMNS = ("is_response_0_safe", "is_response_1_safe")

BUNDLED_PREFIX = "nspo_trl:"
# local data files load_named_dataset reads, by suffix: the datasets builder for each
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def seeded_subset(dataset: Dataset, count: int | None, seed: int) -> Dataset:
    """``min(count, len)`` examples drawn without replacement with ``seed``; ``count=None`` keeps ``dataset`` as is.

    The one sampler for every subset (PKU-SafeRLHF prompts, preservation sets): the CLI generates
    preservation answers only for the subset the trainer later keeps, which relies on both calling this.
    """
    if count is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(count, len(dataset))))


def bundled_path(name: str) -> Path:
    path = Path(str(resources.files("nspo_trl") / "resources" / f"{name}.jsonl"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise ValueError(f"dataset {BUNDLED_PREFIX}{name} is not bundled; available: {available}.")
    return path


def load_named_dataset(name: str, split: str = "train", config: str | None = None) -> Dataset:
    """Load ``name`` (bundled, local file or Hub id) and return ``split``."""
    if name.startswith(BUNDLED_PREFIX):
        return load_dataset("json", data_files=str(bundled_path(name.removeprefix(BUNDLED_PREFIX))), split="train")
    builder = DATA_FILE_BUILDERS.get(Path(name).suffix)
    if builder is not None and Path(name).is_file():
        return load_dataset(builder, data_files=name, split="train")
    return load_dataset(name, config, split=split)


def is_pku_saferlhf(dataset: Dataset) -> bool:
    """Whether ``dataset`` has PKU-SafeRLHF's layout (a ``prompt`` and per-response safety labels)."""
    return "prompt" in dataset.column_names and all(c in dataset.column_names for c in PKU_SAFETY_COLUMNS)


def pku_saferlhf_prompts(
    dataset: Dataset, fraction: float = 1.0, seed: int = 42, harmful_only: bool = False
) -> Dataset:
    """PKU-SafeRLHF rows → unique conversational prompts.

    Each distinct prompt (whitespace-stripped, first occurrence kept) becomes
    ``{"prompt": [{"role": "user", "content": text}], "is_harmful": bool}``, where a prompt is harmful
    when any of its labelled responses (over all its rows) is unsafe: it elicited harm from some model.
    Then ``round(fraction · n)`` prompts (at least one) are drawn without replacement with ``seed``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or the data lacks the PKU-SafeRLHF columns.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {fraction}; the paper uses 0.4.")
    if not is_pku_saferlhf(dataset):
        raise ValueError(f"dataset_name: expected PKU-SafeRLHF columns prompt, {', '.join(PKU_SAFETY_COLUMNS)}; "
                         f"got {dataset.column_names}.")  # fmt: skip
    harmful: dict[str, bool] = {}
    for prompt, safe_0, safe_1 in zip(dataset["prompt"], *(dataset[c] for c in PKU_SAFETY_COLUMNS), strict=True):
        text = prompt.strip()
        harmful[text] = harmful.get(text, False) or not (safe_0 and safe_1)
    texts = [t for t in harmful if t and (harmful[t] or not harmful_only)]
    if not texts:
        raise ValueError("dataset_name: no prompts left (harmful_only filtered everything out).")
    unique = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": t}] for t in texts], "is_harmful": [harmful[t] for t in texts]}
    )
    count = max(1, round(fraction * len(unique)))
    return seeded_subset(unique, count, seed)


def preservation_pairs(
    dataset: Dataset,
    prompt_column: str,
    response_column: str,
    input_column: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Any prompt/response data (e.g. Alpaca's instruction/input/output) → ``messages`` conversations.

    ``input_column``, when given and non-empty, is appended to the prompt on a new line. With
    ``num_samples``, a seeded random subset of that size is kept (the paper: 1k Alpaca examples).
    """
    missing = [c for c in (prompt_column, response_column, input_column) if c and c not in dataset.column_names]
    if missing:
        raise ValueError(f"preservation_dataset: missing columns {missing}; it has {dataset.column_names}.")
    if num_samples is not None and num_samples < len(dataset):
        dataset = seeded_subset(dataset, num_samples, seed)

    def to_messages(example):
        prompt = example[prompt_column]
        if input_column and example[input_column]:
            prompt = f"{prompt}\n{example[input_column]}"
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": example[response_column]},
            ]
        }

    return dataset.map(to_messages, remove_columns=dataset.column_names)


def generate_preservation_responses(
    prompts: Sequence,
    model_name_or_path: str,
    max_new_tokens: int = 256,
    use_vllm: bool | None = None,
    batch_size: int = 8,
    tokenizer=None,
    model=None,
) -> Dataset:
    """Answer preservation prompts with the reference model (greedy), → ``messages`` conversations.

    Prompts are strings or conversations. vLLM is used when installed (``use_vllm=None``), else
    transformers ``generate`` in left-padded batches. Greedy decoding makes the set reproducible.
    """
    from trl.import_utils import is_vllm_available

    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    if not conversations:
        raise ValueError("preservation_dataset: no prompts to generate responses for.")
    if use_vllm is None:
        use_vllm = is_vllm_available()
    if use_vllm:
        responses = _generate_with_vllm(conversations, model_name_or_path, max_new_tokens)
    else:
        responses = _generate_with_transformers(
            conversations, model_name_or_path, max_new_tokens, batch_size, tokenizer, model
        )
    return Dataset.from_dict(
        {
            "messages": [
                [*c, {"role": "assistant", "content": r}] for c, r in zip(conversations, responses, strict=True)
            ]
        }
    )


def _generate_with_vllm(conversations, model_name_or_path: str, max_new_tokens: int) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_name_or_path)
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=True)
    return [output.outputs[0].text for output in outputs]


def _generate_with_transformers(conversations, model_name_or_path, max_new_tokens, batch_size, tokenizer, model):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_name_or_path)
    model = model or AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype="auto")
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(texts), batch_size), desc="preservation responses"):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(**batch.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return responses
