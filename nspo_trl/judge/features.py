"""The features the learned judge reads from a (prompt, response) pair.

Whether a response refuses is mostly decided in its opening, and whether it complies in what
follows: an apology followed by step-by-step instructions is compliance. A whole-response embedding
mixes the two (measured: 0.45 balanced accuracy on PyRIT's refusal labels with a linear head on it),
so the response is split into its *opening* (the first sentence, at most :data:`OPENING_CHARS`
characters) and the *rest*, and each is embedded on its own. With ``p``, ``o``, ``r`` the unit-norm
embeddings of the prompt, the opening and the rest (``r = 0`` when there is no rest), the pair's
feature vector is

    φ = [o, r, p ⊙ o, p ⊙ r, s]                      (4·384 + len(s) values)

where ``p ⊙ r`` (elementwise) carries how the rest relates to the request (an answer on topic, or
something else), and ``s`` are scalars: ``cos(p, o)``, ``cos(p, r)``, whether there is a rest, the
log word counts of opening and rest, and the two rule judges (a refusal phrase anywhere; a statement
of inability in the opening) as 0/1. The prompt alone is read by a separate head, from ``p``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from nspo_trl.judge.rules import DECLINE_PATTERN, REFUSAL_PATTERN, normalise

OPENING_CHARS = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
SCALAR_NAMES = ("cos_prompt_opening", "cos_prompt_rest", "has_rest", "log_words_opening", "log_words_rest",
                "keyword_refusal", "strict_decline_opening")  # fmt: skip


def split_response(text: str) -> tuple[str, str]:
    """``(opening, rest)``: the first sentence (cut at :data:`OPENING_CHARS`) and what follows, stripped."""
    text = text.strip()
    match = _SENTENCE_END.search(text)
    cut = match.start() if match else len(text)
    if cut > OPENING_CHARS:
        space = text.rfind(" ", 0, OPENING_CHARS)
        cut = space if space > 0 else OPENING_CHARS
    return text[:cut].strip(), text[cut:].strip()


def scalar_features(opening: str, rest: str, p: np.ndarray, o: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``s`` of the module docstring for one pair (``p``, ``o``, ``r``: unit-norm embeddings)."""
    whole = f"{opening} {rest}"
    return np.array(
        [
            float(p @ o),
            float(p @ r),
            float(bool(rest)),
            math.log1p(len(opening.split())),
            math.log1p(len(rest.split())),
            float(REFUSAL_PATTERN.search(whole) is not None),
            float(DECLINE_PATTERN.search(normalise(opening)) is not None),
        ],
        dtype=np.float32,
    )


def pair_features(
    openings: Sequence[str], rests: Sequence[str], p: np.ndarray, o: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """``(n, 4·384 + 7)`` feature rows φ from the split responses and the ``(n, 384)`` embeddings."""
    r = r * np.array([[float(bool(rest))] for rest in rests], dtype=np.float32)  # no rest: r = 0
    scalars = np.stack([scalar_features(a, b, *e) for a, b, *e in zip(openings, rests, p, o, r, strict=True)])
    return np.concatenate([o, r, p * o, p * r, scalars], axis=1).astype(np.float32)


def embed_pairs(embedder, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(φ, p)``: the ``(n, 4·384 + 7)`` pair features and the ``(n, 384)`` prompt embeddings.

    ``embedder`` maps texts to unit-norm ``(m, 384)`` embeddings; prompts, openings and rests go to it in
    one call.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"learned judge: {len(prompts)} prompts but {len(responses)} responses.")
    openings, rests = zip(*(split_response(r) for r in responses), strict=True) if responses else ((), ())
    n = len(prompts)
    embedded = embedder([*prompts, *openings, *rests])
    p, o, r = embedded[:n], embedded[n : 2 * n], embedded[2 * n :]
    return pair_features(openings, rests, p, o, r), p
