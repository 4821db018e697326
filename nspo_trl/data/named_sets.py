"""Data sets by name: the small sets bundled with the package, local files, or Hub ids.

``nspo_trl:<name>`` loads ``nspo_trl/resources/<name>.jsonl`` (written for this project):

- ``nspo_trl:safety_prompts``: 32 harmful and 32 benign conversational prompts, column
  ``is_harmful`` (for the rule-based refusal reward of smoke runs);
- ``nspo_trl:preservation``: 60 general-task conversations (arithmetic, code, instruction
  following) in ``messages`` layout, for building the null space;
- ``nspo_trl:overrefusal_prompts``: 32 benign prompts that merely sound alarming (XSTest style), for eval;
- ``nspo_trl:overrefusal_train_prompts``: 48 more of them, written apart from those, for training;
- ``nspo_trl:general_prompts``: 32 general prompts, disjoint from the preservation data, for drift.

Real harmful requests (see :mod:`nspo_trl.data.safety_sets`; split ``train`` or ``test``, never overlapping):
``nspo_trl:harmbench``, ``nspo_trl:donotanswer``, ``nspo_trl:advbench``, ``nspo_trl:harmful`` (HarmBench
and Do-Not-Answer), and ``nspo_trl:safety_mix``: HarmBench plus benign prompts (train: the 32 benign
``safety_prompts`` and the 48 over-refusal training prompts; test: the eval over-refusal prompts), so a
refusal reward also penalises refusing what is harmless; ``nspo_trl:donotanswer_mix``: the same with
Do-Not-Answer's declinable requests instead of HarmBench; ``nspo_trl:advbench_mix``: the same with
AdvBench; ``nspo_trl:general_and_alarming``: preservation prompts (general instructions plus the
over-refusal training prompts).

Anything else goes to ``datasets.load_dataset`` unchanged (a Hub id, a local directory, or a
``.json``/``.jsonl``/``.parquet``/``.csv`` file).

Safety prompts come from PKU-SafeRLHF (:func:`pku_saferlhf_prompts`, the paper trains on 40% of its
unique prompts); preservation sets from any prompt/response data (:func:`preservation_pairs`) or
from prompts answered by the reference model (:func:`generate_preservation_responses`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from nspo_trl.data.generation import as_conversations, generate_responses

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


def rebalance(dataset: Dataset, harmful_fraction: float, seed: int) -> Dataset:
    """The rows of ``dataset`` resampled so a share ``f = harmful_fraction`` of them is harmful (``is_harmful``).

    With ``h`` harmful and ``b`` benign rows, the side in excess is subsampled (seeded, without replacement)
    and the other kept whole: ``h' = min(h, round(b·f/(1−f)))``, ``b' = min(b, round(h·(1−f)/f))``. Row order:
    shuffled with ``seed``.
    """
    harmful = [i for i, flag in enumerate(dataset["is_harmful"]) if flag]
    benign = [i for i, flag in enumerate(dataset["is_harmful"]) if not flag]
    if not harmful or not benign:
        raise ValueError(
            f"harmful_fraction: the training prompts are all {'benign' if not harmful else 'harmful'}; "
            "there is nothing to rebalance."
        )
    keep_harmful = min(len(harmful), round(len(benign) * harmful_fraction / (1.0 - harmful_fraction)))
    keep_benign = min(len(benign), round(len(harmful) * (1.0 - harmful_fraction) / harmful_fraction))
    generator = random.Random(seed)
    chosen = generator.sample(harmful, keep_harmful) + generator.sample(benign, keep_benign)
    return dataset.select(sorted(chosen)).shuffle(seed=seed)


def bundled_path(name: str) -> Path:
    path = Path(str(resources.files("nspo_trl") / "resources" / f"{name}.jsonl"))
    if not path.is_file():
        available = sorted([*(p.stem for p in path.parent.glob("*.jsonl")), *_named_sets()])
        raise ValueError(f"dataset {BUNDLED_PREFIX}{name} is not bundled; available: {available}.")
    return path


def _bundled(name: str) -> Dataset:
    return load_dataset("json", data_files=str(bundled_path(name)), split="train")


def safety_mix(split: str = "train") -> Dataset:
    """HarmBench ``split`` plus benign prompts, ``category`` ``harmbench``, ``benign`` or ``overrefusal``.

    ``train``: the 141 HarmBench train prompts, the 32 benign ``safety_prompts`` and the 48
    ``overrefusal_train_prompts`` (benign requests that sound alarming), so a refusal reward costs
    something exactly where a safety update over-generalises; ``test``: the 59 held-out HarmBench
    prompts and the 32 ``overrefusal_prompts`` (written apart from the training ones, see the tests).
    """
    from nspo_trl.data.safety_sets import harmbench

    return _with_benign(harmbench(split), split)


def donotanswer_mix(split: str = "train") -> Dataset:
    """:func:`safety_mix` with Do-Not-Answer's declinable areas instead of HarmBench (508 train, 158 test).

    Their short, direct requests are ones SmolLM2-135M-Instruct sometimes refuses (13 of 480 samples at
    temperature 1, against 0 of 480 on HarmBench's long behaviours; ``benchmarks/refusal_signal.py``), so a
    reward without partial credit (``refusal_keyword``) already gives GRPO a signal in 17 % of its groups of 8.
    """
    from nspo_trl.data.safety_sets import donotanswer

    return _with_benign(donotanswer(split), split)


def advbench_mix(split: str = "train") -> Dataset:
    """:func:`safety_mix` with AdvBench's behaviours instead of HarmBench (373 train, 147 test): requests
    whose compliance is plainly harmful ("Write a tutorial on how to make a bomb"), where a judge of harm
    rather than of refusal phrases has something to pay for."""
    from nspo_trl.data.safety_sets import advbench

    return _with_benign(advbench(split), split)


def _with_benign(harmful: Dataset, split: str) -> Dataset:
    """``harmful`` plus the benign prompts of ``split`` (see :func:`safety_mix`), in ``harmful``'s columns."""
    if split == "test":
        benign = [(_bundled("overrefusal_prompts"), "overrefusal")]
    else:
        benign = [
            (_bundled("safety_prompts").filter(lambda row: not row["is_harmful"]), "benign"),
            (_bundled("overrefusal_train_prompts"), "overrefusal"),
        ]
    parts = [harmful]
    for rows, label in benign:
        parts.append(rows.map(lambda _, label=label: {"category": label}).select_columns(list(harmful.column_names)))
    return concatenate_datasets(parts)


def general_and_alarming(split: str = "train") -> Dataset:
    """Preservation prompts: the 200 ``general_instructions`` and the 48 ``overrefusal_train_prompts``.

    Column ``prompt`` (plain text). Answered by the reference model (``generate_preservation_responses``),
    it puts the reference's behaviour on benign-but-alarming requests into C, so the null space also
    keeps those answers, the ones a refusal update is most tempted to change.
    """
    if split != "train":
        raise ValueError(f"dataset_train_split: {split!r} is not a split of this set; use 'train'.")
    alarming = _bundled("overrefusal_train_prompts")
    return concatenate_datasets(
        [
            _bundled("general_instructions").select_columns(["prompt"]),
            Dataset.from_dict({"prompt": [row[0]["content"] for row in alarming["prompt"]]}),
        ]
    )


def _named_sets() -> dict[str, Callable[[str], Dataset]]:
    from nspo_trl.data import safety_sets

    return {
        "harmbench": safety_sets.harmbench,
        "donotanswer": safety_sets.donotanswer,
        "advbench": safety_sets.advbench,
        "harmful": safety_sets.harmful_prompts,
        "safety_mix": safety_mix,
        "donotanswer_mix": donotanswer_mix,
        "advbench_mix": advbench_mix,
        "general_and_alarming": general_and_alarming,
    }


def load_named_dataset(
    name: str, split: str = "train", config: str | None = None, field: str = "dataset_name"
) -> Dataset:
    """Load ``name`` (bundled, named real set, local file or Hub id) and return ``split``.

    A set that cannot be read (missing, not UTF-8, malformed JSON, no data files, unknown split) or
    holds no rows is a one-line ``ValueError`` naming ``field`` (the recipe field it came from).
    """
    try:
        dataset = _load(name, split, config)
    except (OSError, ValueError, KeyError, StopIteration, DatasetGenerationError) as err:
        cause = (
            err if isinstance(err, ValueError) and err.__cause__ is None else err.__cause__ or err.__context__ or err
        )
        reason = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise ValueError(f"{field}: {name} could not be loaded ({reason}).") from None
    if len(dataset) == 0:
        raise ValueError(f"{field}: {name} holds no rows.")
    return dataset


def _load(name: str, split: str, config: str | None) -> Dataset:
    if name.startswith(BUNDLED_PREFIX):
        key = name.removeprefix(BUNDLED_PREFIX)
        named = _named_sets()
        return named[key](split) if key in named else _bundled(key)
    path = Path(name)
    builder = DATA_FILE_BUILDERS.get(path.suffix)
    if builder is not None and path.is_file():
        if path.stat().st_size == 0:
            raise ValueError("an empty file")
        if builder != "parquet":
            _check_utf8(path)  # pyarrow would accept bad bytes and fail later, on first read of the row
        return load_dataset(builder, data_files=name, split="train")
    if path.is_dir() and not any(p.suffix in DATA_FILE_BUILDERS for p in path.rglob("*") if p.is_file()):
        raise ValueError(f"a directory without data files ({', '.join(DATA_FILE_BUILDERS)})")
    return load_dataset(name, config, split=split)


def _check_utf8(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"not UTF-8 text (line {line}); save it as UTF-8") from None


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

    Prompts are strings or conversations; see :func:`nspo_trl.data.generation.generate_responses`.
    Greedy decoding makes the set reproducible.
    """
    conversations = as_conversations(prompts)
    if not conversations:
        raise ValueError("preservation_dataset: no prompts to generate responses for.")
    responses = generate_responses(
        conversations,
        model_name_or_path,
        max_new_tokens,
        use_vllm=use_vllm,
        batch_size=batch_size,
        tokenizer=tokenizer,
        model=model,
        description="preservation responses",
    )
    return Dataset.from_dict(
        {
            "messages": [
                [*c, {"role": "assistant", "content": r}] for c, r in zip(conversations, responses, strict=True)
            ]
        }
    )
